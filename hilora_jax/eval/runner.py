"""Evaluation of routers on mixed-task test sets under the method doc's protocols (§7).

`evaluate(engine, tokenizer, pool, router, examples, protocol=...)` scores every multiple-choice
example (summed and length-normalised log-prob of each choice) with the router's decisions made
from the example's prompt alone: no task label reaches the router. Protocols only change which
adapters are *active* for a test task (an array argument: nothing is retraced per task):

* `seen`: every adapter;
* `unseen-within`: all but the task's own adapter (the adapter named like the task);
* `unseen-cross`: all but the adapters of the task's cluster (the pool's cluster labels).

Output: per-task, per-cluster and mean accuracy (`acc` by summed log-prob, `acc_norm` by per-token
log-prob), routing statistics (how often the task's own adapter is among the candidates / ranked
first, for routers that select per sequence; for HiLoRA also the candidate-set size distribution,
how often the `max_candidates` cap bound, the own adapter's share of the ROCs, the total ROCs and
the coverage), per-example correctness (`correct`, by example key,
for paired comparisons of routers on the same items), the exact configuration, and timing.

Resumable: finished examples are appended to `<out>.partial.jsonl` (one record per example, keyed
by task and index, tagged with a fingerprint of the configuration and of the examples) and
skipped on restart. Multi-host: each process scores its round-robin share of every task on its
local mesh and the records are gathered in a fixed order (`hilora_jax.distributed`), so results
do not depend on the process count.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hilora_jax import distributed as dist
from hilora_jax._fs import atomic_file
from hilora_jax.eval.tasks import MCExample, mc_batches
from hilora_jax.lora.pool import LoraPool
from hilora_jax.routing.routers import Router

PROTOCOLS = ("seen", "unseen-within", "unseen-cross")


def first_adapted_layer(pool: LoraPool) -> int:
    """Lowest layer holding any ROC of the pool: the model below it is the same for every router."""
    firsts = [int(np.argmax(np.asarray(m).any(axis=(1, 2)))) for m in pool.arrays.mask.values()
              if np.asarray(m).any()]
    if not firsts:
        raise ValueError("the pool has no ROCs")
    return min(firsts)


class PrefixScorer:
    """Choice scoring that shares the un-adapted prefix of the model between runs.

    Every adapted module of the pool lies at or above `layer`, so the hidden states below it do not
    depend on the router or protocol: they are computed once per batch (base model only,
    `Engine.forward(..., hidden_layer=layer)`), kept on the host, and each run resumes from them
    (`Engine.score(..., resume=(layer, hidden))`). Results equal the full forward up to float
    summation order. `layer=0` disables sharing.
    """

    def __init__(self, engine, layer: int):
        self.engine, self.layer = engine, int(layer)
        self._cache: dict[str, np.ndarray] = {}

    def batch(self, b, lora=None) -> np.ndarray:
        resume = None
        if self.layer > 0:
            key = hashlib.sha1(b.input_ids.tobytes() + b.attention_mask.tobytes()).hexdigest()
            if key not in self._cache:
                _, h = self.engine.forward(b.input_ids, b.attention_mask, logits_at="none",
                                           hidden_layer=self.layer)
                self._cache[key] = np.asarray(h)
            resume = (self.layer, self._cache[key])
        total, _ = self.engine.score(b.input_ids, b.attention_mask, b.target_mask, lora=lora,
                                     tail=b.tail, resume=resume)
        return np.asarray(total)


def protocol_active(pool: LoraPool, task: str, cluster: str | None, protocol: str) -> np.ndarray:
    """Active adapters `[A]` for test task `task` under `protocol`."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {PROTOCOLS}")
    active = np.asarray(pool.arrays.active).copy()
    if protocol == "unseen-within" and task in pool.names:
        active[pool.index(task)] = False
    elif protocol == "unseen-cross":
        if cluster is None:
            raise ValueError(f"protocol 'unseen-cross' needs a cluster for task {task!r}")
        for i, n in enumerate(pool.names):
            if pool.clusters.get(n) == cluster:
                active[i] = False
        if task in pool.names:
            active[pool.index(task)] = False
    if not active.any():
        raise ValueError(f"protocol {protocol!r} leaves no active adapter for task {task!r}")
    return active


