"""Mean ROUGE F-measure as an ``evaluate`` metric that loads offline: ``evaluate.load("<this folder>")``.

``rouge_score`` without stemmer, best reference per sample, plain mean over samples (not the Hub module's bootstrap
median); see ``med3dqwen.evaluation.metrics.rouge``.
"""

import datasets
import evaluate

from med3dqwen.evaluation.metrics import rouge


_DESCRIPTION = "Mean rouge_score F-measure (no stemmer, best of each sample's references, plain mean)."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of strings.
    references: a string or a list of strings per prediction.
    rouge_types: list of "rouge1".."rouge9", "rougeL", "rougeLsum" (default all of rouge1, rouge2, rougeL, rougeLsum).
Returns:
    one mean F-measure per ROUGE type.
Example:
    >>> rouge = evaluate.load("med3dqwen/evaluation/modules/rouge")
    >>> rouge.compute(predictions=["hello there"], references=["hello there"], rouge_types=["rougeL"])
    {'rougeL': 1.0}
"""


class Rouge(evaluate.Metric):
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

    def _compute(self, predictions, references, rouge_types=None):
        rouge_types = ["rouge1", "rouge2", "rougeL", "rougeLsum"] if rouge_types is None else rouge_types
        return {rouge_type: rouge(predictions, references, rouge_type=rouge_type) for rouge_type in rouge_types}
