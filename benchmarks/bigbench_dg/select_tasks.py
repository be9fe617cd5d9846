"""Screen BIG-bench JSON multiple-choice tasks for the domain-generalization benchmark.

For each candidate task: zero-shot accuracy of the real SmolLM2-135M-Instruct on a small held-out
set, then a short LoRA (r=8, q/v) and its held-out accuracy. Tasks where the LoRA clearly beats
zero-shot are the ones worth a pool entry (a LoRA that does not help cannot be routed to usefully).

CPU budget (2 shared cores): a full-depth training step of the 30-layer model costs ~15 s at
batch 8 x 64 tokens, so full-depth screening of a dozen tasks cannot fit in ~35 minutes. The
screen therefore trains the LoRA on the **top `--top-layers` layers only** and caches the frozen
base model's hidden states below them once per task (`Engine.forward(..., hidden_layer=k)`); each
step then runs forward+backward through those top layers only, and zero-shot and LoRA accuracy are
both read from the same cached states. This is a proxy (a lower bound on what the full-depth q/v
LoRA of the real pool reaches); the script checks at start-up that the cached top-only forward
equals the full model's scores on the real model.

Candidates: JSON MC tasks with >= `--min-examples` usable examples after conversion, <= `--max-choices`
choices, and 90% of prompt+choice pairs within `--max-tokens`; one subtask per BIG-bench family; ordered
round-robin over the proposed clusters (`eval.bigbench.propose_cluster`) so that the clusters are
covered first. Tasks are screened in that order until `--budget-min` minutes are spent; the table
(markdown + JSON) is rewritten after every task, so an interrupted run still leaves its results.

    python benchmarks/bigbench_dg/select_tasks.py --out artifacts/bigbench_dg/screen
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from hilora_jax.eval import bigbench as bb
from hilora_jax.eval.tasks import choice_text, encode, pad_id_of, tail_logprobs
from hilora_jax.inference import Engine, bucket_length, pad_batch
from hilora_jax.nn import layers as L
from hilora_jax.train import init_lora


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


# -- top-layers-only forward over cached hidden states ------------------------------------------
def top_tail_logprobs(model, hidden, ids, mask, start: int, tail: int, lora=None):
    """`eval.tasks.tail_logprobs` computed from the hidden state after layer `start` ([B, T, D]).

    Mirrors `CausalLM.__call__` without a KV cache (positions from the mask, RoPE, layers
    `start..L-1`, final norm, head on the last `tail + 1` positions). Checked against the full
    model by `self_check`.
    """
    cfg = model.config
    mask = mask.astype(bool)
    t = ids.shape[1]
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    cos, sin = L.rope_cos_sin(positions, jnp.asarray(cfg.rope.inv_freq(cfg.head_dim)), hidden.dtype)
    x = hidden
    for i in range(start, cfg.num_layers):
        x, _, _ = model.model.layers[i](x, cos, sin, positions, jnp.arange(t), None, None,
                                        positions, mask, jnp.zeros((), jnp.int32), lora)
    h = model.model.norm(x[:, -tail - 1:-1])
    logits = model.model.embed_tokens.attend(h) if model.lm_head is None else model.lm_head(h)
    return L.log_softmax_gather(logits, ids[:, -tail:])


@dataclasses.dataclass
class Rows:
    ids: np.ndarray  # [N, T]
    mask: np.ndarray  # [N, T]
    tmask: np.ndarray  # [N, T]
    ex: np.ndarray  # [N] example index
    ch: np.ndarray  # [N] choice index
    tail: int


def build_rows(examples, tok, pad, *, all_choices: bool, length: int | None = None) -> Rows:
    seqs, conts, ex, ch = [], [], [], []
    for i, e in enumerate(examples):
        p = encode(tok, e.prompt, special=True)
        for j, c in enumerate(e.choices):
            if not all_choices and j != e.answer:
                continue
            cids = encode(tok, choice_text(c), special=False)
            seqs.append(p + cids)
            conts.append(len(cids))
            ex.append(i)
            ch.append(j)
    t = length or bucket_length(max(len(s) for s in seqs))
    ids, mask = pad_batch(seqs, t, pad, side="left")
    tmask = np.zeros_like(mask)
    for r, n in enumerate(conts):
        tmask[r, t - n:] = True
    tail = 4
    while tail < max(conts):
        tail *= 2
    return Rows(ids, mask, tmask, np.array(ex), np.array(ch), min(tail, t - 1))


class Screener:
    def __init__(self, model, tok, *, top_layers: int, batch: int = 16):
        self.model, self.tok, self.batch = model, tok, batch
        self.engine = Engine(model)
        self.graphdef, self.state = self.engine.graphdef, self.engine.state
        self.start = model.config.num_layers - top_layers
        self.pad = pad_id_of(tok)
        self._score = jax.jit(self._score_impl, static_argnames=("tail",))

    def _score_impl(self, state, h, ids, mask, tmask, lora, *, tail):
        model = nnx.merge(self.graphdef, state)
        lp = top_tail_logprobs(model, h, ids, mask, self.start, tail, lora)
        return jnp.sum(jnp.where(tmask[:, -tail:], lp, 0.0), axis=1)

    def _chunks(self, n):
        for s in range(0, n, self.batch):
            idx = np.arange(s, s + self.batch)
            yield idx, np.minimum(idx, n - 1), min(n - s, self.batch)

    def hidden(self, rows: Rows) -> np.ndarray:
        """Frozen base hidden states after layer `start`, `[N, T, D]` (batched, fixed shapes)."""
        out = []
        for _, idx, n in self._chunks(len(rows.ids)):
            _, h = self.engine.forward(rows.ids[idx], rows.mask[idx], logits_at="none",
                                       hidden_layer=self.start)
            out.append(np.asarray(h)[:n])
        return np.concatenate(out)

    def accuracy(self, examples, rows: Rows, h: np.ndarray, lora=None) -> dict:
        lp = np.zeros(len(rows.ids))
        for _, idx, n in self._chunks(len(rows.ids)):
            s = self._score(self.state, h[idx], rows.ids[idx], rows.mask[idx], rows.tmask[idx],
                            lora, tail=rows.tail)
            lp[idx[:n]] = np.asarray(s)[:n]
        ntok = rows.tmask.sum(1)
        best, best_norm = {}, {}
        for r in range(len(lp)):
            e = rows.ex[r]
            if e not in best or lp[r] > best[e][0]:
                best[e] = (lp[r], rows.ch[r])
            if e not in best_norm or lp[r] / ntok[r] > best_norm[e][0]:
                best_norm[e] = (lp[r] / ntok[r], rows.ch[r])
        gold = [ex.answer for ex in examples]
        return {"acc": float(np.mean([best[i][1] == g for i, g in enumerate(gold)])),
                "acc_norm": float(np.mean([best_norm[i][1] == g for i, g in enumerate(gold)]))}

    def train(self, rows: Rows, h: np.ndarray, *, r, alpha, targets, steps, lr, batch_size, seed):
        adapter = init_lora(self.model, r=r, alpha=alpha, targets=targets, seed=seed)
        opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps,
                                                             end_value=lr * 0.1), weight_decay=0.0)
        opt_state = opt.init(adapter)
        tail, start, graphdef = rows.tail, self.start, self.graphdef

        def loss_fn(ad, state, hb, ids, mask, tmask):
            model = nnx.merge(graphdef, state)
            lp = top_tail_logprobs(model, hb, ids, mask, start, tail, ad)
            tm = tmask[:, -tail:].astype(jnp.float32)
            return -jnp.sum(lp * tm) / jnp.maximum(jnp.sum(tm), 1.0)

        @jax.jit
        def step(ad, opt_state, state, hb, ids, mask, tmask):
            loss, g = jax.value_and_grad(loss_fn)(ad, state, hb, ids, mask, tmask)
            upd, opt_state = opt.update(g, opt_state, ad)
            return optax.apply_updates(ad, upd), opt_state, loss

        rng = np.random.default_rng(seed)
        order, losses = [], []
        for _ in range(steps):
            while len(order) < batch_size:
                order.extend(rng.permutation(len(rows.ids)).tolist())
            idx, order = np.array(order[:batch_size]), order[batch_size:]
            adapter, opt_state, loss = step(adapter, opt_state, self.state, h[idx], rows.ids[idx],
                                            rows.mask[idx], rows.tmask[idx])
            losses.append(float(loss))
        return adapter, losses

    def self_check(self, examples):
        """Cached top-only scores == full-model tail scores (with a random non-zero LoRA)."""
        rows = build_rows(examples[:2], self.tok, self.pad, all_choices=True)
        rows = dataclasses.replace(rows, ids=rows.ids[:4], mask=rows.mask[:4], tmask=rows.tmask[:4])
        ad = init_lora(self.model, r=4, seed=1)
        ad = ad.replace(b={k: jax.random.normal(jax.random.key(3), v.shape) * 0.02
                           for k, v in ad.b.items()})
        ad = ad.replace(a={k: v.at[: self.start].set(0.0) for k, v in ad.a.items()})
        h = self.hidden(rows)
        for lora in (None, ad):
            full = tail_logprobs(self.model, jnp.asarray(rows.ids), jnp.asarray(rows.mask),
                                 rows.tail, lora)
            top = top_tail_logprobs(self.model, jnp.asarray(h), jnp.asarray(rows.ids),
                                    jnp.asarray(rows.mask), self.start, rows.tail, lora)
            tm = rows.tmask[:, -rows.tail:]
            err = float(np.abs(np.where(tm, np.asarray(full) - np.asarray(top), 0)).max())
            log(f"self-check (lora={'yes' if lora is not None else 'no'}): max |diff| = {err:.2e}")
            if err > 2e-3:
                raise SystemExit(f"top-layer forward disagrees with the full model ({err})")


# -- candidate selection -----------------------------------------------------------------------
def candidates(root, tok, args, only=None):
    found = []
    per_family_seen = defaultdict(int)
    for name, path in bb.list_tasks(root).items():
        if only is not None and name not in only:
            continue
        if per_family_seen[name.split("/")[0]] >= 3:  # e.g. multiemo has ~100 subtasks
            continue
        try:
            t = bb.read_task(path, name)
        except (ValueError, json.JSONDecodeError):
            continue
        if sum("target_scores" in e for e in t.examples) < args.min_examples:
            continue
        cluster = bb.propose_cluster(t.keywords)
        exs = bb.to_mc_examples(t, cluster, seed=args.seed)
        if len(exs) < args.min_examples or max(len(e.choices) for e in exs) > args.max_choices:
            continue
        probe = exs[:: max(1, len(exs) // 40)][:40]
        lens = [len(encode(tok, e.prompt, special=True))
                + max(len(encode(tok, choice_text(c), special=False)) for c in e.choices)
                for e in probe]
        p90 = float(np.percentile(lens, 90))
        if p90 > args.max_tokens:
            continue
        per_family_seen[name.split("/")[0]] += 1
        found.append({"name": name, "family": name.split("/")[0], "cluster": cluster,
                      "n": len(exs), "p90_tokens": p90, "choices": max(len(e.choices) for e in exs),
                      "keywords": list(t.keywords)})
    per_family = {}
    for c in sorted(found, key=lambda c: (c["p90_tokens"], c["name"])):
        per_family.setdefault(c["family"], c)  # shortest subtask of each family
    by_cluster = defaultdict(list)
    for c in sorted(per_family.values(), key=lambda c: c["name"]):
        by_cluster[c["cluster"]].append(c)
    order, clusters = [], sorted(by_cluster, key=lambda k: (k == "other", -len(by_cluster[k]), k))
    while any(by_cluster.values()):
        for k in clusters:
            if by_cluster[k]:
                order.append(by_cluster[k].pop(0))
    return order


def write_table(rows, out: Path, meta: dict):
    out.mkdir(parents=True, exist_ok=True)
    (out / "screen.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["| task | cluster | n | choices | base acc | LoRA acc | gain | base acc_norm | "
             "LoRA acc_norm | loss first->last | time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['cluster']} | {r['n']} | {r['choices']} | "
                     f"{r['base_acc']:.2f} | {r['lora_acc']:.2f} | {r['gain']:+.2f} | "
                     f"{r['base_acc_norm']:.2f} | {r['lora_acc_norm']:.2f} | "
                     f"{r['loss_first']:.2f}->{r['loss_last']:.2f} | {r['seconds']:.0f} |")
    hdr = (f"Screening on SmolLM2-135M-Instruct ({meta['setting']}); held-out n_test="
           f"{meta['n_test']} per task; generated {meta['date']}.\n\n")
    (out / "screen.md").write_text(hdr + "\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--out", default="artifacts/bigbench_dg/screen")
    p.add_argument("--budget-min", type=float, default=35.0)
    p.add_argument("--min-examples", type=int, default=150)
    p.add_argument("--max-choices", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--n-test", type=int, default=32)
    p.add_argument("--n-train", type=int, default=128)
    p.add_argument("--top-layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", default=None, help="comma-separated BIG-bench names (skip discovery)")
    args = p.parse_args(argv)
    os.environ.setdefault("HILORA_QUIET", "1")

    from hilora_jax.assets import bigbench_tasks_dir
    from hilora_jax.loading import load_model, load_tokenizer

    t_start = time.time()
    root = bigbench_tasks_dir()
    model = load_model(args.model, progress=False)
    tok = load_tokenizer(args.model)
    log(f"model loaded ({time.time() - t_start:.0f}s); finding candidates ...")
    cands = candidates(root, tok, args, only=set(args.tasks.split(",")) if args.tasks else None)
    log(f"{len(cands)} candidates: " + ", ".join(f"{c['name']}[{c['cluster']}]" for c in cands))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "candidates.json").write_text(json.dumps(cands, indent=2) + "\n")

    scr = Screener(model, tok, top_layers=args.top_layers)
    paths = bb.list_tasks(root)
    meta = {"setting": f"LoRA r={args.r} alpha={args.alpha} {args.targets} on the top "
                       f"{args.top_layers} of {model.config.num_layers} layers, {args.steps} steps x "
                       f"batch {args.batch_size}, lr {args.lr}, <= {args.n_train} train examples",
            "n_test": args.n_test, "date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args)}
    results = []
    checked = False
    for k, c in enumerate(cands):
        elapsed = (time.time() - t_start) / 60
        if elapsed > args.budget_min:
            log(f"budget of {args.budget_min} min spent; stopping after {len(results)} tasks")
            break
        t0 = time.time()
        task = bb.read_task(paths[c["name"]], c["name"])
        exs = bb.to_mc_examples(task, c["cluster"], seed=args.seed)
        sp = bb.split_examples(exs, seed=args.seed, n_test=args.n_test, n_samples=20)
        fits = lambda e: (len(encode(tok, e.prompt, special=True)) + max(  # noqa: E731
            len(encode(tok, choice_text(ch), special=False)) for ch in e.choices)) <= args.max_tokens
        test = [e for e in sp["test"] if fits(e)]
        train = [e for e in sp["train"] if fits(e)][: args.n_train]
        if not checked:
            scr.self_check(test)
            checked = True
        length = bucket_length(args.max_tokens)
        test_rows = build_rows(test, tok, scr.pad, all_choices=True, length=length)
        train_rows = build_rows(train, tok, scr.pad, all_choices=False, length=length)
        h_test, h_train = scr.hidden(test_rows), scr.hidden(train_rows)
        t_cache = time.time() - t0
        base = scr.accuracy(test, test_rows, h_test)
        t1 = time.time()
        adapter, losses = scr.train(train_rows, h_train, r=args.r, alpha=args.alpha,
                                    targets=tuple(args.targets.split(",")), steps=args.steps,
                                    lr=args.lr, batch_size=args.batch_size, seed=args.seed)
        t_train = time.time() - t1
        tuned = scr.accuracy(test, test_rows, h_test, adapter)
        row = {**c, "n_test": len(test), "n_train": len(train),
               "base_acc": base["acc"], "lora_acc": tuned["acc"],
               "gain": tuned["acc"] - base["acc"], "base_acc_norm": base["acc_norm"],
               "lora_acc_norm": tuned["acc_norm"], "loss_first": float(np.mean(losses[:3])),
               "loss_last": float(np.mean(losses[-5:])), "seconds": time.time() - t0,
               "seconds_cache": t_cache, "seconds_train": t_train}
        results.append(row)
        write_table(results, out, meta)
        log(f"[{k + 1}/{len(cands)}] {c['name']} ({c['cluster']}): base {base['acc']:.2f} -> "
            f"LoRA {tuned['acc']:.2f} (norm {base['acc_norm']:.2f} -> {tuned['acc_norm']:.2f}); "
            f"loss {row['loss_first']:.2f}->{row['loss_last']:.2f}; {row['seconds']:.0f}s "
            f"(cache {t_cache:.0f}s, train {t_train:.0f}s)")
    log(f"done: {len(results)} tasks in {(time.time() - t_start) / 60:.1f} min -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
