"""Closed-question accuracy as an ``evaluate`` metric that loads offline: ``evaluate.load("<this folder>")``.

``rule="normalized"`` (normalised exact match) or ``"m3d_substring"`` (M3D's ``"<letter>."`` substring rule); see
``med3dqwen.evaluation.metrics.closed_accuracy``.
"""

import datasets
import evaluate

from med3dqwen.evaluation.metrics import closed_accuracy


_DESCRIPTION = "Closed-question accuracy: normalised exact match, or M3D's '<letter>.' substring rule."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of strings.
    references: a string or a list of accepted strings per prediction.
    rule: "normalized" (default) or "m3d_substring".
Returns:
    accuracy: the fraction of correct answers.
Example:
    >>> accuracy = evaluate.load("med3dqwen/evaluation/modules/closed_accuracy")
    >>> accuracy.compute(predictions=["Left lung."], references=["left lung"])
    {'accuracy': 1.0}
"""


class ClosedAccuracy(evaluate.Metric):
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

    def _compute(self, predictions, references, rule="normalized"):
        return {"accuracy": closed_accuracy(predictions, references, rule=rule)}
