"""Issue 12 speed check, the program side: compile `Engine._generate` (prefill + the decode
`while_loop`) for `base` and `hilora-gathered` exactly as `benchmarks/routing_overhead.py --sizes 16
--batch 2 --prompt 32 --new 16` runs them, in whichever tree is first on PYTHONPATH, and write the
optimized HLO plus a per-op-name census of the decode loop body (`while/body/...` metadata).

  cd /tmp/before && PYTHONPATH=/tmp/before python /work/main/docs/ab_quiet/hlo_cmp.py /tmp/hlo_before
  cd /work/main  && PYTHONPATH=/work/main  python docs/ab_quiet/hlo_cmp.py /tmp/hlo_after
  python docs/ab_quiet/hlo_cmp.py --compare /tmp/hlo_before /tmp/hlo_after
"""
import collections
import json
import os
import re
import sys
from pathlib import Path

BODY = re.compile(r'op_name="jit\(_generate_impl\)/while/body/([^"]*)"')
OP = re.compile(r"=\s*\S+\s+([a-z\-]+)\(")


def census(text: str) -> dict:
    body = collections.Counter(re.sub(r"\d+", "", m) for m in BODY.findall(text))
    ops = collections.Counter(OP.findall(text))
    return {"body_ops": sum(body.values()), "body_by_name": dict(sorted(body.items())),
            "all_ops": dict(sorted(ops.items())), "lines": len(text.splitlines())}


def compare(a: str, b: str) -> int:
    rows = []
    for name in ("base", "hilora"):
        ca = json.loads(Path(f"{a}_{name}.json").read_text())
        cb = json.loads(Path(f"{b}_{name}.json").read_text())
        same_body = ca["body_by_name"] == cb["body_by_name"]
        diff_all = {k: (ca["all_ops"].get(k, 0), cb["all_ops"].get(k, 0))
                    for k in set(ca["all_ops"]) | set(cb["all_ops"])
                    if ca["all_ops"].get(k, 0) != cb["all_ops"].get(k, 0)}
        rows.append(f"| {name} | {ca['body_ops']} | {cb['body_ops']} | "
                    f"{'yes' if same_body else 'NO'} | {ca['all_ops'].get('fusion')} -> "
                    f"{cb['all_ops'].get('fusion')} | {ca['all_ops'].get('dot')} -> "
                    f"{cb['all_ops'].get('dot')} | {diff_all or '-'} |")
    print("| hook | decode-body ops before | after | same op census | fusions | dots | "
          "other op-count differences (whole program, before, after) |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


def main() -> int:
    if sys.argv[1] == "--compare":
        return compare(sys.argv[2], sys.argv[3])
    out = sys.argv[1]
    sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
    os.environ.setdefault("HILORA_QUIET", "1")
    import jax
    import jax.numpy as jnp
    import numpy as np
    import routing_overhead as ro

    import hilora_jax
    from hilora_jax.inference import Engine, bucket_length
    from hilora_jax.routing import build_router
    if (Path(hilora_jax.__file__).parent / "loading.py").exists():  # layout before issue 12
        from hilora_jax.loading import load_model
    else:
        from hilora_jax.io.loading import load_model

    engine = Engine(load_model("smollm2", progress=False))
    B, P, NEW, N = 2, 32, 16, 16
    host, means, samples = ro.make_pool_arrays(engine.config, N, 0)
    pool, emb = ro.build_pool(host, means, samples, N)
    z = np.stack([means[b % N] + np.random.default_rng(1000 + b).standard_normal(ro.EMB_DIM)
                  .astype(np.float32) * 0.1 for b in range(B)])
    router = build_router("hilora", pool, options={"strategy": "gathered", "embedder": emb})
    hooks = {"base": None, "hilora": router.route([f"prompt {b}" for b in range(B)],
                                                  embeddings=z).hook}
    ids, mask = jnp.zeros((B, P), jnp.int32), jnp.ones((B, P), bool)
    nb = bucket_length(NEW, minimum=16, multiple=64)
    for name, h in hooks.items():
        text = engine._generate.lower(
            engine.state, ids, mask, jax.random.key(0), jnp.float32(0), jnp.float32(1),
            jnp.asarray([-1], jnp.int32), jnp.int32(NEW), h, cache_size=P + nb, max_new=nb,
            greedy=True).compile().as_text()
        Path(f"{out}_{name}.hlo").write_text(text)
        c = census(text)
        Path(f"{out}_{name}.json").write_text(json.dumps(c, indent=1))
        print(name, hilora_jax.__file__, c["body_ops"], c["lines"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
