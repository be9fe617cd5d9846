"""Small helpers shared by the benchmark scripts.

* `time_call`: warm up (compile), then `repeats` timed calls; every call must block until its
  result is ready (`jax.block_until_ready`, or a synchronous torch call), so timings are wall time.
* `machine_info`: CPU model, cores, load average, library versions, jax device kind, thread and XLA
  settings, so a result file says where and how it was measured.
* `write_json`: results go to `benchmarks/results/<name>.json`, written atomically (temp file in the
  same directory, then `os.replace`), so an interrupted run never leaves a half-written file.
* `markdown_table`: a plain GitHub-markdown table for the console and `results/<name>.md`.

Nothing here imports jax or torch at module level: a script can set `XLA_FLAGS` / thread counts
before either library is loaded.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def time_call(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1) -> dict:
    """Run `fn` `warmup` times untimed, then `repeats` times timed (fn must block on its result).

    Returns `{"median_s", "min_s", "times_s", "warmup_s"}` (seconds, `perf_counter` wall time).
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    warm = []
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - t0)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times,
            "warmup_s": warm}


def time_interleaved(fns: dict[str, Callable[[], Any]], *, repeats: int = 3,
                     warmup: int = 1) -> dict[str, dict]:
    """Like `time_call` for several functions, interleaved so background load hits all alike.

    All functions are warmed up first; then repeat r runs every function once, in the given order
    for even r and reversed for odd r (ABBA), so none always runs first or last. Returns
    `{name: time_call-style stats}`; `times_s[r]` of different names belong to the same round.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    names = list(fns)
    warm: dict[str, list[float]] = {n: [] for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(warmup):
        for n in names:
            t0 = time.perf_counter()
            fns[n]()
            warm[n].append(time.perf_counter() - t0)
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return {n: {"median_s": statistics.median(times[n]), "min_s": min(times[n]),
                "times_s": times[n], "warmup_s": warm[n]} for n in names}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags(wanted=("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")) -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True,
                               cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    """Where and with what a benchmark ran (imports jax/torch only if already imported)."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "load_average_1_5_15": load_average(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "git_commit": _git_commit(),
        "env": {k: os.environ.get(k) for k in
                ("XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "JAX_PLATFORMS")},
    }
    versions = {}
    for mod in ("jax", "jaxlib", "flax", "numpy", "torch", "transformers"):
        m = sys.modules.get(mod)
        if m is not None:
            versions[mod] = getattr(m, "__version__", "?")
    info["versions"] = versions
    if "jax" in sys.modules:
        import jax

        devs = jax.devices()
        info["jax_backend"] = jax.default_backend()
        info["jax_devices"] = [f"{d.platform}:{d.device_kind}" for d in devs]
    if "torch" in sys.modules:
        import torch

        info["torch_num_threads"] = torch.get_num_threads()
        info["torch_num_interop_threads"] = torch.get_num_interop_threads()
    return info


def command_line() -> str:
    """The command as typed (interpreter shown as `python`)."""
    return shlex.join(["python", *sys.argv])


def write_json(name_or_path: str | os.PathLike, payload: dict) -> Path:
    """Write `payload` to `results/<name>.json` (or to an explicit `.json` path) atomically."""
    p = Path(name_or_path)
    path = p if p.suffix == ".json" else RESULTS_DIR / f"{p.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomic text write (same temp-then-rename scheme as `write_json`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table; floats are printed with 3 significant-ish digits."""

    def fmt(v):
        if isinstance(v, float):
            if v != v:  # NaN
                return "n/a"
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}" if abs(v) >= 1 else f"{v:.3f}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True)) + " |"  # noqa: E731
    out = [line(list(headers)), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def generate_timer(engine, ids, mask, new_tokens: int):
    """`gen(hook, steps)` -> a zero-argument function that runs the engine's jitted `_generate`
    (exactly what `Engine.generate(prompts, max_new_tokens=new_tokens, stop_tokens=[-1])` runs:
    greedy, the same cache size and output bucket) with the traced step limit set to `steps`, and
    blocks on the tokens. `steps=1` is prefill + first token and `steps=new_tokens` adds
    `new_tokens - 1` cached decode steps, both in ONE executable, so `t(new) - t(1)` is the decode
    time. `ids`/`mask` `[B, P]` are the left-padded prompts (on the engine's devices)."""
    import jax
    import jax.numpy as jnp

    from hilora_jax.inference import bucket_length

    new_bucket = bucket_length(new_tokens, minimum=16, multiple=64)
    cache_size = ids.shape[1] + new_bucket
    stop_ids, key = jnp.asarray([-1], jnp.int32), jax.random.key(0)

    def gen(hook, steps: int):
        def run():
            out, _ = engine._generate(engine.state, ids, mask, key, jnp.float32(0.0),
                                      jnp.float32(1.0), stop_ids, jnp.int32(steps), hook,
                                      cache_size=cache_size, max_new=new_bucket, greedy=True)
            return jax.block_until_ready(out)
        return run

    return gen


def prefill_decode_rows(timings: dict, names, batch: int, prompt: int, new_tokens: int,
                        refs=(("base", "base"),)) -> dict:
    """Per name, prefill and decode speed from `generate_timer`'s interleaved timings
    (`"{name}|gen1"`: prefill + first token, `"{name}|genN"`: + `new_tokens - 1` decode steps):
    decode time is the median over rounds of genN - gen1 of the same round. Each `(ref, tag)` in
    `refs` present in the rows adds `prefill_vs_{tag}` / `decode_vs_{tag}` speed ratios."""
    rows = {}
    for name in names:
        g1, gn = timings[f"{name}|gen1"], timings[f"{name}|genN"]
        tp = g1["median_s"]
        steps = [b - a for a, b in zip(g1["times_s"], gn["times_s"], strict=True)]
        dec = float(statistics.median(steps))
        rows[name] = {"prefill_s": tp, "decode_s": dec, "genN_s": gn["median_s"],
                      "prefill_tok_s": batch * prompt / tp,
                      "decode_tok_s": batch * (new_tokens - 1) / dec,
                      "decode_step_ms": 1e3 * dec / (new_tokens - 1),
                      "compile_and_first_s": gn["warmup_s"][0] if gn.get("warmup_s") else None}
    for ref, tag in refs:
        if ref in rows:
            for r in rows.values():
                r[f"prefill_vs_{tag}"] = r["prefill_tok_s"] / rows[ref]["prefill_tok_s"]
                r[f"decode_vs_{tag}"] = r["decode_tok_s"] / rows[ref]["decode_tok_s"]
    return rows
