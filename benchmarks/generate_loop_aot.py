"""`Engine.generate`'s program on TPU (issue 14): HBM traffic per decode step inside its
`while_loop`, compiled with XLA's defaults vs `inference.DECODE_STEP_OPTIONS["tpu"]` (what
`Engine.generate_jit("tpu")` compiles with since this benchmark).

`hilora aot` compiles the decode step alone (`decode_step_jit_for`); `Engine.generate` runs the
prefill and every decode step in one program (`inference.generate_loop`), whose memory-space
decisions XLA makes separately. This compiles that very function for a TPU slice through libtpu
on this CPU host (Llama-2-7B shapes, 50 r=8 q/v LoRAs, bf16, 2048-token prompt + 128 new tokens,
mesh 1xN; parameters, pool and decisions abstract, as `hilora aot` builds them) and reads the
estimated HBM bytes of the loop body (one decode step, `aot.hbm_traffic(hlo, computation=
aot.loop_body(hlo))`) and of the entry (the prefill and the code around the loop; the `while`
itself counted as one kernel reading and writing its carry), with the options off and on.

    python benchmarks/generate_loop_aot.py [--only v5e-8:8:hilora v5e-8:1:hilora ...]
Outputs: benchmarks/results/generate_loop_aot.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS_DIR, _git_commit, command_line, markdown_table, write_json, write_text  # noqa: E402,E501

MODEL, N, RANK, TARGETS, PROMPT, NEW = "llama-2-7b", 50, 8, ("q_proj", "v_proj"), 2048, 128
CONFIGS = ("v5e-8:8:hilora", "v5e-8:8:base", "v5e-8:1:hilora")


def compile_both(topology: str, batch: int, router: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh

    from hilora_jax import aot
    from hilora_jax.inference import DECODE_STEP_OPTIONS, bucket_length, generate_loop
    from hilora_jax.model import sharding as shd

    cfg = aot.PRESETS[MODEL]
    devices, _ = aot.topology_devices(topology)
    data, model_ax = aot.parse_mesh(None, len(devices), cfg, batch)
    mesh = Mesh(np.asarray(devices).reshape(data, model_ax), (shd.DATA, shd.MODEL))
    graphdef, state = aot.abstract_params(cfg, jnp.bfloat16, mesh)
    pool, _ = aot.abstract_pool(aot.PoolSpec(n=N, rank=RANK, targets=TARGETS), cfg,
                                jnp.bfloat16, mesh)
    hook, _ = aot.abstract_hook(router, pool, batch, mesh)
    t = bucket_length(PROMPT)
    new = bucket_length(NEW, minimum=16, multiple=64)
    rep = shd.replicated(mesh)
    tok = shd.batch_sharding(mesh, (batch, t))
    key = jax.eval_shape(lambda: jax.random.key(0))
    args = (state, aot._sds((batch, t), jnp.int32, tok), aot._sds((batch, t), bool, tok),
            jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep),
            aot._sds((), jnp.float32, rep), aot._sds((), jnp.float32, rep),
            aot._sds((1,), jnp.int32, rep), aot._sds((), jnp.int32, rep), hook)
    out = {}
    for label, opts in (("defaults", None), ("decode_options", DECODE_STEP_OPTIONS["tpu"])):
        t0 = time.perf_counter()
        fn = jax.jit(generate_loop, static_argnums=(0,),
                     static_argnames=("cache_size", "max_new", "greedy", "mesh"),
                     compiler_options=opts)
        c = fn.lower(graphdef, *args, cache_size=t + new, max_new=new, greedy=True,
                     mesh=mesh).compile()
        hlo = c.as_text()
        body = aot.loop_body(hlo)
        step, parts = aot.hbm_traffic(hlo, computation=body)
        entry, _ = aot.hbm_traffic(hlo)
        out[label] = {"loop_step_bytes": step, "entry_bytes": entry,
                      "loop_step_parts": {k: v for k, v in sorted(parts.items(),
                                                                    key=lambda kv: -kv[1])[:6]},
                      "temp_bytes": c.memory_analysis().temp_size_in_bytes,
                      "cross_program_prefetch": "cross_program_prefetch" in hlo,
                      "compile_s": round(time.perf_counter() - t0, 1)}
        print(f"  {label}: loop step {step / 2**20:.0f} MiB, entry {entry / 2**20:.0f} MiB "
              f"({out[label]['compile_s']} s)", flush=True)
    return {"topology": topology, "batch": batch, "router": router, "mesh": f"{data}x{model_ax}",
            "cache_size": t + new, **out}


def render(res: dict) -> str:
    rows = []
    for key, r in res["configs"].items():
        a, b = r["defaults"], r["decode_options"]
        rows.append([key, f"{a['loop_step_bytes'] / 2**20:.0f}",
                     f"{b['loop_step_bytes'] / 2**20:.0f}",
                     f"{b['loop_step_bytes'] / a['loop_step_bytes']:.3f}x",
                     f"{a['entry_bytes'] / 2**20:.0f}", f"{b['entry_bytes'] / 2**20:.0f}",
                     f"{b['entry_bytes'] / a['entry_bytes']:.4f}x"])
    return "\n".join([
        f"# `Engine.generate`'s program on TPU: {MODEL} + {N} r={RANK} {'/'.join(TARGETS)} LoRAs, "
        f"bf16, prompt {PROMPT} + {NEW} new tokens, mesh 1xN", "",
        "Estimated HBM traffic (`hilora_jax.aot.hbm_traffic`, MiB per device) of the while loop's "
        "body (one decode step) and of the entry (prefill + the code around the loop; the "
        "`while` counted as one kernel reading and writing its carry), compiled by libtpu on a "
        "CPU host with XLA's defaults and with "
        "`inference.DECODE_STEP_OPTIONS['tpu']` (no cross-program prefetch; no on-chip copy "
        "whose uses read fewer bytes than it moves).", "",
        markdown_table(["slice:batch:router", "loop step, defaults", "loop step, options",
                        "ratio", "entry, defaults", "entry, options", "ratio"], rows), "",
        f"Command: `{res['command']}` (commit {res.get('commit')})", ""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", default=list(CONFIGS), help="slice:batch:router entries")
    args = p.parse_args(argv)
    path = RESULTS_DIR / "generate_loop_aot.json"
    res = {"benchmark": "generate_loop_aot", "command": command_line(), "commit": _git_commit(),
           "configs": {}}
    for key in args.only:
        topo, batch, router = key.split(":")
        print(f"== {key}", flush=True)
        res["configs"][key] = compile_both(topo, int(batch), router)
        write_json(path, res)
        write_text(path.with_suffix(".md"), render(res))
    print(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
