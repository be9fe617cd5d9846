"""Evaluation: task files (JSONL), multiple-choice scoring, metrics, BIG-bench conversion.

`tasks`    -- the JSONL task format, validation, MC batching and choice scoring.
`metrics`  -- exact match (SQuAD / LoraRetriever normalisation), ROUGE-L, BLEU, accuracy.
`bigbench` -- BIG-bench JSON multiple-choice tasks -> our format, seeded train/samples/test split.
`gym`      -- reasoning-gym generators (the `bench` extra) -> our multiple-choice format.
"""

from hilora_jax.eval.metrics import accuracy, bleu, exact_match, exact_match_score, rouge_l
from hilora_jax.eval.tasks import (
    ChoiceScorer,
    ChoiceScores,
    Example,
    GenExample,
    MCExample,
    TaskFormatError,
    load_tasks,
    mc_batches,
    mc_report,
    score_choices,
    write_jsonl,
)

__all__ = [
    "ChoiceScorer", "ChoiceScores", "Example", "GenExample", "MCExample", "TaskFormatError",
    "accuracy", "bleu", "exact_match", "exact_match_score", "load_tasks", "mc_batches",
    "mc_report", "rouge_l", "score_choices", "write_jsonl",
]
