"""Routing overhead: prefill / decode tokens/s of each router vs the base model, per pool size N.

Model: SmolLM2-135M-Instruct (fp32, `load_model("smollm2")`). Pool: N synthetic rank-8 adapters on
q_proj (576->576) and v_proj (576->192) at all 30 layers, fp32: A ~ N(0, 1/d_in) (the scale of PEFT's
kaiming-uniform init), B ~ N(0, 0.02^2), alpha 16 (s = 2). Adapter i is identical for every N (the
N-pool is the first N adapters of the largest one). Sequence stage: synthetic 384-d embeddings
(`PrecomputedEmbedder`), 20 samples per adapter around a per-adapter mean; prompt b embeds near
adapter b's mean (in distribution). The embedder is therefore free; the sequence stage is timed
separately (scores + decisions, embedding excluded).

Rows (all on the same prompts, measured in the same interleaved rounds per N):
  base           no hook
  single-LoRA    `oracle` on a pool of ONE adapter (`pool.select`): the true cost of one LoRA,
                 independent of N. This is the reference of the goal.
  oracle@N       `oracle` on the N-pool (one adapter per row, `GatedHook` with [B, A] gates):
                 shows that `GatedHook` computes x.A over the whole pool, so its cost grows with N.
  arrow          PEFT Arrow (top-3 of N per token; full-pool x.A as shipped).
  hilora-dense   HiLoRA, token stage over the whole pool [B,T,A,R] then masked.
  hilora-gathered HiLoRA, candidates gathered per sequence [B,C,R,D] (C = max_candidates = 8).

Method (every call blocks on its result; `time_interleaved` from benchmarks/common.py):
  prefill  `t_generate(1)`: the prefill of B x prompt tokens into the KV cache plus the first greedy
           token (last-position logits + argmax; the extra work is one [B,D]x[D,V] matmul, the
           same as `Engine.forward(..., logits_at="last")` does). prefill tok/s = B*prompt / t_gen(1).
           (Using generate(1) instead of a separate `forward` halves the number of compilations of
           the 30-layer unrolled model, which is what dominates this benchmark's wall time on a
           shared 2-core CPU.)
  decode   `t_generate(new) - t_generate(1)`, paired per round. Both run the engine's jitted
           `_generate` (what `Engine.generate(..., stop_tokens=[-1])` runs) with the same cache size
           and output bucket and only the traced step limit changed, so one executable; generate(1)
           is prefill + first token, so the difference is exactly `new - 1` cached decode steps.
           decode tok/s = B * (new - 1) / t_decode.
  Warm-up: one untimed call of every function (compiles), then `--repeats` rounds, ABBA order;
  medians. Ratios are to `base` of the same N's rounds.
  sequence stage: the router's jitted `_decide` (Gaussian scores of B embeddings against N
  Gaussians + top-C selection + allocation + kappa) per batch, and the whole host call
  `router.route(texts, embeddings=z)` (adds per-text PRNG keys and device->host info copies).

Usage:
  python benchmarks/routing_overhead.py --sizes 8 32 128 512 --batch 8 --prompt 128 --new 64 --repeats 3
  python benchmarks/routing_overhead.py --quick
  python benchmarks/routing_overhead.py --experiment trim        # proposed change (see EXPERIMENTS)
  python benchmarks/routing_overhead.py --experiment pregather   # gather hoisted out of decode
  python benchmarks/routing_overhead.py --sizes 512 --routers base single hilora-gathered
  python benchmarks/routing_overhead.py --finish-partial a.partial.json b.json ...  # merge runs
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

EXPERIMENTS = {
    "none": "hilora-jax as shipped",
    "trim": ("hilora-gathered with the candidate slots trimmed to the batch's largest number of "
             "valid candidates, rounded up to a power of two (valid candidates are a prefix of "
             "the max_candidates slots, so this is exact): the proposed change to "
             "HiLoRARouter.route; at most log2(max_candidates)+1 compiled variants"),
    "pregather": ("hilora-gathered with the candidate gather done ONCE per generate call (outside "
                  "the decode loop): per-layer A_c [L,B,C,R,D], B_c, s*valid, n_module are "
                  "precomputed; the per-module call only does x.A_c, top-n, (u*g*w).B_c"),
}
EMB_DIM, M_SAMPLES, RANK = 384, 20, 8


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 32, 128, 512])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: sizes 4 16, batch 2, prompt "
                   "16, new 8, 2 repeats (explicit flags are overridden)")
    p.add_argument("--routers", nargs="+", default=None,
                   help="subset of rows (default all): base single oracle arrow hilora-dense "
                        "hilora-gathered")
    p.add_argument("--experiment", default="none", choices=sorted(EXPERIMENTS))
    p.add_argument("--finish-partial", nargs="+", default=None, metavar="PARTIAL_JSON",
                   help="render tables/JSON from the per-size checkpoint of an interrupted run "
                        "(pass the same --sizes/--batch/... flags as that run)")
    p.add_argument("--out", default=None, help="JSON path (default results/routing_overhead.json)")
    a = p.parse_args(argv)
    if a.quick:
        a.sizes, a.batch, a.prompt, a.new, a.repeats = [4, 16], 2, 16, 8, 2
    if a.new < 2:
        p.error("--new must be >= 2")
    return a


def _clean_xla_flags():
    orig = os.environ.get("XLA_FLAGS")
    if orig:
        os.environ["XLA_FLAGS"] = " ".join(
            f for f in orig.split() if not f.startswith("--xla_force_host_platform_device_count"))
    return orig


def make_pool_arrays(cfg, n_max, seed):
    """Host arrays for n_max adapters (q_proj, v_proj; rank 8; every layer)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    L, shapes = cfg.num_layers, cfg.module_shapes()
    out = {}
    for m in ("q_proj", "v_proj"):
        d_in, d_out = shapes[m]
        A = rng.standard_normal((L, n_max, RANK, d_in), np.float32) * np.float32(d_in ** -0.5)
        B = rng.standard_normal((L, n_max, RANK, d_out), np.float32) * np.float32(0.02)
        out[m] = (A, B)
    means = rng.standard_normal((n_max, EMB_DIM)).astype(np.float32) * 0.5
    samples = rng.standard_normal((n_max, M_SAMPLES, EMB_DIM)).astype(np.float32) * 0.1
    return out, means, samples


