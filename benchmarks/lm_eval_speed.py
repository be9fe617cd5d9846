"""Requests/s of the `hilora` lm-eval backend vs lm-eval's `hf` backend, and routed vs base hilora.

Same process, same requests, timed interleaved (`common.time_interleaved`, ABBA order, after one
untimed warm-up call that compiles), batch 8, fp32, on this CPU:

* a multiple-choice task: `loglikelihood` requests (context = prompt, continuation = " " +
  choice) of the first `--docs` test items of BIG-bench tasks of the DG benchmark
  (bbq_lite_json/gender_identity_ambig, movie_recommendation);
* a generation task: `generate_until` on the first `--gen-docs` of those prompts, greedy,
  `until=["\\n"]`, `max_gen_toks=--gen-toks`.

Backends: `hf` = `lm_eval.models.huggingface.HFLM` over transformers' SmolLM2 (loaded from the same
GGUF, dequantized to fp32); `hilora` = `HiLoRALM(model=smollm2)` (no pool); `hilora-routed` = the
same with a pool of the realistic pool's trained SmolLM2 adapters (~/.cache/hilora, with their
tasks' `samples` from `--samples`) and `router=hilora` (MiniLM embeddings + sequence stage on the
host for every request, token stage in the jitted forward). Requests/s = requests / median
wall time of one backend call over all requests. Goals (issue 15): hilora >= 2x hf on
log-likelihood requests; routed >= 0.9x base.

    python benchmarks/lm_eval_speed.py            # writes results/lm_eval_speed.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TASKS = (("bbq_lite_json/gender_identity_ambig", "bbq_lite_json"),
         ("movie_recommendation", "emotion-social"))


def mc_docs(n_docs: int):
    from hilora_jax.eval import bigbench as bb
    from hilora_jax.io.assets import bigbench_tasks_dir

    paths = bb.list_tasks(bigbench_tasks_dir())
    per = -(-n_docs // len(TASKS))
    docs = []
    for name, cluster in TASKS:
        t = bb.read_task(paths[name], name.replace("/", "."))
        docs += bb.split_examples(bb.to_mc_examples(t, cluster), n_test=50)["test"][:per]
    return docs[:n_docs]


def routed_pool(tmp: Path, samples_file: Path) -> Path | None:
    """A manifest over the cached realistic-pool adapters whose task has samples; None if none."""
    src = Path.home() / ".cache" / "hilora" / "realistic_pool" / "adapters"
    if not src.is_dir() or not samples_file.exists():
        return None
    samples: dict[str, list[str]] = {}
    for line in samples_file.read_text().splitlines():
        r = json.loads(line)
        samples.setdefault(r["task"], []).append(r["prompt"])
    adapters = {}
    for d in sorted(src.iterdir()):
        task = d.name.rsplit("-", 1)[0]
        if (d / "hilora_train.json").exists() and task in samples:
            adapters[task] = {"path": str(d), "samples": samples[task]}
    if len(adapters) < 2:
        return None
    man = tmp / "pool.json"
    man.write_text(json.dumps({"adapters": adapters}))
    return man


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=16, help="multiple-choice documents")
    p.add_argument("--gen-docs", type=int, default=16)
    p.add_argument("--gen-toks", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--samples", default="artifacts/bigbench_dg/run/data/samples.jsonl",
                   help="the DG splits' samples.jsonl (per-LoRA example inputs)")
    p.add_argument("--out", default="lm_eval_speed")
    a = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import numpy as np
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM

    from hilora_jax.eval.tasks import choice_text
    from hilora_jax.io.assets import smollm2_gguf
    from hilora_jax.io.loading import load_tokenizer
    from hilora_jax.lmeval import HiLoRALM

    docs = mc_docs(a.docs)
    ll = [Instance("loglikelihood", {}, (d.prompt, choice_text(c)), i, (d.task, j, 1))
          for j, d in enumerate(docs) for i, c in enumerate(d.choices)]
    gen = [Instance("generate_until", {}, (d.prompt, {"until": ["\n"], "max_gen_toks": a.gen_toks,
                                                      "do_sample": False}), 0, (d.task, j, 1))
           for j, d in enumerate(mc_docs(a.gen_docs))]
    gguf = smollm2_gguf()
    hf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                    dtype=torch.float32).eval()
    backends = {
        "hf": HFLM(pretrained=hf_model, tokenizer=load_tokenizer("smollm2"), batch_size=a.batch,
                   device="cpu", dtype="float32"),
        "hilora": HiLoRALM(model="smollm2", batch_size=a.batch),
    }
    tmp = Path(tempfile.mkdtemp(prefix="lm_eval_speed_"))
    pool = routed_pool(tmp, Path(a.samples))
    if pool is not None:
        backends["hilora-routed"] = HiLoRALM(model="smollm2", pool=str(pool), router="hilora",
                                             batch_size=a.batch)
    out: dict = {}
    res_ll: dict = {}
    res_gen: dict = {}

    def call(k, method, reqs, keep):
        keep[k] = getattr(backends[k], method)(reqs)

    t_ll = common.time_interleaved({k: (lambda k=k: call(k, "loglikelihood", ll, res_ll))
                                    for k in backends}, repeats=a.repeats, warmup=1)
    t_gen = common.time_interleaved({k: (lambda k=k: call(k, "generate_until", gen, res_gen))
                                     for k in backends}, repeats=a.repeats, warmup=1)
    # agreement of the timed calls' own results (last call of each backend)
    dlp = float(np.max(np.abs(np.array([x[0] for x in res_ll["hilora"]])
                              - np.array([x[0] for x in res_ll["hf"]]))))
    same_gen = sum(x == y for x, y in zip(res_gen["hilora"], res_gen["hf"], strict=True))
    rows = []
    for kind, t, n in (("loglikelihood (multiple choice)", t_ll, len(ll)),
                       ("generate_until", t_gen, len(gen))):
        rps = {k: n / v["median_s"] for k, v in t.items()}
        out[kind] = {"requests": n, "timings": t, "requests_per_s": rps,
                     "hilora_over_hf": rps["hilora"] / rps["hf"]}
        if "hilora-routed" in rps:
            out[kind]["routed_over_base"] = rps["hilora-routed"] / rps["hilora"]
        for k in backends:
            rows.append([kind, k, n, t[k]["median_s"], rps[k]])
        rows.append([kind, "**ratio hilora/hf**", "", "", f"**{out[kind]['hilora_over_hf']:.2f}x**"])
        if "routed_over_base" in out[kind]:
            rows.append([kind, "**ratio routed/base**", "", "",
                         f"**{out[kind]['routed_over_base']:.2f}x**"])
    table = common.markdown_table(["requests", "backend", "n", "median s", "requests/s"], rows)
    pool_names = (sorted(json.loads(pool.read_text())["adapters"]) if pool is not None else None)
    payload = {"command": common.command_line(), "machine": common.machine_info(),
               "batch": a.batch, "docs": a.docs, "gen_docs": a.gen_docs, "gen_toks": a.gen_toks,
               "pool": pool_names, "results": out,
               "parity": {"max_abs_dlogprob_hilora_vs_hf": dlp,
                          "identical_generations": f"{same_gen}/{len(gen)}"},
               "goals": {"ll_hilora_over_hf>=2": out["loglikelihood (multiple choice)"][
                   "hilora_over_hf"] >= 2.0,
                   "routed_over_base>=0.9": None if pool is None else
                   out["loglikelihood (multiple choice)"]["routed_over_base"] >= 0.9}}
    path = common.write_json(a.out, payload)
    m = payload["machine"]
    head = (f"`{payload['command']}`\n\nSmolLM2-135M-Instruct (fp32), batch {a.batch}, "
            f"{len(ll)} log-likelihood requests ({a.docs} documents), {len(gen)} generations "
            f"(greedy, <= {a.gen_toks} tokens), median of {a.repeats} interleaved calls; "
            f"routed pool: {pool_names}; {m.get('cpu_model', '')}, {m.get('usable_cores')} cores; "
            f"load avg {common.load_average()}.\n"
            f"hilora vs hf on the same requests: max |d logprob| {dlp:.2e}, identical greedy "
            f"generations {same_gen}/{len(gen)}.\n\n")
    common.write_text(path.with_suffix(".md"), head + table + "\n")
    print(head + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
