"""hilora-jax as an lm-evaluation-harness backend (`lm-eval>=0.4.13`, the `lmeval` extra).

Importing this module registers the `LM` class `HiLoRALM` under the name ``hilora`` in lm-eval's
model registry (lm-eval 0.4.13 has no plugin entry points for models: a model must be imported
before it is looked up). Use it from Python::

    import hilora_jax.lmeval  # registers "hilora"
    lm_eval.simple_evaluate(model="hilora", model_args="model=smollm2,pool=pool/,router=hilora",
                            tasks=[...])

or from the shell through the thin wrapper, which registers the model and then runs lm-eval's
own command line unchanged::

    python -m hilora_jax.lmeval run --model hilora --model_args model=smollm2,pool=pool/ \\
        --tasks arc_easy --include_path my_tasks/

`model_args` (comma separated ``key=value``; unknown keys are refused in one line naming them):

* ``model``: any source `hilora_jax.load_model` accepts (HF dir, hub id, .gguf, converted dir,
  ``smollm2``); ``tokenizer``: a tokenizer source (default: the model's).
* ``pool``: a pool manifest, a folder of PEFT adapter dirs or a saved pool dir (checked against the
  model when loaded); ``router``: any `hilora_jax.routing.routers.ROUTERS` name (default ``base``
  without a pool, ``hilora`` with one). Router options: ``router_options=k=v;k2=v2`` and/or
  individual keys ``router.k=v``.
* ``adapter_map``: lm-eval task name -> adapter name, as ``task:adapter;task2:adapter2`` or a JSON
  file; the ``oracle`` router uses it per request (a task missing from it is an error).
  ``protocol``: ``seen`` (default), ``unseen-within`` or ``unseen-cross`` (method doc §7): the
  adapter mapped to a request's task (and, for unseen-cross, its cluster) is deactivated.
* ``dtype`` (float32 | bfloat16 | float16), ``mesh`` (``DATAxMODEL``, e.g. ``4x2``),
  ``batch_size`` (int; ``auto`` means 16 — no memory probing; on the command line
  use lm-eval's ``--batch_size``, which lm-eval passes as well), ``max_length`` (default the
  model's ``max_position_embeddings``), ``max_gen_toks`` (default 256), ``add_bos_token``,
  ``prefix_token_id``, ``seed`` (sampling). ``device`` and ``max_batch_size``, which lm-eval's
  command line always passes, are accepted; ``device`` is ignored (JAX places the arrays).
* ``trace_path``: write the routing trace (below) to this JSONL file; ``multihost``: let JAX
  detect the cluster (as ``hilora eval --multihost``).

Encoder-decoder models: a local HF T5 / FLAN-T5 directory (``config.json`` with ``model_type:
t5``) is loaded with `hilora_jax.t5.load_t5` onto a `T5Engine`, with the semantics of lm-eval's
``hf`` backend with ``backend="seq2seq"`` (``HFLM(pretrained=..., backend="seq2seq")``): the
context (encoded with the tokenizer's special tokens, e.g. T5's EOS; its last ``max_length``
tokens) is the encoder input, the continuation (encoded without) the decoder target, scored by
`T5Engine.score_targets` (summed log-prob and is_greedy); ``loglikelihood_rolling`` scores each
rolling window as the decoder target of a one-token encoder input (the prefix token, then the token
before the window), as lm-eval's seq2seq backend does; ``generate_until`` decodes from the
encoder input (last ``max_length`` tokens) with `T5Engine.generate` (greedy, or sampled), at most
``max_gen_toks`` new tokens (lm-eval's seq2seq backend lets HF generate up to the batch's padded
context length + ``max_gen_toks`` - 1 decoder tokens; texts agree whenever a stop sequence or EOS
ends them within ``max_gen_toks``). ``max_length`` defaults to lm-eval's
(`resolve_max_length`: the tokenizer's ``model_max_length``, else 2048). Every router routes from
the context text (the encoder input); the token stage runs on encoder tokens and on each decoded
token.

Multi-process (lm-eval's rank / world-size contract, data parallel like its ``hf`` backend under
accelerate): start one lm-eval process per host with ``HILORA_COORDINATOR=host:port
HILORA_NUM_PROCESSES=N HILORA_PROCESS_ID=i`` (or ``multihost=true``, or call
`hilora_jax.distributed.initialize` yourself before any JAX computation). The model starts
`jax.distributed` (gloo on CPU), reports ``rank = jax.process_index()``, ``world_size =
jax.process_count()``, and builds the model on its *local* devices (``mesh`` is per process);
lm-eval gives rank r the documents r, r + N, ... and gathers through ``all_gather`` (request
counts), ``gather_object`` (samples, metrics) and ``barrier``, implemented as host all-gathers over
`jax.distributed`. Metrics and per-request results equal one process's; rank 0 returns them.

Routing trace: with ``trace_path`` (or, through ``python -m hilora_jax.lmeval``, with
``--output_path`` and ``--log_samples``: ``hilora_trace_<task>_<date>.jsonl`` beside each
``samples_<task>_<date>.jsonl``), one JSON line per request: ``task``, ``doc_id``, ``idx``,
``request_type``, ``router``, ``candidates`` (adapter names), ``rocs`` (HiLoRA's ROC counts),
``weights`` (HiLoRA's allocation probabilities / a mixture's weights) and the per-example
statistics ``hilora eval`` records (``n_candidates``, ``budget``, ``total_rocs``, ``cap_binds``,
``coverage``; ``own_*`` when ``adapter_map`` names the task's adapter). Several processes merge
their traces on rank 0.

Decoding stops early at EOS and at stop strings that are a single token; longer stop strings
are cut from the text afterwards (the same text, more decoding steps).

Routing is per request, from its context text alone: the sequence stage (embedding, Gaussian
scores, candidate selection) runs once per distinct context on the host, the token stage runs
inside the jitted forward. Requests are sorted by length and cut into fixed-size batches padded to
length buckets (`inference.bucket_length`): one compiled program per (bucket, routing shape),
no recompiles across requests of the same shape.

Tokenisation and truncation follow lm-eval's ``hf`` backend exactly: context/continuation pairs
are split as `TemplateLM._encode_pair` does (trailing context spaces move to the continuation);
an empty context is replaced by ``prefix_token_id`` (BOS, else EOS). A log-likelihood request
longer than ``max_length + 1`` tokens is *left-truncated*: the model sees the last ``max_length``
tokens before each scored token (``(context + continuation)[-(max_length + 1):][:-1]``), with a
warning; a continuation longer than ``max_length`` is an error. ``loglikelihood_rolling`` uses
lm-eval's disjoint rolling windows of ``max_length`` tokens. ``generate_until`` left-truncates the
context to ``max_length - max_gen_toks`` tokens; decoding is greedy unless ``do_sample`` /
``temperature > 0`` (then temperature / top-p sampling with the PRNG key from ``seed``); the text
is cut at the first stop sequence (``until`` plus the EOS string), as the hf backend does.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
    resolve_max_length,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from hilora_jax.inference import Engine, bucket_length, pad_batch
from hilora_jax.model import sharding as shd

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
KNOWN_ARGS = ("model", "pretrained", "tokenizer", "pool", "router", "router_options",
              "adapter_map", "protocol", "dtype", "mesh", "batch_size", "max_batch_size",
              "max_length", "max_gen_toks", "add_bos_token", "prefix_token_id", "seed", "device",
              "trace_path", "multihost")
GEN_KEYS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p")
AUTO_BATCH = 16
# set by `main()`: the HiLoRALM instances made during a command-line run, whose routing traces
# are written beside lm-eval's samples files afterwards
_CLI_TRACE: list | None = None


def _parse_kv(s: str, sep: str, what: str) -> dict[str, str]:
    out = {}
    for part in (p.strip() for p in s.split(";")):
        if not part:
            continue
        if sep not in part:
            raise ValueError(f"hilora model_args {what}: {part!r} is not of the form "
                             f"key{sep}value (entries separated by ';')")
        k, v = part.split(sep, 1)
        out[k.strip()] = v.strip()
    return out


def _parse_adapter_map(v) -> dict[str, str]:
    if v is None or v == "":
        return {}
    if isinstance(v, dict):
        return {str(k): str(a) for k, a in v.items()}
    s = str(v)
    if os.path.isfile(s):
        try:
            d = json.loads(Path(s).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"hilora model_args adapter_map: {s} is not valid JSON ({e})") from e
        if not isinstance(d, dict):
            raise ValueError(f"hilora model_args adapter_map: {s} must hold a JSON object "
                             "{task: adapter}")
        return {str(k): str(a) for k, a in d.items()}
    return _parse_kv(s, ":", "adapter_map")


def _check_mesh(v) -> tuple[int, int] | None:
    if v is None or v == "":
        return None
    try:
        d, m = (int(x) for x in str(v).lower().split("x"))
    except ValueError:
        raise ValueError(f"hilora model_args mesh: {v!r} is not DATAxMODEL (e.g. 4x2)") from None
    return d, m


def _as_bool(v, key: str) -> bool:
    if isinstance(v, bool) or v is None:
        return bool(v)
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"hilora model_args {key}: {v!r} is not a boolean (true/false)")


def _start_distributed(multihost: bool) -> None:
    """Start `jax.distributed` from the HILORA_* variables (or JAX's cluster detection with
    `multihost=true`) unless it is already running; one machine needs nothing."""
    try:
        from jax._src.distributed import global_state

        if getattr(global_state, "client", None) is not None:
            return  # the caller started it
    except ImportError:  # pragma: no cover - other jax layouts
        pass
    from hilora_jax import distributed as dist

    dist.initialize(auto=multihost)


def _allgather_bytes(data: bytes) -> list[bytes]:
    """Every process's `data`, in process order (a host all-gather over `jax.distributed`)."""
    if jax.process_count() == 1:
        return [data]
    from jax.experimental import multihost_utils

    a = np.frombuffer(data, np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([a.size], np.int32))).reshape(-1)
    buf = np.zeros(max(int(sizes.max()), 1), np.uint8)
    buf[:a.size] = a
    rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(jax.process_count(), -1)
    return [bytes(r[:k]) for r, k in zip(rows, sizes, strict=True)]


