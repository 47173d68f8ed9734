"""Evaluation: text metrics (no torch import), and later the generation loop, tables and charts.

See docs/metrics.md for what each metric computes and which reference implementation it matches.
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