def build_pool(host, means, samples, n):
    import numpy as np

    from hilora_jax.embed import PrecomputedEmbedder
    from hilora_jax.lora.pool import LoraPool, PoolArrays, _to_device

    A = {m: np.ascontiguousarray(a[:, :n]) for m, (a, _) in host.items()}
    B = {m: np.ascontiguousarray(b[:, :n]) for m, (_, b) in host.items()}
    shp = next(iter(A.values())).shape[:3]
    arrays = PoolArrays(A=A, B=B, scale={m: np.full(shp, 2.0, np.float32) for m in A},
                        mask={m: np.ones(shp, bool) for m in A},
                        ranks=np.full((n,), RANK, np.int32), active=np.ones((n,), bool))
    names = [f"lora{i}" for i in range(n)]
    table, samp = {}, {}
    for i in range(n):
        samp[names[i]] = tuple(f"lora{i} s{j}" for j in range(M_SAMPLES))
        for j in range(M_SAMPLES):
            table[f"lora{i} s{j}"] = means[i] + samples[i, j]
    pool = LoraPool(_to_device(arrays, np.float32, None), names, samples=samp)
    return pool, PrecomputedEmbedder(table)


def trim_hook(hook):
    """EXPERIMENT: keep only the first c_eff candidate slots (c_eff = next power of two of the
    batch's max valid count); exact because `sequence_decisions` fills valid slots first."""
    import numpy as np

    n = int(np.asarray(hook.cand_valid).sum(-1).max())
    c_eff = 1 << max(0, (max(n, 1) - 1).bit_length())
    return hook.replace(cand_idx=hook.cand_idx[:, :c_eff], cand_valid=hook.cand_valid[:, :c_eff],
                        n_rocs=hook.n_rocs[:, :c_eff])


