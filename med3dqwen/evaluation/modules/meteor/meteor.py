"""Mean METEOR as an ``evaluate`` metric that loads offline: ``evaluate.load("<this folder>")``.

NLTK ``meteor_score`` on ``word_tokenize`` tokens with WordNet, alpha 0.9, beta 3, gamma 0.5, as the Hub's ``meteor``
module; NLTK data from ``NLTK_DATA`` (never downloaded); see ``med3dqwen.evaluation.metrics.meteor``.
"""

import datasets
import evaluate

from med3dqwen.evaluation.metrics import meteor


_DESCRIPTION = "Mean NLTK METEOR (WordNet, word_tokenize, alpha 0.9, beta 3, gamma 0.5), as the Hub's `meteor` module."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of strings.
    references: a string or a list of strings per prediction.
Returns:
    meteor: the mean over samples.
Example:
    >>> meteor = evaluate.load("med3dqwen/evaluation/modules/meteor")
    >>> round(meteor.compute(predictions=["It is a guide to action which ensures that the military always obeys the "
    ...     "commands of the party"], references=["It is a guide to action that ensures that the military will "
    ...     "forever heed Party commands"])["meteor"], 4)
    0.6944
"""


class Meteor(evaluate.Metric):
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

    def _compute(self, predictions, references):
        return {"meteor": meteor(predictions, references)}
