"""Attention before / after (issue 14 item 2) on a 2-layer Llama-2-7B-shaped proxy: the prefill
compiled for TPU through `hilora aot` with one `[B, N, T, S]` fp32 score block (the old attention,
`ATTN_SCORE_BUDGET` unbounded) and with the query blocks used now. Two layers keep the compile
short; per-layer figures scale with the layer count.

    python benchmarks/aot_attention_proxy.py   # -> benchmarks/results/aot_attention_2layer.json
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, write_json  # noqa: E402


def main() -> int:
    from hilora_jax import aot
    from hilora_jax.model import layers

    cfg = dataclasses.replace(aot.PRESETS["llama-2-7b"], num_layers=2)
    out = {}
    for label, budget in (("before (one [B,N,T,S] fp32 block)", 1 << 62),
                          ("after (query blocks)", None)):
        old = layers.ATTN_SCORE_BUDGET
        if budget:
            layers.ATTN_SCORE_BUDGET = budget
        try:
            for topo, b in (("v5e-8", 32), ("v5e-1", 1)):
                spec = aot.AotSpec(cfg=cfg, name="llama-2-7b-2layers", topology=topo,
                                   routers=("base",), batch=b, prompt=2048, new=128)
                rep = aot.analyze(spec)
                p = rep["prefill"]
                chip = aot.CHIPS[aot.TOPOLOGIES[topo][2]]
                out[f"{label} {topo}:{b}"] = {
                    "temp_GiB": p["memory"]["temp"] / 2**30,
                    "peak_GiB": rep["memory"]["peak"] / 2**30, "flops_T": p["flops"] / 1e12,
                    "hbm_GiB": p["hbm_bytes_est"] / 2**30, "xla_GiB": p["bytes"] / 2**30,
                    "compute_ms": p["compute_s"] * 1e3,
                    "hbm_ms": p["hbm_bytes_est"] / chip.hbm_bw * 1e3}
                print(label, topo, b, json.dumps(out[f"{label} {topo}:{b}"]), flush=True)
        finally:
            layers.ATTN_SCORE_BUDGET = old
    write_json(RESULTS_DIR / "aot_attention_2layer.json", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
