"""Where routed `generate_until` time goes in the lm-eval backend: sequence stage (MiniLM
embedding + `router.route`) vs the jitted generation, base vs `router=hilora`.

SmolLM2-135M-Instruct fp32, the first 8 multiple-choice prompts of `lm_eval_speed.py`'s tasks as
generation requests (greedy, <= 12 tokens, stop at newline), batch 8; routed pool: the first 6
finished realistic-pool adapters (~/.cache/hilora/realistic_pool/adapters), each given 10 of
60 further prompts as its samples (routing quality is irrelevant here: every adapter is a
candidate, as with real pools). Calls are timed by wrapping the backend's `_route`,
`router.embed` and `engine.generate`; round 0 includes compilation.

    python benchmarks/lm_eval_gen_breakdown.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    import lm_eval_speed as speed
    from lm_eval.api.instance import Instance

    from hilora_jax.lmeval import HiLoRALM

    gen = [Instance("generate_until", {}, (d.prompt, {"until": ["\n"], "max_gen_toks": 12,
                                                      "do_sample": False}), 0, (d.task, j, 1))
           for j, d in enumerate(speed.mc_docs(8))]
    more = speed.mc_docs(60)
    src = Path.home() / ".cache" / "hilora" / "realistic_pool" / "adapters"
    ads = [d for d in sorted(src.iterdir()) if (d / "hilora_train.json").exists()][:6] \
        if src.is_dir() else []
    if len(ads) < 2:
        print("lm_eval_gen_breakdown: needs >= 2 finished realistic-pool adapters", file=sys.stderr)
        return 1
    man = {"adapters": {d.name.rsplit("-", 1)[0]: {
        "path": str(d), "samples": [m.prompt for m in more[i::len(ads)]]}
        for i, d in enumerate(ads)}}
    pool = Path(tempfile.mkdtemp(prefix="gen_breakdown_")) / "pool.json"
    pool.write_text(json.dumps(man))
    lms = {"base": HiLoRALM(model="smollm2", batch_size=8),
           "routed": HiLoRALM(model="smollm2", pool=str(pool), router="hilora", batch_size=8)}
    t: dict = {}

    def timed(name, f):
        def w(*args, **kw):
            t0 = time.perf_counter()
            out = f(*args, **kw)
            t[name] = t.get(name, 0.0) + time.perf_counter() - t0
            return out
        return w

    for n, lm in lms.items():
        lm._route = timed(f"{n}.route", lm._route)
        lm.engine.generate = timed(f"{n}.generate", lm.engine.generate)
        if hasattr(lm.router, "embed"):
            lm.router.embed = timed(f"{n}.embed", lm.router.embed)
    for r in range(a.rounds):
        t.clear()
        for n, lm in lms.items():
            t0 = time.perf_counter()
            lm.generate_until(gen)
            t[f"{n}.total"] = time.perf_counter() - t0
        print(f"round {r}" + (" (compiles)" if r == 0 else "") + ": "
              + ", ".join(f"{k} {v:.2f}s" for k, v in sorted(t.items())), flush=True)
    print("pool:", ", ".join(man["adapters"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