def _routing_record(info: dict, names: Sequence[str], r: int, own: int | None) -> dict:
    """One request's routing, as `hilora eval` records it (`runner._routing_rows`: candidate
    count, budget, ROCs, cap, coverage, own-adapter statistics) plus the candidates by name, their
    ROC counts and weights (HiLoRA: allocation probabilities; mixture routers: mixture weights)."""
    from hilora_jax.eval.runner import _routing_rows

    d = {"router": str(info.get("router", "?"))}
    if "cand_idx" in info:
        used = info["cand_valid"][r] & (info["n_rocs"][r] > 0)
        d.update(candidates=[names[a] for a in info["cand_idx"][r][used].tolist()],
                 rocs=info["n_rocs"][r][used].astype(int).tolist(),
                 weights=[round(float(w), 6) for w in info["probs"][r][used]])
    elif "weights" in info:
        w = np.asarray(info["weights"][r], np.float64)
        order = [int(a) for a in np.argsort(-w, kind="stable") if w[a] > 0]
        d.update(candidates=[names[a] for a in order],
                 weights=[round(float(w[a]), 6) for a in order])
    else:  # token-level routers (arrow, roc-fixed): no per-request decision to record
        d["candidates"] = list(names)
    d.update(_routing_rows(info, np.asarray([r]), own)[0])
    return d


