"""Text metrics for report generation and VQA, exact to the implementations they name (docs/metrics.md).

- :func:`bleu`: corpus BLEU as the ``evaluate`` library's ``bleu`` module computes it (tensorflow/nmt
  ``compute_bleu`` on 13a tokens: no smoothing, brevity penalty from the *shortest* reference of each sample).
- :func:`rouge`: ``rouge_score`` F-measure, no stemmer, the best reference of each sample, plain mean.
- :func:`meteor`: NLTK ``meteor_score`` on ``word_tokenize`` tokens with WordNet (alpha 0.9, beta 3, gamma 0.5), mean.
- :func:`closed_accuracy`: normalised exact match, or M3D's substring rule.
- :func:`compute_metrics`: the ``paper`` protocol (corpus BLEU-4, ROUGE-L, METEOR) or the ``m3d`` protocol (what
  Med3DVLM's and M3D-LaMed's evaluation scripts compute: per-sample BLEU-1, ROUGE-1 and METEOR, averaged).

References are a string or a list of strings per prediction. All scores lie in [0, 1]. Nothing here imports torch;
the scoring libraries (sacrebleu, rouge_score, nltk) load on first use.
"""

from __future__ import annotations

import collections
import math
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any


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

PROTOCOLS = ("paper", "m3d")
CLOSED_RULES = ("normalized", "m3d_substring")
ROUGE_TYPES = ("rouge1", "rouge2", "rouge3", "rouge4", "rouge5", "rouge6", "rouge7", "rouge8", "rouge9", "rougeL")
ROUGE_TYPES += ("rougeLsum",)
NLTK_DATA_HINT = (
    "point NLTK_DATA at a folder holding corpora/wordnet and tokenizers/punkt_tab, or download them with "
    "`python -m nltk.downloader wordnet punkt_tab`"
)


# ---------------------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------------------


def _as_list(values: Any, name: str) -> list:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a list of strings, got {type(values).__name__}")
    return list(values)


def _check_inputs(predictions: Any, references: Any) -> tuple[list[str], list[list[str]]]:
    """Predictions as a list of strings and references as a list of non-empty string lists, or a clear error.

    Raises:
        TypeError: a container that is not a list, or an item that is not a string.
        ValueError: no predictions, lengths that differ, or an empty reference list.
    """
    predictions = _as_list(predictions, "predictions")
    references = _as_list(references, "references")
    if not predictions:
        raise ValueError("predictions is empty: there is nothing to score")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references: they must pair up")
    for i, prediction in enumerate(predictions):
        if not isinstance(prediction, str):
            raise TypeError(f"predictions[{i}] is a {type(prediction).__name__}, not a string: {prediction!r}")
    grouped = []
    for i, refs in enumerate(references):
        refs = [refs] if isinstance(refs, str) else _as_list(refs, f"references[{i}]")
        if not refs:
            raise ValueError(f"references[{i}] is an empty list: each prediction needs at least one reference")
        for j, ref in enumerate(refs):
            if not isinstance(ref, str):
                raise TypeError(f"references[{i}][{j}] is a {type(ref).__name__}, not a string: {ref!r}")
        grouped.append(refs)
    return predictions, grouped


# ---------------------------------------------------------------------------------------------------------------
# BLEU
# ---------------------------------------------------------------------------------------------------------------


def _tokenize_13a(text: str) -> list[str]:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    global _TOKENIZER_13A
    if _TOKENIZER_13A is None:
        _TOKENIZER_13A = Tokenizer13a()
    return _TOKENIZER_13A(text).split()


_TOKENIZER_13A = None


def _ngram_counts(tokens: Sequence[str], max_order: int) -> collections.Counter:
    counts = collections.Counter()
    for order in range(1, max_order + 1):
        for start in range(len(tokens) - order + 1):
            counts[tuple(tokens[start : start + order])] += 1
    return counts


