"""Task files (JSONL), multiple-choice batching and choice scoring.

Task format
-----------
One JSON object per line, validated on read (errors name the file and the 1-based line):

* multiple choice: ``{"prompt": str, "choices": [str, ...], "answer": int, "task": str,
  "cluster": str}`` -- ``answer`` indexes ``choices``; at least two distinct, non-empty choices.
* generation: ``{"prompt": str, "target": str, "task": str, "cluster": str,
  "metric": "em" | "rouge" | "bleu"}``.

Unknown keys are rejected (a typo such as ``"anwser"`` must not silently turn an example into
something else). ``task`` names the LoRA a test item belongs to (oracle baseline, unseen-within
ablation); ``cluster`` groups related tasks (unseen-cross ablation). Routers never see either.

Multiple-choice scoring
-----------------------
Every (example, choice) pair becomes one row: ``prompt tokens ++ choice tokens``. The prompt is
encoded with the tokenizer's special tokens (BOS when the tokenizer adds one), the choice without,
and each separately, so the target mask covers exactly the choice's tokens whatever the tokenizer
would merge across the boundary (prompts end in ``":"``, choices start with ``" "``, the boundary is a
word boundary for BPE tokenizers). Rows are sorted by length, cut into batches of a fixed size and
left-padded to a length bucket (`inference.bucket_length`), so a whole task set compiles a handful
of shapes. Left padding puts every continuation at the *end* of its row; the scorer therefore
needs logits only for the last ``K`` positions (``K`` = bucketed longest choice of the batch), which
skips most of the ``[B, T, V]`` head matmul and log-softmax (a large share of a 135M model's cost).

Two scores per choice are reported, as lm-eval-harness does: the summed log-prob of the
continuation (``acc``) and the per-token mean (``acc_norm``, length-normalised).
"""

# ruff: noqa: F722  (jaxtyping shape strings)
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from hilora_jax._fs import atomic_file
from hilora_jax.errors import HiloraUserError
from hilora_jax.inference import Engine, bucket_length, pad_batch

GEN_METRICS = ("em", "rouge", "bleu")


class TaskFormatError(HiloraUserError, ValueError):
    """A task file line does not follow the JSONL task format."""


class Tokenizer(Protocol):
    """The part of a HF tokenizer used here: `tok(text, add_special_tokens=...)["input_ids"]`."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> Any: ...


@dataclasses.dataclass(frozen=True)
class MCExample:
    prompt: str
    choices: tuple[str, ...]
    answer: int
    task: str
    cluster: str

    @property
    def target(self) -> str:
        """The correct choice (the training continuation)."""
        return self.choices[self.answer]


@dataclasses.dataclass(frozen=True)
class GenExample:
    prompt: str
    target: str
    task: str
    cluster: str
    metric: str


Example = MCExample | GenExample

_MC_KEYS = {"prompt", "choices", "answer", "task", "cluster"}
_GEN_KEYS = {"prompt", "target", "task", "cluster", "metric"}


def parse_example(obj: Any, where: str = "example") -> Example:
    """Validate one decoded JSON object and build an `MCExample` or `GenExample`.

    `where` (e.g. ``"tasks.jsonl:12"``) prefixes every error message.
    """

    def fail(msg: str) -> TaskFormatError:
        return TaskFormatError(f"{where}: {msg}")

    if not isinstance(obj, dict):
        raise fail(f"expected a JSON object, got {type(obj).__name__}")
    keys = set(obj)
    if "choices" in keys:
        kind, want = "multiple-choice", _MC_KEYS
    elif "target" in keys:
        kind, want = "generation", _GEN_KEYS
    else:
        raise fail("neither 'choices' (multiple choice) nor 'target' (generation) is present")
    if keys - want:
        raise fail(f"unknown key(s) for a {kind} example: {sorted(keys - want)}")
    if want - keys:
        raise fail(f"missing key(s) for a {kind} example: {sorted(want - keys)}")
    for k in ("prompt", "task", "cluster"):
        if not isinstance(obj[k], str):
            raise fail(f"'{k}' must be a string, got {type(obj[k]).__name__}")
    if not obj["prompt"]:
        raise fail("'prompt' is empty")
    if not obj["task"]:
        raise fail("'task' is empty")
    if kind == "generation":
        if not isinstance(obj["target"], str) or not obj["target"]:
            raise fail("'target' must be a non-empty string")
        if obj["metric"] not in GEN_METRICS:
            raise fail(f"'metric' must be one of {GEN_METRICS}, got {obj['metric']!r}")
        return GenExample(obj["prompt"], obj["target"], obj["task"], obj["cluster"], obj["metric"])
    ch = obj["choices"]
    if not isinstance(ch, list) or len(ch) < 2:
        raise fail("'choices' must be a list of at least two strings")
    if not all(isinstance(c, str) and c for c in ch):
        raise fail("every choice must be a non-empty string")
    if len(set(ch)) != len(ch):
        raise fail("'choices' contains duplicates")
    a = obj["answer"]
    if isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < len(ch):
        raise fail(f"'answer' must be an integer index into the {len(ch)} choices, got {a!r}")
    return MCExample(obj["prompt"], tuple(ch), a, obj["task"], obj["cluster"])


def example_to_dict(ex: Example) -> dict:
    d = dataclasses.asdict(ex)
    if isinstance(ex, MCExample):
        d["choices"] = list(ex.choices)
    return d


def read_jsonl(path: str | os.PathLike) -> list[Example]:
    """Read and validate one task file."""
    path = Path(path)
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskFormatError(f"{path}:{i}: invalid JSON ({e.msg})") from e
            out.append(parse_example(obj, f"{path}:{i}"))
    return out


def load_tasks(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Example]:
    """Read one or more JSONL task files (in order), validating every line."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Example] = []
    for p in paths:
        out.extend(read_jsonl(p))
    return out


