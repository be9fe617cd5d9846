# ruff: noqa: F722  (jaxtyping shape strings are not forward references)
"""sentence-transformers checkpoints (Transformer -> Pooling -> [Normalize]) run in JAX.

`SentenceEmbedder` reproduces ``SentenceTransformer(path).encode(texts)`` for BERT-family checkpoints
(all-MiniLM-L6-v2 is the project default) without torch:

* **Reading the checkpoint.** ``modules.json`` must be exactly ``Transformer, Pooling[, Normalize]``;
  anything else (Dense, LayerNorm, ...) raises naming the module. ``sentence_bert_config.json``,
  ``1_Pooling/config.json`` and ``2_Normalize/config.json`` go through allowlists like the HF config does
  in `bert.py`: a field whose value would change the result and that we do not implement raises, naming
  the field and the file. Both the legacy (``pooling_mode_mean_tokens: true``, ``max_seq_length`` in
  ``sentence_bert_config.json``) and the sentence-transformers >= 5 formats (``pooling_mode: "mean"``,
  ``model_max_length`` in ``tokenizer_config.json``) are read.
* **Tokenizing like sentence-transformers.** ``transformers.AutoTokenizer`` from the checkpoint, truncation
  ``longest_first`` at ``max_seq_length``, lower-casing first when ``do_lower_case`` is set.
* **Stable shapes.** Texts are tokenized once, sorted by length, and cut into batches; each batch is
  right-padded to the next *length bucket* (powers of two from 8, capped at ``max_seq_length``) and its
  row count to the next power of two (capped at ``batch_size``). Padded keys get exactly zero attention
  weight and padded rows are dropped, so bucketing changes no result, and a long-running process compiles
  at most ``log2(max_seq_length) * log2(batch_size)`` programs instead of one per new batch shape.
* **One jitted pure function.** The model is split once (``nnx.split``); ``_embed_fn`` merges the
  parameters inside ``jax.jit``, runs the encoder, pools and optionally normalizes.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float

from hilora_jax.embed.bert import BertModel, load_bert

POOLING_MODES: tuple[str, ...] = (
    "cls",
    "max",
    "mean",
    "mean_sqrt_len_tokens",
    "weightedmean",
    "lasttoken",
)
# Legacy boolean keys, in the concatenation order sentence-transformers uses for them.
_LEGACY_POOLING_KEYS: dict[str, str] = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
MINILM_NAMES: frozenset[str] = frozenset({"minilm", "all-minilm-l6-v2"})
MIN_BUCKET = 8


# --------------------------------------------------------------------------------------------------
# Pure math: pooling and normalization
# --------------------------------------------------------------------------------------------------


def pool(
    h: Float[Array, "B T D"], mask: Bool[Array, "B T"], modes: tuple[str, ...]
) -> Float[Array, "B M"]:
    """sentence-transformers pooling of token states; several modes concatenate (``M = len(modes) * D``)."""
    t = h.shape[1]
    m = mask.astype(h.dtype)[..., None]  # BT1
    count = jnp.sum(m, axis=1)  # B1
    first = jnp.argmax(mask, axis=1)  # B: first real token (0 under right padding)
    out = []
    for mode in modes:
        if mode == "cls":
            out.append(jnp.take_along_axis(h, first[:, None, None], axis=1)[:, 0])  # BD
        elif mode == "max":
            out.append(jnp.max(jnp.where(m > 0, h, -jnp.inf), axis=1))  # BD
        elif mode == "mean":
            out.append(jnp.sum(h * m, axis=1) / jnp.maximum(count, 1e-9))
        elif mode == "mean_sqrt_len_tokens":
            out.append(jnp.sum(h * m, axis=1) / jnp.sqrt(jnp.maximum(count, 1e-9)))
        elif mode == "weightedmean":
            w = (jnp.arange(1, t + 1, dtype=h.dtype)[None, :] - first[:, None].astype(h.dtype))[
                ..., None
            ]  # BT1
            wm = m * w
            out.append(jnp.sum(h * wm, axis=1) / jnp.maximum(jnp.sum(wm, axis=1), 1e-9))
        elif mode == "lasttoken":
            rev = mask[:, ::-1]
            idx = jnp.where(jnp.any(mask, axis=1), jnp.argmax(rev, axis=1), t - 1)  # from the end
            out.append(jnp.take_along_axis(h * m, (t - 1 - idx)[:, None, None], axis=1)[:, 0])
        else:
            raise ValueError(f"unknown pooling mode {mode!r}")
    return jnp.concatenate(out, axis=-1)


def l2_normalize(x: Float[Array, "B M"]) -> Float[Array, "B M"]:
    """``torch.nn.functional.normalize(x, p=2, dim=-1)``: divide by ``max(||x||, 1e-12)``."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _embed_fn(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    input_ids: jax.Array,
    token_type_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    modes: tuple[str, ...],
    normalize: bool,
) -> jax.Array:
    model: BertModel = nnx.merge(graphdef, state)
    h = model(input_ids, attention_mask, token_type_ids)  # BTD
    x = pool(h, attention_mask.astype(bool), modes)  # BM
    return l2_normalize(x) if normalize else x