def fingerprint(config: dict) -> str:
    return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_partial(path: Path, fp: str) -> dict[str, dict]:
    done = {}
    if path.exists():
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by an interruption: recompute that example
                if rec.get("fp") == fp:
                    done[rec["key"]] = rec
    return done


def _append_partial(path: Path, records: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _routing_rows(info: dict, rows: np.ndarray, own: int | None) -> list[dict]:
    """Per-row routing statistics: candidate count (adapters that get ROCs / weight); for HiLoRA
    also the budget, total ROCs, whether the max_candidates cap bound, the coverage; with a known
    own adapter, whether it is a candidate / ranked first and its share of the ROCs."""
    out = []
    for r in rows:
        d = {}
        if "cand_idx" in info:
            used = info["cand_valid"][r] & (info["n_rocs"][r] > 0)
            cands = info["cand_idx"][r][used]
            n = info["n_rocs"][r][used]
            d = {"n_candidates": int(len(cands)), "budget": int(info["budget"][r]),
                 "total_rocs": int(n.sum()), "cap_binds": bool(info["cap_binds"][r])}
            if "coverage" in info:
                d["coverage"] = float(info["coverage"][r])
            if own is not None:
                d.update(own_in_candidates=bool(own in cands.tolist()),
                         own_first=bool(len(cands) and cands[0] == own),
                         own_roc_share=float(n[cands == own].sum() / n.sum()) if n.sum() else 0.0)
        elif "weights" in info:
            w = info["weights"][r]
            d = {"n_candidates": int((w > 0).sum())}
            if own is not None:
                d.update(own_in_candidates=bool(w[own] > 0), own_first=bool(np.argmax(w) == own))
        out.append(d)
    return out


def _routing_summary(rs: Sequence[dict]) -> dict:
    """Aggregate per-example routing statistics (keys absent from old records are skipped)."""
    out = {}
    for k in ("own_in_candidates", "own_first", "own_roc_share", "cap_binds", "coverage",
              "total_rocs"):
        v = [x[k] for x in rs if k in x]
        if v:
            out[k] = float(np.mean(v))
    sizes = [x["n_candidates"] for x in rs if "n_candidates" in x]
    if sizes:
        out["mean_candidates"] = float(np.mean(sizes))
        counts = np.bincount(np.asarray(sizes, np.int64))
        out["candidates_hist"] = {str(k): int(c) for k, c in enumerate(counts) if c}
    return out


def evaluate(
    engine,
    tokenizer,
    pool: LoraPool,
    router: Router,
    examples: Sequence[MCExample],
    *,
    protocol: str = "seen",
    out: str | os.PathLike | None = None,
    batch_size: int = 16,
    max_len: int = 256,
    config: dict | None = None,
    resume: bool = True,
    progress: bool = True,
    scorer: PrefixScorer | None = None,
) -> dict:
    """Evaluate `router` on `examples` under `protocol`; see the module docstring.

    `scorer`: reuse a `PrefixScorer` across calls (routers, protocols) so the un-adapted prefix of
    the model is computed once per batch; by default one is made for this call.
    """
    t0 = time.time()
    if not examples:
        raise ValueError("no examples to evaluate")
    cfg = {"router": router.name, "protocol": protocol, "batch_size": batch_size,
           "max_len": max_len, "pool": list(pool.names), **(config or {})}
    fp = fingerprint({**cfg, "examples": _examples_digest(examples)})
    partial = Path(str(out) + ".partial.jsonl") if out else None
    done = _resume_records(partial, fp, resume)
    # every process must skip the same examples: process 0's view of the partial file decides
    done_keys = set(dist.allgather_json(sorted(done))[0])
    scorer = _checked_scorer(scorer, engine, pool)
    by_task = _by_task(examples)
    records: dict[str, dict] = dict(done)
    bar = _progress(progress, len(examples), len(done_keys), f"{router.name}/{protocol}")
    for task in sorted(by_task):
        items = [(i, ex) for i, ex in by_task[task] if f"{task}:{i}" not in done_keys]
        mine = dist.share(items)
        new = _score_task(scorer, tokenizer, pool, router, task, mine, protocol, fp,
                          batch_size=batch_size, max_len=max_len) if mine else []
        gathered = _gather(new)
        for r in gathered:
            records[r["key"]] = r
        if partial and dist.process_index() == 0 and gathered:
            _append_partial(partial, gathered)
        if bar is not None:
            bar.update(len(gathered))
    if bar is not None:
        bar.close()
    result = summarize(records.values(), cfg)
    result["timing"] = {"seconds": round(time.time() - t0, 2), "resumed_examples": len(done_keys),
                        "processes": dist.process_count()}
    if out and dist.process_index() == 0:
        write_json_atomic(out, result)
    return result


# -- the concerns of `evaluate` ----------------------------------------------------------------
def _examples_digest(examples: Sequence[MCExample]) -> str:
    """Content hash of a test set (part of the fingerprint: records of another set are never
    reused)."""
    h = hashlib.sha1()
    for ex in examples:
        h.update(json.dumps([ex.task, ex.prompt, list(ex.choices), ex.answer]).encode())
    return h.hexdigest()


def _resume_records(partial: Path | None, fp: str, resume: bool) -> dict[str, dict]:
    """Finished records of this configuration from the partial file (process 0 reads it); without
    `resume` the file is removed."""
    if partial is None or dist.process_index() != 0:
        return {}
    if not resume:
        if partial.exists():
            partial.unlink()
        return {}
    return _read_partial(partial, fp)


def _checked_scorer(scorer: PrefixScorer | None, engine, pool: LoraPool) -> PrefixScorer:
    if hasattr(engine, "mc_scorer"):  # an engine with its own choice scoring (T5: encoder-decoder)
        return scorer if scorer is not None else engine.mc_scorer()
    first = first_adapted_layer(pool)
    if scorer is None:
        return PrefixScorer(engine, first)
    if scorer.layer > first:
        raise ValueError(f"scorer shares layers below {scorer.layer}, but the pool adapts layer "
                         f"{first}")
    return scorer


def _by_task(examples: Sequence[MCExample]) -> dict[str, list[tuple[int, MCExample]]]:
    """`task -> [(index within the task, example)]` in input order."""
    by_task: dict[str, list[tuple[int, MCExample]]] = defaultdict(list)
    for ex in examples:
        by_task[ex.task].append((len(by_task[ex.task]), ex))
    return by_task


def _progress(progress: bool, total: int, initial: int, desc: str):
    if not progress or dist.process_index() != 0 or os.environ.get("HILORA_QUIET") == "1":
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="ex", file=sys.stderr)


