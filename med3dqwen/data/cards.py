"""Dataset cards: render ``hub_cards/dataset_card.md`` for a built dataset folder (``configs:`` + counts)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import DatasetCard, DatasetCardData

from med3dqwen.processing.ct_io import atomic_output


__all__ = ["CARD_TEMPLATE", "PAPER_CITATION", "render_dataset_card"]

# The templates live at the repository's top level (hub_cards/), next to the package.
CARD_TEMPLATE = Path(__file__).resolve().parents[2] / "hub_cards" / "dataset_card.md"

PAPER_CITATION = """@article{boundary_guidance_3dct,
  title  = {Boundary Guidance for Efficient 3D CT Vision-Language Reasoning},
  author = {Anonymous},
  year   = {2025}
}"""


def render_dataset_card(
    out_dir: str | os.PathLike,
    records_by_split: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    pretty_name: str,
    summary: str,
    builder: str,
    prompt_description: str,
    source: str,
    license: str,
    citation: str = PAPER_CITATION,
    skipped: Mapping[str, int] | None = None,
    tags: Sequence[str] = (),
    template: str | os.PathLike = CARD_TEMPLATE,
) -> Path:
    """Write ``out_dir/README.md``: YAML ``configs:`` (so ``datasets.load_dataset(out_dir)`` finds
    ``data/<split>.jsonl``), counts per split and per question type, and what was skipped.

    Args:
        out_dir: the dataset folder.
        records_by_split: split name → its JSONL records (only the structured fields are read).
        pretty_name, summary, builder, prompt_description, source, license, citation: card text.
        skipped: reason → number of skipped rows/volumes.
        tags: extra Hub tags.
        template: the Jinja template (default ``hub_cards/dataset_card.md``).

    Returns:
        The card path.

    Raises:
        FileNotFoundError: the template is missing (e.g. a wheel install without the repository's hub_cards/).
    """
    template = Path(template)
    if not template.is_file():
        raise FileNotFoundError(f"dataset card template not found: {template}")
    splits = [name for name, records in records_by_split.items() if records]
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
    )
    split_rows = [
        {
            "split": name,
            "questions": len(records_by_split[name]),
            "volumes": len({r["volume_id"] for r in records_by_split[name]}),
            "patients": len({r["patient_id"] for r in records_by_split[name]}),
        }
        for name in splits
    ]
    per_type = {
        name: Counter((r["question_type"], r["answer_type"]) for r in records_by_split[name]) for name in splits
    }
    kinds = sorted(set().union(*per_type.values())) if per_type else []
    type_rows = [
        {"question_type": qt, "answer_type": at, "counts": [per_type[name][(qt, at)] for name in splits]}
        for qt, at in kinds
    ]
    skipped_summary = ", ".join(f"{n} ({reason})" for reason, n in sorted(skipped.items())) if skipped else "nothing."
    card = DatasetCard.from_template(
        card_data,
        template_path=str(template),
        summary=summary,
        builder=builder,
        load_path=str(out_dir),
        prompt_description=prompt_description,
        splits=splits,
        split_rows=split_rows,
        type_rows=type_rows,
        question_types=", ".join(f"`{qt}`" for qt in sorted({qt for qt, _ in kinds})),
        skipped_summary=skipped_summary,
        source=source,
        citation=citation,
    )
    path = Path(out_dir) / "README.md"
    with atomic_output(path) as tmp:
        tmp.write_text(str(card), encoding="utf-8")
    return path
