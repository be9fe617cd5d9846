"""Token stage with real candidate sets: HiLoRA's routed step over a heterogeneous pool.

Model: SmolLM2-135M-Instruct fp32 (`load_model("smollm2")`, 30 layers, d 576, ffn 1536, kv 192).
Pool (built in memory with `LoraPool.from_adapters` from `PeftAdapter`s): N adapters, ranks drawn
from {4, 8, 16, 32}; even adapters target q_proj+v_proj, odd ones all linear layers (q, k, v, o,
gate, up, down); adapter 1 uses rsLoRA (s = alpha/sqrt(r)), the others s = alpha/r, alpha 16;
A ~ N(0, 1/d_in), B ~ N(0, 0.02^2), every layer. Rank padding: every module's
pool axis is padded to the pool's max rank (32).

Sequence stage (built directly, no embedder): per row, 8 adapters drawn at random get positive
scores (the rest negative), so `sequence_decisions(max_candidates=8)` keeps exactly 8 candidates
per row, gamma 0.4, expected mode, kappa sqrt. Oracle: one adapter per row (sparse `GatedHook`,
what `OracleRouter` builds). Arrow: `ArrowRouter` (top-3 of N per token, SVD prototypes).

Rows (same prompts, same decisions, interleaved in the same rounds):
  base              no hook
  oracle            one adapter per row
  arrow             PEFT Arrow
  hilora-gathered   strategy `gathered` (the shipped default: per-row gather [B,C,R_max,D]) - BEFORE
  hilora-dense      strategy `dense` (u over the whole rank-padded pool, masked)
  hilora-packed     strategy `packed` (u once per batch over the pool's valid ROCs, rank groups)
  hilora-auto       strategy `auto` (static per-call choice; picks `packed` here)   - AFTER

Method: `t_generate(1)` = prefill of B x prompt tokens + first token; decode = `t_generate(new) -
t_generate(1)` paired per round (same executable, only the traced step limit changes), so exactly
`new - 1` cached decode steps. prefill tok/s = B*prompt / t_gen(1), decode tok/s = B*(new-1) /
t_decode. Warm-up call of everything first (compiles), then `--repeats` ABBA rounds; medians;
ratios to base from the same rounds. Greedy tokens of every hilora strategy are compared.

Profile (`--profile`): one layer's token stage in isolation (all of that layer's adapted modules,
jitted, random x), at decode (T=1) and prefill (T=prompt) shapes, with the pieces of `gathered`
(gather of [B,C,R,D]/[B,C,R,E], responses, top-n, B side) and of `packed` timed separately,
next to the base projections of the same layer. x 30 layers gives the per-step cost.

Usage:
  python benchmarks/token_stage.py --sizes 9 50 --batch 8 --prompt 64 --new 32 --repeats 3
  python benchmarks/token_stage.py --profile-only --sizes 9
  python benchmarks/token_stage.py --quick
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

RANKS = (4, 8, 16, 32)
QV = ("q_proj", "v_proj")
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STRATS = ("gathered", "dense", "packed", "auto")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[9, 50])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--candidates", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile-repeats", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", nargs="+", default=None,
                   help="subset of: base oracle arrow hilora-gathered hilora-dense hilora-packed "
                        "hilora-auto")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--profile-only", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: sizes 9, batch 2, prompt 16, new 4, 1 repeat")
    p.add_argument("--out", default=None, help="JSON path (default results/token_stage.json)")
    a = p.parse_args(argv)
    if a.quick:
        a.sizes, a.batch, a.prompt, a.new, a.repeats, a.profile_repeats = [9], 2, 16, 4, 1, 2
    if a.new < 2:
        p.error("--new must be >= 2")
    if a.candidates > min(a.sizes):
        p.error("--candidates must not exceed the smallest --sizes")
    return a


def make_pool(cfg, n, seed):
    """Heterogeneous pool (module docstring) through the library's constructor."""
    import numpy as np

    from hilora_jax.io.peft import PeftAdapter
    from hilora_jax.lora.pool import LoraPool

    rng = np.random.default_rng(seed)
    shapes = cfg.module_shapes()
    adapters, desc = [], []
    for i in range(n):
        r = int(rng.choice(RANKS))
        targets = QV if i % 2 == 0 else ALL
        rs = i == 1
        alpha = 16.0
        s = alpha / np.sqrt(r) if rs else alpha / r
        mods = {}
        for li in range(cfg.num_layers):
            for m in targets:
                d_in, d_out = shapes[m]
                a = rng.standard_normal((r, d_in), np.float32) * np.float32(d_in ** -0.5)
                b = rng.standard_normal((d_out, r), np.float32) * np.float32(0.02)
                mods[(li, m)] = (a, b.T, float(s))  # B as ROC rows [r, d_out]
        cfg_d = {"r": r, "lora_alpha": alpha, "use_rslora": rs, "target_modules": list(targets)}
        adapters.append(PeftAdapter(name=f"lora{i}", source="synthetic", config=cfg_d, r=r,
                                    modules=mods))
        desc.append({"name": f"lora{i}", "r": r, "targets": "q,v" if i % 2 == 0 else "all-linear",
                     "rslora": rs})
    return LoraPool.from_adapters(adapters, cfg), desc


