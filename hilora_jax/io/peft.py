"""Torch-free reading of PEFT LoRA adapters, with PEFT's own config semantics and strict checks.

An adapter is a directory holding `adapter_config.json` and `adapter_model.safetensors` (read
memory-mapped with `SafetensorsFile`; no torch). Older adapters with only `adapter_model.bin` are read
through `torch.load(weights_only=True)`, which needs torch. A hub id (`org/name`) is fetched with
`huggingface_hub.snapshot_download` when online.

Config handling follows peft 0.21 exactly (`peft/tuners/tuners_utils.py::check_target_module_exists`,
`peft/utils/other.py::get_pattern_key`, `peft/tuners/lora/layer.py::update_layer`):

* module keys are the base model's module names, `model.layers.{l}.self_attn.q_proj` etc.;
* `target_modules`: a string is `re.fullmatch`ed against the key (`"all-linear"` = every adaptable
  projection; `lm_head` is excluded by PEFT); a list matches a key equal to an entry or ending in
  `.entry`. `layers_to_transform` / `layers_pattern` only apply in the list form (as in PEFT);
* `exclude_modules`: string = fullmatch, list = equal or `.entry` suffix;
* per-module rank / alpha: first key `k` of `rank_pattern` / `alpha_pattern` (in insertion order) with
  `re.match(rf"(.*\\.)?({k})$", module_key)`, else `r` / `lora_alpha`;
* scale `s = alpha / r`, or `alpha / sqrt(r)` with `use_rslora`, with that module's r and alpha.

The tensor keys are the truth about which modules and layers are adapted; the set the config predicts
is cross-checked against them and any difference is an error.

`adapter_config.json` fields follow the same policy as model configs (`hilora_jax.model.config`): a field we
implement is read and validated (`r`, `lora_alpha`, `use_rslora`, `target_modules`, patterns, ...); a
known field is allowed only at values that keep plain-LoRA maths (`use_dora`, `lora_bias`, `bias`,
`init_lora_weights`, ... else `AdapterError` naming field and value); metadata (`base_model_name_or_path`,
`revision`, `task_type`, `inference_mode`, `peft_version`, ...) is ignored; an unknown field whose value
is unset (null, false, empty) is accepted with one `UnknownFieldWarning` line (as PEFT does, e.g.
`enable_lora: null` of old PEFT, `astra_config: null` of new PEFT); an unknown field with a value is
refused. `target_modules: null` means PEFT's default for every supported model type, `q_proj, v_proj`.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hilora_jax.io.safetensors import CheckpointError, SafetensorsFile
from hilora_jax.model.config import ModelConfig, unknown_fields_warning
from hilora_jax.model.projections import BLOCKS, MODULES, PROJECTIONS, projection


class AdapterError(CheckpointError):
    """A PEFT adapter is malformed, unsupported, or does not fit the base model."""


class UnmatchedTargetWarning(UserWarning):
    """Some `target_modules` entries match no module of a Llama-family model (PEFT ignores them)."""


# PEFT's `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING` for llama, mistral, qwen2 and qwen3: the
# modules adapted when `target_modules` is null.
DEFAULT_TARGETS = ("q_proj", "v_proj")

# Fields read (and validated) by `check_config`.
_READ = {"peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern",
         "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"}
# Metadata and training-only settings: cannot change the adapter's inference maths.
_IGNORED = {
    "task_type", "auto_mapping", "peft_version", "revision", "inference_mode", "lora_dropout",
    "base_model_name_or_path", "eva_config", "runtime_config", "qalora_group_size",
    "ensure_weight_tying", "megatron_core",
    "merge_weights",  # PEFT <= 0.2: merge into the base at eval time (same function)
}
# Known fields allowed only at values that keep plain LoRA maths: field -> predicate on the value.
_MUST_BE_OFF = {
    "use_dora": lambda v: not v,
    "lora_bias": lambda v: not v,
    "bias": lambda v: v in (None, "none"),
    "modules_to_save": lambda v: not v,
    "layer_replication": lambda v: not v,
    "target_parameters": lambda v: not v,
    "fan_in_fan_out": lambda v: not v,  # Llama-family projections are nn.Linear ([out, in])
    "enable_lora": lambda v: not v,  # PEFT <= 0.3 MergedLinear (fused qkv of GPT-2 style models)
    "trainable_token_indices": lambda v: not v,
    "megatron_config": lambda v: not v,
    "loftq_config": lambda v: not v,  # LoftQ pairs the adapter with a quantized base
    "corda_config": lambda v: not v,
    "lora_ga_config": lambda v: not v,
    "velora_config": lambda v: not v,
    "alora_invocation_tokens": lambda v: not v,  # aLoRA only acts after invocation tokens
    "use_qalora": lambda v: not v,
    "monteclora_config": lambda v: not v,
    "use_bdlora": lambda v: not v,
    "arrow_config": lambda v: not v,  # Arrow routing replaces the plain sum
    "kasa_config": lambda v: not v,
    # PiSSA/OLoRA/CorDA/LoftQ/LoRA-GA inits rewrite the base weights; such adapters only fit that
    # residual base unless converted at save time (which resets the field to True).
    "init_lora_weights": lambda v: v in (True, False, None, "gaussian", "eva")
    or (isinstance(v, str) and v.lower() in ("true", "false", "gaussian", "eva")),
}
# Llama-family modules that exist but that hilora-jax does not adapt.
_NOT_ADAPTED = ("lm_head", "embed_tokens", "norm", "input_layernorm", "post_attention_layernorm",
                "q_norm", "k_norm", "rotary_emb", "act_fn", *BLOCKS)

# A T5 module key or target name (`encoder.block.0.layer.0.SelfAttention.q`, `EncDecAttention.q`,
# `wi_0`): named in the error when a T5 adapter meets a Llama-family base.
_T5_MODULE = re.compile(r"(^|\.)((encoder|decoder)\.block\.\d+\.|(SelfAttention|EncDecAttention|"
                        r"DenseReluDense)\.|(q|k|v|o|wi|wi_0|wi_1|wo)$)")
_KEY = re.compile(
    rf"^base_model\.model\.model\.layers\.(\d+)\.({'|'.join(BLOCKS)})\.(\w+)\.lora_(A|B)\.weight$")


def module_key(layer: int, name: str) -> str:
    """PEFT's module key of projection `name` in layer `layer`."""
    return projection(name).module_key(layer)