def write_jsonl(examples: Iterable[Example], path: str | os.PathLike) -> Path:
    """Write examples as JSONL atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    with atomic_file(path) as f:
        for ex in examples:
            f.write(json.dumps(example_to_dict(ex), ensure_ascii=False) + "\n")
    return path


# -- tokenization ------------------------------------------------------------------------------
def encode(tokenizer: Tokenizer, text: str, *, special: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    return [int(t) for t in ids]


def pad_id_of(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


def encode_pair(tokenizer: Tokenizer, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
    """`(prompt_ids, continuation_ids)`: prompt with special tokens, continuation without."""
    p = encode(tokenizer, prompt, special=True)
    c = encode(tokenizer, continuation, special=False)
    if not p or not c:
        raise ValueError(f"empty tokenization (prompt {len(p)} / continuation {len(c)} tokens)")
    return p, c


def choice_text(choice: str) -> str:
    """The continuation scored for a choice: a leading space, so it starts a new word."""
    return choice if choice[:1].isspace() else " " + choice


# -- multiple-choice batches -------------------------------------------------------------------
@dataclasses.dataclass
class MCBatch:
    """One padded batch of (example, choice) rows.

    `input_ids`, `attention_mask`, `target_mask`: `[B, T]` (left-padded; `target_mask` is True on
    exactly the choice tokens). `example_index`, `choice_index`: `[B]` ints into the example list
    and its choices (-1 for filler rows that only complete the last batch). `tail`: static K, the
    number of trailing positions that hold every row's continuation.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    target_mask: np.ndarray
    example_index: np.ndarray
    choice_index: np.ndarray
    tail: int


def _tail_bucket(n: int) -> int:
    b = 4
    while b < n:
        b *= 2
    return b


def mc_rows(examples: Sequence[MCExample], tokenizer: Tokenizer, *, max_len: int = 256):
    """Tokenize every (example, choice) pair: list of `(example_idx, choice_idx, prompt, cont)`.

    Raises `ValueError` naming the task and example index when a pair exceeds `max_len` tokens.
    """
    rows = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, MCExample):
            raise TypeError(f"example {i} (task {ex.task!r}) is not multiple choice")
        p = encode(tokenizer, ex.prompt, special=True)
        for j, c in enumerate(ex.choices):
            cids = encode(tokenizer, choice_text(c), special=False)
            if len(p) + len(cids) > max_len:
                raise ValueError(
                    f"task {ex.task!r} example {i} choice {j}: prompt + choice is "
                    f"{len(p) + len(cids)} tokens, more than max_len={max_len} (filter long "
                    f"examples out or raise max_len)")
            rows.append((i, j, p, cids))
    return rows