def _route_kwargs(router: Router, pool: LoraPool, task: str, active: np.ndarray,
                  rows: int) -> dict:
    """What the router is told besides the prompts: the protocol's active set and, for routers
    that declare `needs_task_labels` (oracle), the task's own adapter per row (None, the base
    model, when the protocol holds it out)."""
    kw: dict = {"active": active}
    if router.needs_task_labels:
        if task not in pool.names:
            raise ValueError(f"router {router.name!r} needs an adapter named {task!r}")
        own = pool.index(task)
        kw["adapter_names"] = [task if active[own] else None] * rows
    return kw


def _score_task(scorer: PrefixScorer, tokenizer, pool: LoraPool, router: Router, task: str,
                mine: Sequence[tuple[int, MCExample]], protocol: str, fp: str, *,
                batch_size: int, max_len: int) -> list[dict]:
    """Route and score this process's examples of one task; one record per example."""
    active = protocol_active(pool, task, mine[0][1].cluster, protocol)
    own = pool.index(task) if task in pool.names else None
    exs = [ex for _, ex in mine]
    emb = router.embed([ex.prompt for ex in exs]) if hasattr(router, "embed") else None
    lp = [np.full(len(ex.choices), np.nan) for ex in exs]
    nt = [np.zeros(len(ex.choices)) for ex in exs]
    route_stats: list[dict | None] = [None] * len(exs)
    for b in mc_batches(exs, tokenizer, batch_size=batch_size, max_len=max_len):
        rows = np.where(b.example_index >= 0, b.example_index, b.example_index[0])
        kw = _route_kwargs(router, pool, task, active, len(rows))
        if emb is not None:
            kw["embeddings"] = emb[rows]
        routing = router.route([exs[r].prompt for r in rows], **kw)
        s = scorer.batch(b, lora=routing.hook)
        ntok = b.target_mask.sum(1)
        stats = _routing_rows(routing.info, np.arange(len(rows)), own)
        for r in range(len(rows)):
            e = b.example_index[r]
            if e >= 0:
                lp[e][b.choice_index[r]] = s[r]
                nt[e][b.choice_index[r]] = ntok[r]
                if route_stats[e] is None:
                    route_stats[e] = stats[r]
    return [{"key": f"{task}:{i}", "fp": fp, "task": task, "cluster": ex.cluster,
             "answer": ex.answer, "logprob": a.tolist(), "n_tokens": n.tolist(), "routing": rs or {}}
            for (i, ex), a, n, rs in zip(mine, lp, nt, route_stats, strict=True)]


