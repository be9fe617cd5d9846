"""LoRA training in JAX/optax, and export as a standard PEFT adapter.

Design
------
* The adapter is a pytree hook (`TrainableLora`, a `flax.struct.dataclass`): per target module a
  stacked A `[L, R, D]` and B `[L, R, E]` (ROC rows, the project's one LoRA layout: see
  `hilora_jax.model.projections`), and the static scale `alpha / r`. `CausalLM` calls it at every
  adaptable projection, so the base model is never rebuilt or mutated.
* Initialisation matches PEFT's default (`init_lora_weights=True`): A is kaiming-uniform with
  `a = sqrt(5)` on the `[r, d_in]` weight, i.e. `U(-1/sqrt(d_in), 1/sqrt(d_in))`; B is zero, so
  the adapted model starts exactly at the base model.
* The base model is split once (`nnx.split`); the jitted train step is a pure function of
  `(adapter, opt_state, base_state, batch)` and differentiates only the adapter (the base state is
  a non-differentiated argument, so base parameters are frozen by construction).
* Heterogeneous recipes, as found on model hubs: `targets="all-linear"` (every adaptable
  projection; saved as PEFT's `"all-linear"`), rsLoRA (`use_rslora`: scale `alpha / sqrt(r)`),
  and per-module rank / alpha (`rank_pattern` / `alpha_pattern`, keyed by module name such as
  `"down_proj"`, saved under the same PEFT fields). The scale is then per module.
* Loss: mean cross-entropy over the answer tokens only (for multiple choice: the correct choice
  after the prompt; for generation examples: the target followed by EOS), `masked_nll`. What differs
  between families is an *objective* (`batch(idx)` -> arrays, `loss(adapter, model, *arrays)`);
  the optimizer, schedule, batching order and loop are shared. Llama family (`CausalObjective`):
  sequences are left-padded to one length bucket, so the answer is always in the last `K`
  positions and only those go through the LM head (`inference.tail_logprobs`, the scoring path
  of `Engine.score`). T5 (`hilora_jax.t5.train.Seq2SeqObjective`): the prompt is the encoder
  input, the answer the teacher-forced decoder target.
* Targets are PEFT target names (`q_proj`; T5: `q`, `wo`, ...) resolved to the model's projection
  rows (`model.projections.family_table`): a T5 name adapts that projection in every place it
  occurs (encoder / decoder self-attention, `EncDecAttention`), as PEFT's `target_modules` does.
* `save_peft` writes the adapter through the project's one PEFT writer
  (`io.peft.write_adapter`; `peft_modules` is the only place the trainer's arrays meet PEFT),
  atomically, loadable by `peft.PeftModel.from_pretrained`.
"""

# ruff: noqa: F722  (jaxtyping shape strings)
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jaxtyping import Array, Float

from hilora_jax.eval.tasks import (
    Example,
    GenExample,
    MCExample,
    Tokenizer,
    choice_text,
    encode,
    pad_id_of,
)
from hilora_jax.inference import pad_batch, tail_logprobs
from hilora_jax.io.peft import PeftAdapter
from hilora_jax.model.hook import LoraHook
from hilora_jax.model.llama import CausalLM
from hilora_jax.model.projections import MODULES, Projection, family_table, projection
from hilora_jax.t5.config import T5Config


@struct.dataclass
class TrainableLora(LoraHook):
    """One LoRA being trained, as a model hook: `delta = scale * (x A[layer]^T) B[layer]`.

    `a[name]`: `[L, R, D]`, `b[name]`: `[L, R, E]` for each target module name (ROC rows).
    """

    a: dict
    b: dict
    # one scale for every module, or `((module, scale), ...)` (hashable: it is static)
    scale: float | tuple[tuple[str, float], ...] = struct.field(pytree_node=False)
    layers: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)  # None: all

    def scale_of(self, name: str) -> float:
        return dict(self.scale)[name] if isinstance(self.scale, tuple) else self.scale

    def delta(self, layer: int, name: str, x: Float[Array, "B T D"]):
        if name not in self.a or (self.layers is not None and layer not in self.layers):
            return None
        h = jnp.einsum("BTD,RD->BTR", x, self.a[name][layer].astype(x.dtype))
        return jnp.einsum("BTR,RE->BTE", h, self.b[name][layer].astype(x.dtype)) * self.scale_of(name), {}

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.a)


def _rows(model) -> dict[str, Projection]:
    """The model's adaptable projection rows by adapter key (Llama: `q_proj`; T5:
    `decoder.EncDecAttention.q`)."""
    return {p.name: p for p in family_table(model.config)}