def tensor_key(layer: int, name: str, side: str) -> str:
    """Key of a LoRA tensor in `adapter_model.safetensors` (side 'A' or 'B')."""
    return f"base_model.model.{module_key(layer, name)}.lora_{side}.weight"


def pattern_key(patterns: Mapping[str, Any], key: str) -> str | None:
    """PEFT's `get_pattern_key`: the first pattern `p` with `(.*\\.)?(p)$` matching `key`."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", key):
            return p
    return None


def is_targeted(cfg: Mapping[str, Any], key: str) -> bool:
    """PEFT's `check_target_module_exists` for one module key (after 'all-linear' expansion)."""
    excl = cfg.get("exclude_modules")
    if excl:
        if isinstance(excl, str):
            if re.fullmatch(excl, key):
                return False
        elif key in excl or any(key.endswith(f".{e}") for e in excl):
            return False
    tm = cfg.get("target_modules")
    if tm is None:
        return False
    if isinstance(tm, str):
        if tm.lower() == "all-linear":
            return True  # every adaptable projection is a Linear; lm_head is excluded by PEFT
        return re.fullmatch(tm, key) is not None
    if key in tm:
        return True
    found = any(key.endswith(f".{t}") for t in tm)
    idx = cfg.get("layers_to_transform")
    using = idx is not None and (len(idx) != 0 if isinstance(idx, list) else True)
    if using and found:
        pat = cfg.get("layers_pattern")
        m = None
        if not pat:
            m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            for p in [pat] if isinstance(pat, str) else pat:
                m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
                if m is not None:
                    break
        if m is None:
            return False
        layer = int(m.group("idx"))
        return layer == idx if isinstance(idx, int) else layer in idx
    return found


def module_rank_alpha(cfg: Mapping[str, Any], key: str) -> tuple[int, float, float]:
    """`(r, alpha, scale)` PEFT uses for module `key`."""
    rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    rk, ak = pattern_key(rp, key), pattern_key(ap, key)
    r = int(rp[rk]) if rk is not None else int(cfg.get("r", 8))
    alpha = float(ap[ak]) if ak is not None else float(cfg.get("lora_alpha", 8))
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return r, alpha, scale