@register_model("hilora")
class HiLoRALM(TemplateLM):
    """lm-eval `LM` over a hilora-jax model, optionally with a routed LoRA pool (module doc)."""

    backend = "causal"

    def __init__(self, model=None, pretrained=None, tokenizer=None, pool=None, router=None,
                 router_options=None, adapter_map=None, protocol: str = "seen",
                 dtype: str = "float32", mesh=None, batch_size=8, max_batch_size=None,
                 max_length=None, max_gen_toks: int = 256, add_bos_token=None,
                 prefix_token_id=None, seed: int = 0, device=None, trace_path=None,
                 multihost=False, **kwargs):
        super().__init__()
        ropts = {}
        unknown = []
        for k, v in kwargs.items():
            if k.startswith("router."):
                ropts[k[len("router."):]] = v
            else:
                unknown.append(k)
        if unknown:
            raise ValueError(f"hilora model_args: unknown key(s) {sorted(unknown)}; known: "
                             f"{', '.join(KNOWN_ARGS)} and router.<option>")
        src = model if model is not None else pretrained
        if src is None:
            raise ValueError("hilora model_args: `model` is required (any hilora_jax.load_model "
                             "source)")
        if str(dtype) not in DTYPES:
            raise ValueError(f"hilora model_args dtype: {dtype!r} is not one of {sorted(DTYPES)}")
        from hilora_jax.eval.runner import PROTOCOLS

        if protocol not in PROTOCOLS:
            raise ValueError(f"hilora model_args protocol: {protocol!r} is not one of {PROTOCOLS}")
        if isinstance(router_options, dict):
            ropts = {**router_options, **ropts}
        elif router_options:
            ropts = {**_parse_kv(str(router_options), "=", "router_options"), **ropts}
        if batch_size in (None, ""):
            batch_size = 8
        bs = str(batch_size)
        if bs.startswith("auto"):
            bs = str(max_batch_size or AUTO_BATCH)
        try:
            self._batch_size = int(bs)
        except ValueError:
            raise ValueError(f"hilora model_args batch_size: {batch_size!r} is not an integer or "
                             "'auto'") from None
        if self._batch_size < 1:
            raise ValueError(f"hilora model_args batch_size must be >= 1, got {batch_size}")
        self.adapter_map = _parse_adapter_map(adapter_map)
        self.protocol = protocol
        self.seed = int(seed)
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        mesh_shape = _check_mesh(mesh)
        multihost = _as_bool(multihost, "multihost")
        self.trace_path = str(trace_path) if trace_path not in (None, "") else None
        self._trace: dict[tuple, dict] = {}
        self._tracing = self.trace_path is not None or _CLI_TRACE is not None
        if _CLI_TRACE is not None:
            _CLI_TRACE.append(self)

        # lm-eval's data-parallel contract: every process builds the model on its local devices,
        # the harness gives rank r the documents r, r + world_size, ... and gathers the per-sample
        # metrics through `all_gather` / `gather_object` (below)
        _start_distributed(multihost)
        self._rank, self._world_size = jax.process_index(), jax.process_count()
        mesh_ = None if mesh_shape is None else shd.make_mesh(*mesh_shape,
                                                              devices=jax.local_devices())

        from hilora_jax.io.loading import load_model, load_tokenizer
        from hilora_jax.t5.config import is_t5_dir

        if is_t5_dir(src):  # encoder-decoder: lm-eval's seq2seq semantics (module doc)
            from hilora_jax.t5 import T5Engine, load_t5

            self.backend = "seq2seq"
            self.model = load_t5(src, dtype=DTYPES[str(dtype)], mesh=mesh_)
            self.engine = T5Engine(self.model, mesh=mesh_)
        else:
            self.model = load_model(src, dtype=DTYPES[str(dtype)], mesh=mesh_, progress=False)
            self.engine = Engine(self.model, mesh=mesh_)
        self.tokenizer = load_tokenizer(tokenizer if tokenizer is not None else src)
        self.config = self.model.config
        if self.backend == "seq2seq":  # relative positions: no limit; lm-eval's default length
            self._max_length = (int(max_length) if max_length
                                else resolve_max_length(self.config, self.tokenizer))
        else:
            limit = self.config.max_position_embeddings
            self._max_length = int(max_length) if max_length else limit
            if self._max_length > limit:
                raise ValueError(f"hilora model_args max_length={self._max_length} exceeds the "
                                 f"model's max_position_embeddings={limit}")
        self.pool = None
        if pool is not None:
            from hilora_jax.lora.io import load_pool

            self.pool = load_pool(pool, model=self.model, mesh=mesh_, progress=False)
        rname = router or ("hilora" if self.pool is not None else "base")
        if rname != "base" and self.pool is None:
            raise ValueError(f"hilora model_args: router={rname!r} needs a `pool`")
        from hilora_jax.routing.routers import build_router

        self.router = build_router(rname, self.pool, options=ropts, model=self.model,
                                   engine=self.engine, tokenizer=self.tokenizer)
        if self.pool is not None:
            bad = {t: a for t, a in self.adapter_map.items() if a not in self.pool.names}
            if bad:
                raise ValueError(f"hilora model_args adapter_map: adapter(s) not in the pool: "
                                 f"{bad}; pool: {list(self.pool.names)}")

    # -- lm-eval properties ------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return int(self.custom_prefix_token_id)
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "tokenizer").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None,
                   **kwargs) -> list[int]:
        # as lm-eval's hf backend: explicit flag, else add_bos_token, else the tokenizer default;
        # no special tokens when the string already starts with BOS
        kw = {}
        if add_special_tokens is not None:
            kw["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            kw["add_special_tokens"] = self.add_bos_token
        if add_special_tokens is None and has_bos_prefix(
                string, self.tokenizer.decode(self.prefix_token_id)):
            kw["add_special_tokens"] = False
        enc = self.tokenizer.encode(string, **kw)
        if left_truncate_len:
            enc = enc[-left_truncate_len:]
        return enc

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # -- routing -------------------------------------------------------------------------
    def _adapter_for(self, task: str | None) -> str:
        if task not in self.adapter_map:
            raise ValueError(f"hilora: task {task!r} has no adapter in adapter_map "
                             f"({sorted(self.adapter_map)})")
        return self.adapter_map[task]

    def _active(self, task: str | None):
        if self.pool is None or self.protocol == "seen":
            return None
        from hilora_jax.eval.runner import protocol_active

        a = self._adapter_for(task)
        return protocol_active(self.pool, a, self.pool.clusters.get(a), self.protocol)

    def _route(self, texts: Sequence[str], tasks: Sequence[str | None], emb_cache: dict,
               keys: Sequence[tuple | None] = ()):
        """Sequence-stage routing of one batch (rows share the batch's protocol view); records
        the routing of the rows whose request `keys` are given when tracing."""
        r = self.router
        if self.pool is None or r.name == "base":
            if self._tracing:
                for k in keys:
                    if k is not None:
                        self._trace.setdefault(k, {"router": "base", "candidates": []})
            return None
        kw = {}
        active = self._active(tasks[0])
        if active is not None:
            kw["active"] = active
        if hasattr(r, "embed"):
            new = sorted({t for t in texts if t not in emb_cache})
            if new:
                for t, z in zip(new, r.embed(new), strict=True):
                    emb_cache[t] = z
            kw["embeddings"] = np.stack([emb_cache[t] for t in texts])
        if r.name == "oracle":
            names = [self._adapter_for(t) for t in tasks]
            if active is not None:
                names = [n if active[self.pool.index(n)] else None for n in names]
            kw["adapter_names"] = names
        routing = r.route(list(texts), **kw)
        if self._tracing:
            for row, k in enumerate(keys):
                if k is not None and k not in self._trace:
                    a = self.adapter_map.get(k[0])
                    own = self.pool.index(a) if a is not None else None
                    self._trace[k] = _routing_record(routing.info, self.pool.names, row, own)
        return routing.hook

    # -- routing trace -------------------------------------------------------------------
    @staticmethod
    def _key(req) -> tuple:
        d, i = getattr(req, "doc_id", None), getattr(req, "idx", None)
        return (str(getattr(req, "task_name", None)), -1 if d is None else int(d),
                -1 if i is None else int(i), str(getattr(req, "request_type", "")))

    def trace_records(self) -> list[dict]:
        """This process's routing trace: one record per request (task, doc_id, idx,
        request_type, then the routing), sorted by those keys."""
        return [{"task": k[0], "doc_id": k[1], "idx": k[2], "request_type": k[3], **v}
                for k, v in sorted(self._trace.items())]

    def _write_trace(self, records: list[dict]) -> None:
        if self.trace_path is None:
            return
        from hilora_jax._fs import atomic_file

        with atomic_file(self.trace_path) as f:
            for rec in records:
                f.write(json.dumps(rec, sort_keys=True) + "\n")

    def _flush_trace(self) -> None:
        """After each request type: one process writes its trace; several write it (merged) in
        `gather_object`, which lm-eval calls on every rank once the requests are done."""
        if self._tracing and self._world_size == 1:
            self._write_trace(self.trace_records())

    # -- lm-eval's multi-process hooks (jax.distributed host collectives) ------------------
    def all_gather(self, tensor):
        """lm-eval gathers per-rank request counts with this (a torch tensor): concatenated
        along dim 0 across processes, as accelerate's `gather`."""
        if self._world_size == 1:
            return tensor
        import pickle

        import torch

        a = tensor.detach().cpu().numpy()
        parts = [pickle.loads(b) for b in _allgather_bytes(pickle.dumps(a))]
        return torch.as_tensor(np.concatenate([np.atleast_1d(p) for p in parts]))

    def gather_object(self, obj, dst: int = 0):
        """Every rank's `obj` on rank `dst` (None elsewhere); the routing traces ride along and
        rank `dst` writes the merged trace."""
        if self._world_size == 1:
            self._flush_trace()
            return [obj]
        import pickle

        parts = [pickle.loads(b) for b in _allgather_bytes(pickle.dumps((obj, self._trace)))]
        if self._tracing:
            for _, tr in parts:
                for k, v in tr.items():
                    self._trace.setdefault(k, v)
            if self._rank == dst:
                self._write_trace(self.trace_records())
        return [o for o, _ in parts] if self._rank == dst else None

    def barrier(self) -> None:
        if self._world_size > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("hilora_lmeval_barrier")

    def _groups(self, items: Sequence, task_of) -> list[list[int]]:
        """Indices grouped so that one batch never mixes protocol views."""
        if self.pool is None or self.protocol == "seen":
            return [list(range(len(items)))]
        g: dict = defaultdict(list)
        for i, it in enumerate(items):
            g[task_of(it)].append(i)
        return [g[k] for k in sorted(g, key=str)]

    # -- log-likelihood ------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        items = []
        for req in requests:
            context, continuation = req.args
            if context == "":
                cont = self.tok_encode(continuation, add_special_tokens=False)
                ctx, cont = (([self.prefix_token_id], cont) if self.prefix_token_id != cont[0]
                             else (cont[:1], cont[1:]))
            else:
                ctx, cont = self._encode_pair(context, continuation)
            items.append((ctx, cont, context, getattr(req, "task_name", None), self._key(req)))
        out = self._score_items(items)
        self._flush_trace()
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """lm-eval's token-level entry: `((context, continuation), ctx_ids, cont_ids)` triples
        (routed from the context string; no task, so not for oracle / protocols)."""
        items = [(ctx, cont, (key[0] if key else "") or "", None, None)
                 for key, ctx, cont in requests]
        return self._score_items(items)

    def _score_items(self, items) -> list[tuple[float, bool]]:
        """items: (ctx_ids, cont_ids, route_text, task, request key | None) ->
        [(logprob, is_greedy)]."""
        res: list = [None] * len(items)
        emb_cache: dict = {}
        seq2seq = self.backend == "seq2seq"
        rows = []  # causal: context + continuation; seq2seq: the encoder input (the context)
        for i, (ctx, cont, *_) in enumerate(items):
            if not cont:
                raise ValueError(f"hilora: request {i} has an empty continuation")
            if len(cont) > self.max_length:
                raise ValueError(f"hilora: request {i}: continuation of {len(cont)} tokens is "
                                 f"longer than max_length={self.max_length}")
            if seq2seq:  # as lm-eval's seq2seq backend: the last max_length context tokens
                if not ctx:
                    raise ValueError(f"hilora: request {i} has an empty context (the encoder "
                                     "input of an encoder-decoder model)")
                rows.append(list(ctx)[-self.max_length:])
                continue
            full = list(ctx) + list(cont)
            if len(full) > self.max_length + 1:
                log.warning("hilora: request %d has %d tokens > max_length+1=%d; left-truncating "
                            "the context", i, len(full), self.max_length + 1)
                full = full[-(self.max_length + 1):]
            rows.append(full)
        bsz = self.batch_size
        for group in self._groups(items, lambda it: it[3]):
            order = sorted(group, key=lambda i: (-len(rows[i]) - seq2seq * len(items[i][1]), i))
            for s in range(0, len(order), bsz):
                idx = order[s:s + bsz]
                n = len(idx)
                pad_idx = idx + [idx[0]] * (bsz - n)  # fixed batch shape
                hook = self._route([items[i][2] for i in pad_idx],
                                   [items[i][3] for i in pad_idx], emb_cache,
                                   [items[i][4] for i in idx])
                score = self._score_seq2seq if seq2seq else self._score_causal
                lp, greedy = score([rows[i] for i in pad_idx], [items[i][1] for i in pad_idx],
                                   hook)
                for r, i in enumerate(idx):
                    res[i] = (float(lp[r]), bool(greedy[r]))
        return res

    def _score_causal(self, rows, conts, hook) -> tuple[np.ndarray, np.ndarray]:
        """One decoder-only batch: rows (context + continuation, left-padded; lm-eval's layout,
        input = row[:-1], targets = row[1:]) scored on their continuation's tail by `Engine.score`
        -> (summed log-probs [B], is_greedy [B])."""
        bsz = len(rows)
        t = bucket_length(max(len(full) - 1 for full in rows))
        tail = min(t, bucket_length(max(len(c) for c in conts)))
        ids = np.zeros((bsz, t), np.int32)
        tgt = np.zeros((bsz, t), np.int32)
        mask = np.zeros((bsz, t), bool)
        tmask = np.zeros((bsz, t), bool)
        for r, (full, cont) in enumerate(zip(rows, conts, strict=True)):
            m = len(full) - 1
            ids[r, t - m:] = full[:-1]
            tgt[r, t - m:] = full[1:]
            mask[r, t - m:] = True
            tmask[r, t - len(cont):] = True
        lp, _, greedy = self.engine.score(ids, mask, tmask, lora=hook, tail=tail, targets=tgt,
                                          greedy=True)
        return np.asarray(lp), np.asarray(greedy)

    def _score_seq2seq(self, ctxs, conts, hook) -> tuple[np.ndarray, np.ndarray]:
        """One encoder-decoder batch: each context right-padded as the encoder input, its
        continuation the decoder target (`T5Engine.score_targets`, one target per row) ->
        (summed log-probs [B], is_greedy [B])."""
        te = bucket_length(max(len(c) for c in ctxs))
        tc = bucket_length(max(len(c) for c in conts))
        ids, mask = pad_batch(ctxs, te, 0, side="right")
        tgt, tmask = pad_batch(conts, tc, 0, side="right")
        lp, greedy = self.engine.score_targets(ids, mask, tgt[:, None], tmask[:, None], lora=hook,
                                               greedy=True)
        return lp[:, 0], greedy[:, 0]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        items, owner = [], []
        for j, req in enumerate(requests):
            (string,) = req.args
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            for ctx, cont in windows:
                items.append((ctx, cont, string, getattr(req, "task_name", None),
                              self._key(req)))
                owner.append(j)
        out = [0.0] * len(requests)
        for j, (lp, _) in zip(owner, self._score_items(items), strict=True):
            out[j] += lp
        self._flush_trace()
        return out

    # -- generation ----------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        res: list = [None] * len(requests)
        groups: dict = defaultdict(list)
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            extra = sorted(set(gen_kwargs) - set(GEN_KEYS) - {"max_new_tokens", "max_tokens",
                                                              "max_completion_tokens"})
            if extra:
                raise ValueError(f"hilora generate_until: unsupported generation kwargs {extra} "
                                 f"(supported: {', '.join(GEN_KEYS)})")
            key = json.dumps(gen_kwargs, sort_keys=True, default=str)
            task = getattr(req, "task_name", None)
            gkey = (key, task) if (self.pool is not None and self.protocol != "seen") else (key,)
            groups[gkey].append(i)
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        emb_cache: dict = {}
        for gi, gkey in enumerate(sorted(groups)):
            idx_all = groups[gkey]
            raw = dict(requests[idx_all[0]].args[1])
            kwargs = normalize_gen_kwargs(raw, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            # do_sample without a temperature samples at 1.0 (transformers' default);
            # temperature 0 is greedy whatever do_sample says
            temperature = float(kwargs.get("temperature") if "temperature" in raw
                                else (1.0 if kwargs.get("do_sample") else 0.0))
            greedy = not kwargs.get("do_sample") or temperature <= 0.0
            stops = self._stop_tokens(until)
            if self.backend == "seq2seq":
                # the encoder takes the last max_length tokens, encoded with the tokenizer's
                # defaults (lm-eval's `tok_batch_encode` for seq2seq)
                enc = {i: self.tokenizer.encode(requests[i].args[0])[-self.max_length:]
                       for i in idx_all}
            else:
                max_ctx = self.max_length - max_gen
                if max_ctx <= 0:
                    raise ValueError(f"hilora generate_until: max_gen_toks={max_gen} must be "
                                     f"less than max_length={self.max_length}")
                enc = {i: self.tok_encode(requests[i].args[0], left_truncate_len=max_ctx)
                       for i in idx_all}
            order = sorted(idx_all, key=lambda i: (-len(enc[i]), i))
            bsz = self.batch_size
            for s in range(0, len(order), bsz):
                idx = order[s:s + bsz]
                pad_idx = idx + [idx[0]] * (bsz - len(idx))
                prompts = [enc[i] for i in pad_idx]
                t = bucket_length(max(len(p) for p in prompts))
                if self.backend == "causal":
                    room = self.config.max_position_embeddings - bucket_length(max_gen)
                    if t > room >= max(len(p) for p in prompts):
                        t = room
                hook = self._route([requests[i].args[0] for i in pad_idx],
                                   [getattr(requests[i], "task_name", None) for i in pad_idx],
                                   emb_cache, [self._key(requests[i]) for i in idx])
                key = None if greedy else jax.random.fold_in(
                    jax.random.fold_in(jax.random.key(self.seed), gi), s)
                out = self.engine.generate(
                    prompts, max_new_tokens=max_gen, temperature=0.0 if greedy else temperature,
                    top_p=float(kwargs.get("top_p") or 1.0), key=key, lora=hook, stop_tokens=stops,
                    pad_id=self.tokenizer.pad_token_id or 0, prompt_bucket=t)
                for r, i in enumerate(idx):
                    toks = out.tokens[r, :out.lengths[r]].tolist()
                    res[i] = postprocess_generated_text(self.tok_decode(toks), until, None)
        self._flush_trace()
        return res

    def _stop_tokens(self, until: Sequence[str]) -> list[int]:
        """Token ids at which decoding may stop: the EOS ids, and every stop string that is one
        token decoding to exactly that string (once generated, the text is cut at or before it,
        so stopping there gives the same text). Longer stop strings are cut afterwards."""
        ids = [int(t) for t in np.atleast_1d(self.config.eos_token_id or [])]
        if self.tokenizer.eos_token_id is not None:
            ids.append(int(self.tokenizer.eos_token_id))
        for s in until:
            enc = self.tokenizer.encode(s, add_special_tokens=False)
            if len(enc) == 1 and self.tok_decode(enc, skip_special_tokens=False) == s:
                ids.append(int(enc[0]))
        return sorted(set(ids))

    def get_model_info(self) -> dict:
        return {"hilora_router": self.router.name,
                "hilora_pool": list(self.pool.names) if self.pool is not None else [],
                "hilora_protocol": self.protocol}


_SAMPLES_FILE = re.compile(r"^samples_(?P<task>.+)_(?P<date>\d{4}-\d\d-\d\dT[0-9.\-]+)\.jsonl$")


def write_cli_traces(output_path: str, since: float, lms: Sequence[HiLoRALM]) -> list[Path]:
    """Beside every lm-eval samples file ``samples_<task>_<date>.jsonl`` written under
    `output_path` since `since`, write ``hilora_trace_<task>_<date>.jsonl``: that task's routing
    trace (one record per request, `HiLoRALM.trace_records`). Only rank 0 writes."""
    root = Path(output_path)
    base = root.parent if root.suffix == ".json" else root
    records = [r for lm in lms if lm.rank == 0 for r in lm.trace_records()]
    if not records or not base.is_dir():
        return []
    from hilora_jax._fs import atomic_file

    written = []
    for f in sorted(base.rglob("samples_*.jsonl")):
        m = _SAMPLES_FILE.match(f.name)
        if m is None or f.stat().st_mtime < since:
            continue
        task = m.group("task")
        dest = f.with_name(f"hilora_trace_{task}_{m.group('date')}.jsonl")
        with atomic_file(dest) as out:
            for rec in records:
                if rec["task"] == task:
                    out.write(json.dumps(rec, sort_keys=True) + "\n")
        written.append(dest)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m hilora_jax.lmeval <lm-eval arguments>`: lm-eval's CLI with `hilora` registered.

    With ``--output_path`` and ``--log_samples``, the routing trace of each task is written
    beside its samples file (`write_cli_traces`)."""
    import argparse
    import sys
    import time

    from lm_eval.__main__ import cli_evaluate

    global _CLI_TRACE
    saved_argv = list(sys.argv)
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--output_path", "-o")
    p.add_argument("--log_samples", "-s", action="store_true")
    ns, _ = p.parse_known_args(sys.argv[1:])
    _CLI_TRACE = [] if (ns.output_path and ns.log_samples) else None
    t0 = time.time() - 1.0
    try:
        cli_evaluate()
        if _CLI_TRACE:
            for path in write_cli_traces(ns.output_path, t0, _CLI_TRACE):
                log.info("hilora: routing trace written to %s", path)
    finally:
        _CLI_TRACE = None
        if argv is not None:
            sys.argv = saved_argv


if __name__ == "__main__":
    main()