def bucket_lengths(max_seq_length: int, min_len: int = MIN_BUCKET) -> tuple[int, ...]:
    """Padded lengths used: powers of two from ``min_len`` below ``max_seq_length``, then ``max_seq_length``."""
    out = []
    n = min_len
    while n < max_seq_length:
        out.append(n)
        n *= 2
    return (*out, max_seq_length)


def _round_up(n: int, buckets: Sequence[int]) -> int:
    return next(b for b in buckets if b >= n)


# --------------------------------------------------------------------------------------------------
# Reading a sentence-transformers directory
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SentenceConfig:
    """What the checkpoint's sentence-transformers files decide."""

    model_dir: Path  # holds config.json, model.safetensors and the tokenizer
    max_seq_length: int | None  # None: take the tokenizer's model_max_length
    do_lower_case: bool
    pooling_modes: tuple[str, ...]
    normalize: bool
    tokenizer_kwargs: Mapping[str, Any]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} is missing (not a sentence-transformers checkpoint?)"
        ) from None


def _read_transformer_config(path: Path) -> tuple[int | None, bool, dict[str, Any]]:
    cfg = _read_json(path) if path.exists() else {}
    errors = []
    tok_kwargs: dict[str, Any] = {}
    for key, value in cfg.items():
        if key in ("max_seq_length", "do_lower_case", "unpad_inputs"):
            continue
        if key == "transformer_task" and value == "feature-extraction":
            continue
        if key == "module_output_name" and value in (None, "token_embeddings"):
            continue
        if key == "modality_config" and value in (
            None,
            {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
        ):
            continue  # fmt: skip
        if (
            key in ("query_length", "document_length", "query_expansion", "processing_kwargs")
            and not value
        ):
            continue
        if key in ("tokenizer_args", "processor_kwargs") and isinstance(value, dict):
            tok_kwargs.update({k: v for k, v in value.items() if k != "trust_remote_code"})
            continue
        if key in ("model_args", "model_kwargs", "config_args", "config_kwargs") and not {
            k for k in (value or {}) if k != "trust_remote_code"
        }:
            continue
        errors.append(f"{key!r}={value!r}")
    if errors:
        raise ValueError(f"unsupported field(s) in {path}: " + ", ".join(errors))
    max_len = cfg.get("max_seq_length")
    return (
        (int(max_len) if max_len is not None else None),
        bool(cfg.get("do_lower_case", False)),
        tok_kwargs,
    )


def _read_pooling_config(path: Path, hidden_size: int) -> tuple[str, ...]:
    cfg = _read_json(path)
    known = {"pooling_mode", "embedding_dimension", "word_embedding_dimension", "include_prompt"}
    unknown = sorted(k for k in cfg if k not in known and k not in _LEGACY_POOLING_KEYS)
    if unknown:
        raise ValueError(f"unsupported field(s) {unknown} in {path}")
    dim = cfg.get("embedding_dimension", cfg.get("word_embedding_dimension"))
    if dim is not None and int(dim) != hidden_size:
        raise ValueError(
            f"'embedding_dimension'={dim} in {path} but the encoder's hidden_size is {hidden_size}"
        )
    if "pooling_mode" in cfg:  # sentence-transformers >= 5; legacy keys are then ignored, as there
        raw = cfg["pooling_mode"]
        modes = (raw,) if isinstance(raw, str) else tuple(raw)
    else:
        modes = tuple(
            mode for key, mode in _LEGACY_POOLING_KEYS.items() if cfg.get(key, False)
        ) or ("mean",)
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad or not modes:
        raise ValueError(
            f"unsupported 'pooling_mode' {bad or modes!r} in {path} (supported: {POOLING_MODES})"
        )
    return modes


def read_sentence_config(root: str | Path, hidden_size: int | None = None) -> SentenceConfig:
    """Parse ``modules.json`` and the per-module configs of a sentence-transformers directory."""
    root = Path(root)
    modules = sorted(_read_json(root / "modules.json"), key=lambda m: int(m.get("idx", 0)))
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise ValueError(
            f"{root / 'modules.json'} lists modules {[m.get('type') for m in modules]}; only "
            "Transformer -> Pooling [-> Normalize] is supported"
        )
    model_dir = root / modules[0].get("path", "")
    if hidden_size is None:
        hidden_size = int(_read_json(model_dir / "config.json")["hidden_size"])
    max_len, lower, tok_kwargs = _read_transformer_config(model_dir / "sentence_bert_config.json")
    modes = _read_pooling_config(root / modules[1]["path"] / "config.json", hidden_size)
    normalize = len(modules) == 3
    if normalize:
        norm_cfg_path = root / modules[2].get("path", "") / "config.json"
        norm_cfg = (
            _read_json(norm_cfg_path) if modules[2].get("path") and norm_cfg_path.exists() else {}
        )
        for key in ("module_input_name", "module_output_name"):
            if norm_cfg.get(key, "sentence_embedding") != "sentence_embedding":
                raise ValueError(f"unsupported {key!r}={norm_cfg[key]!r} in {norm_cfg_path}")
    return SentenceConfig(model_dir, max_len, lower, modes, normalize, tok_kwargs)


def resolve_checkpoint(name_or_path: str | os.PathLike[str]) -> Path:
    """Local directory for ``"minilm"``, a path, or a HF Hub id (downloaded unless offline)."""
    name = os.fspath(name_or_path)
    if name.lower() in MINILM_NAMES:
        from hilora_jax.io.assets import minilm_dir

        return minilm_dir()
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"{name!r} is not a sentence-transformers checkpoint directory")
    from huggingface_hub import constants, snapshot_download

    repo_id = name if "/" in name else f"sentence-transformers/{name}"
    offline = bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "0").lower() in (
        "1",
        "true",
        "yes",
    )
    try:
        return Path(snapshot_download(repo_id, local_files_only=offline))
    except Exception as e:  # hub errors come in many classes; re-raise one clear message
        if offline:
            raise OSError(
                f"{name!r} is not a local directory and the Hugging Face Hub is offline (HF_HUB_OFFLINE=1), "
                f"and {repo_id!r} is not in the local HF cache. Pass a local checkpoint directory or 'minilm'."
            ) from e
        raise OSError(f"could not download {repo_id!r} from the Hugging Face Hub: {e}") from e


