"""Benchmark: convert a pool of synthetic PEFT adapters shaped for SmolLM2-135M.

Writes N (default 64) random r=8 q_proj/v_proj adapters as PEFT safetensors directories into a temp
dir, then times `convert_pool` (read + check + stack + orbax save, atomic) and `load_pool_dir`
(orbax restore), and records peak RSS (`ru_maxrss`) after each phase. The base model's config is
read in a child process so that the GGUF weights never count towards this process's memory.

    python benchmarks/pool_conversion.py [--adapters 64] [--rank 8]

Prints a table and writes `benchmarks/results/pool_conversion.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_CONFIG_SNIPPET = """
import json, sys
from hilora_jax.io.loading import resolve_source
from hilora_jax.io.gguf import read_gguf
kind, path = resolve_source("smollm2")
print(json.dumps(read_gguf(path).config))
"""


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def smollm2_config() -> dict:
    out = subprocess.run([sys.executable, "-c", _CONFIG_SNIPPET], check=True, capture_output=True,
                         text=True, env={**os.environ, "HILORA_QUIET": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_adapters(root: Path, cfg, n: int, r: int, seed: int = 0) -> dict:
    from hilora_jax.io.peft import tensor_key
    from hilora_jax.io.safetensors import save_file

    rng = np.random.default_rng(seed)
    shapes = cfg.module_shapes()
    adapters = {}
    for i in range(n):
        d = root / f"task{i:03d}"
        d.mkdir(parents=True)
        t = {}
        for layer in range(cfg.num_layers):
            for m in ("q_proj", "v_proj"):
                d_in, d_out = shapes[m]
                t[tensor_key(layer, m, "A")] = rng.standard_normal((r, d_in), np.float32) * 0.02
                t[tensor_key(layer, m, "B")] = rng.standard_normal((d_out, r), np.float32) * 0.02
        save_file(t, d / "adapter_model.safetensors", metadata={"format": "pt"})
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
            "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.05, "bias": "none",
            "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "use_rslora": False, "fan_in_fan_out": False, "init_lora_weights": True}))
        adapters[f"task{i:03d}"] = {"path": str(d), "samples": [f"example input {i}"],
                                    "cluster": f"c{i % 8}"}
    return {"base": "smollm2", "adapters": adapters}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "pool_conversion.json"))
    args = ap.parse_args(argv)

    from hilora_jax.lora import convert_pool, load_pool_dir
    from hilora_jax.model.config import ModelConfig

    t0 = time.perf_counter()
    cfg = ModelConfig.from_hf_config(smollm2_config(), source="smollm2")
    t_cfg = time.perf_counter() - t0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        manifest = write_adapters(tmp / "adapters", cfg, args.adapters, args.rank)
        t_write = time.perf_counter() - t0
        (tmp / "pool.json").write_text(json.dumps(manifest))
        rows.append(("write synthetic PEFT dirs", t_write, rss_mib()))
        t0 = time.perf_counter()
        convert_pool(tmp / "pool.json", cfg, tmp / "pool", progress=False)
        rows.append(("convert_pool (read+check+stack+orbax)", time.perf_counter() - t0, rss_mib()))
        t0 = time.perf_counter()
        pool = load_pool_dir(tmp / "pool")
        next(iter(pool.arrays.A.values())).block_until_ready()
        rows.append(("load_pool_dir (orbax restore)", time.perf_counter() - t0, rss_mib()))
        src_bytes = sum(f.stat().st_size for f in (tmp / "adapters").rglob("*.safetensors"))
        pool_bytes = sum(f.stat().st_size for f in (tmp / "pool").rglob("*") if f.is_file())
        shapes = {m: list(pool.arrays.A[m].shape) for m in pool.arrays.modules}

    print(f"\nPool conversion: {args.adapters} adapters, r={args.rank}, q_proj+v_proj, "
          f"SmolLM2-135M shapes (L={cfg.num_layers}, d={cfg.hidden_size}, kv={cfg.kv_size})")
    print(f"{'phase':<42}{'seconds':>10}{'peak RSS MiB':>15}")
    for name, sec, rss in rows:
        print(f"{name:<42}{sec:>10.2f}{rss:>15.0f}")
    print(f"adapter files {src_bytes / 2**20:.1f} MiB -> pool dir {pool_bytes / 2**20:.1f} MiB; "
          f"A shapes {shapes}")
    result = {
        "adapters": args.adapters, "rank": args.rank, "modules": ["q_proj", "v_proj"],
        "model": "SmolLM2-135M-Instruct", "config_seconds": t_cfg,
        "phases": [{"phase": n, "seconds": s, "peak_rss_mib": r} for n, s, r in rows],
        "adapter_bytes": src_bytes, "pool_bytes": pool_bytes, "pool_A_shapes": shapes,
        "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
