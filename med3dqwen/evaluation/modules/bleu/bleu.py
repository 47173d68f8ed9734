"""Corpus BLEU as an ``evaluate`` metric that loads offline: ``evaluate.load("<this folder>")``.

Computes exactly what the Hub's ``bleu`` module computes (13a tokens, tensorflow/nmt ``compute_bleu``, no smoothing,
shortest reference length) and returns the same keys; see ``med3dqwen.evaluation.metrics.bleu_statistics``.
"""

import datasets
import evaluate

from med3dqwen.evaluation.metrics import bleu_statistics


_DESCRIPTION = "Corpus BLEU (13a tokenisation, no smoothing, shortest reference length), as the Hub's `bleu` module."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of strings.
    references: a string or a list of strings per prediction.
    max_order: largest n-gram order (default 4).
Returns:
    bleu, precisions, brevity_penalty, length_ratio, translation_length, reference_length.
Example:
    >>> bleu = evaluate.load("med3dqwen/evaluation/modules/bleu")
    >>> bleu.compute(predictions=["hello there general kenobi"], references=[["hello there general kenobi"]])["bleu"]
    1.0
"""


class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {"predictions": datasets.Value("string"), "references": datasets.List(datasets.Value("string"))}
                ),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
        )

    def _compute(self, predictions, references, max_order=4):
        return bleu_statistics(predictions, references, max_order=max_order)
