"""What training and evaluation read: the record schema, question rewriting, splits.

``load_dataset(folder)`` then :func:`resolve_media` gives a built dataset with NIfTI / image columns.
"""

from .schema import RECORD_FIELDS, RECORD_FORMATS, message_texts, record_features, resolve_media, to_format


__all__ = ["RECORD_FIELDS", "RECORD_FORMATS", "message_texts", "record_features", "resolve_media", "to_format"]