def mc_batches(examples: Sequence[MCExample], tokenizer: Tokenizer, *, batch_size: int = 16,
               max_len: int = 256, pad_id: int | None = None) -> Iterator[MCBatch]:
    """Yield fixed-size, length-bucketed, left-padded batches over every (example, choice) pair.

    Rows are sorted by length (shortest first) to limit padding; every batch has exactly
    `batch_size` rows (the last is completed with copies of its first row, marked index -1) so the
    compiled shapes depend only on the length bucket.
    """
    pad = pad_id_of(tokenizer) if pad_id is None else pad_id
    rows = mc_rows(examples, tokenizer, max_len=max_len)
    rows.sort(key=lambda r: len(r[2]) + len(r[3]))
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        n_real = len(chunk)
        chunk = chunk + [chunk[0]] * (batch_size - n_real)
        seqs = [p + c for _, _, p, c in chunk]
        t = min(bucket_length(max(len(q) for q in seqs)), max(max_len, max(len(q) for q in seqs)))
        ids, mask = pad_batch(seqs, t, pad, side="left")
        tmask = np.zeros_like(mask)
        for r, (_, _, _, c) in enumerate(chunk):
            tmask[r, t - len(c):] = True
        ei = np.array([r[0] for r in chunk], np.int64)
        ci = np.array([r[1] for r in chunk], np.int64)
        ei[n_real:] = -1
        ci[n_real:] = -1
        tail = min(_tail_bucket(max(len(c) for _, _, _, c in chunk)), t - 1)
        yield MCBatch(ids, mask, tmask, ei, ci, tail)


# -- scoring -----------------------------------------------------------------------------------
@dataclasses.dataclass
class ChoiceScores:
    """Per-example choice scores. `logprob[c]`: summed log-prob of choice c; `n_tokens[c]`: its
    token count; `mean_logprob = logprob / n_tokens` (the length-normalised score)."""

    logprob: np.ndarray  # [C]
    n_tokens: np.ndarray  # [C]

    @property
    def mean_logprob(self) -> np.ndarray:
        return self.logprob / self.n_tokens

    @property
    def pred(self) -> int:
        return int(np.argmax(self.logprob))

    @property
    def pred_norm(self) -> int:
        return int(np.argmax(self.mean_logprob))


class ChoiceScorer:
    """Multiple-choice scorer over an `Engine` (`Engine.score` with the batch's tail: one compile
    per shape bucket, batches placed by the engine)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def batch(self, b: MCBatch, lora=None) -> np.ndarray:
        """Summed continuation log-probs `[B]` for one batch."""
        total, _ = self.engine.score(b.input_ids, b.attention_mask, b.target_mask, lora=lora,
                                     tail=b.tail)
        return np.asarray(total)

    def __call__(self, examples: Sequence[MCExample], tokenizer: Tokenizer, *, lora=None,
                 batch_size: int = 16, max_len: int = 256, progress: bool = False
                 ) -> list[ChoiceScores]:
        """Score every choice of every example; returns one `ChoiceScores` per example."""
        lp = [np.full(len(ex.choices), np.nan) for ex in examples]
        nt = [np.zeros(len(ex.choices)) for ex in examples]
        batches = list(mc_batches(examples, tokenizer, batch_size=batch_size, max_len=max_len))
        it = batches
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(batches, desc="scoring", unit="batch", leave=False)
        for b in it:
            s = self.batch(b, lora)
            ntok = b.target_mask.sum(1)
            for r in range(len(s)):
                if b.example_index[r] >= 0:
                    lp[b.example_index[r]][b.choice_index[r]] = s[r]
                    nt[b.example_index[r]][b.choice_index[r]] = ntok[r]
        return [ChoiceScores(a, n) for a, n in zip(lp, nt, strict=True)]


def score_choices(engine: Engine, examples: Sequence[MCExample], tokenizer: Tokenizer, *,
                  lora=None, batch_size: int = 16, max_len: int = 256) -> list[ChoiceScores]:
    """Convenience wrapper: `ChoiceScorer(engine)(examples, tokenizer, ...)` (compiles anew)."""
    return ChoiceScorer(engine)(examples, tokenizer, lora=lora, batch_size=batch_size,
                                max_len=max_len)


def mc_report(examples: Sequence[MCExample], scores: Sequence[ChoiceScores]) -> dict[str, float]:
    """`{"acc": ..., "acc_norm": ..., "n": ...}`: accuracy by summed and by per-token log-prob."""
    from hilora_jax.eval.metrics import accuracy

    gold = [ex.answer for ex in examples]
    return {"acc": accuracy([s.pred for s in scores], gold),
            "acc_norm": accuracy([s.pred_norm for s in scores], gold),
            "n": len(examples)}