def resolve_targets(model: CausalLM, targets: str | Sequence[str]) -> tuple[str, ...]:
    """Adapter keys (projection rows) of `targets`: `"all-linear"` = every adaptable projection
    of `model` (PEFT's meaning: lm_head excluded), else PEFT target names (`q_proj`; T5: `q`,
    `wi_0`, ...), checked against the model; a name adapts every row it names (T5 `q`: encoder
    and decoder self-attention and `EncDecAttention`). Llama rows are the names themselves; row
    keys are accepted as well (so resolved targets resolve to themselves)."""
    rows = family_table(model.config)
    names = tuple(dict.fromkeys(p.target for p in rows))
    if isinstance(targets, str):
        if targets.lower() != "all-linear":
            raise ValueError(f"targets: a string must be 'all-linear', got {targets!r} (pass a list "
                             f"of module names otherwise)")
        return tuple(p.name for p in rows)
    targets = tuple(targets)
    bad = [t for t in targets if not any(t in (p.target, p.name) for p in rows)]
    if bad or not targets:
        raise ValueError(f"unknown target module(s) {bad or '(none given)'}; adaptable modules: "
                         f"{sorted(names)}")
    return tuple(dict.fromkeys(p.name for t in targets for p in rows if t in (p.target, p.name)))


def module_rank_alpha(name: str, r: int, alpha: float, rank_pattern=None, alpha_pattern=None,
                      use_rslora: bool = False) -> tuple[int, float, float]:
    """`(r, alpha, scale)` of module `name`: the pattern's value where it names the module."""
    rm = int((rank_pattern or {}).get(name, r))
    am = float((alpha_pattern or {}).get(name, alpha))
    if rm < 1:
        raise ValueError(f"rank of {name!r} must be >= 1, got {rm}")
    return rm, am, am / math.sqrt(rm) if use_rslora else am / rm


def init_lora(model: CausalLM, *, r: int = 8, alpha: float = 16,
              targets: str | Sequence[str] = ("q_proj", "v_proj"), seed: int = 0,
              layers: Sequence[int] | None = None, use_rslora: bool = False,
              rank_pattern: dict[str, int] | None = None,
              alpha_pattern: dict[str, float] | None = None) -> TrainableLora:
    """PEFT-default initialised adapter (A kaiming-uniform, B zero) for `targets`, float32.

    `targets`: PEFT target names or `"all-linear"` (`resolve_targets`). `layers` (PEFT's
    `layers_to_transform`; Llama family only) restricts the adapter to those layers; None = all.
    `use_rslora`: scale `alpha / sqrt(r)` (PEFT's rsLoRA) instead of `alpha / r`. `rank_pattern` /
    `alpha_pattern`: `{target name: r / alpha}` overriding `r` / `alpha` for those modules (PEFT's
    fields of the same names; a T5 name covers every row it names)."""
    if layers is not None and isinstance(model.config, T5Config):
        raise ValueError("layers (PEFT layers_to_transform): Llama-family models only; a T5 "
                         "adapter adapts every block of the targeted projections")
    rows = _rows(model)
    targets = resolve_targets(model, targets)
    names = list(dict.fromkeys(rows[t].target for t in targets))
    for what, pat in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        extra = sorted(set(pat or {}) - set(names))
        if extra:
            raise ValueError(f"{what} names module(s) {extra} that are not targets {names}")
    n_layers = model.config.num_layers
    key = jax.random.key(seed)
    a, b, scales = {}, {}, {}
    for i, name in enumerate(targets):
        p = rows[name]
        d_in, d_out = p.shape(model.config)
        rm, _, scales[name] = module_rank_alpha(p.target, r, alpha, rank_pattern, alpha_pattern,
                                                use_rslora)
        bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)) on [r, d_in]
        shape = (p.num_layers(model.config), rm)
        a[name] = jax.random.uniform(jax.random.fold_in(key, i), (*shape, d_in), jnp.float32,
                                     -bound, bound)
        b[name] = jnp.zeros((*shape, d_out), jnp.float32)
    if layers is not None:
        layers = tuple(sorted({int(i) for i in layers}))
        if not layers or layers[0] < 0 or layers[-1] >= n_layers:
            raise ValueError(f"layers must be a non-empty subset of 0..{n_layers - 1}, got {layers}")
    vals = set(scales.values())
    scale = vals.pop() if len(vals) == 1 else tuple(sorted(scales.items()))
    return TrainableLora(a=a, b=b, scale=scale, layers=layers)


