"""Dataset cards: render the ``dataset_card.md`` template for a built dataset folder (``configs:``, features,
counts)."""

from __future__ import annotations

import importlib.resources
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import DatasetCard, DatasetCardData

from med3dqwen.data.schema import CLOSED_LABEL_NAMES, RECORD_FORMATS
from med3dqwen.data.splits import SPLIT_NAMES
from med3dqwen.io import atomic_output


__all__ = ["CARD_TEMPLATE", "PAPER_CITATION", "DatasetStats", "render_dataset_card"]

# Package data, shipped in the wheel (hub_cards/ at the repository root links to this folder). Installed wheels are
# plain files, so the resource is a path on disk.
CARD_TEMPLATE = Path(str(importlib.resources.files(__package__) / "templates" / "dataset_card.md"))

PAPER_CITATION = """@article{boundary_guidance_3dct,
  title  = {Boundary Guidance for Efficient 3D CT Vision-Language Reasoning},
  author = {Anonymous},
  year   = {2025}
}"""

_DEFAULT_FILES = (
    "Volumes are NIfTI files in this folder; load one with "
    '`med3dqwen.processing.ct_io.load_volume(folder / sample["volume_path"])`.'
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class DatasetStats:
    """Counts over the records of a dataset, collected one record at a time (a merge never holds all records).

    Per split: questions, distinct volumes and patients; per split, question type and answer type: questions.
    """

    def __init__(self) -> None:
        self.questions: Counter[str] = Counter()
        self._volumes: defaultdict[str, set[str]] = defaultdict(set)
        self._patients: defaultdict[str, set[str]] = defaultdict(set)
        self.per_type: Counter[tuple[str, str, str]] = Counter()  # (split, question_type, answer_type)

    @classmethod
    def from_records(cls, records_by_split: Mapping[str, Iterable[Mapping[str, Any]]]) -> DatasetStats:
        stats = cls()
        for split, records in records_by_split.items():
            for record in records:
                stats.add(record, split)
        return stats

    def add(self, record: Mapping[str, Any], split: str | None = None) -> None:
        """Count one record (its ``split`` field unless ``split`` is given)."""
        split = split or record["split"]
        self.questions[split] += 1
        self._volumes[split].add(record["volume_id"])
        self._patients[split].add(record["patient_id"])
        self.per_type[(split, record["question_type"], record["answer_type"])] += 1

    @property
    def splits(self) -> list[str]:
        """Non-empty splits, train / validation / test first."""
        order = {name: i for i, name in enumerate(SPLIT_NAMES)}
        return sorted((s for s, n in self.questions.items() if n), key=lambda s: (order.get(s, len(order)), s))

    def volumes(self, split: str) -> int:
        return len(self._volumes.get(split, ()))

    def patients(self, split: str) -> int:
        return len(self._patients.get(split, ()))

    @property
    def question_types(self) -> dict[str, int]:
        """Question type → questions over all splits."""
        counts: Counter[str] = Counter()
        for (_, question_type, _), n in self.per_type.items():
            counts[question_type] += n
        return dict(sorted(counts.items()))


def render_dataset_card(
    out_dir: str | os.PathLike,
    records_by_split: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    *,
    pretty_name: str,
    summary: str,
    builder: str,
    prompt_description: str,
    source: str,
    license: str,
    citation: str = PAPER_CITATION,
    stats: DatasetStats | None = None,
    skipped: Mapping[str, int] | None = None,
    notes: Sequence[str] = (),
    files_description: str = _DEFAULT_FILES,
    features: Any = None,
    extra_fields: Mapping[str, str] | None = None,
    tags: Sequence[str] = (),
    template: str | os.PathLike = CARD_TEMPLATE,
    record_format: str = "trl",
    load_path: str | None = None,
) -> Path:
    """Write ``out_dir/README.md``: YAML ``configs:`` (so ``datasets.load_dataset(out_dir)`` finds
    ``data/<split>.jsonl``), the declared features, counts per split and per question type, and what was skipped.

    Args:
        out_dir: the dataset folder.
        records_by_split: split name → its JSONL records (only the structured fields are read); or pass ``stats``.
        pretty_name, summary, builder, prompt_description, source, license, citation: card text.
        stats: counts collected with :class:`DatasetStats` (used instead of ``records_by_split``).
        skipped: reason → number of skipped rows.
        notes: more sentences for the "Built from" section (e.g. how many duplicates were removed).
        files_description: where the volumes are and how to open one.
        features: the ``datasets.Features`` of a record; written as ``dataset_info.features`` so that
            ``load_dataset`` uses these types (a column that is ``null`` in a whole split keeps its type).
        extra_fields: name → meaning of the builder's own record fields, for the field table.
        tags: extra Hub tags.
        template: the Jinja template (default :data:`CARD_TEMPLATE`, ``med3dqwen/builders/templates/``).
        record_format: the layout of the records, ``trl`` or ``paper`` (:mod:`med3dqwen.data.schema`).
        load_path: the Hub dataset id (``user/name``) the quick start loads; ``None`` names the folder relative to
            its parent (``./<folder name>``), never an absolute path of the machine that built it.

    Returns:
        The card path.

    Raises:
        FileNotFoundError: the template is missing.
        ValueError: neither ``records_by_split`` nor ``stats`` is given; ``load_path`` is not a Hub id; unknown
            ``record_format``.
    """
    template = Path(template)
    if record_format not in RECORD_FORMATS:
        raise ValueError(f"record_format must be one of {RECORD_FORMATS}, got {record_format!r}")
    if load_path is not None and not _HUB_ID.match(load_path):
        raise ValueError(f"load_path must be a Hub dataset id (user/name), got {load_path!r}")
    if not template.is_file():
        raise FileNotFoundError(f"dataset card template not found: {template}")
    if stats is None:
        if records_by_split is None:
            raise ValueError("pass records_by_split or stats")
        stats = DatasetStats.from_records(records_by_split)
    splits = stats.splits
    extra: dict[str, Any] = {}
    if features is not None:
        extra["dataset_info"] = {"config_name": "default", "features": features._to_yaml_list()}
    card_data = DatasetCardData(
        pretty_name=pretty_name,
        license=license,
        task_categories=["visual-question-answering"],
        tags=["medical", "ct", "3d", "boundary-prompting", *tags],
        configs=[
            {
                "config_name": "default",
                "default": True,
                "data_files": [{"split": name, "path": f"data/{name}.jsonl"} for name in splits],
            }
        ],
        **extra,
    )
    split_rows = [
        {
            "split": name,
            "questions": stats.questions[name],
            "volumes": stats.volumes(name),
            "patients": stats.patients(name),
        }
        for name in splits
    ]
    kinds = sorted({(qt, at) for (_, qt, at) in stats.per_type})
    type_rows = [
        {"question_type": qt, "answer_type": at, "counts": [stats.per_type[(name, qt, at)] for name in splits]}
        for qt, at in kinds
    ]
    skipped_rows = [{"reason": reason, "rows": n} for reason, n in sorted((skipped or {}).items()) if n]
    card = DatasetCard.from_template(
        card_data,
        template_path=str(template),
        summary=summary,
        builder=builder,
        load_path=load_path or f"./{Path(out_dir).resolve().name}",
        from_hub=load_path is not None,
        record_format=record_format,
        closed_label_names=", ".join(f"`{name}`" for name in CLOSED_LABEL_NAMES),
        prompt_description=prompt_description,
        splits=splits,
        split_rows=split_rows,
        type_rows=type_rows,
        question_types=", ".join(f"`{qt}`" for qt in sorted({qt for qt, _ in kinds})),
        skipped_rows=skipped_rows,
        skipped_total=sum(row["rows"] for row in skipped_rows),
        notes=list(notes),
        extra_fields=sorted((extra_fields or {}).items()),
        files_description=files_description,
        source=source,
        citation=citation,
    )
    path = Path(out_dir) / "README.md"
    with atomic_output(path) as tmp:
        tmp.write_text(str(card), encoding="utf-8")
    return path