def _target_entry_status(entry: Any) -> tuple[str, str] | None:
    """None when a `target_modules` list entry names an adaptable projection; else
    `("refuse", why)` when PEFT would adapt (or fail on) a Llama module we do not adapt, or
    `("ignore", why)` when it matches no module of a Llama-family model (PEFT ignores such entries
    as long as another entry matches)."""
    if not isinstance(entry, str) or not entry:
        return "refuse", "is not a module name"
    last = entry.rsplit(".", 1)[-1]
    if last in _NOT_ADAPTED:
        return "refuse", (f"adapts {last!r}, which hilora-jax does not adapt (only the q/k/v/o and "
                          "gate/up/down projections)")
    if last not in MODULES:
        return "ignore", "names no module of a Llama-family model"
    block = PROJECTIONS[last].block
    if "." in entry and not re.fullmatch(rf"(?:(?:model\.)?layers\.\d+\.)?{block}\.{last}", entry):
        return "ignore", f"matches no Llama-family module path '...layers.<i>.{block}.{last}'"
    return None


@dataclass(frozen=True)
class AdapterFamily:
    """What `check_config` needs to know about a model family's adaptable modules.

    `default_targets`: PEFT's targets when `target_modules` is null; `check_targets(tm, bad,
    where)`: validates a non-null `target_modules` (a string or a list), raising `bad(field, why)`
    (an `AdapterError`) or warning about ignored entries. Llama: `LLAMA_FAMILY` here; T5:
    `hilora_jax.t5.lora.T5_FAMILY`.
    """

    name: str
    default_targets: tuple[str, ...]
    check_targets: Any  # Callable[[str | list, Callable[[str, str], AdapterError], str], None]


def _check_llama_targets(tm: Any, bad, where: str) -> None:
    if isinstance(tm, str):
        if tm.lower() != "all-linear":
            try:
                rx = re.compile(tm)
            except re.error as e:
                raise bad("target_modules", f"= {tm!r} is not a valid regular expression ({e})") from e
            hit = [m for m in ("lm_head", "model.embed_tokens") if rx.fullmatch(m)]
            if hit:
                raise bad("target_modules", f"= {tm!r} adapts {hit[0]!r}, which hilora-jax does not "
                          "adapt")
    elif isinstance(tm, list) and tm:
        status = [(e, _target_entry_status(e)) for e in tm]
        for e, st in status:
            if st and st[0] == "refuse":
                raise bad("target_modules", f"entry {e!r} {st[1]} (target_modules = {_repr_short(tm)})")
        ignored = [(e, st[1]) for e, st in status if st]
        t5 = [e for e in tm if isinstance(e, str) and _T5_MODULE.search(f".{e}")]
        if len(ignored) == len(tm) and t5:
            raise bad("target_modules", f"= {_repr_short(tm)} names T5 modules ({t5[0]!r}): a T5 "
                      "adapter does not fit a Llama-family base (load it on a T5 model)")
        if len(ignored) == len(tm):
            raise bad("target_modules", f"= {_repr_short(tm)}: no entry names a projection of a "
                      f"Llama-family model ({ignored[0][0]!r} {ignored[0][1]}; a fused qkv projection "
                      "or another architecture's modules)")
        if ignored:
            warnings.warn(f"{where}: target_modules entries {[e for e, _ in ignored]} match no module "
                          "of a Llama-family model and are ignored, as PEFT ignores them",
                          UnmatchedTargetWarning, stacklevel=4)
    else:
        raise bad("target_modules", f"= {_repr_short(tm)} must be null, a string or a non-empty list")


LLAMA_FAMILY = AdapterFamily("Llama-family", DEFAULT_TARGETS, _check_llama_targets)


