"""PEFT LoRA adapters for T5 / FLAN-T5, read strictly, and a one-adapter delta hook.

PEFT's T5 module keys are the base model's module paths, `encoder.block.{i}.layer.0.SelfAttention.q`,
`decoder.block.{i}.layer.1.EncDecAttention.v`, `decoder.block.{i}.layer.2.DenseReluDense.wi_0`, ...
(tensors `base_model.model.{key}.lora_A.weight` `[r, d_in]` and `.lora_B.weight` `[d_out, r]`).
Targeting, `layers_to_transform` / `layers_pattern`, `exclude_modules`, per-module ranks and alphas
(`rank_pattern`, `alpha_pattern`) and the scale (`alpha / r`, or `alpha / sqrt(r)` with
`use_rslora`) follow peft exactly through `hilora_jax.io.peft`'s helpers; the config field
policy is the same as for Llama adapters (maths-changing fields refused, unknown set fields refused).
`target_modules: null` is PEFT's T5 default, `["q", "v"]`.

The tensor keys are the truth about which modules are adapted; the set the config predicts is
cross-checked against them. A Llama-family adapter (`model.layers.{l}.self_attn.q_proj`) on a T5
base, or a T5 adapter whose shapes do not fit the base, is refused in one line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import struct

from hilora_jax.io.peft import (
    AdapterError,
    AdapterFamily,
    PeftAdapter,
    _read_tensors,
    _repr_short,
    check_config,
    is_targeted,
    lora_pair,
    module_rank_alpha,
)
from hilora_jax.model.hook import LoraHook
from hilora_jax.t5.config import T5Config
from hilora_jax.t5.model import split_module_key
from hilora_jax.t5.projections import module_shapes

DEFAULT_TARGETS = ("q", "v")  # PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["t5"]
T5_NAMES = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")
_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_(A|B)\.weight$")
_LLAMA = re.compile(r"(^|\.)layers\.\d+\.(self_attn|mlp)\.")


def _check_t5_targets(tm: Any, bad, where: str) -> None:
    if isinstance(tm, list):
        if not tm or not all(isinstance(e, str) and e for e in tm):
            raise bad("target_modules", f"= {_repr_short(tm)} must be a non-empty list of names")
        llama = [e for e in tm if e.rsplit(".", 1)[-1].endswith("_proj")]
        if llama and not any(e.rsplit(".", 1)[-1] in T5_NAMES for e in tm):
            raise bad("target_modules", f"= {_repr_short(tm)} names Llama-family projections "
                      f"({llama[0]!r}); a T5 adapter targets {', '.join(T5_NAMES)}")
    elif isinstance(tm, str):
        try:
            re.compile(tm)
        except re.error as e:
            raise bad("target_modules", f"= {tm!r} is not a valid regular expression ({e})") from e
    else:
        raise bad("target_modules", f"= {_repr_short(tm)} must be null, a string or a list")


T5_FAMILY = AdapterFamily("T5", DEFAULT_TARGETS, _check_t5_targets)


def check_t5_config(cfg: Any, name: str, *, source: str | None = None) -> dict:
    """The adapter field policy (`hilora_jax.io.peft.check_config`) with T5 targets."""
    return check_config(cfg, name, source=source, family=T5_FAMILY)


@dataclass
class T5LoraAdapter:
    """One adapter in host memory: `modules[path] = (A [r, d_in], B [d_out, r], scale)` (float32,
    PEFT's layout), `path` the HF module path."""

    name: str
    source: str
    config: dict
    modules: dict[str, tuple[np.ndarray, np.ndarray, float]] = field(default_factory=dict)


def read_t5_adapter(src: str | Path, model_cfg: T5Config, *, name: str | None = None
                    ) -> T5LoraAdapter:
    """Read and check one PEFT adapter directory against a T5 base config (see module doc)."""
    d = Path(src)
    name = name or d.name
    if not d.is_dir():
        raise AdapterError(f"adapter {name!r}: {d} is not a directory")
    cpath = d / "adapter_config.json"
    try:
        raw = json.loads(cpath.read_text())
    except FileNotFoundError as e:
        raise AdapterError(f"adapter {name!r}: {cpath} does not exist") from e
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"adapter {name!r}: {cpath}: unreadable ({e})") from e
    cfg = check_t5_config(raw, name, source=str(cpath))
    tensors, tpath = _read_tensors(d, name)
    shapes = module_shapes(model_cfg)
    found: dict[str, dict[str, str]] = {}
    for k in tensors:
        m = _KEY.match(k)
        if m and _LLAMA.search(m.group(1)):
            raise AdapterError(f"adapter {name!r}: {tpath}: {k!r} is a Llama-family module; this "
                               "adapter does not fit a T5 base")
        if m is None or m.group(1) not in shapes:
            raise AdapterError(f"adapter {name!r}: {tpath}: unexpected tensor {k!r} (not LoRA A/B "
                               f"of a projection of this T5 base: {model_cfg.variant}, "
                               f"{model_cfg.num_layers}+{model_cfg.num_decoder_layers} blocks)")
        found.setdefault(m.group(1), {})[m.group(2)] = k
    if not found:
        raise AdapterError(f"adapter {name!r}: {tpath} holds no LoRA tensors")
    want = {p for p in shapes if is_targeted(cfg, p)}
    if want != set(found):
        raise AdapterError(f"adapter {name!r}: tensors and config disagree on the adapted modules: "
                           f"config targets but no tensors: {sorted(want - set(found))[:6]}; "
                           f"tensors but not targeted: {sorted(set(found) - want)[:6]}")
    ad = T5LoraAdapter(name=name, source=str(d), config=cfg)
    for path, sides in sorted(found.items()):
        r, _, scale = module_rank_alpha(cfg, path)
        a, b = lora_pair(name, tpath, tensors, sides, r, shapes[path],
                         lambda side, path=path: f"base_model.model.{path}.lora_{side}.weight")
        ad.modules[path] = (a, b, scale)
    return ad


