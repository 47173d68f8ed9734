"""Evaluation: text metrics (no torch import), the generation loop, tables, charts and the evaluate.py run.

This package imports only the metrics, so that ``import med3dqwen`` stays free of torch here; import the rest from
its modules: ``generation`` (batched greedy generation, closed head), ``report`` (scores per task / question type /
ROI, Table-1 markdown, chart, paired bootstrap), ``runner`` (``EvaluationArguments``, ``evaluate_model``,
``run_comparison``). See docs/metrics.md and docs/evaluation.md.
"""

from .metrics import (
    NLTK_DATA_HINT,
    PROTOCOLS,
    bleu,
    bleu_statistics,
    closed_accuracy,
    compute_metrics,
    meteor,
    normalize_answer,
    rouge,
)


__all__ = [
    "NLTK_DATA_HINT",
    "PROTOCOLS",
    "bleu",
    "bleu_statistics",
    "closed_accuracy",
    "compute_metrics",
    "meteor",
    "normalize_answer",
    "rouge",
]
