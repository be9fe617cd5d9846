"""Evaluation metrics: exact match, ROUGE-L, BLEU, multiple-choice accuracy.

* Exact match, default ``style="squad"``: the answer normalisation of the official SQuAD v1.1
  evaluation script (`evaluate-v1.1.py`, `normalize_answer`: lowercase, drop ASCII punctuation, drop
  the articles a/an/the as whole words, collapse whitespace), applied to prediction and reference.
  LoraRetriever's own scorer (`summarize_results.py`: `cal_correct`, seen in the public fork
  Sherry805139/LoraRetriever) is stricter: it only
  strips, lowercases and deletes ``"."``, after cutting the reference at the first blank line.
  ``style="loraretriever"`` reproduces that exactly, for comparisons with the paper's numbers.
  (LoraRetriever also scores BLEU with NLTK sentence BLEU on whitespace tokens and ROUGE with the
  `rouge` package, so our BLEU/ROUGE are *not* numerically comparable with its tables.)
* ROUGE-L F-measure comes from Google's `rouge-score` package (`rouge_scorer.RougeScorer`,
  `use_stemmer=True`), averaged over examples; reported on a 0-100 scale like the paper's tables.
* BLEU is corpus-level `sacrebleu.corpus_bleu` with its defaults (13a tokenisation, exp
  smoothing), 0-100 scale.

No metric is re-implemented by hand beyond the SQuAD normaliser (which is the definition itself).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """SQuAD v1.1 normalisation: lower, remove punctuation, remove articles, fix whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def normalize_loraretriever(s: str) -> str:
    """LoraRetriever's `cal_correct` normalisation: strip, lowercase, delete every '.'."""
    return s.strip().lower().replace(".", "")


def exact_match(prediction: str, reference: str, *, style: str = "squad") -> float:
    """1.0 when the normalised strings are equal, else 0.0 (`style`: "squad" | "loraretriever")."""
    if style == "squad":
        return float(normalize_answer(prediction) == normalize_answer(reference))
    if style == "loraretriever":
        reference = reference.split("\n\n")[0]
        return float(normalize_loraretriever(prediction) == normalize_loraretriever(reference))
    raise ValueError(f"unknown exact-match style {style!r} (squad | loraretriever)")


def exact_match_score(predictions: Sequence[str], references: Sequence[str], *,
                      style: str = "squad") -> float:
    """Mean exact match, 0-100."""
    _same_length(predictions, references)
    if not predictions:
        return float("nan")
    hits = sum(exact_match(p, r, style=style) for p, r in zip(predictions, references, strict=True))
    return 100.0 * hits / len(predictions)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (rouge-score, Porter stemming), 0-100."""
    from rouge_score import rouge_scorer

    _same_length(predictions, references)
    if not predictions:
        return float("nan")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    total = sum(scorer.score(r, p)["rougeL"].fmeasure
                for p, r in zip(predictions, references, strict=True))
    return 100.0 * total / len(predictions)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults), 0-100, one reference per prediction."""
    import sacrebleu

    _same_length(predictions, references)
    if not predictions:
        return float("nan")
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def accuracy(predicted: Sequence[int], gold: Sequence[int]) -> float:
    """Fraction (0-1) of positions where the predicted choice index equals the gold one."""
    _same_length(predicted, gold)
    if not gold:
        return float("nan")
    return sum(int(p) == int(g) for p, g in zip(predicted, gold, strict=True)) / len(gold)


GENERATION_METRICS = {"em": exact_match_score, "rouge": rouge_l, "bleu": bleu}


def generation_metric(name: str, predictions: Sequence[str], references: Sequence[str]) -> float:
    """Dispatch on the task file's `metric` field (`em` | `rouge` | `bleu`), 0-100."""
    try:
        fn = GENERATION_METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r} (expected one of {sorted(GENERATION_METRICS)})") from None
    return fn(predictions, references)


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions but {len(b)} references")