def to_peft_adapter(ad: T5LoraAdapter) -> PeftAdapter:
    """The adapter as the pool's host type (`io.peft.PeftAdapter`): `modules[(block, row)] =
    (A [r, d_in], B [r, d_out] rows, scale)`, keyed like the hook (`split_module_key`)."""
    out = PeftAdapter(name=ad.name, source=ad.source, config=ad.config,
                      r=int(ad.config.get("r", 8)))
    for path, (a, b, scale) in ad.modules.items():
        out.modules[split_module_key(path)] = (a, np.ascontiguousarray(b.T), scale)
    return out


def read_t5_pool_adapter(src: str | Path, model_cfg: T5Config, *, name: str | None = None,
                         base: str | None = None) -> PeftAdapter:
    """`read_t5_adapter` as a pool member (`to_peft_adapter`); `base` is accepted for the pool
    reader's signature (`io.peft.read_adapter`)."""
    return to_peft_adapter(read_t5_adapter(src, model_cfg, name=name))


@struct.dataclass
class SingleLoraHook(LoraHook):
    """One adapter as a `LoraHook`: `delta(block, row, x)` = scale * (x @ A^T) @ B^T for an adapted
    module, None otherwise.

    A pytree (module keys `"{block}:{row}"` are static structure), so it is passed to jitted
    functions as an argument: new adapter values of the same shapes never recompile.
    """

    a: dict  # key -> [d_in, r]
    b: dict  # key -> [r, d_out]
    scale: dict  # key -> scalar

    @classmethod
    def from_adapter(cls, ad: T5LoraAdapter, dtype=jnp.float32) -> SingleLoraHook:
        keys = {p: "{}:{}".format(*split_module_key(p)) for p in ad.modules}
        return cls(a={keys[p]: jnp.asarray(m[0].T, dtype) for p, m in ad.modules.items()},
                   b={keys[p]: jnp.asarray(m[1].T, dtype) for p, m in ad.modules.items()},
                   scale={keys[p]: jnp.float32(m[2]) for p, m in ad.modules.items()})

    def delta(self, layer: int, name: str, x):
        key = f"{layer}:{name}"
        if key not in self.a:
            return None
        a, b = self.a[key], self.b[key]
        h = jnp.einsum("...D,DR->...R", x.astype(a.dtype), a)
        return jnp.einsum("...R,RF->...F", h, b) * self.scale[key].astype(a.dtype), {}