@dataclasses.dataclass
class TrainedLora:
    """A trained adapter with its hyper-parameters and the loss curve (one value per step)."""

    adapter: TrainableLora
    r: int
    alpha: float
    targets: tuple[str, ...]
    losses: list[float]
    seconds: float
    task: str | None = None
    use_rslora: bool = False
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None
    all_linear: bool = False  # saved as target_modules="all-linear"
    task_type: str = "CAUSAL_LM"  # PEFT's task type: "SEQ_2_SEQ_LM" for T5


# -- data --------------------------------------------------------------------------------------
def training_pairs(examples: Sequence[Example], tokenizer: Tokenizer) -> list[tuple[list[int], list[int]]]:
    """`(prompt_ids, answer_ids)` per example: MC -> correct choice; generation -> target + EOS."""
    eos = getattr(tokenizer, "eos_token_id", None)
    out = []
    for i, ex in enumerate(examples):
        p = encode(tokenizer, ex.prompt, special=True)
        if isinstance(ex, MCExample):
            a = encode(tokenizer, choice_text(ex.target), special=False)
        elif isinstance(ex, GenExample):
            a = encode(tokenizer, choice_text(ex.target), special=False)
            if eos is not None:
                a = a + [int(eos)]
        else:
            raise TypeError(f"example {i}: not an MCExample/GenExample")
        if not a:
            raise ValueError(f"task {ex.task!r} example {i}: the answer tokenizes to nothing")
        out.append((p, a))
    return out


def _pow2(n: int, lo: int = 4) -> int:
    b = lo
    while b < n:
        b *= 2
    return b


