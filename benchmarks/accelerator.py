"""Accelerator throughput: Llama-2-7B-shaped bf16 + 50 r=8 q/v LoRAs on one GPU, beside the roofline.

One prepared script (issue 14 item 6) for a bare GPU machine with the repo copied: it needs only
what the project installs (jax with the GPU backend, flax, numpy; `pip install -e .` of this repo,
or the repo on `PYTHONPATH`). The GPU backend is the pinned jax's CUDA wheels
(`pip install "jax[cuda12]==<jax in constraints.txt>"`, carried as wheels to a machine without
network). No weights are downloaded or read: everything is random and made on the device.

Model: `hilora_jax.aot.PRESETS["llama-2-7b"]` (32 layers, d 4096, ffn 11008, 32 heads, vocab
32000), parameters of `aot.abstract_params` materialised by small jitted random inits (one per distinct
shape) straight onto the device with their shardings (norm weights 1, every other tensor N(0, 0.02^2)), in bfloat16.
Pool: `aot.abstract_pool(PoolSpec(50, 8, q_proj/v_proj))` materialised the same way (A ~ N(0,
1/d_in), B ~ N(0, 0.02^2), scale alpha/r = 2, every layer) and wrapped in a `LoraPool`.

Rows, per batch (interleaved in the same rounds, compile excluded by a warm-up call):
  base    no LoRA
  oracle  `build_router("oracle", pool)`: one adapter per row (row i -> lora{i mod 50})
  arrow   `build_router("arrow", pool)`: PEFT Arrow, per-token top-3 of the 50 LoRAs
  hilora  HiLoRA's token stage over a synthetic sequence decision: per row 4-8 adapters drawn at
          random get positive scores (the rest negative), `sequence_decisions(max_candidates=8,
          gamma=0.4)` keeps exactly them; kappa sqrt; `HiLoRAHook(strategy="auto").prepared()`
          with the slots trimmed as `HiLoRARouter` trims them (as `token_stage.py` does)

Method: `Engine.prefill(ids [B, prompt], cache_size=prompt+new)` timed to `block_until_ready`;
then `new - 1` calls of `Engine.decode_step` on that cache (the compiled functions `generate`
composes; a fixed token fed each step, dispatch is asynchronous, blocked once at the end), so the
`new` generated tokens are 1 from prefill + `new - 1` decode steps. prefill tok/s = B*prompt /
t_prefill; decode tok/s = B*(new-1) / t_decode. Medians of `--repeats` ABBA rounds; routed/base
ratios from the same rounds.

Roofline (analytic, per row): model FLOPs = 2 x (matmul parameters of the layers) per token +
causal attention (QK and PV: 4 x d_attn x context per token and layer) + the LM head at the last
position; LoRA and routing FLOPs are not counted (MFU is the base model's useful work). Minimum
bytes of a decode step = every weight read once (embedding: only the B gathered rows) + the valid
KV cache (mean context prompt + new/2) + the LoRA slots the router reads (oracle: its distinct
adapters; hilora: the union of the batch's candidates; arrow: all 50 and their prototypes).
Roofline time = max(FLOPs / peak bf16 FLOP/s, bytes / HBM bandwidth) from `GPU_PEAKS` (an unknown
GPU says so and gets no roofline). MFU = model FLOPs / time / peak; bandwidth use = minimum bytes
/ time / HBM bandwidth.

Budget: `--budget-s` (default 450 s, counted from start) is checked before every compile and every
timing round; what does not fit is skipped and marked so in the table and the JSON (the JSON is
rewritten after every batch, atomically).

Usage:
  python benchmarks/accelerator.py                      # the GPU run (bf16, batch 1/8/32)
  python benchmarks/accelerator.py --smoke              # tiny shapes, CPU, < 1 min
  python benchmarks/accelerator.py --out DIR --budget-s 450 --batches 1 8 32 --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from pathlib import Path

T_START = time.perf_counter()

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROUTERS = ("base", "oracle", "arrow", "hilora")


# ----------------------------------------------------------------------------- GPU peaks
@dataclasses.dataclass(frozen=True)
class GpuPeak:
    name: str
    bf16_flops: float | None  # dense (no sparsity) bf16 tensor-core FLOP/s; None: no bf16 units
    hbm_bw: float  # memory bandwidth, bytes/s
    mem_bytes: int
    source: str
    note: str = ""


# Vendor datasheet figures. NVIDIA quotes tensor-core FLOP/s "with sparsity"; the dense figure used
# here is half of it (the datasheets' footnote: "Shown with sparsity. Specifications are one-half
# lower without sparsity").
#   H100 SXM: BF16 1,979 TFLOPS (sparse) -> 989.5 dense; HBM3 80 GB, 3.35 TB/s
#             https://www.nvidia.com/en-us/data-center/h100/ (datasheet table, "H100 SXM")
#   H200 (SXM): BF16 1,979 TFLOPS (sparse) -> 989.5 dense; HBM3e 141 GB, 4.8 TB/s
#             https://www.nvidia.com/en-us/data-center/h200/ (datasheet table, "H200 SXM")
#   A100 80GB: BF16 312 TFLOPS dense (624 sparse); SXM 2,039 GB/s, PCIe 1,935 GB/s
#             https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
#   L4:       BF16 242 TFLOPS (sparse) -> 121 dense; 24 GB, 300 GB/s
#             https://www.nvidia.com/en-us/data-center/l4/
#   T4:       Turing has no bf16 tensor cores (FP16 mixed precision 65 TFLOPS); 16 GB, 320 GB/s
#             https://www.nvidia.com/en-us/data-center/tesla-t4/
GPU_PEAKS: dict[str, GpuPeak] = {
    "H100 SXM": GpuPeak("H100 SXM", 989.5e12, 3.35e12, 80 * 10**9,
                        "https://www.nvidia.com/en-us/data-center/h100/"),
    "H200": GpuPeak("H200 SXM", 989.5e12, 4.8e12, 141 * 10**9,
                    "https://www.nvidia.com/en-us/data-center/h200/"),
    "A100 80GB SXM": GpuPeak("A100 80GB SXM", 312e12, 2.039e12, 80 * 10**9,
                             "NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4)"),
    "A100 80GB PCIe": GpuPeak("A100 80GB PCIe", 312e12, 1.935e12, 80 * 10**9,
                              "NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4)"),
    "L4": GpuPeak("L4", 121e12, 300e9, 24 * 10**9, "https://www.nvidia.com/en-us/data-center/l4/"),
    "T4": GpuPeak("T4", None, 320e9, 16 * 10**9,
                  "https://www.nvidia.com/en-us/data-center/tesla-t4/",
                  note="no bf16 tensor cores (fp16 peak 65 TFLOP/s): no MFU"),
}

# jax `device_kind` strings (e.g. "NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA A100-SXM4-80GB",
# "NVIDIA A100 80GB PCIe", "NVIDIA L4", "Tesla T4") -> table entry. Variants with other figures
# (H100 PCIe / NVL, H200 NVL, A100 40GB, L40S) deliberately match nothing: unknown, not guessed.
_KIND_RULES = (
    (r"h200(?!.*nvl)", "H200"),
    (r"h100(?!.*(pcie|nvl)).*(sxm|hbm3)", "H100 SXM"),
    (r"a100.*sxm.*80gb|a100.*80gb.*sxm", "A100 80GB SXM"),
    (r"a100.*80gb.*pcie", "A100 80GB PCIe"),
    (r"(^|[^a-z0-9])l4($|[^a-z0-9])", "L4"),
    (r"(^|[^a-z0-9])t4($|[^a-z0-9])", "T4"),
)


def lookup_gpu(device_kind: str) -> dict:
    """Peak figures for a jax `device_kind`, or `{"status": "unknown", ...}` with no numbers."""
    kind = device_kind.lower()
    for pat, key in _KIND_RULES:
        if re.search(pat, kind):
            g = GPU_PEAKS[key]
            return {"status": "known", "device_kind": device_kind, "name": g.name,
                    "bf16_flops": g.bf16_flops, "hbm_bw": g.hbm_bw, "mem_bytes": g.mem_bytes,
                    "source": g.source, "note": g.note}
    return {"status": "unknown", "device_kind": device_kind, "name": "unknown",
            "bf16_flops": None, "hbm_bw": None, "mem_bytes": None, "source": None,
            "note": f"device {device_kind!r} is not in the peak table "
                    f"({', '.join(GPU_PEAKS)}): no roofline"}


# ----------------------------------------------------------------------------- analytic roofline
def model_counts(cfg, state) -> dict:
    """Parameter counts from the (abstract or real) state: layer matmul params, head, embedding."""
    import jax

    layer_mm = other = head = embed = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        p = jax.tree_util.keystr(path)
        n = int(leaf.size)
        if "lm_head" in p:
            head += n
        elif "embed_tokens" in p:
            embed += n
        elif len(leaf.shape) == 2 and "layers" in p:
            layer_mm += n
        else:
            other += n
    return {"layer_matmul": layer_mm, "lm_head": head, "embed": embed, "other": other,
            "tied": head == 0}


def roofline(cfg, counts, *, batch, prompt, new, lora_bytes, peak, dtype_bytes=2) -> dict:
    """FLOPs, minimum bytes and roofline times of the prefill and of one mean decode step."""
    L, d_attn = cfg.num_layers, cfg.num_heads * cfg.head_dim
    kv_per_tok = L * 2 * cfg.num_kv_heads * cfg.head_dim * dtype_bytes
    head = counts["lm_head"] or counts["embed"]  # tied: the embedding is the head
    d = cfg.hidden_size
    # prefill: every prompt token through every layer, causal attention (mean context prompt/2),
    # the head at the last position only (logits_at="last")
    f_pre = (batch * prompt * 2 * counts["layer_matmul"]
             + batch * L * 4 * d_attn * prompt * prompt / 2 + batch * 2 * head)
    weights = (counts["layer_matmul"] + counts["other"] + head) * dtype_bytes
    b_pre = weights + batch * prompt * d * dtype_bytes + batch * prompt * kv_per_tok  # + KV write
    ctx = prompt + new / 2  # mean context over the decode steps
    f_dec = batch * (2 * counts["layer_matmul"] + L * 4 * d_attn * ctx + 2 * head)
    b_dec = weights + batch * d * dtype_bytes + batch * ctx * kv_per_tok + lora_bytes
    out = {"prefill_flops": f_pre, "prefill_min_bytes": b_pre, "decode_step_flops": f_dec,
           "decode_step_min_bytes": b_dec, "lora_bytes_per_step": lora_bytes}
    if peak["status"] == "known":
        fl = peak["bf16_flops"]
        t_pre = max(f_pre / fl if fl else 0.0, b_pre / peak["hbm_bw"])
        t_dec = max(f_dec / fl if fl else 0.0, b_dec / peak["hbm_bw"])
        out.update(prefill_roofline_s=t_pre, decode_step_roofline_s=t_dec,
                   prefill_roofline_tok_s=batch * prompt / t_pre,
                   decode_roofline_tok_s=batch / t_dec,
                   prefill_bound="compute" if fl and f_pre / fl >= b_pre / peak["hbm_bw"]
                   else "memory",
                   decode_bound="compute" if fl and f_dec / fl >= b_dec / peak["hbm_bw"]
                   else "memory")
    return out


def lora_read_bytes(router, n_adapters_read, cfg, rank, targets, n_pool, dtype_bytes=2) -> int:
    """Bytes of the LoRA slots one decode step must read (module docstring)."""
    shapes = cfg.module_shapes()
    per_adapter = sum(cfg.num_layers * rank * (shapes[m][0] + shapes[m][1]) for m in targets)
    b = n_adapters_read * per_adapter * dtype_bytes
    if router == "arrow":  # prototypes [L, N, d_in] per module
        b += sum(cfg.num_layers * n_pool * shapes[m][0] for m in targets) * dtype_bytes
    return int(b)


# ----------------------------------------------------------------------------- setup
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-2-7b", help="hilora_jax.aot preset (model shapes)")
    p.add_argument("--batches", type=int, nargs="+", default=None,
                   help="batch sizes (default 1 8 32; --smoke: 1 2)")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--pool-size", type=int, default=50)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--min-candidates", type=int, default=4)
    p.add_argument("--max-candidates", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--routers", default=",".join(ROUTERS))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="wall-clock budget from start; what does not fit is skipped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes (1 layer, d 64, pool 6 x r4), batch 1/2, prompt 16, new 4, 1 round")
    p.add_argument("--out", default=None, help="output DIR for accelerator.{md,json} "
                                               "(default benchmarks/results)")
    a = p.parse_args(argv)
    if a.smoke:
        a.preset, a.prompt, a.new, a.pool_size, a.rank = "smoke", 16, 4, 6, 4
        a.batches = a.batches or [1, 2]
        a.min_candidates, a.max_candidates, a.repeats = 2, 4, 1
    a.batches = a.batches or [1, 8, 32]
    a.routers = [r for r in a.routers.split(",") if r]
    a.targets = tuple(t for t in a.targets.split(",") if t)
    bad = [r for r in a.routers if r not in ROUTERS]
    if bad:
        p.error(f"--routers: unknown {bad}; choose from {','.join(ROUTERS)}")
    if "base" not in a.routers:
        p.error("--routers must include base (the ratios' reference)")
    if a.new < 2 or a.prompt < 1 or a.repeats < 1 or min(a.batches) < 1:
        p.error("need --new >= 2, --prompt >= 1, --repeats >= 1, batches >= 1")
    if not 1 <= a.min_candidates <= a.max_candidates <= a.pool_size:
        p.error("need 1 <= --min-candidates <= --max-candidates <= --pool-size")
    return a


def smoke_config():
    from hilora_jax.model.config import ModelConfig, RopeConfig

    return ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=1,
                       num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                       rope=RopeConfig(theta=10000.0), max_position_embeddings=256,
                       model_type="llama")


def random_like(tree, key, kind, init):
    """A pytree of `ShapeDtypeStruct`s (with shardings) -> random arrays made on the device, each
    by a jitted `init(kind, key, shape, dtype)` placed on the struct's sharding. One small program
    per distinct (kind, shape, dtype, sharding), so a 32-layer model compiles a handful of tiny
    programs (one program for every leaf at once compiles very slowly)."""
    import functools

    import jax

    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    programs: dict = {}
    out = []
    for i, (path, leaf) in enumerate(flat):
        k = kind(jax.tree_util.keystr(path))
        sig = (k, tuple(leaf.shape), str(leaf.dtype), leaf.sharding)
        if sig not in programs:
            def make(key, i, k=k, shape=tuple(leaf.shape), dtype=leaf.dtype):
                return init(k, jax.random.fold_in(key, i), shape, dtype)

            programs[sig] = jax.jit(functools.partial(make), out_shardings=leaf.sharding)
        out.append(programs[sig](key, i))
    return jax.tree_util.tree_unflatten(treedef, out)


def build_model(cfg, dtype, mesh, seed):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from hilora_jax import aot

    graphdef, abstract = aot.abstract_params(cfg, dtype, mesh)

    def init(kind, key, shape, dt):
        if kind == "norm":
            return jnp.ones(shape, dt)
        return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dt)

    state = random_like(abstract, jax.random.key(seed),
                        lambda p: "norm" if "norm" in p else "normal", init)
    return nnx.merge(graphdef, state), model_counts(cfg, abstract)


def build_pool(cfg, args, dtype, mesh):
    import jax
    import jax.numpy as jnp

    from hilora_jax import aot
    from hilora_jax.lora.pool import LoraPool

    spec = aot.PoolSpec(n=args.pool_size, rank=args.rank, targets=args.targets)
    abstract, desc = aot.abstract_pool(spec, cfg, dtype, mesh)
    alpha = 2.0 * args.rank  # scale alpha / r = 2

    def kind(path):  # PoolArrays leaves: .A['q_proj'], .B[...], .scale[...], .mask[...], .ranks
        return path.split("[")[0].lstrip(".")

    def init(k, key, shape, dt):
        if k == "A":
            return (jax.random.normal(key, shape, jnp.float32) * shape[-1] ** -0.5).astype(dt)
        if k == "B":
            return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dt)
        if k == "scale":
            return jnp.full(shape, alpha / args.rank, dt)
        if k == "ranks":
            return jnp.full(shape, args.rank, dt)
        if k in ("mask", "active"):
            return jnp.ones(shape, dt)
        raise ValueError(f"unexpected pool array {k!r}")

    arrays = random_like(abstract, jax.random.key(args.seed + 1), kind, init)
    names = [f"lora{i}" for i in range(args.pool_size)]
    return LoraPool(arrays, names, mesh=mesh), desc


def hilora_hook(pool, batch, args):
    """Synthetic sequence decision with min..max candidates per row (module docstring)."""
    import jax.numpy as jnp
    import numpy as np

    from hilora_jax.routing.hooks import HiLoRAHook, trim_slots
    from hilora_jax.routing.sequence import sequence_decisions
    from hilora_jax.routing.token import kappa

    n = args.pool_size
    rng = np.random.default_rng(args.seed + 7 + batch)
    s = -rng.random((batch, n)).astype(np.float32) - 1.0
    counts = rng.integers(args.min_candidates, args.max_candidates + 1, size=batch)
    for b in range(batch):
        pick = rng.choice(n, size=int(counts[b]), replace=False)
        s[b, pick] = rng.random(len(pick)).astype(np.float32) * 3 + 0.1
    arr = pool.arrays
    dec = sequence_decisions(jnp.asarray(s), arr.ranks, arr.active, k=3, gamma=0.4, tau=1.0,
                             max_candidates=args.max_candidates)
    c = trim_slots(np.asarray(dec.n_rocs))
    hook = HiLoRAHook(arr, dec.cand_idx[:, :c], dec.cand_valid[:, :c], dec.n_rocs[:, :c],
                      kappa(dec.n_rocs, "sqrt"), strategy="auto").prepared()
    valid = np.asarray(dec.cand_valid[:, :c]) & (np.asarray(dec.n_rocs[:, :c]) > 0)
    idx = np.asarray(dec.cand_idx[:, :c])
    info = {"candidates_per_row": valid.sum(1).tolist(),
            "union_of_candidates": int(len(np.unique(idx[valid]))), "slots": int(c)}
    return hook, info


# ----------------------------------------------------------------------------- timing
def elapsed() -> float:
    return time.perf_counter() - T_START


def bench_batch(args, engine, pool, cfg, counts, peak, batch, state):
    """Rows of one batch size; fills `state["skipped"]` with what the budget did not allow."""
    import jax
    import numpy as np

    from hilora_jax.routing import build_router

    rng = np.random.default_rng(args.seed + batch)
    ids = rng.integers(10, cfg.vocab_size, size=(batch, args.prompt)).astype(np.int32)
    mask = np.ones((batch, args.prompt), bool)
    tok = rng.integers(10, cfg.vocab_size, size=(batch,)).astype(np.int32)
    cache_size = args.prompt + args.new
    rows: dict[str, dict] = {}
    hooks, reads = {}, {}
    for name in args.routers:
        rows[name] = {"batch": batch, "router": name, "status": "skipped (budget)"}
        t0 = time.perf_counter()
        if name == "base":
            hooks[name], reads[name] = None, 0
        elif name == "oracle":
            names = [pool.names[i % len(pool)] for i in range(batch)]
            hooks[name] = build_router("oracle", pool).route(["x"] * batch,
                                                             adapter_names=names).hook
            reads[name] = len(set(names))
        elif name == "arrow":
            hooks[name] = build_router("arrow", pool).route(["x"] * batch).hook
            reads[name] = len(pool)
        else:
            hooks[name], info = hilora_hook(pool, batch, args)
            reads[name] = info["union_of_candidates"]
            rows[name]["decision"] = info
        rows[name]["router_setup_s"] = time.perf_counter() - t0

    def prefill(h):
        t0 = time.perf_counter()
        logits, cache = engine.prefill(ids, mask, cache_size=cache_size, lora=h)
        jax.block_until_ready(logits)
        return time.perf_counter() - t0, cache

    def decode(h, cache, steps):
        t0 = time.perf_counter()
        logits = None
        for _ in range(steps):
            logits, cache = engine.decode_step(tok, cache, lora=h)
        jax.block_until_ready((logits, cache))
        return time.perf_counter() - t0

    compiled = []
    for name in args.routers:  # warm-up: compile prefill and the decode step
        est = max([rows[n]["compile_s"] for n in compiled], default=0.0)
        if elapsed() + est > args.budget_s:
            state["skipped"].append(f"batch {batch} {name}: compile (budget)")
            continue
        t0 = time.perf_counter()
        _, cache = prefill(hooks[name])
        decode(hooks[name], cache, 2)
        del cache
        rows[name]["compile_s"] = time.perf_counter() - t0
        compiled.append(name)
    times = {n: {"prefill": [], "decode": []} for n in compiled}
    round_s = 0.0
    for r in range(args.repeats):
        if not compiled or (r > 0 and elapsed() + round_s > args.budget_s) or (
                r == 0 and elapsed() > args.budget_s):
            state["skipped"].append(f"batch {batch}: rounds {r + 1}..{args.repeats} (budget)")
            break
        t0 = time.perf_counter()
        for name in compiled if r % 2 == 0 else compiled[::-1]:
            tp, cache = prefill(hooks[name])
            td = decode(hooks[name], cache, args.new - 1)
            del cache
            times[name]["prefill"].append(tp)
            times[name]["decode"].append(td)
        round_s = time.perf_counter() - t0
    for name in compiled:
        tp, td = times[name]["prefill"], times[name]["decode"]
        if not tp:
            continue
        t_pre, t_dec = float(np.median(tp)), float(np.median(td))
        steps = args.new - 1
        lb = lora_read_bytes(name, reads[name], cfg, args.rank, args.targets, len(pool))
        rl = roofline(cfg, counts, batch=batch, prompt=args.prompt, new=args.new,
                      lora_bytes=lb if name != "base" else 0, peak=peak,
                      dtype_bytes=2 if args.dtype == "bfloat16" else 4)
        row = rows[name]
        row.update(status="ok", repeats=len(tp), prefill_s=t_pre, decode_s=t_dec,
                   prefill_times_s=tp, decode_times_s=td,
                   prefill_tok_s=batch * args.prompt / t_pre,
                   decode_tok_s=batch * steps / t_dec, decode_step_ms=1e3 * t_dec / steps,
                   adapters_read=reads[name], roofline=rl)
        t_step = t_dec / steps
        if peak["status"] == "known":
            fl, bw = peak["bf16_flops"], peak["hbm_bw"]
            row["mfu_prefill"] = rl["prefill_flops"] / t_pre / fl if fl else None
            row["mfu_decode"] = rl["decode_step_flops"] / t_step / fl if fl else None
            row["bw_use_decode"] = rl["decode_step_min_bytes"] / t_step / bw
            row["bw_use_prefill"] = rl["prefill_min_bytes"] / t_pre / bw
            row["prefill_vs_roofline"] = row["prefill_tok_s"] / rl["prefill_roofline_tok_s"]
            row["decode_vs_roofline"] = row["decode_tok_s"] / rl["decode_roofline_tok_s"]
    base = rows.get("base", {})
    for row in rows.values():
        if row["status"] == "ok" and base.get("status") == "ok":
            row["prefill_vs_base"] = row["prefill_tok_s"] / base["prefill_tok_s"]
            row["decode_vs_base"] = row["decode_tok_s"] / base["decode_tok_s"]
    return list(rows.values())


# ----------------------------------------------------------------------------- output
def _f(x, fmt):
    return "n/a" if x is None else format(x, fmt)


def render(args, rows, peak, meta) -> str:
    table = []
    for r in rows:
        if r["status"] != "ok":
            table.append([r["batch"], r["router"], r["status"]] + [""] * 9)
            continue
        rl = r["roofline"]
        table.append([
            r["batch"], r["router"], f"{r['prefill_tok_s']:.0f}",
            _f(rl.get("prefill_roofline_tok_s"), ".0f"), _f(r.get("mfu_prefill"), ".1%"),
            f"{r.get('prefill_vs_base', float('nan')):.2f}x", f"{r['decode_tok_s']:.1f}",
            f"{r['decode_step_ms']:.2f}", _f(rl.get("decode_roofline_tok_s"), ".1f"),
            _f(r.get("bw_use_decode"), ".1%"), _f(r.get("mfu_decode"), ".2%"),
            f"{r.get('decode_vs_base', float('nan')):.2f}x"])
    md_table = common.markdown_table(
        ["batch", "router", "prefill tok/s", "roofline", "MFU", "prefill / base",
         "decode tok/s", "ms/step", "roofline", "HBM BW use", "MFU", "decode / base"], table)
    if peak["status"] == "known":
        pk = (f"{peak['name']} ({peak['device_kind']}): peak bf16 "
              f"{_f(peak['bf16_flops'] and peak['bf16_flops'] / 1e12, '.1f')} TFLOP/s, HBM "
              f"{peak['hbm_bw'] / 1e9:.0f} GB/s ({peak['source']}) {peak['note']}")
    else:
        pk = f"GPU peaks: {peak['note']}"
    skipped = ("\n\nSkipped (budget): " + "; ".join(meta["skipped"])) if meta["skipped"] else ""
    return (f"`{meta['command']}`\n\n{meta['model']} {args.dtype} (random weights), pool "
            f"{args.pool_size} x r={args.rank} {'/'.join(args.targets)}; prompt {args.prompt}, "
            f"{args.new} new tokens (1 from prefill + {args.new - 1} decode steps), median of "
            f"{args.repeats} interleaved rounds, compile excluded; hilora: "
            f"{args.min_candidates}-{args.max_candidates} candidates per row. Device "
            f"{meta['device']}; jax {meta['jax']}. {pk}. Roofline = max(model FLOPs / peak, "
            f"minimum bytes / HBM bandwidth), see the script's docstring. Setup "
            f"{meta['setup_s']:.0f}s, total {meta['total_s']:.0f}s of budget "
            f"{args.budget_s:.0f}s.\n\n{md_table}{skipped}\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp

    from hilora_jax import Engine, aot
    from hilora_jax.model import sharding as shd

    command = common.command_line()
    dev = jax.devices()[0]
    peak = lookup_gpu(dev.device_kind if dev.platform == "gpu" else f"{dev.platform} "
                      f"({dev.device_kind})")
    if dev.platform != "gpu":
        print(f"no GPU: running on {dev.platform}; {peak['note']}", file=sys.stderr)
    cfg = smoke_config() if args.preset == "smoke" else aot.model_config(preset=args.preset)[1]
    dtype = jnp.dtype(args.dtype)
    mesh = shd.make_mesh(1, 1, devices=[dev])
    t0 = time.perf_counter()
    model, counts = build_model(cfg, dtype, mesh, args.seed)
    pool, pool_desc = build_pool(cfg, args, dtype, mesh)
    jax.block_until_ready((nnx_state(model), pool.arrays))
    engine = Engine(model)
    setup_s = time.perf_counter() - t0
    print(f"model + pool on {dev} in {setup_s:.1f}s", file=sys.stderr)
    out_dir = Path(args.out) if args.out else common.RESULTS_DIR
    meta = {"command": command, "model": args.preset, "device": str(dev.device_kind),
            "jax": jax.__version__, "setup_s": setup_s, "skipped": []}
    rows: list[dict] = []

    def write(done: bool):
        meta["total_s"] = elapsed()
        md = render(args, rows, peak, meta)
        payload = {"benchmark": "accelerator", "complete": done, "command": command,
                   "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   "settings": {k: (list(v) if isinstance(v, tuple) else v)
                                for k, v in vars(args).items()},
                   "method": __doc__.split("Method:")[1].split("Budget:")[0].strip(),
                   "device": {"platform": dev.platform, "device_kind": dev.device_kind,
                              "peak": peak},
                   "model": {"preset": args.preset, "config": dataclasses.asdict(cfg),
                             "params": counts},
                   "pool": pool_desc, "machine": common.machine_info(), "rows": rows,
                   "skipped": meta["skipped"], "setup_s": setup_s, "total_wall_s": elapsed(),
                   "budget_s": args.budget_s, "markdown": md}
        common.write_json(out_dir / "accelerator.json", payload)
        common.write_text(out_dir / "accelerator.md", md)
        return md

    for b in args.batches:
        if elapsed() > args.budget_s:
            meta["skipped"].append(f"batch {b}: all rows (budget)")
            rows.extend({"batch": b, "router": n, "status": "skipped (budget)"}
                        for n in args.routers)
            continue
        rows.extend(bench_batch(args, engine, pool, cfg, counts, peak, b, meta))
        write(False)
        print(f"batch {b} done ({elapsed():.0f}s)", file=sys.stderr)
    md = write(True)
    print(md)
    print(f"wrote {out_dir / 'accelerator.json'} and {out_dir / 'accelerator.md'}",
          file=sys.stderr)
    return 0


def nnx_state(model):
    from flax import nnx

    return nnx.state(model)


if __name__ == "__main__":
    raise SystemExit(main())