_PREPARE = {}


def pregather_hook(hook):
    """EXPERIMENT: HiLoRAHook with the per-sequence candidate gather hoisted out of the model."""
    if "fn" not in _PREPARE:
        _PREPARE["fn"] = _make_prepare()
    return _PREPARE["fn"](hook)


def _make_prepare():
    import jax
    import jax.numpy as jnp
    from flax import struct

    from hilora_jax.model.hook import LoraHook
    from hilora_jax.routing.sequence import per_module_counts
    from hilora_jax.routing.token import topn_gates

    @struct.dataclass
    class PreGathered(LoraHook):
        A_c: dict  # m -> L B C R D
        B_c: dict  # m -> L B C R E
        w_c: dict  # m -> L B C R  (s * valid)
        valid_c: dict  # m -> L B C R
        n_mod: dict  # m -> L B C
        kappa: jax.Array  # B

        def delta(self, layer, name, x):
            if name not in self.A_c:
                return None
            valid = self.valid_c[name][layer]
            u = jnp.einsum("BTD,BCRD->BTCR", x, self.A_c[name][layer])
            g = topn_gates(u, self.n_mod[name][layer], valid)
            coef = u * g * self.w_c[name][layer][:, None]
            delta = jnp.einsum("BTCR,BCRE->BTE", coef, self.B_c[name][layer])
            return delta * self.kappa[:, None, None], {}

    @jax.jit
    def prepare(h):
        A_c, B_c, w_c, v_c, n_c = {}, {}, {}, {}, {}
        idx = h.cand_idx
        for m in h.arrays.A:
            per = []
            for layer in range(h.arrays.A[m].shape[0]):
                A_l, B_l, mask_l, w_l = h.arrays.layer(m, layer)
                valid = mask_l[idx] & h.cand_valid[..., None]
                n_mod = per_module_counts(h.n_rocs, h.arrays.ranks[idx],
                                          valid.sum(-1).astype(jnp.int32))
                per.append((A_l[idx], B_l[idx], w_l[idx] * valid, valid, n_mod))
            A_c[m], B_c[m], w_c[m], v_c[m], n_c[m] = (jnp.stack(z) for z in zip(*per, strict=True))
        return PreGathered(A_c, B_c, w_c, v_c, n_c, h.kappa)

    return prepare