def bucket16(longest: int, max_len: int) -> int:
    """One padded length for every step (one compile): `longest` rounded up to 16 tokens, at most
    `max_len` (but never below `longest`)."""
    return max(min(-(-longest // 16) * 16, max_len), longest)


def make_batch(pairs, idx, length: int, pad_id: int):
    """Left-padded `[B, length]` ids/mask and the answer mask, all numpy."""
    seqs = [pairs[i][0] + pairs[i][1] for i in idx]
    ids, mask = pad_batch(seqs, length, pad_id, side="left")
    tmask = np.zeros_like(mask)
    for r, i in enumerate(idx):
        tmask[r, length - len(pairs[i][1]):] = True
    return ids, mask, tmask


# -- training ----------------------------------------------------------------------------------
def masked_nll(lp: Float[Array, "B K"], mask) -> Float[Array, ""]:
    """Mean negative log-likelihood of the answer tokens: `lp` log-probs, `mask` marks them."""
    m = mask.astype(jnp.float32)
    return -jnp.sum(lp * m) / jnp.maximum(jnp.sum(m), 1.0)


class CausalObjective:
    """The Llama family's objective: prompt + answer left-padded to one length bucket, so the answer
    is in the last `tail` positions and only those reach the LM head (`inference.tail_logprobs`).
    With `start > 0` (an adapter on the top layers only) `prepare` caches every example's hidden
    states at layer `start` (base model, one batched pass) and steps run only the layers above."""

    def __init__(self, examples, pairs, pad: int, max_len: int, start: int = 0):
        for i, (p, a) in enumerate(pairs):
            if len(p) + len(a) > max_len:
                raise ValueError(f"task {examples[i].task!r} example {i}: {len(p) + len(a)} tokens "
                                 f"> max_len={max_len}")
        self.pairs, self.pad, self.start = pairs, pad, start
        self.length = bucket16(max(len(p) + len(a) for p, a in pairs), max_len)
        self.tail = min(_pow2(max(len(a) for _, a in pairs)), self.length - 1)
        self.prefix = None

    def prepare(self, model, graphdef, state, batch_size: int) -> None:
        if self.start == 0:
            return
        start = self.start

        @jax.jit
        def run_prefix(state, ids, mask):
            return nnx.merge(graphdef, state).hidden(ids, mask, layer=start)

        n = len(self.pairs)
        self.prefix = np.zeros((n, self.length, model.config.hidden_size), np.float32)
        for s0 in range(0, n, batch_size):
            idx = list(range(s0, min(s0 + batch_size, n)))
            idx_full = idx + [idx[0]] * (batch_size - len(idx))  # one compiled shape
            ids, mask, _ = make_batch(self.pairs, idx_full, self.length, self.pad)
            self.prefix[idx] = np.asarray(run_prefix(state, ids, mask))[: len(idx)]

    def batch(self, idx) -> tuple:
        ids, mask, tmask = make_batch(self.pairs, idx, self.length, self.pad)
        return ids, mask, tmask, None if self.prefix is None else self.prefix[idx]

    def loss(self, adapter, model, ids, mask, tmask, hidden):
        lp = tail_logprobs(model, ids, mask, self.tail, adapter, start_layer=self.start,
                           hidden_in=hidden)  # B K
        return masked_nll(lp, tmask[:, -self.tail:])


def train_lora(
    model: CausalLM,
    tokenizer: Tokenizer,
    examples: Sequence[Example],
    *,
    r: int = 8,
    alpha: float = 16,
    targets: str | Sequence[str] = ("q_proj", "v_proj"),
    steps: int = 100,
    lr: float = 1e-3,
    batch_size: int = 8,
    seed: int = 0,
    max_len: int = 256,
    warmup: int = 10,
    progress: bool = True,
    layers: Sequence[int] | None = None,
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
) -> TrainedLora:
    """Train one LoRA on `examples` with AdamW (cosine decay after `warmup` linear steps).

    `model`: a `CausalLM` or a T5 (`t5.model.T5ForConditionalGeneration`; its objective is
    `t5.train.Seq2SeqObjective`, targets PEFT T5 names such as `("q", "v")`). `targets` (names or
    `"all-linear"`), `use_rslora`, `rank_pattern`, `alpha_pattern`: see `init_lora`; they are
    written to the PEFT config by `save_peft`.

    `layers` (PEFT `layers_to_transform`, Llama family) restricts the adapter to those layers. The
    frozen model below the lowest of them does not depend on the adapter, so its hidden states are
    computed once per example (base model, one batched pass) and every step runs only the layers
    from there up: exact (rows are left-padded to one length and attend only within themselves)
    and, for top layers, many times cheaper than full-depth steps.

    Batches are drawn by reshuffling the examples every epoch (seeded). Every batch is padded to
    the same shape (`[batch_size, bucket(longest)]`), so the step compiles once. Examples longer
    than `max_len` tokens raise `ValueError` naming the task and index.
    Returns a `TrainedLora` (float32 adapter, per-step losses, wall time).
    """
    if not examples:
        raise ValueError("train_lora needs at least one example")
    all_linear = isinstance(targets, str)
    targets = resolve_targets(model, targets)
    pairs = training_pairs(examples, tokenizer)
    pad = pad_id_of(tokenizer)
    adapter = init_lora(model, r=r, alpha=alpha, targets=targets, seed=seed, layers=layers,
                        use_rslora=use_rslora, rank_pattern=rank_pattern,
                        alpha_pattern=alpha_pattern)
    if isinstance(model.config, T5Config):
        from hilora_jax.t5.train import Seq2SeqObjective

        objective = Seq2SeqObjective(model.config, examples, pairs, pad, max_len)
        task_type = "SEQ_2_SEQ_LM"
    else:
        start = adapter.layers[0] if adapter.layers is not None else 0
        objective = CausalObjective(examples, pairs, pad, max_len, start)
        task_type = "CAUSAL_LM"
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, min(warmup, steps - 1)),
                                               max(steps, 2), end_value=lr * 0.1)
    opt = optax.adamw(sched, weight_decay=0.0)
    opt_state = opt.init(adapter)
    graphdef, state = nnx.split(model)  # once; `state` is never differentiated

    @jax.jit
    def step(adapter, opt_state, state, batch):
        base = nnx.merge(graphdef, state)
        loss, grads = jax.value_and_grad(objective.loss)(adapter, base, *batch)
        updates, opt_state = opt.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state, loss

    objective.prepare(model, graphdef, state, batch_size)
    rng = np.random.default_rng(seed)
    order: list[int] = []
    losses: list[float] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"train-lora {examples[0].task}", unit="step", file=sys.stderr,
                   disable=os.environ.get("HILORA_QUIET") == "1")
    t0 = time.time()
    for _ in range(steps):
        while len(order) < batch_size:
            order.extend(rng.permutation(len(pairs)).tolist())
        idx, order = order[:batch_size], order[batch_size:]
        adapter, opt_state, loss = step(adapter, opt_state, state, objective.batch(idx))
        losses.append(float(loss))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if bar is not None:
        bar.close()
    task = examples[0].task if len({e.task for e in examples}) == 1 else None
    return TrainedLora(adapter=adapter, r=r, alpha=float(alpha), targets=targets, losses=losses,
                       seconds=time.time() - t0, task=task, use_rslora=bool(use_rslora),
                       rank_pattern=dict(rank_pattern) if rank_pattern else None,
                       alpha_pattern=dict(alpha_pattern) if alpha_pattern else None,
                       all_linear=all_linear, task_type=task_type)