def make_decision(n, batch, cands, seed):
    """SequenceDecision with exactly `cands` candidates per row (positive scores), + kappa."""
    import jax.numpy as jnp
    import numpy as np

    from hilora_jax.routing.sequence import sequence_decisions
    from hilora_jax.routing.token import kappa

    rng = np.random.default_rng(seed + 7)
    s = -rng.random((batch, n)).astype(np.float32) - 1.0
    for b in range(batch):
        pick = rng.choice(n, size=cands, replace=False)
        s[b, pick] = rng.random(cands).astype(np.float32) * 3 + 0.1
    return s, (lambda ranks, active: _decide(jnp.asarray(s), ranks, active, cands, kappa,
                                             sequence_decisions))


def _decide(s, ranks, active, cands, kappa, sequence_decisions):
    dec = sequence_decisions(s, ranks, active, k=3, gamma=0.4, tau=1.0, max_candidates=cands)
    return dec, kappa(dec.n_rocs, "sqrt")


# ----------------------------------------------------------------------------- profile


def profile_layer(args, cfg, pool, hook, layer=0):
    """Isolated, jitted pieces of one layer's token stage (module docstring)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from hilora_jax.routing.token import topn_gates

    arr = pool.arrays
    mods = arr.modules
    shapes = cfg.module_shapes()
    rng = np.random.default_rng(3)
    out = {}
    for phase, t in (("decode", 1), ("prefill", args.prompt)):
        xs = {m: jnp.asarray(rng.standard_normal((args.batch, t, shapes[m][0]), np.float32))
              for m in mods}
        W = {m: jnp.asarray(rng.standard_normal(shapes[m], np.float32) * 0.02) for m in mods}
        fns = {}

        def run(f, *a):
            jf = jax.jit(f)
            return lambda: jax.block_until_ready(jf(*a))

        # whole step, the model's call pattern: q/k/v read one x, gate/up another
        shared = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
        xin = {m: xs.get(shared.get(m, m), xs[m]) for m in mods}
        Wl = [{m: jnp.asarray(rng.standard_normal(shapes[m], np.float32) * 0.02) for m in ALL}
              for _ in range(cfg.num_layers)]
        xall = {m: jnp.asarray(rng.standard_normal((args.batch, t, shapes[m][0]), np.float32))
                for m in ALL}
        xall.update(k_proj=xall["q_proj"], v_proj=xall["q_proj"], up_proj=xall["gate_proj"])
        fns["STEP base projections (all 7 modules x 30 layers)"] = run(
            lambda xa, Wl: [jnp.einsum("BTD,DE->BTE", xa[m], Wl[li][m])
                            for li in range(cfg.num_layers) for m in ALL], xall, Wl)
        # the model asks once per input: (q, k, v), (o), (gate, up), (down)
        groups = [g for g in (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"),
                              ("down_proj",)) if any(m in mods for m in g)]
        for strat in STRATS:
            h = hook.prepared(strat)
            fns[f"STEP hilora {strat} (30 layers)"] = run(
                lambda h, xa, groups=groups: [h.deltas(li, g, xa[g[0]])
                                              for li in range(cfg.num_layers) for g in groups],
                h, xall)
        fns["base projections"] = run(
            lambda xs, W: [jnp.einsum("BTD,DE->BTE", xs[m], W[m]) for m in mods], xs, W)
        for strat in STRATS:
            h = hook.prepared(strat)
            fns[f"hilora {strat}"] = run(
                lambda h, xin: [h(layer, m, xin[m]) for m in mods], h, xin)
        h = hook.prepared("gathered")
        idx = h.cand_idx

        def gather(h):
            res = []
            for m in mods:
                A_l, B_l, _, w_l = h.arrays.layer(m, layer)
                res += [A_l[h.cand_idx], B_l[h.cand_idx], w_l[h.cand_idx]]
            return res

        fns["gathered: gather A_c,B_c"] = run(gather, h)
        gath = jax.jit(gather)(h)
        A_c = {m: gath[3 * i] for i, m in enumerate(mods)}
        B_c = {m: gath[3 * i + 1] for i, m in enumerate(mods)}
        fns["gathered: responses u"] = run(
            lambda xs, A_c: [jnp.einsum("BTD,BCRD->BTCR", xs[m], A_c[m]) for m in mods], xs, A_c)
        us = {m: jnp.einsum("BTD,BCRD->BTCR", xs[m], A_c[m]) for m in mods}
        valid = {m: (arr.layer(m, layer)[2][idx] & h.cand_valid[..., None]) for m in mods}
        n = jnp.minimum(h.n_rocs, 8)
        for meth in ("pairwise", "sort"):
            fns[f"gathered: top-n ({meth})"] = run(
                lambda us, valid, n, meth=meth: [topn_gates(us[m], n, valid[m], method=meth)
                                                 for m in mods], us, valid, n)
        fns["gathered: B side"] = run(
            lambda us, B_c: [jnp.einsum("BTCR,BCRE->BTE", us[m], B_c[m]) for m in mods], us, B_c)
        hp = hook.prepared("packed")
        pk = hp.pack
        fns["packed: responses u (one matmul per input)"] = run(
            lambda xs, pk: [jnp.einsum("BTD,PD->BTP", xs[k], pk.A[k][layer]) for k in pk.A],
            xs, pk)
        up = {m: jnp.einsum("BTD,PD->BTP", xs[m], pk.module_A(m, layer)) for m in mods}
        fns["packed: B side"] = run(
            lambda up, pk: [jnp.einsum("BTP,PE->BTE", up[m], pk.B[m][layer]) for m in mods],
            up, pk)

        def packed_topn(up, n_ad, pk=pk, t=t):
            res = []
            for m in mods:
                off = 0
                for r, ads in pk.module_groups(m):
                    k = len(ads)
                    ug = up[m][..., off:off + k * r].reshape(args.batch, t, k, r)
                    res.append(topn_gates(ug, n_ad[:, np.asarray(ads)],
                                          jnp.ones((args.batch, k, r), bool)))
                    off += k * r
            return res

        n_ad = jnp.asarray(rng.integers(0, 9, (args.batch, arr.num_adapters)), jnp.int32)
        fns["packed: top-n (pairwise, rank groups)"] = run(packed_topn, up, n_ad)
        st = common.time_interleaved(fns, repeats=args.profile_repeats, warmup=1)
        out[phase] = {k: 1e3 * v["median_s"] for k, v in st.items()}
    sizes = {m: {"gathered_rows_BxCxR": int(np.prod(hook.cand_idx.shape)) * arr.A[m].shape[2],
                 "dense_rows_AxR": arr.A[m].shape[1] * arr.A[m].shape[2],
                 "packed_rows_P": int(hook.prepared("packed").pack.B[m][0].shape[0])} for m in mods}
    return {"ms_per_layer": out, "roc_rows": sizes, "auto_choice": {
        ph: {m: hook.prepared("auto").choose(m, (args.batch, t, shapes[m][0])) for m in mods}
        for ph, t in (("decode", 1), ("prefill", args.prompt))}}


# ----------------------------------------------------------------------------- end to end


def bench_size(args, model, engine, n, prompts_ids):
    import jax.numpy as jnp
    import numpy as np

    from hilora_jax.lora.pool import GatedHook
    from hilora_jax.routing import build_router
    from hilora_jax.routing.hooks import HiLoRAHook

    cfg = model.config
    Bsz, P, NEW = args.batch, args.prompt, args.new
    t0 = time.perf_counter()
    pool, desc = make_pool(cfg, n, args.seed)
    setup = {"pool_build_s": time.perf_counter() - t0}
    scores, decide = make_decision(n, Bsz, args.candidates, args.seed)
    dec, kap = decide(pool.arrays.ranks, pool.arrays.active)
    hook0 = HiLoRAHook(pool.arrays, dec.cand_idx, dec.cand_valid, dec.n_rocs, kap)
    t0 = time.perf_counter()
    hook0.prepared("packed")
    setup["pack_s"] = time.perf_counter() - t0
    info = {"candidates_per_row": np.asarray(dec.cand_valid).sum(-1).tolist(),
            "budget_per_row": np.asarray(dec.budget).tolist(),
            "cand_ranks": np.asarray(pool.arrays.ranks)[np.asarray(dec.cand_idx)].tolist(),
            "union_of_candidates": int(len(np.unique(np.asarray(dec.cand_idx)))),
            "pool": desc,
            "padded_R": {m: int(pool.arrays.A[m].shape[2]) for m in pool.arrays.modules},
            "packed_P": {m: int(hook0.prepared("packed").pack.B[m][0].shape[0])
                         for m in pool.arrays.modules}}
    result = {"N": n, "setup_s": setup, "decision": info}
    if not args.no_profile:
        t0 = time.perf_counter()
        result["profile"] = profile_layer(args, cfg, pool, hook0)
        result["profile"]["wall_s"] = time.perf_counter() - t0
    if args.profile_only:
        return result, {}

    wanted = args.rows or ["base", "oracle", "arrow"] + [f"hilora-{s}" for s in STRATS]
    hooks = {}
    if "base" in wanted:
        hooks["base"] = None
    if "oracle" in wanted:
        idx = np.asarray(dec.cand_idx)[:, :1]
        hooks["oracle"] = GatedHook(pool.arrays, jnp.ones((Bsz, 1), jnp.float32),
                                    idx=jnp.asarray(idx, jnp.int32))
    if "arrow" in wanted:
        t0 = time.perf_counter()
        hooks["arrow"] = build_router("arrow", pool).route(["x"] * Bsz).hook
        setup["arrow_prototypes_s"] = time.perf_counter() - t0
    for s in STRATS:
        if f"hilora-{s}" in wanted:
            hooks[f"hilora-{s}"] = hook0.prepared(s)

    ids = jnp.asarray(prompts_ids, jnp.int32)
    mask = jnp.ones((Bsz, P), bool)
    gen = common.generate_timer(engine, ids, mask, NEW)

    fns = {}
    for name, h in hooks.items():
        fns[f"{name}|gen1"] = gen(h, 1)
        fns[f"{name}|genN"] = gen(h, NEW)
    load_before = common.load_average()
    t0 = time.perf_counter()
    timings = common.time_interleaved(fns, repeats=args.repeats, warmup=1)
    wall = time.perf_counter() - t0
    load_after = common.load_average()

    toks = {k: np.asarray(gen(h, NEW)())[:, :NEW] for k, h in hooks.items()}
    checks = {}
    if "hilora-dense" in toks:
        for k in toks:
            if k.startswith("hilora") and k != "hilora-dense":
                checks[f"{k}_vs_dense_token_agreement"] = float(
                    np.mean(toks[k] == toks["hilora-dense"]))
        if "base" in toks:
            checks["hilora_vs_base_token_agreement"] = float(
                np.mean(toks["hilora-dense"] == toks["base"]))
    rows = common.prefill_decode_rows(timings, hooks, Bsz, P, NEW)
    result.update(rows=rows, checks=checks, load_before=load_before, load_after=load_after,
                  timing_wall_s=wall)
    del pool, hooks
    gc.collect()
    return result, timings


def render(args, results, command, machine, t_start):
    rows_md, prof_md = [], []
    for res in results:
        for name, r in res.get("rows", {}).items():
            rows_md.append([res["N"], name, f"{r['prefill_tok_s']:.0f}",
                            f"{r.get('prefill_vs_base', float('nan')):.2f}x",
                            f"{r['decode_tok_s']:.1f}", f"{r.get('decode_vs_base', float('nan')):.2f}x",
                            f"{r['decode_step_ms']:.1f}"])
        prof = res.get("profile")
        if prof:
            keys = list(prof["ms_per_layer"]["decode"])
            for k in keys:
                d, p = prof["ms_per_layer"]["decode"][k], prof["ms_per_layer"]["prefill"][k]
                step = k.startswith("STEP")
                prof_md.append([res["N"], k, "" if step else f"{d:.3f}",
                                f"{d if step else 30 * d:.1f}", "" if step else f"{p:.2f}",
                                f"{p if step else 30 * p:.0f}"])
    table = "(no end-to-end rows)" if not rows_md else common.markdown_table(
        ["N", "row", "prefill tok/s", "prefill / base", "decode tok/s", "decode / base",
         "decode ms/step"], rows_md)
    ptable = "(no profile)" if not prof_md else common.markdown_table(
        ["N", "piece (one layer, all its adapted modules)", "decode ms/layer", "x30 ms/step",
         "prefill ms/layer", "x30 ms/prefill"], prof_md)
    header = (f"SmolLM2-135M-Instruct fp32, batch {args.batch}, prompt {args.prompt}, {args.new} "
              f"new tokens (no early stop), {args.candidates} candidates per row, median of "
              f"{args.repeats} interleaved rounds; {machine['cpu_model']}, "
              f"{machine['usable_cores']} cores, jax {machine['versions'].get('jax')}; load avg "
              f"before/after each N: "
              f"{[(r.get('load_before'), r.get('load_after')) for r in results]}")
    extra = []
    for res in results:
        d = res["decision"]
        extra.append(f"N={res['N']}: candidates/row {d['candidates_per_row']}, union of the "
                     f"batch's candidates {d['union_of_candidates']}, padded R {d['padded_R']}, "
                     f"packed P {d['packed_P']}, checks {res.get('checks')}, auto choice "
                     f"{res.get('profile', {}).get('auto_choice')}")
    md = (f"`{command}`\n\n{header}\n\n{table}\n\nProfile (isolated jitted pieces, one layer; "
          f"x30 = per decode step / per prefill):\n\n{ptable}\n\n" + "\n\n".join(extra) + "\n")
    return md


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    import jax
    import numpy as np

    from hilora_jax import load_model
    from hilora_jax.inference import Engine

    command = common.command_line()
    model = load_model("smollm2", progress=False)
    engine = Engine(model)
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(10, model.config.vocab_size, size=(args.batch, args.prompt))
    results, raw = [], {}
    for n in args.sizes:
        res, timings = bench_size(args, model, engine, n, prompts)
        results.append(res)
        raw[str(n)] = timings
        print(f"N={n} done ({time.perf_counter() - t_start:.0f}s)", file=sys.stderr)
    machine = common.machine_info()
    md = render(args, results, command, machine, t_start)
    print(md)
    payload = {"benchmark": "token_stage", "command": command,
               "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "settings": {k: v for k, v in vars(args).items()},
               "method": __doc__.split("Method:")[1].split("Usage:")[0].strip(),
               "machine": machine, "jax_devices": [str(d) for d in jax.devices()],
               "results": results, "raw_timings_s": raw,
               "total_wall_s": time.perf_counter() - t_start, "markdown": md}
    out = Path(args.out) if args.out else common.RESULTS_DIR / "token_stage.json"
    path = common.write_json(out, payload)
    common.write_text(path.with_suffix(".md"), md)
    print(f"wrote {path} and {path.with_suffix('.md')} ({payload['total_wall_s']:.0f}s)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
