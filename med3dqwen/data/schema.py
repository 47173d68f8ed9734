"""The one declaration of a dataset record: its structured fields and its ``datasets.Features``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


__all__ = ["RECORD_FIELDS", "record_features"]

RECORD_FIELDS = (
    "volume_path",
    "mask_path",
    "mask_source",
    "roi",
    "question_type",
    "answer_type",
    "closed_label",
    "split",
    "patient_id",
    "volume_id",
    "roi_empty",
)
"""Structured fields of a JSONL record, next to ``messages``."""


def record_features(extra: Mapping[str, Any] | None = None):
    """The ``datasets.Features`` of a JSONL record: ``messages`` + :data:`~med3dqwen.data.rewrite.RECORD_FIELDS`
    (+ ``extra``, the builder's own fields). Written into the card so ``load_dataset`` uses exactly these types."""
    import datasets

    string = datasets.Value("string")
    features = {
        "messages": datasets.List({"role": string, "content": string}),
        "volume_path": string,
        "mask_path": string,
        "mask_source": string,
        "roi": string,
        "question_type": string,
        "answer_type": string,
        "closed_label": datasets.Value("int64"),
        "split": string,
        "patient_id": string,
        "volume_id": string,
        "roi_empty": datasets.Value("bool"),
    }
    if set(features) != {"messages", *RECORD_FIELDS}:  # keep in step with rewrite.RECORD_FIELDS
        raise RuntimeError(f"record_features is out of date with RECORD_FIELDS {RECORD_FIELDS}")
    clashes = sorted(set(extra or {}) & set(features))
    if clashes:
        raise ValueError(f"extra features {clashes} clash with the record's own fields")
    features.update(extra or {})
    return datasets.Features(features)