def bench_size(args, engine, host, means, samples, n, single_hook, prompts_ids, texts):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from hilora_jax.routing import build_router

    Bsz, P, NEW = args.batch, args.prompt, args.new
    t0 = time.perf_counter()
    pool, embedder = build_pool(host, means, samples, n)
    setup = {"pool_s": time.perf_counter() - t0}
    names = pool.names
    z = np.stack([means[b % n] + np.random.default_rng(1000 + b).standard_normal(EMB_DIM)
                  .astype(np.float32) * 0.1 for b in range(Bsz)])

    wanted = args.routers or ["base", "single", "oracle", "arrow", "hilora-dense",
                              "hilora-gathered"]
    hooks, routers = {}, {}
    if "base" in wanted:
        hooks["base"] = None
    if "single" in wanted:
        hooks["single-LoRA"] = single_hook
    if "oracle" in wanted:
        r = build_router("oracle", pool)
        hooks["oracle@N"] = r.route(texts, adapter_names=[names[b % n] for b in range(Bsz)]).hook
    if "arrow" in wanted:
        t0 = time.perf_counter()
        r = build_router("arrow", pool)
        setup["arrow_prototypes_s"] = time.perf_counter() - t0
        hooks["arrow"] = r.route(texts).hook
    for strat in ("dense", "gathered"):
        if f"hilora-{strat}" in wanted:
            t0 = time.perf_counter()
            r = build_router("hilora", pool, options={"strategy": strat, "embedder": embedder})
            setup[f"hilora_{strat}_fit_s"] = time.perf_counter() - t0
            routing = r.route(texts, embeddings=z)
            routers[strat] = r
            hooks[f"hilora-{strat}"] = routing.hook
            if strat == "gathered":
                info = routing.info
                setup["hilora_candidates_per_row"] = info["cand_valid"].sum(-1).tolist()
                setup["hilora_budget_per_row"] = info["budget"].tolist()
    if args.experiment == "trim" and "hilora-gathered" in hooks:
        hooks["hilora-trim"] = trim_hook(hooks["hilora-gathered"])
        setup["trim_slots"] = int(hooks["hilora-trim"].cand_idx.shape[1])
    if args.experiment == "pregather" and "hilora-gathered" in hooks:
        t0 = time.perf_counter()
        hooks["hilora-pregather"] = jax.block_until_ready(
            pregather_hook(hooks["hilora-gathered"]))
        setup["pregather_first_call_s"] = time.perf_counter() - t0

    ids = jnp.asarray(prompts_ids, jnp.int32)
    mask = jnp.ones((Bsz, P), bool)
    gen = common.generate_timer(engine, ids, mask, NEW)

    fns = {}
    for name, h in hooks.items():
        fns[f"{name}|gen1"] = gen(h, 1)
        fns[f"{name}|genN"] = gen(h, NEW)
    if args.experiment == "pregather" and "hilora-pregather" in hooks:
        # the prepare step is part of the cost of a generate call with this hook
        hg = hooks["hilora-gathered"]
        fns["hilora-pregather-incl-prepare|genN"] = lambda: jax.block_until_ready(
            gen(pregather_hook(hg), NEW)())
    load_before = common.load_average()
    t0 = time.perf_counter()
    timings = common.time_interleaved(fns, repeats=args.repeats, warmup=1)
    wall = time.perf_counter() - t0
    load_after = common.load_average()

    # correctness: hilora dense == gathered (== pregather) tokens; single LoRA vs base differ
    checks = {}
    toks = {k: np.asarray(gen(h, NEW)())[:, :NEW] for k, h in hooks.items()
            if k.startswith("hilora")}
    if "hilora-dense" in toks and "hilora-gathered" in toks:
        checks["hilora_dense_vs_gathered_token_agreement"] = float(
            np.mean(toks["hilora-dense"] == toks["hilora-gathered"]))
    if "hilora-trim" in toks:
        checks["hilora_trim_vs_gathered_token_agreement"] = float(
            np.mean(toks["hilora-trim"] == toks["hilora-gathered"]))
    if "hilora-pregather" in toks:
        checks["hilora_pregather_vs_gathered_token_agreement"] = float(
            np.mean(toks["hilora-pregather"] == toks["hilora-gathered"]))

    rows = common.prefill_decode_rows(timings, hooks, Bsz, P, NEW,
                                      refs=(("base", "base"), ("single-LoRA", "single")))
    if "hilora-pregather-incl-prepare|genN" in timings:
        rows["hilora-pregather"]["genN_incl_prepare_s"] = timings[
            "hilora-pregather-incl-prepare|genN"]["median_s"]

    # sequence stage (embedding excluded)
    seq = {}
    if routers:
        r = routers.get("gathered") or next(iter(routers.values()))
        arr = pool.arrays
        zj = jnp.asarray(z)
        keys = jnp.stack([jax.random.fold_in(jax.random.key(0), i) for i in range(Bsz)])
        tau = jnp.float32(r.params["tau"])

        def decide():
            return jax.block_until_ready(r._decide(r.bank, zj, arr.ranks, arr.active, tau, keys))

        def route():
            return r.route(texts, embeddings=z)

        st = common.time_interleaved({"decide": decide, "route": route},
                                     repeats=max(20, args.repeats), warmup=2)
        seq = {"decide_ms": 1e3 * st["decide"]["median_s"],
               "route_ms": 1e3 * st["route"]["median_s"],
               "raw_s": st}
    result = {"N": n, "rows": rows, "sequence_stage": seq, "setup_s": setup, "checks": checks,
              "load_before": load_before, "load_after": load_after, "timing_wall_s": wall}
    del pool, hooks, routers
    gc.collect()
    return result, timings