def check_config(cfg: Mapping[str, Any], name: str, *, source: str | None = None,
                 family: AdapterFamily = LLAMA_FAMILY) -> dict:
    """Validate an `adapter_config.json` dict under the field policy; returns it as a plain dict.

    `target_modules: null` is resolved to PEFT's default for the `family` (Llama:
    `DEFAULT_TARGETS`); a non-null one is checked by `family.check_targets`. Raises `AdapterError`
    naming the adapter (and `source`, the file, when given), the first offending field and its value;
    warns once (`UnknownFieldWarning`) about unknown fields that are unset.
    """
    where = f"adapter {name!r}" + (f" ({source})" if source else "")

    def bad(field: str, why: str) -> AdapterError:
        return AdapterError(f"{where}: field {field!r} {why}")

    if not isinstance(cfg, Mapping):
        raise AdapterError(f"{where}: the config must be a JSON object, got {type(cfg).__name__}")
    cfg = dict(cfg)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise bad("peft_type", f"= {cfg['peft_type']!r}; only LORA adapters are supported")
    unset_unknown: dict[str, Any] = {}
    for f in sorted(cfg):
        v = cfg[f]
        if f in _IGNORED or f in _READ:
            continue
        if f in _MUST_BE_OFF:
            if not _MUST_BE_OFF[f](v):
                raise bad(f, f"= {_repr_short(v)} changes the LoRA maths and is not supported")
            continue
        if _is_unset(v):
            unset_unknown[f] = v
            continue
        raise bad(f, f"= {_repr_short(v)} is not known to hilora-jax (it may change the maths); refusing "
                  "(unknown fields are accepted only when unset)")
    for f in ("r", "lora_alpha"):
        v = cfg.get(f, 8)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0 or not math.isfinite(v):
            raise bad(f, f"= {v!r} must be a positive number")
    if not isinstance(cfg.get("use_rslora", False), (bool, type(None))):
        raise bad("use_rslora", f"= {cfg['use_rslora']!r} must be true or false")
    tm = cfg.get("target_modules")
    if tm is None:
        cfg["target_modules"] = list(family.default_targets)
    else:
        family.check_targets(tm, bad, where)
    ex = cfg.get("exclude_modules")
    if ex is not None and not isinstance(ex, str) and not (
            isinstance(ex, list) and all(isinstance(e, str) for e in ex)):
        raise bad("exclude_modules", f"= {_repr_short(ex)} must be null, a string or a list of strings")
    idx = cfg.get("layers_to_transform")
    if idx is not None:
        ints = [idx] if isinstance(idx, int) else idx
        if not isinstance(ints, list) or any(
                isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ints):
            raise bad("layers_to_transform", f"= {_repr_short(idx)} must be null, a layer index or a list "
                      "of layer indices")
        if isinstance(tm, str) and ints:
            raise bad("layers_to_transform", f"= {_repr_short(idx)} cannot be used with a string "
                      "target_modules (PEFT refuses it too)")
    pat = cfg.get("layers_pattern")
    if pat is not None and not isinstance(pat, str) and not (
            isinstance(pat, list) and all(isinstance(x, str) for x in pat)):
        raise bad("layers_pattern", f"= {_repr_short(pat)} must be null, a string or a list of strings")
    for f in ("rank_pattern", "alpha_pattern"):
        pats = cfg.get(f)
        if pats is None:
            continue
        if not isinstance(pats, dict):
            raise bad(f, f"= {_repr_short(pats)} must be a mapping of module pattern -> number")
        for k, v in pats.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise bad(f, f"entry {k!r}: {v!r} must be a positive number")
            try:
                re.compile(k)
            except re.error as e:
                raise bad(f, f"entry {k!r} is not a valid regular expression ({e})") from e
    unknown_fields_warning(where, unset_unknown)
    return cfg


def read_adapter_config(path: str | os.PathLike, name: str | None = None) -> dict:
    """Read and check `adapter_config.json` (a file, or a directory holding it); see `check_config`."""
    p = Path(path)
    if p.is_dir():
        p = p / "adapter_config.json"
    name = name or (p.parent.name if p.name == "adapter_config.json" else p.stem)
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError as e:
        raise AdapterError(f"adapter {name!r}: {p} does not exist") from e
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"adapter {name!r}: {p}: unreadable ({e})") from e
    return check_config(raw, name, source=str(p))


def _is_unset(v: Any) -> bool:
    return v is None or v is False or (isinstance(v, (str, list, tuple, dict)) and len(v) == 0)


def _repr_short(v: Any, limit: int = 120) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 3] + "..."


@dataclass
class PeftAdapter:
    """One PEFT adapter read into host memory.

    `modules[(layer, name)] = (A [r, d_in], B [r, d_out], scale)`, float32, in the project's LoRA
    layout (`hilora_jax.model.projections`: ROC j is the pair of rows A[j], B[j]; B is the transpose of
    PEFT's `lora_B.weight [d_out, r]`).
    """

    name: str
    source: str
    config: dict
    r: int
    modules: dict[tuple[int, str], tuple[np.ndarray, np.ndarray, float]] = field(default_factory=dict)