def _gather(new: list[dict]) -> list[dict]:
    """Every process's records of one task, in example order (the same on every process)."""
    gathered = [r for part in dist.allgather_json(new) for r in part]
    gathered.sort(key=lambda r: int(r["key"].rsplit(":", 1)[1]))
    return gathered


def summarize(records, config: dict) -> dict:
    """Per-task / per-cluster / mean accuracies and routing statistics from per-example records."""
    correct: dict[str, int] = {}  # per example, for paired comparisons of routers
    per_task: dict[str, dict] = defaultdict(lambda: {"acc": [], "acc_norm": [], "routing": []})
    clusters = {}
    for r in records:
        lp = np.asarray(r["logprob"], np.float64)
        nt = np.asarray(r["n_tokens"], np.float64)
        t = per_task[r["task"]]
        t["acc"].append(float(np.argmax(lp) == r["answer"]))
        correct[r["key"]] = int(t["acc"][-1])
        t["acc_norm"].append(float(np.argmax(lp / np.maximum(nt, 1)) == r["answer"]))
        t["routing"].append(r.get("routing") or {})
        clusters[r["task"]] = r["cluster"]
    tasks = {}
    for name in sorted(per_task):
        t = per_task[name]
        entry = {"acc": float(np.mean(t["acc"])), "acc_norm": float(np.mean(t["acc_norm"])),
                 "n": len(t["acc"]), "cluster": clusters[name]}
        rs = [x for x in t["routing"] if x]
        if rs:
            entry.update(_routing_summary(rs))
        tasks[name] = entry
    by_cluster: dict[str, list] = defaultdict(list)
    for e in tasks.values():
        by_cluster[e["cluster"]].append(e)
    cl = {c: {"acc": float(np.mean([e["acc"] for e in es])),
              "acc_norm": float(np.mean([e["acc_norm"] for e in es])), "tasks": len(es)}
          for c, es in sorted(by_cluster.items())}
    mean = {"acc": float(np.mean([e["acc"] for e in tasks.values()])),
            "acc_norm": float(np.mean([e["acc_norm"] for e in tasks.values()])),
            "tasks": len(tasks), "examples": sum(e["n"] for e in tasks.values())}
    routing = {}
    with_stats = [e for e in tasks.values() if "mean_candidates" in e]
    if with_stats:  # mean over tasks of the per-task means; the histogram over all examples
        keys = sorted({k for e in with_stats for k in e} & {
            "own_in_candidates", "own_first", "own_roc_share", "cap_binds", "coverage",
            "total_rocs", "mean_candidates"})
        routing = {k: float(np.mean([e[k] for e in with_stats if k in e])) for k in keys}
        hist: dict[str, int] = defaultdict(int)
        for e in with_stats:
            for k, c in e.get("candidates_hist", {}).items():
                hist[k] += c
        routing["candidates_hist"] = dict(sorted(hist.items(), key=lambda kv: int(kv[0])))
    return {"config": config, "mean": mean, "clusters": cl, "tasks": tasks, "routing": routing,
            "correct": dict(sorted(correct.items()))}


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    path = Path(path)
    with atomic_file(path) as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True, default=_np_default))
    return path


def _np_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
