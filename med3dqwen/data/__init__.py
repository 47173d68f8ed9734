"""What training and evaluation read: the record schema, question rewriting, splits.

``load_dataset(folder)`` then :func:`resolve_media` gives a built dataset with NIfTI / image columns;
:func:`closed_targets` turns a record's closed answer into the closed head's target over :data:`CLOSED_LABEL_NAMES`.
"""

from .schema import (
    CLOSED_LABEL_NAMES,
    RECORD_FIELDS,
    RECORD_FORMATS,
    closed_targets,
    message_texts,
    record_features,
    resolve_media,
    to_format,
)


__all__ = [
    "CLOSED_LABEL_NAMES",
    "RECORD_FIELDS",
    "RECORD_FORMATS",
    "closed_targets",
    "message_texts",
    "record_features",
    "resolve_media",
    "to_format",
]