# -- PEFT export -------------------------------------------------------------------------------
def peft_modules(trained: TrainedLora) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    """The trained ROC rows per `(layer, module)`, `(A [r, D], B [r, E])` float32, for the PEFT
    writer (`io.peft.write_adapter`; the scale is the config's, not folded in)."""
    layers = trained.adapter.layers
    out = {}
    for name in trained.targets:
        a = np.asarray(trained.adapter.a[name], np.float32)  # L R D
        b = np.asarray(trained.adapter.b[name], np.float32)  # L R E
        for i in (range(a.shape[0]) if layers is None else layers):
            out[(i, name)] = (a[i], b[i])
    return out


def trainable_from_peft(adapter: PeftAdapter, config) -> TrainableLora:
    """A read PEFT adapter (`io.peft.read_adapter`) as the trainer's hook (same layout).

    `config`: the base model's config, so every row gets its own depth (T5: encoder rows
    `num_layers` blocks, decoder rows `num_decoder_layers`); an int (the layer count) still works
    for a Llama-family adapter, where every row has it. Blocks the adapter does not adapt stay
    zero; a Llama adapter on a subset of layers (`layers_to_transform`) keeps that subset
    (`TrainableLora.layers`), a T5 hook adapts every block, as `init_lora`'s."""
    from hilora_jax.model.projections import T5

    rows = {k[1] for k in adapter.modules}
    t5 = bool(rows & {p.name for p in T5})
    if isinstance(config, int):
        if t5:
            raise ValueError(f"adapter {adapter.name!r}: a T5 adapter needs the T5 config, not one "
                             "layer count (encoder and decoder depths differ)")
        depth = dict.fromkeys(rows, int(config))
    else:
        depth = {m: projection(m).num_layers(config) for m in rows}
    a, b, scale = {}, {}, {}
    for (layer, mod), (A, B, s) in adapter.modules.items():
        if not 0 <= layer < depth[mod]:
            raise ValueError(f"adapter {adapter.name!r}: {mod} in layer {layer}, but the model "
                             f"has {depth[mod]}")
        if mod not in a:
            a[mod] = np.zeros((depth[mod],) + A.shape, np.float32)
            b[mod] = np.zeros((depth[mod],) + B.shape, np.float32)
        a[mod][layer], b[mod][layer], scale[mod] = A, B, s
    layers = tuple(sorted({layer for layer, _ in adapter.modules}))
    n = max(depth.values(), default=0)
    return TrainableLora(a=a, b=b, scale=tuple(sorted(scale.items())),
                         layers=None if t5 or len(layers) == n else layers)


def save_peft(trained: TrainedLora, out_dir: str | os.PathLike, base_model_name: str, *,
              overwrite: bool = False) -> Path:
    """Write a standard PEFT LoRA adapter directory atomically; returns its path (a T5 adapter:
    `task_type` `SEQ_2_SEQ_LM`, checked under `t5.lora.T5_FAMILY`)."""
    from hilora_jax.io.peft import LLAMA_FAMILY, write_adapter

    family = LLAMA_FAMILY
    if trained.task_type == "SEQ_2_SEQ_LM":
        from hilora_jax.t5.lora import T5_FAMILY

        family = T5_FAMILY
    names = sorted({projection(t).target for t in trained.targets})
    config = {
        "peft_type": "LORA",
        "task_type": trained.task_type,
        "base_model_name_or_path": str(base_model_name),
        "r": int(trained.r),
        "lora_alpha": trained.alpha,
        "lora_dropout": 0.0,
        # PEFT ignores layers_to_transform for a string target_modules: list them then
        "target_modules": ("all-linear" if trained.all_linear and trained.adapter.layers is None
                           else names),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": bool(trained.use_rslora),
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    if trained.adapter.layers is not None:
        config["layers_to_transform"] = list(trained.adapter.layers)
    if trained.rank_pattern:
        config["rank_pattern"] = {k: int(v) for k, v in trained.rank_pattern.items()}
    if trained.alpha_pattern:
        config["alpha_pattern"] = {k: float(v) for k, v in trained.alpha_pattern.items()}
    meta = {"task": trained.task, "steps": len(trained.losses),
            "loss_first": trained.losses[0] if trained.losses else None,
            "final_loss": trained.losses[-1] if trained.losses else None,
            "seconds": round(trained.seconds, 2)}
    write_adapter(out_dir, config, peft_modules(trained), overwrite=overwrite, family=family,
                  extra_files={"hilora_train.json": json.dumps(meta, indent=2) + "\n"})
    return Path(out_dir)


# -- command line ------------------------------------------------------------------------------
def add_train_lora_args(p) -> None:
    """Add the `hilora train-lora` flags to an `argparse` parser."""
    p.add_argument("--model", required=True,
                   help="model source (HF dir, .gguf, smollm2, ...; a local HF T5 dir trains a T5 LoRA)")
    p.add_argument("--tasks", required=True, action="append", help="JSONL task file(s)")
    p.add_argument("--task", default=None, help="train only on examples of this task")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--targets", default=None,
                   help="PEFT target names (default q_proj,v_proj; T5: q,v)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--layers", default=None,
                   help="layers to adapt (PEFT layers_to_transform), e.g. 26-29 or 0,5,9 "
                   "(Llama family)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")


