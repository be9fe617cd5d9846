"""Pool manifests: which adapters form a pool, with their example inputs and clusters.

A manifest is JSON or YAML (or the same structure as a dict):

    base: <model path or id>                  # optional; compared with each adapter's base
    adapters:
      <name>:
        path: <adapter dir or hub id>         # relative paths resolve against the manifest's folder
        samples: ["...", ...]                 # or
        samples_file: <jsonl, one {"text": ...} per line>
        cluster: <optional group label>       # used by the unseen-cross evaluation protocol

`samples` are per-LoRA example inputs (HiLoRA fits a Gaussian on their embeddings). They are
optional: a pool without them still serves routers that do not need them (`LoraPool.require_samples`).
A folder whose sub-folders are adapter directories is also accepted: names are the sub-folder names,
with no samples or clusters. Adapter order is the manifest's order (the pool's N axis).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hilora_jax.errors import HiloraUserError
from hilora_jax.io.peft import AdapterError


class ManifestError(HiloraUserError, ValueError):
    """A pool manifest is malformed."""


@dataclass(frozen=True)
class AdapterEntry:
    name: str
    path: str  # absolute adapter dir, or a hub id
    samples: tuple[str, ...] | None = None
    cluster: str | None = None


@dataclass(frozen=True)
class PoolManifest:
    adapters: tuple[AdapterEntry, ...]
    base: str | None = None
    source: str = "<dict>"


_ENTRY_FIELDS = {"path", "samples", "samples_file", "cluster"}


def _resolve(p: str, root: Path) -> str:
    q = Path(p).expanduser()
    if not q.is_absolute():
        cand = root / q
        # keep hub ids ("org/name") that do not exist locally as they are
        if cand.exists() or str(p).startswith((".", "~")) or str(p).count("/") != 1:
            return str(cand)
        return str(p)
    return str(q)


def _read_samples_file(path: Path, name: str) -> tuple[str, ...]:
    out = []
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ManifestError(f"adapter {name!r}: samples_file {path}: unreadable ({e})") from e
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ManifestError(f"adapter {name!r}: {path}:{i}: not JSON ({e})") from e
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise ManifestError(f"adapter {name!r}: {path}:{i}: needs a string 'text' field")
        out.append(rec["text"])
    return tuple(out)


def parse_manifest(d: Mapping[str, Any], root: str | os.PathLike = ".", *,
                   source: str = "<dict>") -> PoolManifest:
    """Check a manifest dict and resolve its paths against `root`."""
    root = Path(root).absolute()
    if not isinstance(d, Mapping):
        raise ManifestError(f"{source}: a manifest must be a mapping, got {type(d).__name__}")
    extra = sorted(set(d) - {"base", "adapters"})
    if extra:
        raise ManifestError(f"{source}: unknown top-level fields {extra}")
    ads = d.get("adapters")
    if not isinstance(ads, Mapping) or not ads:
        raise ManifestError(f"{source}: 'adapters' must be a non-empty mapping name -> entry "
                            "(the pool is empty)")
    entries = []
    for name, e in ads.items():
        if isinstance(e, str):
            e = {"path": e}
        if not isinstance(e, Mapping) or "path" not in e:
            raise ManifestError(f"{source}: adapter {name!r} needs a 'path'")
        bad = sorted(set(e) - _ENTRY_FIELDS)
        if bad:
            raise ManifestError(f"{source}: adapter {name!r}: unknown fields {bad}")
        if "samples" in e and "samples_file" in e:
            raise ManifestError(f"{source}: adapter {name!r}: give 'samples' or 'samples_file', "
                                "not both")
        samples = None
        if "samples" in e:
            s = e["samples"]
            if not isinstance(s, (list, tuple)) or not all(isinstance(x, str) for x in s):
                raise ManifestError(f"{source}: adapter {name!r}: 'samples' must be a list of strings")
            samples = tuple(s)
        elif "samples_file" in e:
            samples = _read_samples_file(Path(_resolve(e["samples_file"], root)), name)
        cluster = e.get("cluster")
        entries.append(AdapterEntry(str(name), _resolve(str(e["path"]), root), samples,
                                    None if cluster is None else str(cluster)))
    base = d.get("base")
    if base is not None:
        base = _resolve(str(base), root) if (root / str(base)).exists() else str(base)
    return PoolManifest(tuple(entries), base, source)


def read_manifest(src: str | os.PathLike | Mapping[str, Any]) -> PoolManifest:
    """A manifest from a JSON/YAML file, a dict, or a folder of adapter directories."""
    if isinstance(src, Mapping):
        return parse_manifest(src)
    p = Path(src).expanduser().absolute()
    if p.is_dir():
        subs = sorted(q for q in p.iterdir() if (q / "adapter_config.json").exists())
        if not subs:
            if (p / "adapter_config.json").exists():
                return PoolManifest((AdapterEntry(p.name, str(p)),), None, str(p))
            raise AdapterError(f"{p}: no adapter directories (with adapter_config.json) found; the "
                               "pool would be empty")
        return PoolManifest(tuple(AdapterEntry(q.name, str(q)) for q in subs), None, str(p))
    try:
        text = p.read_text()
    except OSError as e:
        raise ManifestError(f"{p}: unreadable manifest ({e})") from e
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            d = yaml.safe_load(text)
        else:
            d = json.loads(text)
    except Exception as e:
        raise ManifestError(f"{p}: malformed manifest ({type(e).__name__}: {e})") from e
    return parse_manifest(d, p.parent, source=str(p))
