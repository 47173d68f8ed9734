"""The one declaration of a dataset record: its fields, their types, the ``datasets.Features`` and the message layouts.

Two layouts of the same record (``--format``, :data:`RECORD_FORMATS`):

``trl`` (default): the ecosystem's conversation, the form TRL, ``apply_chat_template`` and
``pipeline("image-text-to-text")`` read::

    {"messages": [{"role": "system", "content": [{"type": "text", "text": <system prompt>}]},
                  {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": <question>}]},
                  {"role": "assistant", "content": [{"type": "text", "text": <answer>}]}],
     "volume_path": "volumes/x.nii.gz", "mask_path": "volumes/x/masks/heart.nii.gz" | null,
     "prompt_pngs": ["prompts/x/heart_montage.png", ...], <structured fields>, <builder fields>}

The ``{"type": "image"}`` placeholder stands for the volume (one per conversation); the volume, the mask and the
prompt PNGs are columns holding paths relative to the dataset folder. :func:`resolve_media` turns them into
``datasets`` ``Nifti`` / ``Image`` columns (nibabel and PIL images on access).

``paper``: the paper's layout ``[system, user, vision, assistant]`` with string contents, the vision turn being
``"nifti:<volume>; prompt_png:[<png>, ...]"`` (:func:`vision_content`); no ``prompt_pngs`` column.

Closed answers are stored by name, over one vocabulary (:data:`CLOSED_LABEL_NAMES`): ``closed_answer`` is the
label of a closed answer (``"yes"``, ``"B"``) and ``closed_choices`` the labels its question allows (``["no",
"yes"]``, ``["A", "B", "C", "D"]``), so one classification head over the vocabulary serves yes/no and multiple-choice
rows together, each row's softmax restricted to its own choices (:func:`closed_targets`). ``closed_label`` is the
index of ``closed_answer`` in ``closed_choices`` (kept for readers of older datasets; -1 for open answers).

Every other module derives the record from here: :func:`~med3dqwen.data.rewrite.build_record` fills
:data:`STRUCTURED_FIELDS`, the dataset builders write :func:`to_format` of it, the card declares
:func:`record_features`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..processing import ct_io


__all__ = [
    "CHOICE_LETTER_NAMES",
    "CLOSED_IGNORE_INDEX",
    "CLOSED_LABEL_NAMES",
    "IMAGE_SUFFIXES",
    "NIFTI_SUFFIXES",
    "NO_PROMPT",
    "PAPER_ROLES",
    "RECORD_FIELDS",
    "RECORD_FORMATS",
    "STRUCTURED_FIELDS",
    "TRL_ROLES",
    "YES_NO_NAMES",
    "chat_messages",
    "check_closed_fields",
    "closed_targets",
    "message_texts",
    "paper_messages",
    "parse_vision_content",
    "prompt_mask_path",
    "record_features",
    "record_fields",
    "record_media",
    "resolve_media",
    "to_format",
    "vision_content",
    "volume_settings",
]

YES_NO_NAMES = ("no", "yes")
"""Names of the yes/no label set (answers ``"No."`` / ``"Yes."``), in ``closed_label`` order."""
CHOICE_LETTER_NAMES = ("A", "B", "C", "D")
"""Names of a multiple-choice label set: the choice letters, in ``closed_label`` order (A = 0)."""
CLOSED_LABEL_NAMES = (*YES_NO_NAMES, *CHOICE_LETTER_NAMES)
"""The closed-label vocabulary: every ``closed_answer`` and ``closed_choices`` entry of a record is one of these names.

The model's closed head has one logit per name: ``Med3DQwenConfig.closed_label_names`` must default to exactly this
list, in this order (the model files cannot import ``data/``; ``tests/data/test_schema.py`` compares the two). A new
label set (an ordinal scale, a fifth choice) is added here and in the config default together; no builder writes one
today."""
CLOSED_IGNORE_INDEX = -100
""":func:`closed_targets`' label of an open record: the ``ignore_index`` of ``torch.nn.CrossEntropyLoss``."""