def parse_layers(spec: str | None) -> list[int] | None:
    """`"26-29"` / `"0,5,9"` / None -> layer list."""
    if not spec:
        return None
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            out.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
        except ValueError:
            raise ValueError(f"--layers: {part.strip()!r} is not a layer or a range like 26-29 "
                             f"(in {spec!r})") from None
    return out


def train_lora_cli(args) -> int:
    """Entry point for `hilora train-lora` (args from `add_train_lora_args`).

    A local HF directory whose config says `model_type: t5` trains a T5 LoRA (targets among the
    config's T5 projections, `q,v` by default; saved as a `SEQ_2_SEQ_LM` PEFT adapter).
    The output, task files, `--task`, `--targets`, `--layers` and the sizes are checked before the
    model loads; a bad one is a `UsageError` (one line from the CLI)."""
    from hilora_jax.cli import check_model_source, check_output, load_task_files
    from hilora_jax.errors import UsageError
    from hilora_jax.io.loading import load_model, load_tokenizer
    from hilora_jax.t5.config import is_t5_dir

    check_output(args.out, args.overwrite)
    for name in ("r", "steps", "batch_size", "max_len"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.lr > 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    t5 = is_t5_dir(args.model)
    if t5:
        from hilora_jax.t5.config import read_t5_config

        names, what = tuple(dict.fromkeys(p.target for p in read_t5_config(args.model)
                                          .projections())), " of this T5 model"
    else:
        names, what = MODULES, ""
    spec = args.targets or ("q,v" if t5 else "q_proj,v_proj")
    targets = [t.strip() for t in spec.split(",") if t.strip()]
    bad = [t for t in targets if t not in names]
    if not targets or bad:
        raise UsageError(f"--targets {spec!r}: unknown module(s){what} {bad}; choose from "
                         f"{', '.join(names)}")
    if t5 and args.layers:
        raise UsageError(f"--layers {args.layers!r}: Llama-family models only; a T5 LoRA adapts "
                         "every block")
    try:
        layers = parse_layers(args.layers)
    except ValueError as e:
        raise UsageError(str(e)) from None
    examples = load_task_files(args.tasks)
    if args.task is not None:
        tasks = sorted({e.task for e in examples})
        examples = [e for e in examples if e.task == args.task]
        if not examples:
            raise UsageError(f"--task {args.task!r}: no examples of it in {', '.join(args.tasks)} "
                             f"(tasks there: {', '.join(tasks)})")
    check_model_source(args.model)
    if t5:
        from hilora_jax.t5.load import load_t5

        model = load_t5(args.model)
    else:
        model = load_model(args.model)
    n = model.config.num_layers
    if layers is not None and (not layers or min(layers) < 0 or max(layers) >= n):
        raise UsageError(f"--layers {args.layers!r}: the model has layers 0..{n - 1}")
    tok = load_tokenizer(args.model)
    trained = train_lora(model, tok, examples, r=args.r, alpha=args.alpha, targets=targets,
                         steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                         seed=args.seed, max_len=args.max_len, layers=layers)
    out = save_peft(trained, args.out, args.model, overwrite=args.overwrite)
    print(f"trained {len(examples)} examples, {args.steps} steps in {trained.seconds:.1f}s; "
          f"loss {trained.losses[0]:.3f} -> {np.mean(trained.losses[-10:]):.3f}; saved {out}")
    return 0
