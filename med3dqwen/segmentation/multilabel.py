"""Masks from one multilabel NIfTI per volume (TotalSegmentator ``--ml`` output, or any integer label map).

The label map is read once per file and kept in a small LRU cache, so asking for ten structures of one volume reads
the file once. Label names follow :func:`~med3dqwen.processing.ct_io.load_mask`: ``label_map`` if given, else the
label table in the file header (TotalSegmentator writes one), else TotalSegmentator v2's ``total`` class map; the
mask of a name is exactly ``load_mask(path, like=volume, label=name)``. Names the table lacks are translated with the
vocabulary (``"right lung upper lobe"`` → ``lung_upper_lobe_right``) or united from their parts (``lung_left`` → its
two lobes).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Literal

import numpy as np

from med3dqwen.anatomy.labels import TOTALSEGMENTATOR_V2_LABELS
from med3dqwen.anatomy.vocabulary import Vocabulary, default_vocabulary
from med3dqwen.io import check_path_component
from med3dqwen.processing.ct_io import CorruptFileError, CTVolume, LabelMap, load_label_map

from .base import MaskResult, MaskSource, UnknownStructureError, close_matches
from .files import strip_image_suffix, volume_id_from_path


__all__ = ["MultilabelFileSource"]


class MultilabelFileSource(MaskSource):
    """Masks from one multilabel file per volume.

    Args:
        path_or_pattern: the file (``"seg/ct_1_ml.nii.gz"``), or a pattern with ``{volume_id}``
            (``"ts_out/{volume_id}.nii.gz"``) filled from ``get_mask(..., volume_id=)`` or the volume's file name.
        label_map: id → name table that overrides the header and TotalSegmentator tables.
        cache_size: how many label maps to keep in memory (least recently used first out).
        naming: vocabulary naming of the labels for translating other names (``"totalsegmentator"``), or ``None``
            to use names exactly as in the table.
        vocabulary: the :class:`~.vocabulary.Vocabulary` (default: the shared one).
        source_name: ``MaskResult.source`` of the results.
    """

    def __init__(
        self,
        path_or_pattern: str | os.PathLike,
        label_map: dict[int, str] | None = None,
        *,
        cache_size: int = 2,
        naming: Literal["totalsegmentator", "radgenome", "vista3d"] | None = "totalsegmentator",
        vocabulary: Vocabulary | None = None,
        source_name: str = "totalsegmentator",
    ) -> None:
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self.pattern = str(path_or_pattern)
        self.label_map = dict(label_map) if label_map else None
        self.cache_size = int(cache_size)
        self.naming = naming
        self.vocabulary = vocabulary or default_vocabulary()
        self.source_name = source_name
        self._cache: OrderedDict[tuple, LabelMap] = OrderedDict()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pattern!r}, label_map={'custom' if self.label_map else None})"

    def path_for(self, volume: CTVolume | None = None, volume_id: str | None = None) -> Path:
        """The label map file of a volume."""
        if "{volume_id}" not in self.pattern:
            return Path(self.pattern)
        if volume_id is None and volume is not None and volume.path:
            volume_id = volume_id_from_path(volume.path)
        if volume_id is None:
            raise ValueError(f"pattern {self.pattern!r} needs a volume_id (the volume has no path to derive it)")
        volume_id = check_path_component(strip_image_suffix(str(volume_id)), "volume id")
        return Path(self.pattern.format(volume_id=volume_id))

    def load(self, path: str | os.PathLike) -> LabelMap:
        """The label map of ``path``, from the cache when the file is unchanged (same size and mtime)."""
        path = Path(path)
        try:
            stat = path.stat()
        except OSError as err:
            raise CorruptFileError(path, "label map file not found") from err
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        label_map = load_label_map(path)
        self._cache[key] = label_map
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return label_map

    def cache_clear(self) -> None:
        self._cache.clear()

    def labels(self, volume: CTVolume | None = None, volume_id: str | None = None) -> dict[int, str]:
        """The id → name table used for this volume's file."""
        return self._table(self.load(self.path_for(volume, volume_id)))

    def _table(self, label_map: LabelMap) -> dict[int, str]:
        return self.label_map or label_map.header_table or TOTALSEGMENTATOR_V2_LABELS

    def get_mask(self, volume: CTVolume, structure: str, *, volume_id: str | None = None) -> MaskResult:
        """The mask of ``structure`` from the volume's label map (read once, then cached).

        Raises:
            UnknownStructureError: the name is neither in the label table nor translatable to names in it.
            CorruptFileError: missing or unreadable file. MaskMismatchError: the file's grid differs from the volume's.
        """
        path = self.path_for(volume, volume_id)
        label_map = self.load(path)
        label_map.check_grid(volume)
        table = self._table(label_map)
        ids_by_name: dict[str, int] = {}
        for label, name in sorted(table.items()):
            ids_by_name.setdefault(name, label)  # first id of a name, as load_mask does

        names = [structure] if structure in ids_by_name else []
        if not names and self.naming:
            parts = self.vocabulary.components(structure, self.naming)
            if parts and all(part in ids_by_name for part in parts):
                names = parts
        if not names:
            raise UnknownStructureError(
                structure,
                f"{self.source_name} ({path})",
                close_matches(structure, ids_by_name),
                detail="not in the file's label table",
            )
        ids = [ids_by_name[name] for name in names]
        array = label_map.array
        mask = array == ids[0] if len(ids) == 1 else np.isin(array, ids)
        return MaskResult(
            mask=mask,
            structure=structure,
            resolved_name="+".join(names),
            source=self.source_name,
            path=str(path),
            components=tuple(names) if len(names) > 1 else (),
        )