RECORD_FORMATS = ("trl", "paper")
"""``--format`` values: the ecosystem's content-list conversation (default) or the paper's message layout."""

STRUCTURED_FIELDS: dict[str, str] = {
    "volume_path": "string",
    "mask_path": "string",
    "mask_source": "string",
    "roi": "string",
    "question_type": "string",
    "answer_type": "string",
    "closed_label": "int64",
    "closed_answer": "string",
    "closed_choices": "list[string]",
    "split": "string",
    "patient_id": "string",
    "volume_id": "string",
    "roi_empty": "bool",
    "boundary_prompt": "string",
}
"""Structured fields of every record, next to ``messages``, with their ``datasets.Value`` dtype (``list[<dtype>]``: a
``datasets.List`` of it). ``null`` is allowed for ``mask_path``, ``mask_source`` and ``roi`` (whole-volume questions)
and ``closed_answer`` (open answers, whose ``closed_choices`` is ``[]``). ``boundary_prompt`` is the contour the
sample is seen with: a colour word (``"red"``) or :data:`NO_PROMPT`; the ROI mask stays in ``mask_path`` either way
(see :func:`prompt_mask_path`)."""

NO_PROMPT = "none"
"""``boundary_prompt`` of the no-prompt variant: the ROI is known (``mask_path``) but no contour is drawn."""

RECORD_FIELDS = tuple(STRUCTURED_FIELDS)
"""Names of :data:`STRUCTURED_FIELDS`, in record order."""

TRL_ROLES = ("system", "user", "assistant")
"""Roles of a ``trl`` conversation, in order."""
PAPER_ROLES = ("system", "user", "vision", "assistant")
"""Roles of a ``paper`` message list, in order."""

NIFTI_SUFFIXES = (".nii", ".nii.gz")
"""Path suffixes :func:`resolve_media` casts to ``datasets.Nifti``."""
IMAGE_SUFFIXES = ct_io.IMAGE_SUFFIXES
"""Path suffixes :func:`resolve_media` casts to ``datasets.Image``: the figures ``ct_io.load_volume`` reads."""

_VISION_SEPARATOR = "; prompt_png:["
_PNG_SEPARATOR = ", "


def record_fields(format: str = "trl") -> tuple[str, ...]:
    """Field names of a record in ``format`` (without the builder's own fields), in record order.

    Raises:
        ValueError: unknown ``format``.
    """
    _check_format(format)
    if format == "paper":
        return ("messages", *RECORD_FIELDS)
    return ("messages", "volume_path", "mask_path", "prompt_pngs", *RECORD_FIELDS[2:])