def bleu_statistics(predictions: Sequence[str], references: Sequence[str | Sequence[str]], max_order: int = 4):
    """Corpus BLEU with its parts, as the ``evaluate`` library's ``bleu`` module returns them.

    Tokens are sacrebleu's 13a tokens. Each sample's n-gram matches are clipped by the largest count of that n-gram
    in any one of its references; the brevity penalty compares the total prediction length with the sum of each
    sample's *shortest* reference (not the closest, as sacrebleu does); no smoothing.

    Args:
        predictions: one string per sample.
        references: a string or a list of strings per sample.
        max_order: the largest n-gram order (4 for BLEU-4, 1 for BLEU-1).

    Returns:
        A dict with ``bleu``, ``precisions`` (one per order), ``brevity_penalty``, ``length_ratio``,
        ``translation_length`` and ``reference_length``. An empty corpus side (no prediction or no reference
        tokens at all) gives ``bleu = 0`` with a brevity penalty and ratio of 0, as the reference does.
    """
    predictions, references = _check_inputs(predictions, references)
    if isinstance(max_order, bool) or not isinstance(max_order, int) or max_order < 1:
        raise ValueError(f"max_order must be a positive integer, got {max_order!r}")
    matches = [0] * max_order
    possible = [0] * max_order
    translation_length = reference_length = 0
    for prediction, refs in zip(predictions, references, strict=True):
        tokens = _tokenize_13a(prediction)
        ref_tokens = [_tokenize_13a(ref) for ref in refs]
        translation_length += len(tokens)
        reference_length += min(len(r) for r in ref_tokens)
        ref_counts = collections.Counter()
        for r in ref_tokens:
            ref_counts |= _ngram_counts(r, max_order)  # per n-gram: the max over the references
        for ngram, count in (_ngram_counts(tokens, max_order) & ref_counts).items():
            matches[len(ngram) - 1] += count
        for order in range(1, max_order + 1):
            possible[order - 1] += max(len(tokens) - order + 1, 0)
    precisions = [m / p if p > 0 else 0.0 for m, p in zip(matches, possible, strict=True)]
    geo_mean = math.exp(sum(math.log(p) / max_order for p in precisions)) if min(precisions) > 0 else 0.0
    if translation_length == 0 or reference_length == 0:
        ratio = brevity_penalty = 0.0
    else:
        ratio = translation_length / reference_length
        brevity_penalty = 1.0 if ratio > 1.0 else math.exp(1.0 - 1.0 / ratio)
    return {
        "bleu": geo_mean * brevity_penalty,
        "precisions": precisions,
        "brevity_penalty": brevity_penalty,
        "length_ratio": ratio,
        "translation_length": translation_length,
        "reference_length": reference_length,
    }


def bleu(predictions: Sequence[str], references: Sequence[str | Sequence[str]], max_order: int = 4) -> float:
    """Corpus BLEU in [0, 1], exactly the ``evaluate`` library's ``bleu`` (see :func:`bleu_statistics`).

    Args:
        predictions: one string per sample.
        references: a string or a list of strings per sample.
        max_order: the largest n-gram order (4 = BLEU-4).

    Returns:
        The corpus score: one number for the whole list, not a mean of sample scores.
    """
    return bleu_statistics(predictions, references, max_order)["bleu"]


# ---------------------------------------------------------------------------------------------------------------
# ROUGE
# ---------------------------------------------------------------------------------------------------------------


def _rouge_per_sample(predictions, references, rouge_type: str) -> list[float]:
    if rouge_type not in ROUGE_TYPES:
        raise ValueError(f"rouge_type must be one of {ROUGE_TYPES}, got {rouge_type!r}")
    predictions, references = _check_inputs(predictions, references)
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer([rouge_type], use_stemmer=False)
    # score_multi keeps, per ROUGE type, the reference with the best F-measure.
    return [
        scorer.score_multi(refs, prediction)[rouge_type].fmeasure
        for prediction, refs in zip(predictions, references, strict=True)
    ]


def rouge(predictions: Sequence[str], references: Sequence[str | Sequence[str]], rouge_type: str = "rougeL") -> float:
    """Mean ``rouge_score`` F-measure in [0, 1]: no stemmer, the best of each sample's references.

    ``rouge_score``'s tokenizer lowercases and keeps only ``[a-z0-9]`` runs. The mean is the plain mean over samples,
    not ``evaluate``'s bootstrap median (which equals it for one sample and differs slightly for many).

    Args:
        predictions: one string per sample.
        references: a string or a list of strings per sample.
        rouge_type: ``"rouge1"`` … ``"rouge9"``, ``"rougeL"`` or ``"rougeLsum"`` (sentences split on newlines).
    """
    scores = _rouge_per_sample(predictions, references, rouge_type)
    return math.fsum(scores) / len(scores)


# ---------------------------------------------------------------------------------------------------------------
# METEOR
# ---------------------------------------------------------------------------------------------------------------


def _require_nltk_data() -> None:
    """Make NLTK see ``NLTK_DATA`` (even when set after nltk was imported) and check WordNet and punkt_tab are there.

    Raises:
        LookupError: WordNet or the punkt_tab tokenizer is missing; the message says how to get them.
    """
    import nltk

    for folder in reversed(os.environ.get("NLTK_DATA", "").split(os.pathsep)):
        if folder and folder not in nltk.data.path:
            nltk.data.path.insert(0, folder)
    missing = []
    for resource in ("corpora/wordnet", "tokenizers/punkt_tab/english/"):
        try:
            nltk.data.find(resource)
        except LookupError:
            missing.append(resource)
    if missing:
        raise LookupError(
            f"METEOR needs the NLTK data {', '.join(missing)}, not found in {nltk.data.path}: {NLTK_DATA_HINT}"
        )


def _meteor_per_sample(predictions, references) -> list[float]:
    predictions, references = _check_inputs(predictions, references)
    _require_nltk_data()
    from nltk import word_tokenize
    from nltk.translate.meteor_score import meteor_score

    return [
        meteor_score([word_tokenize(ref) for ref in refs], word_tokenize(prediction), alpha=0.9, beta=3, gamma=0.5)
        for prediction, refs in zip(predictions, references, strict=True)
    ]


