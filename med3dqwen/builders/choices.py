"""Multiple-choice questions (M3D-VQA, PMC-VQA) as closed and open records."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from med3dqwen.anatomy.radlex import RadLexNormalizer
from med3dqwen.builders.engine import BuildError
from med3dqwen.data.rewrite import RewriteConfig, build_record, rewrite_qa
from med3dqwen.data.schema import CHOICE_LETTER_NAMES


__all__ = [
    "ANSWER_MODES",
    "CHOICE_LETTERS",
    "NA_VALUES",
    "choice_key",
    "multiple_choice_records",
]


CHOICE_LETTERS = "".join(CHOICE_LETTER_NAMES)
"""The letters of the four choices; a letter's index is the ``closed_label``, the letter the ``closed_answer``."""
ANSWER_MODES = ("closed", "open", "both")
"""``--mode`` values of the multiple-choice builders: which records :func:`multiple_choice_records` writes."""
NA_VALUES = ("", "na", "n/a", "nan", "none", "null")
"""Cell texts (compared lower-cased) that mean "no value" in the multiple-choice CSVs."""


def choice_key(text: str) -> str:
    """Comparison key of a choice or answer text: whitespace collapsed, case-folded, a final full stop dropped
    (``" Pleural  effusion."`` and ``"pleural effusion"`` match)."""
    return " ".join(text.split()).casefold().removesuffix(".").rstrip()


def multiple_choice_records(
    question: str,
    choices: Sequence[str],
    letter: str,
    answer: str,
    *,
    mode: str,
    config: RewriteConfig,
    normalizer: RadLexNormalizer,
    source: str,
    **fields: Any,
) -> list[dict[str, Any]]:
    """The records of one multiple-choice row: the closed one, the open one, or both in that order (``mode``).

    Closed: ``"<question> Choices: A. ... B. ... C. ... D. ..."`` (an empty choice is left out of the list but keeps
    its letter), answer ``"<letter>. <choice>"``, ``closed_label`` = the letter's index (A = 0), ``closed_answer`` =
    the letter, ``closed_choices`` = the letters listed (an empty choice is not offered). Open: the question alone,
    answer ``answer``. Both are rewritten with :func:`~med3dqwen.data.rewrite.rewrite_qa`.

    Args:
        question: the question stem. choices: the four choice texts, ``""`` for an empty one. letter: the correct
            choice, one of :data:`CHOICE_LETTERS`. answer: the answer of the open record. (Texts as they should
            appear, i.e. already normalised.)
        mode: one of :data:`ANSWER_MODES`. config, normalizer: passed to ``rewrite_qa``.
        source: the upstream row (``"file.csv:12"``), named in the error.
        fields: the other keyword arguments of :func:`~med3dqwen.data.rewrite.build_record` (``volume_path``,
            ``split``, ``extra``, ...), the same for both records.

    Raises:
        BuildError: the closed label is not the letter's index (cannot happen: the labels hold the letters).
    """
    index = CHOICE_LETTERS.index(letter)
    pairs = []
    if mode in ("closed", "both"):
        listed = " ".join(f"{x}. {c}" for x, c in zip(CHOICE_LETTERS, choices, strict=True) if c)
        labels = [f"{x}. {c or 'NA'}" for x, c in zip(CHOICE_LETTERS, choices, strict=True)]
        qa = rewrite_qa(
            f"{question} Choices: {listed}",
            f"{letter}. {choices[index]}",
            answer_type="closed",
            choices=labels,
            offered=[x for x, c in zip(CHOICE_LETTERS, choices, strict=True) if c],
            config=config,
            normalizer=normalizer,
        )
        if qa.closed_label != index:
            raise BuildError(f"{source}: closed label {qa.closed_label} != letter {letter}")
        pairs.append(qa)
    if mode in ("open", "both"):
        pairs.append(rewrite_qa(question, answer, answer_type="open", config=config, normalizer=normalizer))
    return [build_record(qa, **fields) for qa in pairs]