def chat_messages(system: str, question: str, answer: str) -> list[dict[str, Any]]:
    """The ``trl`` conversation: system text, user turn with one ``{"type": "image"}`` placeholder (the volume)
    then the question, assistant answer."""
    return [
        {"role": "system", "content": [{"type": "text", "text": system}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


def paper_messages(
    system: str, question: str, answer: str, volume_path: str | os.PathLike, prompt_pngs: Sequence[str] = ()
) -> list[dict[str, str]]:
    """The paper's ``[system, user, vision, assistant]`` message list (contents are strings)."""
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": question},
        {"role": "vision", "content": vision_content(volume_path, prompt_pngs)},
        {"role": "assistant", "content": answer},
    ]


def vision_content(volume_path: str | os.PathLike, prompt_pngs: Sequence[str | os.PathLike] = ()) -> str:
    """Content of the paper's ``vision`` message: ``"nifti:<volume>; prompt_png:[<png 1>, <png 2>, ...]"``.

    The PNG paths are joined with ``", "`` and the list is ``[]`` when there are no PNGs (no-prompt variant). Paths are
    written as given (no quoting), so to keep the string parseable by :func:`parse_vision_content` the volume path
    must not contain ``"; prompt_png:["`` and a PNG path must not contain ``", "``, ``"["`` or ``"]"``; no path may
    contain a line break.

    Args:
        volume_path: path of the NIfTI volume.
        prompt_pngs: paths of the prompt PNG stack, in slice order.

    Returns:
        The content string.

    Raises:
        ValueError: if the volume path is empty or a path contains a forbidden substring.
    """
    volume = os.fspath(volume_path)
    pngs = [os.fspath(png) for png in prompt_pngs]
    if not volume or _VISION_SEPARATOR in volume or "\n" in volume:
        raise ValueError(f"volume path {volume!r} is empty or contains {_VISION_SEPARATOR!r} or a line break")
    for png in pngs:
        if not png or any(bad in png for bad in (_PNG_SEPARATOR, "[", "]", "\n")):
            raise ValueError(f"prompt PNG path {png!r} is empty or contains ', ', '[', ']' or a line break")
    return f"nifti:{volume}{_VISION_SEPARATOR}{_PNG_SEPARATOR.join(pngs)}]"


def parse_vision_content(content: str) -> tuple[str, list[str]]:
    """Inverse of :func:`vision_content`: ``(volume_path, prompt_pngs)``.

    Raises:
        ValueError: if ``content`` does not have the ``"nifti:...; prompt_png:[...]"`` form.
    """
    volume, separator, pngs = content.partition(_VISION_SEPARATOR)
    if not volume.startswith("nifti:") or not separator or not pngs.endswith("]"):
        raise ValueError(f"not a vision content of the form 'nifti:...; prompt_png:[...]': {content!r}")
    pngs = pngs[:-1]
    return volume.removeprefix("nifti:"), pngs.split(_PNG_SEPARATOR) if pngs else []


def message_texts(record: Mapping[str, Any]) -> dict[str, str]:
    """``{"system": ..., "user": ..., "assistant": ...}``: the texts of a record's conversation, in either layout.

    Raises:
        ValueError: the messages have neither layout (the message names the roles found).
    """
    messages = record["messages"]
    roles = tuple(m["role"] for m in messages)
    if roles == PAPER_ROLES:
        return {m["role"]: m["content"] for m in messages if m["role"] != "vision"}
    if roles != TRL_ROLES:
        raise ValueError(f"messages have roles {list(roles)}, expected {list(TRL_ROLES)} or {list(PAPER_ROLES)}")
    texts = {}
    for message in messages:
        parts = [part["text"] for part in message["content"] if part["type"] == "text"]
        if len(parts) != 1:
            raise ValueError(f"the {message['role']} turn has {len(parts)} text parts, expected 1")
        texts[message["role"]] = parts[0]
    return texts


def record_media(record: Mapping[str, Any]) -> tuple[str, list[str]]:
    """``(volume_path, prompt_pngs)`` of a record, in either layout (paths as stored: relative to the dataset)."""
    if "prompt_pngs" in record:
        return record["volume_path"], list(record["prompt_pngs"])
    vision = [m["content"] for m in record["messages"] if m["role"] == "vision"]
    if len(vision) != 1:
        raise ValueError(f"a paper record needs one vision message, found {len(vision)}")
    return parse_vision_content(vision[0])


def prompt_mask_path(record: Mapping[str, Any]) -> Any:
    """The mask to draw the boundary prompt from: the record's ``mask_path``, or None for a whole-volume question or
    a no-prompt record (``boundary_prompt`` = :data:`NO_PROMPT`, whose ``mask_path`` names the ROI but must not reach
    the image). Records of datasets built before the field existed are drawn, as they were then.

    Raises:
        ValueError: ``boundary_prompt`` is not a non-empty string.
    """
    prompt = record.get("boundary_prompt")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise ValueError(f"boundary_prompt must be a colour word or {NO_PROMPT!r}, got {prompt!r}")
    if prompt is not None and prompt.strip().lower() == NO_PROMPT:
        return None
    return record.get("mask_path")


def volume_settings(record: Mapping[str, Any]) -> dict[str, Any]:
    """How a record's volume values become the model input: the image processor's ``intensity`` and ``rescale``.

    Builders record them per row: ``intensity`` — ``"hu"`` (windowed) or ``"unit"`` (already in [0, 1]: M3D-VQA's
    arrays, figures) — and ``rescale_slope`` / ``rescale_intercept`` (HU = value × slope + intercept, for files whose
    header lacks them: CT-RATE's originals). Every reader of records (training collator, model-grid cache,
    evaluation) applies them through this one rule; ignoring them windows M3D's [0, 1] images or CT-RATE's raw values
    as if they were HU.

    Returns:
        ``{"intensity": "hu" | "unit" | None, "rescale": (slope, intercept) | None}``: None where the record says
        nothing (the file decides: figures are ``"unit"``, the rest HU), and no rescale for (1, 0).

    Raises:
        ValueError: an unknown ``intensity``; only one of slope and intercept; a slope or intercept that is not a
            finite number, or a zero slope.
    """
    import math

    intensity = record.get("intensity")
    if intensity is not None and intensity not in ("hu", "unit"):
        raise ValueError(f"intensity must be 'hu' or 'unit', got {intensity!r}")
    slope, intercept = record.get("rescale_slope"), record.get("rescale_intercept")
    if slope is None and intercept is None:
        return {"intensity": intensity, "rescale": None}
    if slope is None or intercept is None:
        raise ValueError(f"rescale_slope and rescale_intercept come together, got {slope!r} and {intercept!r}")
    try:
        slope, intercept = float(slope), float(intercept)
    except (TypeError, ValueError):
        raise ValueError(f"rescale_slope / rescale_intercept must be numbers, got {slope!r} / {intercept!r}") from None
    if not (math.isfinite(slope) and math.isfinite(intercept)) or slope == 0.0:
        raise ValueError(f"rescale_slope must be a non-zero finite number and rescale_intercept finite, got "
                         f"{slope!r} / {intercept!r}")  # fmt: skip
    return {"intensity": intensity, "rescale": None if (slope, intercept) == (1.0, 0.0) else (slope, intercept)}


def to_format(record: Mapping[str, Any], format: str) -> dict[str, Any]:
    """A ``trl`` record (as :func:`~med3dqwen.data.rewrite.build_record` makes it) in layout ``format``.

    ``trl`` returns it unchanged; ``paper`` moves the volume and the prompt PNGs into the vision turn and drops the
    ``prompt_pngs`` column (field order: ``messages``, :data:`RECORD_FIELDS`, the builder's fields).

    Raises:
        ValueError: unknown ``format``, or ``record`` is not a ``trl`` record.
    """
    _check_format(format)
    if "prompt_pngs" not in record:
        raise ValueError(f"not a trl record (no prompt_pngs field): fields {sorted(record)}")
    if format == "trl":
        return dict(record)
    texts = message_texts(record)
    paper = {
        "messages": paper_messages(
            texts["system"], texts["user"], texts["assistant"], record["volume_path"], record["prompt_pngs"]
        )
    }
    paper.update((name, value) for name, value in record.items() if name not in ("messages", "prompt_pngs"))
    return paper


def record_features(extra: Mapping[str, Any] | None = None, format: str = "trl"):
    """The ``datasets.Features`` of a JSONL record in ``format``: ``messages`` + :data:`STRUCTURED_FIELDS` (+
    ``prompt_pngs`` for ``trl``) + ``extra`` (the builder's own fields). Written into the card so that
    ``load_dataset`` uses exactly these types.

    Paths are ``string`` here: a JSON path column declared ``Nifti``/``Image`` would resolve against the working
    directory, not the dataset folder (datasets 5.2), so :func:`resolve_media` casts them after loading.

    Raises:
        ValueError: ``extra`` reuses a record field name; unknown ``format``.
    """
    import datasets

    string = datasets.Value("string")
    if format == "paper":
        messages = datasets.List({"role": string, "content": string})
    else:
        _check_format(format)
        messages = datasets.List({"role": string, "content": datasets.List({"type": string, "text": string})})
    structured = {name: _feature(dtype) for name, dtype in STRUCTURED_FIELDS.items()}
    features = {
        name: messages if name == "messages" else datasets.List(string) if name == "prompt_pngs" else structured[name]
        for name in record_fields(format)
    }
    clashes = sorted(set(extra or {}) & {*features, "prompt_pngs"})
    if clashes:
        raise ValueError(f"extra features {clashes} clash with the record's own fields")
    features.update(extra or {})
    return datasets.Features(features)


def check_closed_fields(answer_type: str, closed_answer: str | None, closed_choices: Sequence[str] | None) -> None:
    """Check the closed-answer fields of one record against each other and :data:`CLOSED_LABEL_NAMES`.

    A closed record names its answer and its (non-empty, duplicate-free) choices, the answer among them; an open
    record has ``closed_answer`` ``None`` and no choices (``None`` counts as none: a null JSON value).

    Raises:
        ValueError: the fields disagree, or a name is not in :data:`CLOSED_LABEL_NAMES` (the message says which).
    """
    choices = list(closed_choices or [])
    if answer_type == "open":
        if closed_answer is not None or choices:
            raise ValueError(
                f"an open answer has no closed_answer / closed_choices, got {closed_answer!r} / {choices!r}"
            )
        return
    if answer_type != "closed":
        raise ValueError(f"answer_type must be 'closed' or 'open', got {answer_type!r}")
    unknown = [name for name in choices if name not in CLOSED_LABEL_NAMES]
    if not choices or unknown or len(set(choices)) != len(choices):
        raise ValueError(
            f"closed_choices {choices!r} must be distinct names of the closed-label vocabulary {CLOSED_LABEL_NAMES}"
            + (f" ({unknown!r} are not)" if unknown else "")
        )
    if closed_answer not in choices:
        raise ValueError(f"closed_answer {closed_answer!r} is not one of its closed_choices {choices!r}")


def closed_targets(
    record: Mapping[str, Any], label_names: Sequence[str] = CLOSED_LABEL_NAMES
) -> tuple[int, list[bool]]:
    """The closed head's target of one record: the answer's index in ``label_names`` and the allowed-set mask.

    A collator stacks these into the model's ``closed_labels`` (B,) and allowed-set mask (B, len(label_names)); the
    softmax of a yes/no row then runs over {no, yes} only. An open record gives :data:`CLOSED_IGNORE_INDEX` and an
    all-false mask.

    Args:
        record: a record in either layout (its ``answer_type``, ``closed_answer`` and ``closed_choices``).
        label_names: the head's vocabulary, i.e. the model config's ``closed_label_names`` (default
            :data:`CLOSED_LABEL_NAMES`).

    Returns:
        ``(label, allowed)``: the index of ``closed_answer`` in ``label_names`` and, per name, whether it is one of
        the record's ``closed_choices``.

    Raises:
        ValueError: the record lacks the fields (built before they existed: rebuild it), they disagree, or a choice
            is not in ``label_names``; the message names the record's ``volume_id``.
    """
    where = f"record of volume {record.get('volume_id')!r}"
    missing = [name for name in ("answer_type", "closed_answer", "closed_choices") if name not in record]
    if missing:
        raise ValueError(f"{where} has no {missing} field(s); rebuild the dataset with this version of med3dqwen")
    names = list(label_names)
    try:
        check_closed_fields(record["answer_type"], record["closed_answer"], record["closed_choices"])
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    if record["answer_type"] == "open":
        return CLOSED_IGNORE_INDEX, [False] * len(names)
    outside = [name for name in record["closed_choices"] if name not in names]
    if outside:
        raise ValueError(f"{where}: closed_choices {outside!r} are not in the head's label names {names!r}")
    allowed = set(record["closed_choices"])
    return names.index(record["closed_answer"]), [name in allowed for name in names]


def resolve_media(dataset, root: str | os.PathLike):
    """Make a loaded record dataset's media columns decodable: paths relative to ``root`` become absolute and are cast
    to ``datasets.Nifti`` (``.nii``, ``.nii.gz``) or ``datasets.Image`` (PNG, JPEG, ...), by their suffix.

    ``volume_path`` and ``mask_path`` (whole-volume questions: ``None``, kept) and ``prompt_pngs`` (``trl`` layout)
    are resolved; a column whose files are of another kind (``.npy`` volumes, DICOM folders) keeps absolute path
    strings. Accessing a row then gives nibabel images (``Nifti1ImageWrapper``) and PIL images.

    Args:
        dataset: a ``datasets.Dataset`` or ``DatasetDict`` of records, e.g. ``load_dataset(folder)``.
        root: the dataset folder the paths are relative to.

    Returns:
        The dataset (dict) with absolute, typed media columns.

    Raises:
        FileNotFoundError: ``root`` is not a folder, or a referenced file is missing (the message names it).
        ValueError: a column mixes kinds (e.g. NIfTI and PNG), or a path is absolute or escapes ``root``.
    """
    import datasets

    root_path = Path(root).expanduser().resolve()
    if not root_path.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    splits = dict(dataset) if isinstance(dataset, datasets.DatasetDict) else {None: dataset}
    names = set().union(*(ds.column_names for ds in splits.values()))
    columns = [name for name in ("volume_path", "mask_path", "prompt_pngs") if name in names]
    splits = {split: _absolute_paths(ds, root_path, columns) for split, ds in splits.items()}
    for name in columns:  # one type per column over all splits, so the splits stay compatible
        paths = [
            path
            for ds in splits.values()
            for value in ds[name]
            for path in (value if isinstance(value, list) else [value])
            if path is not None
        ]
        feature = _media_feature(paths, name)
        if feature is not None:
            feature = datasets.List(feature) if name == "prompt_pngs" else feature
            splits = {split: ds.cast_column(name, feature) for split, ds in splits.items()}
    return splits[None] if None in splits else datasets.DatasetDict(splits)


def _absolute_paths(dataset, root: Path, columns: Sequence[str]):
    """``dataset`` with the paths of ``columns`` joined to ``root``, each checked to exist inside it."""

    def absolute(path: str | None, column: str) -> str | None:
        if path is None:
            return None
        if os.path.isabs(path) or Path(os.path.normpath(path)).parts[:1] == ("..",):
            raise ValueError(f"{column} path {path!r} is not relative to the dataset folder {root}")
        full = root / path
        if not full.exists():
            raise FileNotFoundError(f"{column} {path!r} of the dataset in {root} does not exist ({full})")
        return full.as_posix()

    def resolve(row: dict[str, Any]) -> dict[str, Any]:
        return {
            name: [absolute(png, name) for png in row[name]] if name == "prompt_pngs" else absolute(row[name], name)
            for name in columns
        }

    return dataset.map(resolve, desc="resolving media paths")


def _media_feature(paths: Sequence[str], column: str):
    """``Nifti()`` or ``Image()`` when every path has one of their suffixes, ``None`` when none does."""
    import datasets

    kinds = {
        "nifti" if p.lower().endswith(NIFTI_SUFFIXES) else "image" if p.lower().endswith(IMAGE_SUFFIXES) else "other"
        for p in paths
    }
    if len(kinds) > 1:
        raise ValueError(f"column {column} mixes file kinds {sorted(kinds)}; cannot give it one feature type")
    kind = kinds.pop() if kinds else "other"
    return {"nifti": datasets.Nifti(), "image": datasets.Image()}.get(kind)


def _feature(dtype: str):
    """``datasets.Value(dtype)``, or a ``datasets.List`` of it for ``"list[<dtype>]"``."""
    import datasets

    if dtype.startswith("list[") and dtype.endswith("]"):
        return datasets.List(datasets.Value(dtype[5:-1]))
    return datasets.Value(dtype)


def _check_format(format: str) -> None:
    if format not in RECORD_FORMATS:
        raise ValueError(f"record format must be one of {RECORD_FORMATS}, got {format!r}")