def meteor(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean METEOR in [0, 1]: NLTK ``meteor_score`` on ``word_tokenize`` tokens, WordNet synonyms, alpha 0.9, beta 3,
    gamma 0.5; the best of each sample's references (what the ``evaluate`` library's ``meteor`` module computes).

    Needs the NLTK data ``wordnet`` and ``punkt_tab`` (from ``NLTK_DATA`` or NLTK's default folders).

    Raises:
        LookupError: the NLTK data is missing (the message says how to get it).
    """
    scores = _meteor_per_sample(predictions, references)
    return math.fsum(scores) / len(scores)


# ---------------------------------------------------------------------------------------------------------------
# Closed questions
# ---------------------------------------------------------------------------------------------------------------

_SPACES = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """``"  Left-Lung. "`` → ``"left lung"``: NFKC, case-folded, punctuation to spaces, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return _SPACES.sub(" ", text).strip()


def _closed_correct(predictions, references, rule: str) -> list[bool]:
    if rule not in CLOSED_RULES:
        raise ValueError(f"rule must be one of {CLOSED_RULES}, got {rule!r}")
    predictions, references = _check_inputs(predictions, references)
    if rule == "m3d_substring":
        # M3D / Med3DVLM eval_vqa.py: correct when "<answer letter>." occurs anywhere in the generated text.
        return [
            any(f"{ref}." in prediction for ref in refs)
            for prediction, refs in zip(predictions, references, strict=True)
        ]
    return [
        normalize_answer(prediction) in {normalize_answer(ref) for ref in refs}
        for prediction, refs in zip(predictions, references, strict=True)
    ]


def closed_accuracy(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]], rule: str = "normalized"
) -> float:
    """Fraction of correct closed answers, in [0, 1].

    Args:
        predictions: one generated answer per question.
        references: the correct answer (or several accepted answers) per question.
        rule: ``"normalized"``: the prediction equals a reference after :func:`normalize_answer`.
            ``"m3d_substring"``: M3D-LaMed's and Med3DVLM's rule for multiple choice: the reference is the correct
            option letter (``"B"``) and the prediction is correct when ``"B."`` occurs anywhere in it (case and
            spacing as given; ``"B"`` alone, or ``"b."``, is wrong, and an answer naming several options is right).
    """
    correct = _closed_correct(predictions, references, rule)
    return sum(correct) / len(correct)


# ---------------------------------------------------------------------------------------------------------------
# Protocols
# ---------------------------------------------------------------------------------------------------------------


def _stripped(predictions, references):
    predictions, references = _check_inputs(predictions, references)
    return [p.strip() for p in predictions], [[r.strip() for r in refs] for refs in references]


def compute_metrics(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    protocol: str = "paper",
    task: str = "open",
) -> dict[str, float]:
    """All the metrics of one protocol, in [0, 1] (tables print them ×100).

    Args:
        predictions: one generated text per sample.
        references: a string or a list of strings per sample.
        protocol: ``"paper"``: corpus BLEU-4, mean ROUGE-L and mean METEOR (task ``open``); normalised exact match
            (task ``closed``). ``"m3d"``: what Med3DVLM's and M3D-LaMed's ``eval_vqa.py`` / ``eval_caption.py``
            compute: texts stripped, then *per sample* ``evaluate`` BLEU with ``max_order=1``, ROUGE-1 and METEOR,
            each averaged over the samples (task ``open``); ``"<letter>."`` substring accuracy (task ``closed``).
            Their BERTScore needs a model and torch: ``evaluation.bertscore`` (``evaluate.py --bertscore_model``).
        task: ``"open"`` (free text: open VQA, reports) or ``"closed"`` (one answer per question).

    Returns:
        ``{"bleu4", "rougeL", "meteor"}`` or ``{"bleu1", "rouge1", "meteor"}`` for open text, ``{"accuracy"}`` for
        closed questions.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if task not in ("open", "closed"):
        raise ValueError(f"task must be 'open' or 'closed', got {task!r}")
    if task == "closed":
        rule = "normalized" if protocol == "paper" else "m3d_substring"
        return {"accuracy": closed_accuracy(predictions, references, rule=rule)}
    if protocol == "paper":
        return {
            "bleu4": bleu(predictions, references, max_order=4),
            "rougeL": rouge(predictions, references, rouge_type="rougeL"),
            "meteor": meteor(predictions, references),
        }
    predictions, references = _stripped(predictions, references)
    bleu1 = [bleu([p], [refs], max_order=1) for p, refs in zip(predictions, references, strict=True)]
    return {
        "bleu1": math.fsum(bleu1) / len(bleu1),
        "rouge1": rouge(predictions, references, rouge_type="rouge1"),
        "meteor": meteor(predictions, references),
    }