def main(argv=None) -> int:
    args = parse_args(argv)
    orig_xla = _clean_xla_flags()
    if args.finish_partial:
        import json

        results, raw, cmds = [], {}, []
        for run, f in enumerate(args.finish_partial, 1):
            d = json.loads(Path(f).read_text())
            for r in d["results"]:
                r["run"] = run
            results += d["results"]
            raw.update({f"run{run}/{k}": v for k, v in (d.get("raw") or d["raw_timings_s"]).items()})
            cmds.append(f"run {run}: {d['command']}")
        done = sorted(r["N"] for r in results)
        names = ", ".join(Path(f).name for f in args.finish_partial)
        return finish(args, results, raw, orig_xla, time.perf_counter(), 30,
                      note=f"merged per-size checkpoints {names} (sizes {done}; the full "
                           f"4-size run did not fit the time box); machine info taken at "
                           f"render time", command=" ; ".join(cmds))
    import jax
    import numpy as np

    from hilora_jax.inference import Engine
    from hilora_jax.io.loading import load_model, load_tokenizer

    os.environ.setdefault("HILORA_QUIET", "1")
    jax.config.update("jax_compilation_cache_dir", "/tmp/hilora_jax_cc_routing_overhead")
    t_start = time.perf_counter()
    engine = Engine(load_model("smollm2", progress=False))
    cfg = engine.config
    tok = load_tokenizer("smollm2")
    special = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}) or {})
    allowed = np.array([i for i in range(cfg.vocab_size) if i not in special], np.int64)
    prompts_ids = np.random.default_rng(args.seed).choice(allowed, size=(args.batch, args.prompt))
    texts = [f"prompt {b}" for b in range(args.batch)]

    t0 = time.perf_counter()
    host, means, samples = make_pool_arrays(cfg, max(args.sizes), args.seed)
    args.host_pool_s = time.perf_counter() - t0
    # the single-LoRA reference: adapter 0 alone in a pool of one (identical for every N)
    from hilora_jax.routing import build_router

    one, _ = build_pool(host, means, samples, 1)
    single_hook = build_router("oracle", one).route(texts, adapter_names=["lora0"] * args.batch).hook

    results, raw = [], {}
    for n in args.sizes:
        t0 = time.perf_counter()
        res, timings = bench_size(args, engine, host, means, samples, n, single_hook,
                                  prompts_ids, texts)
        res["size_wall_s"] = time.perf_counter() - t0
        results.append(res)
        raw[f"N{n}"] = timings
        common.write_json(Path(str(args.out or common.RESULTS_DIR / "routing_overhead.json")
                               ).with_suffix(".partial.json"),
                          {"command": common.command_line(), "results": results, "raw": raw})
        print(f"[routing_overhead] N={n} done in {res['size_wall_s']:.0f}s "
              f"(load {res['load_before']} -> {res['load_after']})", file=sys.stderr, flush=True)

    return finish(args, results, raw, orig_xla, t_start, cfg.num_layers)


