"""Prompt-oriented rewriting of VQA samples into the paper's JSONL records (paper §3.3).

A sample ``(volume, mask, question, answer)`` becomes a visual-prompt sample: the system prompt describes the
coloured outline, the question is prefixed so that it refers to the outlined area, colloquial anatomy terms are
normalised to RadLex, closed answers keep their label (by name, see :func:`closed_label_names`) and open answers get a
prefix too. The no-prompt variant
(``RewriteConfig(prompt=False)``, the paper's "No Prompt" baseline) keeps the normalisation and the labels but has no
prefixes and a system prompt without the outline.

One JSONL line holds the conversation plus structured fields, see :func:`build_record`; its layout is declared in
:mod:`med3dqwen.data.schema`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from med3dqwen.anatomy.radlex import RadLexNormalizer
from med3dqwen.data.schema import (
    CHOICE_LETTER_NAMES,
    CLOSED_LABEL_NAMES,
    NO_PROMPT,
    RECORD_FIELDS,
    YES_NO_NAMES,
    chat_messages,
    check_closed_fields,
    parse_vision_content,
    vision_content,
)


__all__ = [
    "WH_WORDS",
    "YES_NO_LABELS",
    "RewriteConfig",
    "RewrittenQA",
    "build_record",
    "closed_label",
    "closed_label_names",
    "parse_vision_content",
    "rewrite_answer",
    "rewrite_qa",
    "rewrite_question",
    "system_prompt",
    "vision_content",
]

WH_WORDS = ("what", "which", "where", "when", "who", "whom", "whose", "why", "how")
"""Questions starting with one of these get the "Within the …-outlined area of the CT volume," prefix."""

YES_NO_LABELS = ("No.", "Yes.")
"""Label set of Yes/No closed questions; the label index is the position in this tuple (names: ``"no"``, ``"yes"``)."""

_SYSTEM_PROMPT = (
    "You are a vision-language model that receives (1) a 3-D CT volume in NIfTI format and (2) {article} {color}, "
    "one-pixel-wide boundary that tightly encloses the ROI. Always restrict your visual reasoning to voxels inside "
    "this {color} outline; ignore other regions. When multiple structures appear inside the outline, describe only "
    'those explicitly requested. If no relevant finding exists in the {color} area, answer "No finding" (closed) or '
    '"No, the requested abnormality is absent." (open). Provide concise, radiologically precise answers.'
)
_SYSTEM_PROMPT_NO_OUTLINE = (
    "You are a vision-language model that receives a 3-D CT volume in NIfTI format. When multiple structures appear "
    'in the volume, describe only those explicitly requested. If no relevant finding exists, answer "No finding" '
    '(closed) or "No, the requested abnormality is absent." (open). Provide concise, radiologically precise answers.'
)

_WH_PREFIX = "Within the {color}-outlined area of the CT volume, "
_OTHER_PREFIX = "Inside the {color} boundary, "
_ANSWER_PREFIX = "Within the {color} boundary, "
# Any of the three prefixes above, whatever the colour (one or two words), so that rewriting is idempotent.
_ANY_PREFIX = re.compile(
    r"^(?:within the [\w#]+(?: [\w#]+)?-outlined area of the ct volume|(?:inside|within) the [\w#]+(?: [\w#]+)? "
    r"boundary),?\s*",
    re.IGNORECASE,
)
_LEADING_WORD = re.compile(r"[A-Za-z0-9]+")
_CHOICE_LETTER = re.compile(r"^\(?([A-Za-z])\)?(?:[.:)]\s*(.*))?$", re.DOTALL)


def system_prompt(color: str = "red", prompt: bool = True) -> str:
    """The paper's system prompt (§3.3), verbatim except for "vision-language" typed with a plain hyphen.

    With ``prompt=True`` the colour word follows ``color`` (three places: "a red, one-pixel-wide boundary", "this red
    outline", "the red area"), with "an" before a colour starting with a vowel ("an orange, …").

    With ``prompt=False`` (no-prompt baseline) the same instruction is given without the outline: item (2) of the
    input list ("a red, one-pixel-wide boundary that tightly encloses the ROI") and the sentence "Always restrict
    your visual reasoning to voxels inside this red outline; ignore other regions." are removed, "inside the
    outline" becomes "in the volume" and "in the red area" is dropped. The answer-format sentences are unchanged::

        You are a vision-language model that receives a 3-D CT volume in NIfTI format. When multiple structures
        appear in the volume, describe only those explicitly requested. If no relevant finding exists, answer
        "No finding" (closed) or "No, the requested abnormality is absent." (open). Provide concise, radiologically
        precise answers.

    Args:
        color: colour word of the contour, e.g. ``"red"`` or ``"blue"``; ignored when ``prompt`` is false.
        prompt: whether the samples carry a boundary prompt.

    Returns:
        The system prompt.

    Raises:
        ValueError: if ``color`` is empty.
    """
    if not prompt:
        return _SYSTEM_PROMPT_NO_OUTLINE
    color = _check_color(color)
    article = "an" if color[0].lower() in "aeiou" else "a"
    return _SYSTEM_PROMPT.format(article=article, color=color)


@dataclass(frozen=True)
class RewriteConfig:
    """How to rewrite samples.

    Args:
        color: colour word of the contour used in the prefixes and the system prompt.
        prompt: ``False`` gives the no-prompt variant: no prefixes, system prompt without the outline.
        normalize_anatomy: normalise anatomy terms in questions and open answers to RadLex preferred names.
    """

    color: str = "red"
    prompt: bool = True
    normalize_anatomy: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "color", _check_color(self.color))
        if self.color.lower() == NO_PROMPT:
            raise ValueError(f"color {self.color!r} is no colour: for the no-prompt variant set prompt=False")


@dataclass
class RewrittenQA:
    """A rewritten sample.

    Args:
        question: rewritten question (user message).
        answer: rewritten answer (assistant message).
        answer_type: ``"closed"`` or ``"open"``.
        closed_label: index of the answer in the closed label set (the letter's position for multiple choice), -1
            for open answers.
        closed_answer: name of the closed answer (:func:`closed_label_names`: ``"yes"``, ``"B"``), ``None`` for open
            answers.
        closed_choices: names of the choices the question offers (the label set, less choices left out of the
            question), e.g. ``("no", "yes")``; ``()`` for open answers.
        system: system prompt for this sample.
        boundary_prompt: the contour the sample is meant to be seen with: its colour word (``"red"``, ``"blue"``) or
            ``"none"`` for the no-prompt variant (the record's ``boundary_prompt`` field).

    Raises:
        ValueError: the closed fields disagree (an answer outside its choices, a name that is not in
            :data:`~med3dqwen.data.schema.CLOSED_LABEL_NAMES`, a label or choices on an open answer).
    """

    question: str
    answer: str
    answer_type: Literal["closed", "open"]
    closed_label: int
    closed_answer: str | None
    closed_choices: tuple[str, ...]
    system: str
    boundary_prompt: str

    def __post_init__(self) -> None:
        self.closed_choices = tuple(self.closed_choices)
        self.boundary_prompt = _check_color(self.boundary_prompt)
        if (self.answer_type == "closed") != (self.closed_label >= 0) or self.closed_label < -1:
            raise ValueError(f"closed_label {self.closed_label} does not fit a {self.answer_type!r} answer")
        check_closed_fields(self.answer_type, self.closed_answer, self.closed_choices)


def rewrite_question(
    question: str, config: RewriteConfig | None = None, normalizer: RadLexNormalizer | None = None
) -> str:
    """Rewrite a question: normalise anatomy terms, then add the boundary prefix.

    Questions starting with a word of :data:`WH_WORDS` get "Within the {color}-outlined area of the CT volume, ",
    the others "Inside the {color} boundary, "; the question's first letter is lower-cased unless its first word is
    an acronym (two or more characters, none lower case: "CT", "T7"). Surrounding whitespace is stripped. A prefix
    already present (any colour) is replaced, never doubled; in the no-prompt variant it is removed and the first
    letter upper-cased. Prefixes contain no anatomy terms, so normalising before or after prefixing is the same.

    Args:
        question: the original question.
        config: rewriting options (default :class:`RewriteConfig`).
        normalizer: RadLex normaliser, pass one to collect its counts over a dataset (default: a new one).

    Returns:
        The rewritten question.

    Raises:
        ValueError: if the question is empty or holds only a prefix.
    """
    config = config or RewriteConfig()
    body, had_prefix = _strip_prefix(_check_text(question, "question"))
    body = _check_text(body, "question without its prefix")
    if config.normalize_anatomy:
        body = (normalizer or RadLexNormalizer()).normalize_text(body)
    if not config.prompt:
        return _upper_first(body) if had_prefix else body
    leading = _LEADING_WORD.match(body)
    is_wh = leading is not None and leading.group(0).lower() in WH_WORDS
    prefix = _WH_PREFIX if is_wh else _OTHER_PREFIX
    return prefix.format(color=config.color) + _lower_first(body)


def closed_label(answer: str, choices: Sequence[str] | None = None) -> int:
    """Index of a closed answer in its label set.

    Without ``choices`` the label set is :data:`YES_NO_LABELS`. Matching ignores case, surrounding whitespace, runs
    of inner whitespace and one trailing period (``"yes"``, ``"Yes."``, ``" YES "`` → 1). With ``choices``
    (multiple choice or ordinal labels, in label order) the answer matches a choice by its text (``"mild"``,
    ``"A. left lung"``), by its letter (``"A"``, ``"a."``, ``"(B)"``: A is index 0) or by letter and text
    (``"B. right lung"``, whose text must then agree with choice B). Choices may carry their own letters
    (``"A. left lung"``) or not (``"left lung"``).

    Args:
        answer: the closed answer.
        choices: the label set, or ``None`` for Yes/No.

    Returns:
        The label index.

    Raises:
        ValueError: if the answer is not in the label set; the message names the answer and the label set.
    """
    labels = tuple(YES_NO_LABELS if choices is None else choices)
    wanted = _label_key(answer)
    texts = [_label_key(label) for label in labels]
    if wanted in texts:
        return texts.index(wanted)
    bare_texts = [_label_key(_split_choice_letter(label)[1]) for label in labels]
    if wanted in bare_texts:
        return bare_texts.index(wanted)
    letter, text = _split_choice_letter(answer)
    if choices is not None and letter is not None:
        index = ord(letter.upper()) - ord("A")
        if index < len(labels) and (not text or _label_key(text) == bare_texts[index]):
            return index
    raise ValueError(f"closed answer {answer!r} is not in the label set {labels!r}")


def closed_label_names(choices: Sequence[str] | None = None) -> tuple[str, ...]:
    """Names of a closed label set's labels, in label order: what a record stores as ``closed_choices``.

    Every name is one of :data:`~med3dqwen.data.schema.CLOSED_LABEL_NAMES`, the vocabulary of the model's closed head.
    The Yes/No set (``None``, or choices that are "no" and "yes" in any order, matched as :func:`closed_label` does)
    is named ``"no"``, ``"yes"``; any other set is named by its letters ``"A"``, ``"B"``, ... by position (the letters
    :func:`closed_label` accepts as answers). A choice that carries its own letter (``"B. right lung"``) must carry
    the one of its position. Ordinal scales (``["none", "mild", "moderate", "severe"]``) are named by position letters
    too, so their question should list them with letters; no builder writes one today.

    Args:
        choices: the label set, or ``None`` for Yes/No.

    Returns:
        The names, one per label.

    Raises:
        ValueError: more choices than :data:`~med3dqwen.data.schema.CHOICE_LETTER_NAMES`, or a choice lettered out of
            its position; the message names the label set.
    """
    labels = tuple(YES_NO_LABELS if choices is None else choices)
    keys = tuple(_label_key(label) for label in labels)
    if sorted(keys) == sorted(YES_NO_NAMES):
        return keys
    if not labels or len(labels) > len(CHOICE_LETTER_NAMES):
        raise ValueError(
            f"closed label set {labels!r} has {len(labels)} choices; the closed-label vocabulary {CLOSED_LABEL_NAMES} "
            f"names sets of 1 to {len(CHOICE_LETTER_NAMES)} choices (A-{CHOICE_LETTER_NAMES[-1]}) or yes/no"
        )
    names = CHOICE_LETTER_NAMES[: len(labels)]
    for name, label in zip(names, labels, strict=True):
        letter = _split_choice_letter(label)[0]
        if letter is not None and letter.upper() != name:
            raise ValueError(f"choice {label!r} of the closed label set {labels!r} is lettered {letter!r} at {name}")
    return names


def rewrite_answer(
    answer: str,
    answer_type: Literal["closed", "open"],
    config: RewriteConfig | None = None,
    normalizer: RadLexNormalizer | None = None,
) -> str:
    """Rewrite an answer.

    Closed answers are returned unchanged apart from surrounding whitespace, so that their label text stays the one
    of the label set. Open answers are normalised like questions and, with a prompt, prefixed with "Within the
    {color} boundary, " (first letter lower-cased unless the first word is an acronym; an existing prefix of any
    colour is replaced, or removed in the no-prompt variant).

    Args:
        answer: the original answer.
        answer_type: ``"closed"`` or ``"open"``.
        config: rewriting options (default :class:`RewriteConfig`).
        normalizer: RadLex normaliser (default: a new one).

    Returns:
        The rewritten answer.

    Raises:
        ValueError: if ``answer_type`` is neither ``"closed"`` nor ``"open"``, or the answer is empty.
    """
    _check_answer_type(answer_type)
    config = config or RewriteConfig()
    answer = _check_text(answer, "answer")
    if answer_type == "closed":
        return answer
    body, had_prefix = _strip_prefix(answer)
    body = _check_text(body, "answer without its prefix")
    if config.normalize_anatomy:
        body = (normalizer or RadLexNormalizer()).normalize_text(body)
    if not config.prompt:
        return _upper_first(body) if had_prefix else body
    return _ANSWER_PREFIX.format(color=config.color) + _lower_first(body)


def rewrite_qa(
    question: str,
    answer: str,
    *,
    answer_type: Literal["closed", "open"],
    choices: Sequence[str] | None = None,
    offered: Sequence[str] | None = None,
    config: RewriteConfig | None = None,
    normalizer: RadLexNormalizer | None = None,
) -> RewrittenQA:
    """Rewrite a question-answer pair (see :func:`rewrite_question`, :func:`rewrite_answer`, :func:`closed_label`).

    Args:
        question: the original question.
        answer: the original answer.
        answer_type: ``"closed"`` (Yes/No, ordinal, multiple choice) or ``"open"``.
        choices: label set of a closed multiple-choice or ordinal question; ``None`` means Yes/No. Ignored for open
            answers.
        offered: names (:func:`closed_label_names`) of the choices the question offers, when it leaves some of the
            label set out (an empty choice that keeps its letter); default: the whole set. Ignored for open answers.
        config: rewriting options (default :class:`RewriteConfig`).
        normalizer: RadLex normaliser shared by question and answer (default: a new one).

    Returns:
        The rewritten sample. A closed answer has its index in the label set (``closed_label``), its name
        (``closed_answer``) and the names of the offered choices (``closed_choices``); an open one has -1, ``None``
        and ``()``.

    Raises:
        ValueError: on an unknown ``answer_type``, an empty question or answer, a closed answer that is not in its
            label set or not offered, ``offered`` names outside the label set, or a label set the closed-label
            vocabulary cannot name.
    """
    _check_answer_type(answer_type)
    config = config or RewriteConfig()
    normalizer = normalizer or RadLexNormalizer()
    new_question = rewrite_question(question, config, normalizer)
    new_answer = rewrite_answer(answer, answer_type, config, normalizer)
    label, name, names = -1, None, ()
    if answer_type == "closed":
        label = closed_label(new_answer, choices)
        names = closed_label_names(choices)
        name = names[label]
        if offered is not None:
            outside = [n for n in offered if n not in names]
            if outside:
                raise ValueError(f"offered choices {outside!r} are not names of the label set {names!r}")
            names = tuple(n for n in names if n in set(offered))
            if name not in names:
                raise ValueError(f"closed answer {new_answer!r} ({name!r}) is not among the offered choices {names!r}")
    return RewrittenQA(
        question=new_question,
        answer=new_answer,
        answer_type=answer_type,
        closed_label=label,
        closed_answer=name,
        closed_choices=names,
        system=system_prompt(config.color, config.prompt),
        boundary_prompt=config.color if config.prompt else NO_PROMPT,
    )


def build_record(
    qa: RewrittenQA,
    *,
    volume_path: str | os.PathLike,
    mask_path: str | os.PathLike | None,
    mask_source: str | None,
    roi: str | None,
    question_type: str,
    split: str,
    patient_id: str,
    volume_id: str,
    prompt_pngs: Sequence[str | os.PathLike] = (),
    roi_empty: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One record in the default ``trl`` layout (:mod:`med3dqwen.data.schema`): the content-list conversation,
    ``volume_path``, ``mask_path``, ``prompt_pngs`` and the other fields of :data:`RECORD_FIELDS`, then ``extra``.

    ``messages`` is ``[system, user, assistant]`` with content lists; the user turn holds one ``{"type": "image"}``
    placeholder (the volume) before the question. A question about the whole volume has no mask: pass ``None`` for
    ``mask_path``, ``mask_source`` and ``roi``; they are stored as JSON ``null`` (never ``""``). Paths are stored as
    strings, as given (builders pass paths relative to the dataset folder). The paper's layout is
    :func:`~med3dqwen.data.schema.to_format` of this record.

    Args:
        qa: the rewritten sample.
        volume_path: path of the NIfTI volume.
        mask_path: path of the ROI mask, or ``None``.
        mask_source: where the mask comes from (e.g. ``"dataset"``, ``"totalsegmentator"``, ``"vista3d"``), or
            ``None``.
        roi: name of the region (e.g. a normalised RadGenome anatomy path), or ``None``.
        question_type: e.g. ``"presence"``, ``"abnormality"``, ``"location"``, ``"size"``.
        split: ``"train"``, ``"validation"`` or ``"test"``.
        patient_id: patient id (PMC-VQA: the article id); the unit of the split.
        volume_id: id of the volume.
        prompt_pngs: paths of the prompt PNG stack (empty for the no-prompt variant).
        roi_empty: the mask is empty, so no contour was drawn.
        extra: more fields to store; they must not reuse a record field name.

    Returns:
        The record, JSON-serialisable.

    Raises:
        ValueError: if ``extra`` reuses a record field name, or a path cannot be written in the paper's vision turn
            (see :func:`~med3dqwen.data.schema.vision_content`), so both layouts can always be exported.
    """
    vision_content(volume_path, prompt_pngs)  # both layouts must be writable: check the paths once, here
    fields: dict[str, Any] = {
        "volume_path": os.fspath(volume_path),
        "mask_path": None if mask_path is None else os.fspath(mask_path),
        "mask_source": mask_source,
        "roi": roi,
        "question_type": question_type,
        "answer_type": qa.answer_type,
        "closed_label": qa.closed_label,
        "closed_answer": qa.closed_answer,
        "closed_choices": list(qa.closed_choices),
        "split": split,
        "patient_id": patient_id,
        "volume_id": volume_id,
        "roi_empty": roi_empty,
        "boundary_prompt": qa.boundary_prompt,
    }
    if tuple(fields) != RECORD_FIELDS:  # the schema is the declaration; fail loudly if the two drift apart
        raise RuntimeError(f"build_record fills {tuple(fields)}, the schema declares {RECORD_FIELDS}")
    record: dict[str, Any] = {
        "messages": chat_messages(qa.system, qa.question, qa.answer),
        "volume_path": fields.pop("volume_path"),
        "mask_path": fields.pop("mask_path"),
        "prompt_pngs": [os.fspath(png) for png in prompt_pngs],
        **fields,
    }
    clashes = sorted(set(extra or {}) & set(record))
    if clashes:
        raise ValueError(f"extra fields {clashes} clash with the record's own fields")
    record.update(extra or {})
    return record


def _check_color(color: str) -> str:
    color = color.strip() if isinstance(color, str) else ""
    if not color:
        raise ValueError("the contour colour must be a non-empty colour word such as 'red' or 'blue'")
    return color


def _check_answer_type(answer_type: str) -> None:
    if answer_type not in ("closed", "open"):
        raise ValueError(f"answer_type must be 'closed' or 'open', got {answer_type!r}")


def _check_text(text: str, what: str) -> str:
    text = text.strip() if isinstance(text, str) else ""
    if not text:
        raise ValueError(f"the {what} is empty")
    return text


def _strip_prefix(text: str) -> tuple[str, bool]:
    """``text`` without a leading rewriting prefix of any colour, and whether there was one."""
    match = _ANY_PREFIX.match(text)
    return (text[match.end() :], True) if match else (text, False)


def _is_acronym(text: str) -> bool:
    leading = _LEADING_WORD.match(text)
    return leading is not None and len(leading.group(0)) > 1 and not any(c.islower() for c in leading.group(0))


def _lower_first(text: str) -> str:
    return text if _is_acronym(text) else text[:1].lower() + text[1:]


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def _label_key(label: str) -> str:
    """Matching form of a label: case-folded, single-spaced, without surrounding whitespace or a final period."""
    return " ".join(label.split()).casefold().removesuffix(".").rstrip()


def _split_choice_letter(label: str) -> tuple[str | None, str]:
    """``("B", "right lung")`` for ``"B. right lung"``, ``("A", "")`` for ``"A"``; ``(None, label)`` without letter."""
    match = _CHOICE_LETTER.match(label.strip())
    if match is None:
        return None, label
    return match.group(1), match.group(2) or ""