# --------------------------------------------------------------------------------------------------
# The embedder
# --------------------------------------------------------------------------------------------------


class SentenceEmbedder:
    """Flax port of a BERT-family sentence-transformers model. Satisfies `hilora_jax.embed.Embedder`."""

    def __init__(self, model: BertModel, tokenizer: Any, config: SentenceConfig, *, name: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.name = name
        max_pos = model.config.max_position_embeddings
        if config.max_seq_length is not None:
            if config.max_seq_length > max_pos:
                raise ValueError(
                    f"'max_seq_length'={config.max_seq_length} in {config.model_dir / 'sentence_bert_config.json'}"
                    f" exceeds max_position_embeddings={max_pos}"
                )
            self.max_seq_length = config.max_seq_length
        else:  # sentence-transformers >= 5 stores it as the tokenizer's model_max_length
            self.max_seq_length = int(min(tokenizer.model_max_length, max_pos))
        self.dim: int = model.config.hidden_size * len(config.pooling_modes)
        self.buckets = bucket_lengths(self.max_seq_length, min(MIN_BUCKET, self.max_seq_length))
        graphdef, state = nnx.split(model)
        self._state = state
        self._fn = jax.jit(
            functools.partial(
                _embed_fn, graphdef, modes=config.pooling_modes, normalize=config.normalize
            )
        )

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str] = "minilm") -> SentenceEmbedder:
        """Load from a sentence-transformers directory, a HF Hub id, or ``"minilm"``/``"all-MiniLM-L6-v2"``."""
        from transformers import AutoTokenizer

        root = resolve_checkpoint(name_or_path)
        config = read_sentence_config(root)
        model = load_bert(config.model_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(config.model_dir), **config.tokenizer_kwargs)
        return cls(model, tokenizer, config, name=os.fspath(name_or_path))

    def tokenize(self, texts: Sequence[str]) -> dict[str, list[list[int]]]:
        """Token ids / type ids per text, truncated like sentence-transformers (no padding)."""
        if self.config.do_lower_case:
            texts = [t.lower() for t in texts]
        enc = self.tokenizer(
            list(texts),
            truncation="longest_first",
            max_length=self.max_seq_length,
            padding=False,
            return_token_type_ids=True,
            return_attention_mask=False,
        )
        return {"input_ids": enc["input_ids"], "token_type_ids": enc["token_type_ids"]}

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Embeddings ``[n, dim]`` float32, row ``i`` for ``texts[i]`` (same as ``SentenceTransformer.encode``)."""
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not a single string")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(texts)
        out = np.zeros((n, self.dim), np.float32)
        if n == 0:
            return out
        enc = self.tokenize(texts)
        ids, types = enc["input_ids"], enc["token_type_ids"]
        order = sorted(range(n), key=lambda i: -len(ids[i]))  # similar lengths share a bucket
        row_buckets = [2**k for k in range(int(math.log2(batch_size)) + 1)]
        if row_buckets[-1] != batch_size:
            row_buckets.append(batch_size)
        pad_id = self.tokenizer.pad_token_id or 0
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            t = _round_up(max(len(ids[i]) for i in rows), self.buckets)
            b = _round_up(len(rows), row_buckets)
            input_ids = np.full((b, t), pad_id, np.int32)
            type_ids = np.zeros((b, t), np.int32)
            mask = np.zeros((b, t), np.int32)
            mask[:, 0] = 1  # padding rows: one token, so no pooling sees an empty row
            for r, i in enumerate(rows):
                input_ids[r, : len(ids[i])] = ids[i]
                type_ids[r, : len(types[i])] = types[i]
                mask[r, : len(ids[i])] = 1
            vecs = self._fn(self._state, input_ids, type_ids, mask)  # BM
            out[rows] = np.asarray(vecs)[: len(rows)]
        return out

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return self.embed(texts)

    def __repr__(self) -> str:
        return (
            f"SentenceEmbedder({self.name!r}, dim={self.dim}, max_seq_length={self.max_seq_length}, "
            f"pooling={self.config.pooling_modes}, normalize={self.config.normalize})"
        )
