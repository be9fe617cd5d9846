"""HF / GGUF state dicts -> Flax NNX `CausalLM`, through one strict mapping table.

The table maps each HF key pattern to a target parameter path and a transform (`T` transposes
torch's `[out, in]` Linear weight to our `[in, out]` kernel). Loading:

1. build the *abstract* model (`nnx.eval_shape`, nothing allocated) and each parameter's
   `NamedSharding` from the rules table;
2. stream source tensors one at a time (memory-mapped safetensors or dequantised GGUF), check the
   shape and finiteness, cast, and `jax.device_put` straight onto the target sharding;
3. fail with *one* error listing every unexpected key, missing parameter, shape mismatch and
   non-finite tensor, naming the file each came from. Nothing is zero-filled.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from hilora_jax.io.safetensors import (
    CheckpointError,
    SafetensorsFile,
    all_finite,
    checkpoint_files,
    place_tensor,
)
from hilora_jax.model import sharding as shd
from hilora_jax.model.config import ModelConfig
from hilora_jax.model.llama import CausalLM

_T = lambda a: np.swapaxes(a, -1, -2)
_ID = lambda a: a

# (HF key regex, target path template, transform). `{0}` is the layer index.
LLAMA_TABLE: list[tuple[str, str, Callable]] = [
    (r"model\.embed_tokens\.weight", "model.embed_tokens.embedding", _ID),
    (r"model\.norm\.weight", "model.norm.weight", _ID),
    (r"lm_head\.weight", "lm_head.kernel", _T),
    (r"model\.layers\.(\d+)\.self_attn\.(q|k|v|o)_proj\.weight", "model.layers.{0}.self_attn.{1}_proj.kernel", _T),
    (r"model\.layers\.(\d+)\.self_attn\.(q|k|v|o)_proj\.bias", "model.layers.{0}.self_attn.{1}_proj.bias", _ID),
    (r"model\.layers\.(\d+)\.self_attn\.(q|k)_norm\.weight", "model.layers.{0}.self_attn.{1}_norm.weight", _ID),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", "model.layers.{0}.mlp.{1}_proj.kernel", _T),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.bias", "model.layers.{0}.mlp.{1}_proj.bias", _ID),
    (r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight", "model.layers.{0}.{1}.weight", _ID),
]
# Keys some checkpoints carry that we deliberately do not use (recomputed from the config).
IGNORED_KEYS = [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]

class KeyMapper:
    """HF tensor key -> `(target parameter path, transform)` from a `(regex, template, transform)`
    table (first full match wins; `{i}` in the template is the regex's group i), plus the keys to
    skip (`ignored`, full-match regexes). One mapper per model family (Llama here, T5 in
    `hilora_jax.t5.load`)."""

    def __init__(self, table: list[tuple[str, str, Callable]], ignored: list[str] = ()):
        self.table = list(table)
        self._compiled = [(re.compile(p + "$"), t, f) for p, t, f in self.table]
        self._ignored = [re.compile(p) for p in ignored]

    def ignored(self, key: str) -> bool:
        """Whether `key` is a tensor the loader deliberately skips."""
        return any(p.fullmatch(key) for p in self._ignored)

    def __call__(self, key: str) -> tuple[str, Callable] | None:
        for pat, tmpl, fn in self._compiled:
            m = pat.match(key)
            if m:
                return tmpl.format(*m.groups()), fn
        return None


LLAMA_KEYS = KeyMapper(LLAMA_TABLE, IGNORED_KEYS)


def map_key(key: str) -> tuple[str, Callable] | None:
    return LLAMA_KEYS(key)


def _path_str(path) -> str:
    return ".".join(str(p) for p in path)


def abstract_model(cfg: ModelConfig, dtype=jnp.float32) -> tuple[nnx.GraphDef, dict]:
    """Graph definition and `{path: ShapeDtypeStruct}` of the model, allocating nothing."""
    abs_model = nnx.eval_shape(lambda: CausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abs_model)
    flat = {_path_str(p): v for p, v in nnx.to_flat_state(state)}
    return graphdef, state, flat



class StrictFill:
    """Fills abstract parameters (`flat`: target path -> abstract array) from checkpoint tensors,
    strictly, collecting every problem instead of stopping at the first: each tensor maps to one
    parameter of this config, once, with its shape (reported in the file's orientation) and finite
    values (checked in the file's dtype: no float32 copy); each is cast per device shard straight
    onto its sharding, and the host tensor freed before the next is read. Llama and T5 loaders."""

    def __init__(self, flat: dict):
        self.flat = flat
        self.filled: dict[str, jax.Array] = {}
        self.seen_from: dict[str, str] = {}
        self.problems: list[str] = []
        self.bad: set[str] = set()  # reported already: not "missing" as well

    def add(self, key: str, src: str, target: str, fn, load, *, dtype, sharding_of,
            absent: str) -> None:
        """Tensor `key` of file `src` -> parameter `target` (`fn` maps the file's layout to it;
        `load()` reads it; `sharding_of(target, shape)` or None; `absent` ends the message when
        the config has no such parameter)."""
        if target not in self.flat:
            self.problems.append(f"tensor {key!r} in {src} {absent}")
            return
        if target in self.filled:
            self.problems.append(f"tensor {key!r} in {src} fills {target!r} a second time "
                                 f"(first from {self.seen_from[target]})")
            return
        arr = fn(load())
        want = tuple(self.flat[target].shape)
        if tuple(arr.shape) != want:
            self.bad.add(target)
            file_shape, file_want = ((arr.shape[::-1], want[::-1]) if fn is _T
                                     else (arr.shape, want))
            self.problems.append(f"tensor {key!r} in {src} has shape {tuple(file_shape)}, "
                                 f"expected {tuple(file_want)} for {target}")
            return
        if not all_finite(arr):
            self.bad.add(target)
            self.problems.append(f"tensor {key!r} in {src} contains NaN or inf")
            return
        self.filled[target] = place_tensor(arr, dtype(target) if callable(dtype) else dtype,
                                           sharding_of(target, want) if sharding_of else None)
        del arr
        self.seen_from[target] = src

    def missing(self) -> list[str]:
        """Parameters no tensor filled (those with a reported bad tensor excluded)."""
        return sorted(set(self.flat) - set(self.filled) - self.bad)

def build_model(
    cfg: ModelConfig,
    tensors: Iterable[tuple[str, Callable[[], np.ndarray], str]],
    *,
    dtype=jnp.float32,
    mesh: Mesh | None = None,
    progress: Callable[[int, int], None] | None = None,
    total: int | None = None,
) -> CausalLM:
    """Fill a `CausalLM` from `(hf_key, load_fn, source_file)` triples, strictly.

    Each array is checked and placed directly onto its `NamedSharding` (when `mesh` is given),
    so no full host copy of the model is ever assembled.
    """
    graphdef, state, flat = abstract_model(cfg, dtype)
    fill = StrictFill(flat)
    problems = fill.problems
    tied_lm_head = None
    for i, (key, load, src) in enumerate(tensors):
        if progress is not None:
            progress(i + 1, total or 0)
        if LLAMA_KEYS.ignored(key):
            continue
        m = LLAMA_KEYS(key)
        if m is None:
            problems.append(f"unexpected tensor {key!r} in {src}")
            continue
        target, fn = m
        if target == "lm_head.kernel" and cfg.tie_word_embeddings:
            tied_lm_head = (key, load, src)  # checked against the embedding below
            continue
        fill.add(key, src, target, fn, load, dtype=jnp.dtype(dtype),
                 sharding_of=(lambda t, shape: shd.param_sharding(t, shape, mesh)) if mesh else None,
                 absent=f"maps to {target!r}, which this config ({cfg.model_type}) does not have")
    filled = fill.filled
    for t in fill.missing():
        problems.append(f"missing tensor for parameter {t}")
    if tied_lm_head is not None and "model.embed_tokens.embedding" in filled:
        key, load, src = tied_lm_head
        head = np.asarray(load(), np.float32)
        emb = np.asarray(filled["model.embed_tokens.embedding"], np.float32)
        if head.shape != emb.shape or not np.allclose(head, emb):
            problems.append(f"tensor {key!r} in {src} differs from the embedding, but the config "
                            "says tie_word_embeddings=true")
    if problems:
        raise CheckpointError(f"{len(problems)} problem(s) loading weights:\n  " + "\n  ".join(problems))
    for path, var in nnx.to_flat_state(state):
        var.set_value(filled[_path_str(path)])
    return nnx.merge(graphdef, state)


def iter_safetensors(model_dir: str | Path):
    """Yield `(key, load_fn, file)` for every tensor of a HF model directory."""
    for f in checkpoint_files(model_dir):
        st = SafetensorsFile(f)
        for key in st:
            yield key, (lambda st=st, key=key: st[key]), str(f)


def count_tensors(model_dir: str | Path) -> int:
    return sum(len(SafetensorsFile(f)) for f in checkpoint_files(model_dir))


def read_hf_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{model_dir}: no config.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e
    return ModelConfig.from_hf_config(raw, source=str(path))


def load_hf_dir(model_dir: str | Path, *, dtype=jnp.float32, mesh: Mesh | None = None,
                progress: Callable[[int, int], None] | None = None) -> CausalLM:
    cfg = read_hf_config(model_dir)
    return build_model(cfg, iter_safetensors(model_dir), dtype=dtype, mesh=mesh,
                       progress=progress, total=count_tensors(model_dir))


def load_state_dict(cfg: ModelConfig, tensors: Mapping[str, np.ndarray], *, source: str,
                    dtype=jnp.float32, mesh: Mesh | None = None, progress=None) -> CausalLM:
    """Build a model from an in-memory HF-named state dict (e.g. from a GGUF file)."""
    items = ((k, (lambda v=v: v), source) for k, v in tensors.items())
    return build_model(cfg, items, dtype=dtype, mesh=mesh, progress=progress, total=len(tensors))
