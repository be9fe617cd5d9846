"""Issue 12 speed check in ONE process: the tree before the refactor (main 92313c5, imported as the
package `hilora_before`) and the current tree (`hilora_jax`), same model weights, same prompts and
pools, timed in interleaved rounds (`benchmarks/common.time_interleaved`, ABBA order), so machine
load hits both alike. SmolLM2-135M-Instruct fp32, batch 8, 64-token prompts, 32 new tokens; base
and HiLoRA `gathered` over 16 synthetic rank-8 q/v adapters (`routing_overhead.py`'s pool).
prefill tok/s = B*P / t(1); decode tok/s = B*(new-1) / (t(new) - t(1)), medians of paired rounds.

Prepare the before tree as its own package (once):
    git archive 92313c5 | tar -x -C /tmp/before
    mkdir -p /tmp/before_pkg/bench_before && cp -r /tmp/before/hilora_jax /tmp/before_pkg/hilora_before
    cp /tmp/before/benchmarks/routing_overhead.py /tmp/before_pkg/bench_before/ro_before.py
    grep -rl hilora_jax /tmp/before_pkg | xargs sed -i 's/hilora_jax/hilora_before/g'
Run:
    python docs/ab_quiet/same_run.py [--repeats 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, "/tmp/before_pkg")
sys.path.insert(0, "/tmp/before_pkg/bench_before")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    os.environ.setdefault("HILORA_QUIET", "1")
    import common
    import hilora_before
    import jax.numpy as jnp
    import numpy as np
    import ro_before
    import routing_overhead as ro_after
    from hilora_before.inference import Engine as EngineBefore
    from hilora_before.loading import load_model as load_before
    from hilora_before.routing import build_router as router_before

    import hilora_jax
    from hilora_jax.inference import Engine as EngineAfter
    from hilora_jax.io.loading import load_model as load_after
    from hilora_jax.routing import build_router as router_after

    b, p, new, n = 8, 64, 32, 16
    ids = jnp.asarray(np.random.default_rng(0).integers(100, 40000, (b, p)), jnp.int32)
    mask = jnp.ones((b, p), bool)
    fns, toks = {}, {}
    for tag, load, Eng, ro, build in (
            ("before", load_before, EngineBefore, ro_before, router_before),
            ("after", load_after, EngineAfter, ro_after, router_after)):
        eng = Eng(load("smollm2", progress=False))
        host, means, samples = ro.make_pool_arrays(eng.config, n, 0)
        pool, emb = ro.build_pool(host, means, samples, n)
        z = np.stack([means[i % n] + np.random.default_rng(1000 + i).standard_normal(ro.EMB_DIM)
                      .astype(np.float32) * 0.1 for i in range(b)])
        hook = build("hilora", pool, options={"strategy": "gathered", "embedder": emb}).route(
            [f"p{i}" for i in range(b)], embeddings=z).hook
        gen = common.generate_timer(eng, ids, mask, new)
        for hn, h in (("base", None), ("hilora", hook)):
            g1, gn = gen(h, 1), gen(h, new)
            g1()
            toks[(tag, hn)] = np.asarray(gn())
            fns[f"{tag}|{hn}|1"], fns[f"{tag}|{hn}|N"] = g1, gn
    t = common.time_interleaved(fns, repeats=a.repeats, warmup=0)
    rows, out = [], {"packages": [hilora_before.__file__, hilora_jax.__file__], "rows": []}
    for hn in ("base", "hilora"):
        same = bool((toks[("before", hn)] == toks[("after", hn)]).all())
        r = {"hook": hn, "same_tokens": same}
        for tag in ("before", "after"):
            t1 = np.array(t[f"{tag}|{hn}|1"]["times_s"])
            tn = np.array(t[f"{tag}|{hn}|N"]["times_s"])
            r[f"{tag}_prefill_tok_s"] = round(b * p / float(np.median(t1)), 1)
            r[f"{tag}_decode_tok_s"] = round(b * (new - 1) / float(np.median(tn - t1)), 1)
        r["decode_after_over_before"] = round(r["after_decode_tok_s"] / r["before_decode_tok_s"], 3)
        r["prefill_after_over_before"] = round(r["after_prefill_tok_s"]
                                               / r["before_prefill_tok_s"], 3)
        out["rows"].append(r)
        rows.append([hn, r["before_prefill_tok_s"], r["after_prefill_tok_s"],
                     r["prefill_after_over_before"], r["before_decode_tok_s"],
                     r["after_decode_tok_s"], r["decode_after_over_before"], same])
    out["raw"] = t
    out["load_average"] = common.load_average()
    print(common.markdown_table(["hook", "prefill before", "prefill after", "after/before",
                                 "decode before", "decode after", "after/before",
                                 "same tokens"], rows))
    print(f"load average {out['load_average']}; {a.repeats} interleaved rounds")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
