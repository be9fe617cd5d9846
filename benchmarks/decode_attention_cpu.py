"""Decode tokens/s on this CPU with the two decode attention orders (`llama.DECODE_ATTENTION`):
`then_write` (attend over the old cache + the new token, then write) and `write_first` (write,
then attend over the updated cache; the default).

SmolLM2-135M-Instruct fp32, batch 8, 64-token prompts, 32 new tokens; base and HiLoRA (router
default, 16 synthetic rank-8 q/v adapters from routing_overhead.py). One Engine per order (each
traces under its own setting), interleaved rounds; decode tok/s = B*(new-1) / (t(new) - t(1)),
median over rounds. Greedy tokens of both orders are printed (they must agree).

    python benchmarks/decode_attention_cpu.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    os.environ.setdefault("HILORA_QUIET", "1")
    import common
    import jax.numpy as jnp
    import numpy as np
    import routing_overhead as ro

    from hilora_jax.inference import Engine
    from hilora_jax.io.loading import load_model
    from hilora_jax.model import llama
    from hilora_jax.routing import build_router

    model = load_model("smollm2", progress=False)
    b, p, new, n = 8, 64, 32, 16
    host, means, samples = ro.make_pool_arrays(model.config, n, 0)
    pool, emb = ro.build_pool(host, means, samples, n)
    z = np.stack([means[i % n] + np.random.default_rng(1000 + i).standard_normal(ro.EMB_DIM)
                  .astype(np.float32) * 0.1 for i in range(b)])
    hook = build_router("hilora", pool, options={"embedder": emb}).route(
        [f"p{i}" for i in range(b)], embeddings=z).hook
    ids = jnp.asarray(np.random.default_rng(0).integers(100, 40000, (b, p)), jnp.int32)
    mask = jnp.ones((b, p), bool)
    fns, toks = {}, {}
    for mode in ("then_write", "write_first"):
        with llama.decode_attention(mode):
            gen = common.generate_timer(Engine(model), ids, mask, new)
            for hn, h in (("base", None), ("hilora", hook)):
                g1, gn = gen(h, 1), gen(h, new)
                g1()
                toks[(mode, hn)] = np.asarray(gn())  # compiles under this order
                fns[f"{mode}|{hn}|1"], fns[f"{mode}|{hn}|N"] = g1, gn
    t = common.time_interleaved(fns, repeats=a.repeats, warmup=0)
    rows = []
    for hn in ("base", "hilora"):
        same = bool((toks[("then_write", hn)] == toks[("write_first", hn)]).all())
        r = [hn]
        for mode in ("then_write", "write_first"):
            d = np.median(np.array(t[f"{mode}|{hn}|N"]["times_s"])
                          - np.array(t[f"{mode}|{hn}|1"]["times_s"]))
            r.append(round(b * (new - 1) / d, 1))
        rows.append(r + [same])
    print(common.markdown_table(["hook", "then_write tok/s", "write_first tok/s",
                                 "same tokens"], rows))
    print(f"load average {common.load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
