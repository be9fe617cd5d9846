"""Decode step only, Llama-2-7B + 50 r=8 q/v LoRAs, bf16, v5e-8 (1x8), batch 8, 2048 + 128 cache:
estimated HBM bytes by kind (`hilora_jax.aot.hbm_traffic`) and the number of whole-layer KV-cache
copies from on-chip memory back to HBM, per router. Compile-only through libtpu on a CPU host.

    TPU_SKIP_MDS_QUERY=1 JAX_PLATFORMS=cpu python benchmarks/aot_decode_bytes.py base,hilora,hilora-gathered,oracle TAG

writes /tmp/aot/dec_TAG_<router>.hlo.txt and prints one line per router (docs/aot_decode_bytes.md).
`WRITE_FIRST=1` compiles the default decode attention (write the new keys into the cache, then
attend over the updated cache; `llama.DECODE_ATTENTION`), otherwise "then_write" (attend over the
old cache plus the new keys, then write).
"""
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from hilora_jax import aot
from hilora_jax.aot import (
    _sds,
    abstract_hook,
    abstract_params,
    abstract_pool,
    hbm_traffic,
    topology_devices,
)
from hilora_jax.inference import KVCache, decode_step_jit_for, kv_cache_sharding
from hilora_jax.model import llama
from hilora_jax.model import sharding as shd

llama.DECODE_ATTENTION = "write_first" if os.environ.get("WRITE_FIRST") else "then_write"

cfg, dtype = aot.PRESETS["llama-2-7b"], jnp.bfloat16
devices, chip = topology_devices("v5e-8")
mesh = Mesh(np.asarray(devices).reshape(1, 8), (shd.DATA, shd.MODEL))
graphdef, state = abstract_params(cfg, dtype, mesh)
pool_arrays, _ = abstract_pool(aot.PoolSpec(n=50, rank=8, targets=("q_proj", "v_proj")), cfg,
                               dtype, mesh)
b, cache_size = 8, 2048 + 128
tok = _sds((b,), jnp.int32, shd.batch_sharding(mesh, (b,)))
cache = jax.eval_shape(lambda: KVCache.empty(cfg, b, cache_size, dtype))
cache = jax.tree.map(lambda a, s: _sds(a.shape, a.dtype, s), cache,
                     kv_cache_sharding(mesh, cache))
for r in sys.argv[1].split(","):
    hook, slots = abstract_hook(r, pool_arrays, b, mesh, 8)
    t0 = time.perf_counter()
    hlo = decode_step_jit_for("tpu").lower(graphdef, state, tok, cache, hook,
                                           mesh=mesh).compile().as_text()
    os.makedirs("/tmp/aot", exist_ok=True)
    open(f"/tmp/aot/dec_{sys.argv[2]}_{r}.hlo.txt", "w").write(hlo)
    tot, parts = hbm_traffic(hlo)
    # copy-start whose result is a whole layer's K or V in HBM and whose source is on chip (S(1))
    kv = r"bf16\[8,2176,4,128\]\{3,2,1,0:T\(4,128\)\(2,1\)"
    evictions = len(re.findall(r"= \(" + kv + r"\}, " + kv + r"S\(1\)\}", hlo))
    print(r, f"{time.perf_counter() - t0:.0f}s", "GiB", round(tot / 2**30, 3),
          {k: round(v / 2**30, 3) for k, v in parts.items() if v > 2**24},
          "kv evictions", evictions, flush=True)