def resolve_adapter_dir(src: str | os.PathLike, name: str) -> Path:
    """An adapter directory from a path or a hub id (downloaded when online)."""
    p = Path(src).expanduser()
    if p.is_dir():
        return p
    s = str(src)
    if p.exists():
        raise AdapterError(f"adapter {name!r}: {p} is not a directory")
    if s.count("/") == 1 and not s.startswith((".", "/", "~")):
        from hilora_jax.io.hub import hub_download

        try:
            return hub_download(s, allow_patterns=("adapter_config.json", "adapter_model.safetensors",
                                                    "adapter_model.bin"))
        except (OSError, ImportError) as e:
            raise AdapterError(f"adapter {name!r}: {e}") from e
    raise AdapterError(f"adapter {name!r}: {s!r} is not a directory or a hub id")


def _read_tensors(d: Path, name: str) -> tuple[Mapping[str, np.ndarray], str]:
    st, bn = d / "adapter_model.safetensors", d / "adapter_model.bin"
    if st.exists():
        try:
            return SafetensorsFile(st), str(st)
        except CheckpointError as e:
            raise AdapterError(f"adapter {name!r}: {e}") from e
    if bn.exists():
        try:
            import torch
        except ImportError as e:
            raise AdapterError(f"adapter {name!r}: {bn} is a pickled torch file; reading it needs "
                               "torch (pip install torch), or re-save the adapter as safetensors") from e
        try:
            sd = torch.load(bn, map_location="cpu", weights_only=True)
        except Exception as e:
            raise AdapterError(f"adapter {name!r}: {bn}: unreadable ({type(e).__name__}: {e})") from e
        return {k: v.detach().float().numpy() for k, v in sd.items()}, str(bn)
    raise AdapterError(f"adapter {name!r}: {d} has neither adapter_model.safetensors nor "
                       "adapter_model.bin")


def read_adapter(src: str | os.PathLike, model_cfg: ModelConfig, *, name: str | None = None,
                 base: str | None = None) -> PeftAdapter:
    """Read and check one PEFT adapter against the base model's config.

    `base` (the pool's base model path or id) is compared with the adapter's
    `base_model_name_or_path`; a mismatch is a `warnings.warn`, not an error.
    """
    d = resolve_adapter_dir(src, name or str(src))
    name = name or d.name
    cfg = read_adapter_config(d / "adapter_config.json", name)
    declared = cfg.get("base_model_name_or_path")
    if base and declared and _short(declared) != _short(base):
        warnings.warn(f"adapter {name!r} was trained on {declared!r}, the pool's base is {base!r}",
                      stacklevel=2)
    tensors, tpath = _read_tensors(d, name)

    shapes = model_cfg.module_shapes()
    found: dict[tuple[int, str], dict[str, str]] = {}
    bad = []
    for k in tensors:
        m = _KEY.match(k)
        if m is None or m.group(3) not in PROJECTIONS or PROJECTIONS[m.group(3)].block != m.group(2):
            bad.append(k)
            continue
        layer = int(m.group(1))
        if layer >= model_cfg.num_layers:
            raise AdapterError(f"adapter {name!r}: {tpath}: key {k!r} is for layer {layer}, the base "
                               f"model has {model_cfg.num_layers} layers")
        found.setdefault((layer, m.group(3)), {})[m.group(4)] = k
    t5 = [k for k in bad if _T5_MODULE.search(k)]
    if t5:
        raise AdapterError(f"adapter {name!r}: {tpath}: {t5[0]!r} is a T5 module; this adapter "
                           "does not fit a Llama-family base (load it on a T5 model)")
    if bad:
        raise AdapterError(f"adapter {name!r}: {tpath}: unexpected tensor keys (not LoRA A/B of an "
                           f"adaptable projection): {sorted(bad)[:8]}")
    if not found:
        raise AdapterError(f"adapter {name!r}: {tpath} holds no LoRA tensors")

    want = {(li, n) for li in range(model_cfg.num_layers) for n in MODULES
            if is_targeted(cfg, module_key(li, n))}
    have = set(found)
    if want != have:
        extra = sorted(module_key(*x) for x in have - want)
        missing = sorted(module_key(*x) for x in want - have)
        raise AdapterError(f"adapter {name!r}: tensors and config disagree on the adapted modules: "
                           f"config targets but no tensors: {missing[:8]}; tensors but not "
                           f"targeted: {extra[:8]}")

    ad = PeftAdapter(name=name, source=str(d), config=cfg, r=int(cfg.get("r", 8)))
    for (layer, mod), sides in sorted(found.items()):
        r, _, scale = module_rank_alpha(cfg, module_key(layer, mod))
        a, b = lora_pair(name, tpath, tensors, sides, r, shapes[mod],
                         lambda side, layer=layer, mod=mod: tensor_key(layer, mod, side))
        ad.modules[(layer, mod)] = (a, np.ascontiguousarray(b.T), scale)  # PEFT B -> rows
    return ad