def finish(args, results, raw, orig_xla, t_start, num_layers, note="", command=None):
    """Tables, goal check, JSON and markdown (also used by --finish-partial)."""
    import jax

    command = command or common.command_line()
    order = ["base", "single-LoRA", "oracle@N", "arrow", "hilora-dense", "hilora-gathered",
             "hilora-pregather", "hilora-trim"]
    headers = ["run", "N", "router", "prefill tok/s", "prefill / base", "decode tok/s", "decode / base",
               "decode ms/step", "decode / single-LoRA"]
    rows = []
    results.sort(key=lambda r: (r.get("run", 1), r["N"]))
    for res in results:
        for name in order:
            if name in res["rows"]:
                r = res["rows"][name]
                rows.append([res.get("run", 1), res["N"], name, r["prefill_tok_s"], f"{r['prefill_vs_base']:.2f}x",
                             r["decode_tok_s"], f"{r['decode_vs_base']:.2f}x", r["decode_step_ms"],
                             f"{r.get('decode_vs_single', float('nan')):.2f}x"])
    table = common.markdown_table(headers, rows)
    seq_rows = [[res.get("run", 1), res["N"], res["sequence_stage"].get("decide_ms", float("nan")),
                 res["sequence_stage"].get("route_ms", float("nan")),
                 res["setup_s"].get("hilora_candidates_per_row", ""),
                 res["load_before"]] for res in results]
    seq_table = common.markdown_table(
        ["run", "N", "scores+decisions ms / batch (jit)", "route() ms / batch (host call)",
         "candidates per row", "load avg before"], seq_rows)

    goal = {}
    # goal: from the run that measured hilora-gathered at the most sizes (same-run comparison)
    runs = {}
    for res in results:
        if "hilora-gathered" in res["rows"]:
            runs.setdefault(res.get("run", 1), []).append(res)
    best = max(runs.values(), key=lambda rs: (len(rs), max(r["N"] for r in rs))) if runs else []
    gat = {res["N"]: res["rows"]["hilora-gathered"] for res in best}
    if gat and all("decode_vs_single" in g for g in gat.values()):
        nmax = max(gat)
        goal = {
            "run": best[0].get("run", 1),
            "N_max": nmax,
            "gathered_decode_vs_single_at_Nmax": gat[nmax]["decode_vs_single"],
            "gathered_prefill_vs_single_at_Nmax": gat[nmax]["prefill_vs_single"],
            "gathered_decode_tok_s_by_N": {k: v["decode_tok_s"] for k, v in gat.items()},
            "gathered_decode_vs_base_by_N": {k: v["decode_vs_base"] for k, v in gat.items()},
        }
        goal["met_0.8x_single"] = bool(min(goal["gathered_decode_vs_single_at_Nmax"],
                                           goal["gathered_prefill_vs_single_at_Nmax"]) >= 0.8)
    machine = common.machine_info()
    machine["xla_flags_original"] = orig_xla
    header = (f"SmolLM2-135M-Instruct fp32, batch {args.batch}, prompt {args.prompt}, "
              f"{args.new} new tokens (no early stop), median of {args.repeats}; synthetic r={RANK} "
              f"q_proj+v_proj adapters at all {num_layers} layers; {machine['cpu_model']}, "
              f"{machine['usable_cores']} cores, jax {machine['versions'].get('jax')}; load avg "
              f"before each N {[r['load_before'] for r in results]}; experiment: {args.experiment}")
    if note:
        header += f"; NOTE: {note}"
    md = (f"`{command}`\n\n{header}\n\n{table}\n\nSequence stage (embedding "
          f"excluded):\n\n{seq_table}\n\nGoal check: {goal}\n")
    print(md)
    payload = {
        "benchmark": "routing_overhead",
        "command": command, "note": note,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {"sizes": args.sizes, "batch": args.batch, "prompt": args.prompt,
                     "new": args.new, "repeats": args.repeats, "seed": args.seed,
                     "quick": args.quick, "experiment": args.experiment,
                     "experiment_description": EXPERIMENTS[args.experiment],
                     "rank": RANK, "modules": ["q_proj", "v_proj"], "emb_dim": EMB_DIM,
                     "samples_per_adapter": M_SAMPLES, "host_pool_s": getattr(args, "host_pool_s", None),
                     "jax_devices": [str(d) for d in jax.devices()]},
        "method": __doc__.split("Method")[1].split("Usage:")[0].strip(),
        "machine": machine,
        "goal": goal,
        "results": results,
        "raw_timings_s": raw,
        "total_wall_s": time.perf_counter() - t_start,
        "markdown": md,
    }
    out = Path(args.out) if args.out else common.RESULTS_DIR / "routing_overhead.json"
    path = common.write_json(out, payload)
    common.write_text(path.with_suffix(".md"), md)
    print(f"wrote {path} and {path.with_suffix('.md')} ({payload['total_wall_s']:.0f}s)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