def lora_pair(name: str, tpath, tensors, sides: Mapping[str, str], r: int,
              dims: tuple[int, int], key_of) -> tuple[np.ndarray, np.ndarray]:
    """One module's `(A [r, d_in], B [d_out, r])` as the file holds them, in float32, checked:
    both present (`sides` maps "A"/"B" to tensor names; `key_of(side)` names a missing one),
    shapes from the config's rank and the base model's `dims = (d_in, d_out)`, all finite."""
    for side in "AB":
        if side not in sides:
            raise AdapterError(f"adapter {name!r}: {tpath}: missing {key_of(side)!r}")
    d_in, d_out = dims
    a = np.asarray(tensors[sides["A"]], np.float32)
    b = np.asarray(tensors[sides["B"]], np.float32)
    for k, arr, exp in ((sides["A"], a, (r, d_in)), (sides["B"], b, (d_out, r))):
        if arr.shape != exp:
            raise AdapterError(f"adapter {name!r}: {tpath}: {k!r} has shape {arr.shape}, expected "
                               f"{exp} (rank {r} from the config, module shape (d_in={d_in}, "
                               f"d_out={d_out}) from the base model)")
        if not np.all(np.isfinite(arr)):
            raise AdapterError(f"adapter {name!r}: {tpath}: {k!r} contains NaN or inf")
    return a, b


# -- writing ---------------------------------------------------------------------------------
def peft_tensors(modules: Mapping[tuple[int, str], tuple[np.ndarray, np.ndarray]]
                 ) -> dict[str, np.ndarray]:
    """PEFT-named float32 tensors from ROC rows per `(layer, projection)`: `A [r, d_in]`,
    `B [r, d_out]` (the project's layout; any scale the config will not apply already folded into
    B) -> `...lora_A.weight [r, d_in]` and `...lora_B.weight [d_out, r]` (`tensor_key`)."""
    out = {}
    for (layer, name), (a, b) in modules.items():
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
            raise ValueError(f"{module_key(layer, name)}: A {a.shape} and B {b.shape} must be "
                             "[r, d_in] and [r, d_out] with the same r")
        out[tensor_key(layer, name, "A")] = np.ascontiguousarray(a)
        out[tensor_key(layer, name, "B")] = np.ascontiguousarray(b.T)
    return out


def write_adapter(out: str | os.PathLike, config: Mapping[str, Any],
                  modules: Mapping[tuple[int, str], tuple[np.ndarray, np.ndarray]], *,
                  metadata: Mapping[str, str] | None = None,
                  extra_files: Mapping[str, str] | None = None, overwrite: bool = False,
                  family: AdapterFamily = LLAMA_FAMILY) -> Path:
    """Write a PEFT adapter directory atomically (a temp dir renamed to `out`): the checked
    `adapter_config.json` (`check_config` under `family`: T5 is `t5.lora.T5_FAMILY`),
    `adapter_model.safetensors` from `modules` (`peft_tensors`) and any `extra_files`
    (`{file name: text}`). The one PEFT writer (pool export and the trainer)."""
    from hilora_jax._fs import atomic_dir
    from hilora_jax.io.safetensors import save_file

    check_config(config, Path(out).name, family=family)  # what we write, we can read back
    tensors = peft_tensors(modules)
    if not tensors:
        raise ValueError(f"{out}: nothing to write (no adapted module)")
    out = Path(out).absolute()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(dict(config), indent=2) + "\n")
        save_file(tensors, tmp / "adapter_model.safetensors",
                  metadata={"format": "pt", **(metadata or {})})
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
    return out


def _short(s: str) -> str:
    s = str(s).rstrip("/").lower()
    s = s.rsplit("/", 1)[-1]
    return {"smollm2": "smollm2-135m-instruct"}.get(s, s)
