"""Per-structure binary mask files: RadGenome-ChestCT ``seg_<volume>/<leaf>.nii.gz`` and TotalSegmentator folders.

RadGenome-ChestCT ships one binary NIfTI per structure, named by the leaf of the ``Anatomy`` path, in one folder per
volume (``train_anatomy_mask/seg_train_362_a_1/right lung upper lobe.nii.gz``), and ten region masks in a second tree
(``train_region_mask/seg_train_362_a_1/lung.nii.gz``). The official baseline links a question's ``Anatomy`` path to a
mask like this (``src/dataset/dataset_grounded_attn.py``), and :meth:`PerStructureFileSource.resolve` does the same:

1. head or leaf is ``others`` / ``whole scan`` → the whole volume (an all-ones mask; no contour can be drawn);
2. the leaf's file in the anatomy tree, if it exists;
3. else (or when the leaf's file is empty) the head's file in the region tree (flagged ``fallback="region"``).

Unlike the baseline, a path whose leaf and region files are both missing is an error naming both files (the baseline
silently used the whole volume). TotalSegmentator's per-class output (``TotalSegmentator -i ct.nii.gz -o seg/``, also
with ``--fast``) is the same one-file-per-structure layout with ``<class>.nii.gz`` names; with ``naming=...`` a name
the folder lacks is translated by the vocabulary (``"right lung upper lobe"`` → ``lung_upper_lobe_right.nii.gz``) or
built as the union of its parts (``lung_left`` → its two lobe files).
"""

from __future__ import annotations

import os
import re
import string
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

from med3dqwen.anatomy.labels import RADGENOME_NO_CONTOUR
from med3dqwen.anatomy.vocabulary import Vocabulary, default_vocabulary
from med3dqwen.io import UnsafePathError, check_path_component
from med3dqwen.processing.ct_io import CorruptFileError, CTVolume, load_mask

from .base import MaskResult, MaskSource, UnknownStructureError, close_matches


__all__ = [
    "FLAT_LAYOUT",
    "FOLDER_LAYOUT",
    "LAYOUTS",
    "MaskFileNotFoundError",
    "PerStructureFileSource",
    "RADGENOME_LAYOUT",
    "Resolution",
    "parse_anatomy_path",
    "strip_image_suffix",
    "volume_id_from_path",
]

RADGENOME_LAYOUT = "seg_{volume_id}/{name}.nii.gz"
FOLDER_LAYOUT = "{volume_id}/{name}.nii.gz"
FLAT_LAYOUT = "{name}.nii.gz"  # one folder for one volume, e.g. a TotalSegmentator output folder
LAYOUTS = {"radgenome": RADGENOME_LAYOUT, "folder": FOLDER_LAYOUT, "flat": FLAT_LAYOUT}

_NIFTI_SUFFIXES = (".nii.gz", ".nii")


def volume_id_from_path(path: str | os.PathLike) -> str:
    """Volume id of a CT file: its name without ``.nii.gz`` / ``.nii`` / ``.npy`` (``train_362_a_1.nii.gz`` →
    ``train_362_a_1``, the RadGenome mask folder being ``seg_train_362_a_1``); a DICOM folder gives its name."""
    return strip_image_suffix(Path(path).name)


def strip_image_suffix(name: str) -> str:
    """``name`` without a trailing ``.nii.gz`` / ``.nii`` / ``.npy`` (case-insensitive)."""
    for suffix in (*_NIFTI_SUFFIXES, ".npy"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def parse_anatomy_path(anatomy_path: str) -> list[str]:
    """Split a RadGenome ``Anatomy`` path into its stripped levels (``"lung/lung/right lung"`` → 3 levels).

    Raises:
        UnsafePathError: empty path, absolute path (leading ``/``) or an empty level (``"lung//x"``).
    """
    if not isinstance(anatomy_path, str) or not anatomy_path.strip():
        raise UnsafePathError(f"empty anatomy path {anatomy_path!r} (use 'whole scan' for the whole volume)")
    if anatomy_path.lstrip().startswith(("/", "\\")):
        raise UnsafePathError(f"anatomy path {anatomy_path!r} is absolute; expected 'head/.../leaf'")
    levels = [level.strip() for level in anatomy_path.split("/")]
    if not all(levels):
        raise UnsafePathError(f"anatomy path {anatomy_path!r} has an empty level")
    return levels


class MaskFileNotFoundError(CorruptFileError):
    """Neither a structure's own file nor its region's file exists; the message names every file tried."""


class Resolution(NamedTuple):
    """Where a structure's mask is: ``files, fallback = source.resolve(path)``.

    Attributes:
        files: the mask files to unite (one for a plain file; several for a union of parts; none for the whole
            volume).
        fallback: ``None``, ``"region"`` or ``"whole_volume"`` (see :class:`~.base.MaskResult`).
    """

    files: tuple[Path, ...]
    fallback: str | None

    @property
    def file(self) -> Path | None:
        """The single mask file, or ``None`` (whole volume or a union)."""
        return self.files[0] if len(self.files) == 1 else None

    @property
    def names(self) -> tuple[str, ...]:
        """The structure names of the files (file names without ``.nii.gz``)."""
        return tuple(volume_id_from_path(f) for f in self.files)

    @property
    def whole_volume(self) -> bool:
        return self.fallback == "whole_volume"


class PerStructureFileSource(MaskSource):
    """Masks from one binary NIfTI file per structure (RadGenome-ChestCT, TotalSegmentator per-class output).

    Args:
        root: folder holding the per-volume mask folders (or the masks themselves with ``layout="flat"``).
        layout: where a structure's file is relative to ``root``: a format string with ``{name}`` (and
            ``{volume_id}``), or a preset: ``"folder"`` = ``"{volume_id}/{name}.nii.gz"``, ``"radgenome"`` =
            ``"seg_{volume_id}/{name}.nii.gz"``, ``"flat"`` = ``"{name}.nii.gz"``.
        region_root: folder of the region masks (RadGenome ``*_region_mask``) used when a leaf file is missing; by
            default the head is looked up in ``root`` itself.
        region_layout: layout of the region tree (default: ``layout``).
        naming: ``"radgenome"`` or ``"totalsegmentator"``: the naming of the files; names the folder lacks are
            translated with the vocabulary (or united from their parts). ``None`` uses names as given.
        vocabulary: the :class:`~.vocabulary.Vocabulary` for ``naming`` (default: the shared one).
        source_name: ``MaskResult.source`` of the results (``"dataset"``; ``"totalsegmentator"`` for TS output).

    Raises:
        ValueError: a layout without ``{name}`` or with fields other than ``name`` and ``volume_id``; unknown naming.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        layout: str = FOLDER_LAYOUT,
        region_root: str | os.PathLike | None = None,
        region_layout: str | None = None,
        *,
        naming: Literal["radgenome", "totalsegmentator"] | None = None,
        vocabulary: Vocabulary | None = None,
        source_name: str = "dataset",
    ) -> None:
        self.root = Path(root)
        self.layout = _check_layout(LAYOUTS.get(layout, layout))
        self.region_root = Path(region_root) if region_root is not None else None
        self.region_layout = _check_layout(LAYOUTS.get(region_layout, region_layout)) if region_layout else None
        if naming not in (None, "radgenome", "totalsegmentator"):
            raise ValueError(f"naming must be None, 'radgenome' or 'totalsegmentator', got {naming!r}")
        self.naming = naming
        self.vocabulary = vocabulary or default_vocabulary()
        self.source_name = source_name

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, layout={self.layout!r}, "
            f"region_root={None if self.region_root is None else str(self.region_root)!r}, naming={self.naming!r})"
        )

    # -- paths -----------------------------------------------------------------------------------------------------

    @property
    def needs_volume_id(self) -> bool:
        return "volume_id" in _fields(self.layout) or "volume_id" in _fields(self.region_layout or "")

    def volume_id_for(self, volume: CTVolume | None, volume_id: str | None) -> str | None:
        """The volume id to use: ``volume_id`` without a NIfTI suffix, else derived from ``volume.path``."""
        if volume_id is None and volume is not None and volume.path and self.needs_volume_id:
            volume_id = volume_id_from_path(volume.path)
        if volume_id is None:
            if self.needs_volume_id:
                raise ValueError(f"layout {self.layout!r} needs a volume_id (the volume has no path to derive it)")
            return None
        return check_path_component(strip_image_suffix(str(volume_id)), "volume id")

    def file_for(self, name: str, volume_id: str | None = None, *, region: bool = False) -> Path:
        """The file that would hold ``name`` (a RadGenome leaf / region or a class name); not checked for existence.

        Raises:
            UnsafePathError: ``name`` or ``volume_id`` is not a single safe file name.
        """
        check_path_component(name, "structure name")
        root = (self.region_root or self.root) if region else self.root
        layout = (self.region_layout or self.layout) if region else self.layout
        fields = {"name": name}
        if "volume_id" in _fields(layout):
            if volume_id is None:
                raise ValueError(f"layout {layout!r} needs a volume_id")
            fields["volume_id"] = check_path_component(volume_id, "volume id")
        path = root / layout.format(**fields)
        # Names are single components already; refuse anything the layout itself would move out of the root.
        if os.path.commonpath([os.path.normpath(root), os.path.normpath(path)]) != os.path.normpath(root):
            raise UnsafePathError(f"resolves outside the mask root {root}", path)
        return path

    def available(self, volume_id: str | None = None, *, region: bool = False) -> list[str]:
        """Structure names that have a file for this volume (sorted); ``[]`` if the folder does not exist."""
        root = (self.region_root or self.root) if region else self.root
        layout = (self.region_layout or self.layout) if region else self.layout
        fields = {"name": "\0"}
        if "volume_id" in _fields(layout):
            fields["volume_id"] = check_path_component(volume_id or "", "volume id")
        before, _, after = layout.format(**fields).partition("\0")
        if "/" in after:  # the name is a folder level; listing is not supported
            return []
        folder = (root / before).parent if before and not before.endswith("/") else root / before
        prefix = Path(before).name if before and not before.endswith("/") else ""
        if not folder.is_dir():
            return []
        names = []
        for entry in folder.iterdir():
            if entry.name.startswith(prefix) and entry.name.endswith(after) and len(entry.name) > len(prefix + after):
                names.append(entry.name[len(prefix) : len(entry.name) - len(after)])
        return sorted(names)

    # -- resolution ------------------------------------------------------------------------------------------------

    def resolve(self, anatomy_path: str, volume_id: str | None = None) -> Resolution:
        """Apply the RadGenome linking rule to a name or ``Anatomy`` path without loading anything.

        Args:
            anatomy_path: ``"lung/lung/right lung/right lung upper lobe"``, or a bare name (``"liver"``, ``"lung"``:
                a one-level path, looked up as a leaf and then as a region).
            volume_id: the volume (``"train_362_a_1"``; a ``.nii.gz`` suffix is removed).

        Returns:
            ``Resolution(files, fallback)``: ``((leaf file,), None)``, ``((region file,), "region")`` or
            ``((), "whole_volume")``; a union of part files when ``naming`` builds the structure from parts.

        Raises:
            UnsafePathError: a level that would escape the mask folder, an absolute or malformed path.
            UnknownStructureError: a bare name with no file in an existing volume folder.
            MaskFileNotFoundError: neither the leaf nor the region file exists (the message names both).
        """
        levels = parse_anatomy_path(anatomy_path)
        leaf, head = levels[-1], levels[0]
        if leaf.lower() in RADGENOME_NO_CONTOUR or head.lower() in RADGENOME_NO_CONTOUR:
            return Resolution((), "whole_volume")
        for level in levels:
            check_path_component(level, "anatomy level")
        volume_id = self.volume_id_for(None, volume_id)

        found = self._locate(leaf, volume_id, region=False)
        if found:
            return Resolution(found, None)
        found = self._locate(head, volume_id, region=True)
        if found:
            return Resolution(found, "region")

        leaf_file = self.file_for(leaf, volume_id)
        region_file = self.file_for(head, volume_id, region=True)
        tried = [str(leaf_file)] + ([str(region_file)] if region_file != leaf_file else [])
        if len(levels) == 1 and leaf_file.parent.is_dir():
            names = self.available(volume_id) + (self.available(volume_id, region=True) if self.region_root else [])
            raise UnknownStructureError(
                anatomy_path,
                f"{self.source_name} ({leaf_file.parent})",
                close_matches(leaf, names),
                detail=f"no file {leaf_file.name!r}",
            )
        raise MaskFileNotFoundError(
            leaf_file,
            f"mask file not found for {anatomy_path!r} (tried {tried}"
            + ("; no region fallback" if len(tried) == 1 and not self.region_root else "")
            + ")",
        )

    def _locate(self, name: str, volume_id: str | None, *, region: bool) -> tuple[Path, ...]:
        """Files for ``name``: its own file, else (with ``naming``) its source name's file or all of its parts."""
        path = self.file_for(name, volume_id, region=region)
        if path.is_file():
            return (path,)
        if self.naming is None:
            return ()
        parts = self.vocabulary.components(name, self.naming)
        if not parts or parts == [name]:
            return ()
        try:
            paths = tuple(self.file_for(part, volume_id, region=region) for part in parts)
        except UnsafePathError:
            return ()
        return paths if all(p.is_file() for p in paths) else ()

    # -- masks -----------------------------------------------------------------------------------------------------

    def get_mask(self, volume: CTVolume, structure: str, *, volume_id: str | None = None) -> MaskResult:
        """Load the mask of ``structure`` (a name or RadGenome ``Anatomy`` path) on ``volume``'s grid.

        The grid is checked file by file (:func:`~med3dqwen.processing.ct_io.load_mask` with ``like=volume``); a
        union of parts is the OR of the part files. See :meth:`resolve` for the linking rule and errors. A leaf file
        that exists but is empty is treated like a missing one: the head's region file is used when there is one
        (``fallback="region"``, ``fallback_reason="empty"``), else the empty result is returned. A leaf file that
        cannot be read or lies on another grid is an error, never a silent switch to the region.

        Raises:
            MaskFileNotFoundError: neither the leaf nor the region file exists.
            CorruptFileError: a mask file cannot be read.
            MaskMismatchError: a mask file's shape or affine differs from ``volume``'s.
        """
        volume_id = self.volume_id_for(volume, volume_id)
        resolution = self.resolve(structure, volume_id)
        if resolution.whole_volume:
            return MaskResult(
                mask=np.ones(volume.shape, dtype=bool),
                structure=structure,
                resolved_name="whole scan",
                source=self.source_name,
                fallback="whole_volume",
                whole_volume=True,
            )
        result = self._load(volume, structure, resolution, "missing" if resolution.fallback == "region" else None)
        if result.empty and resolution.fallback is None:
            # An empty leaf is treated like a missing one: SAT found no such structure in this scan.
            head = parse_anatomy_path(structure)[0]
            region = self._locate(head, volume_id, region=True)
            if region and region != resolution.files:
                return self._load(volume, structure, Resolution(region, "region"), "empty")
        return result

    def _load(
        self, volume: CTVolume, structure: str, resolution: Resolution, fallback_reason: str | None
    ) -> MaskResult:
        mask = load_mask(resolution.files[0], like=volume)
        for path in resolution.files[1:]:
            mask |= load_mask(path, like=volume)
        single = len(resolution.files) == 1
        return MaskResult(
            mask=mask,
            structure=structure,
            resolved_name="+".join(resolution.names),
            source=self.source_name,
            path=str(resolution.files[0]) if single else None,
            fallback=resolution.fallback,
            fallback_reason=fallback_reason,
            components=() if single else resolution.names,
        )


def _fields(layout: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(layout) if field is not None}


def _check_layout(layout: str) -> str:
    fields = _fields(layout)
    if "name" not in fields or not fields <= {"name", "volume_id"}:
        raise ValueError(
            f"layout {layout!r} must contain {{name}} and only {{name}} / {{volume_id}}, "
            f"or be one of {sorted(LAYOUTS)}"
        )
    if layout.startswith(("/", "\\")) or re.search(r"(^|[/\\])\.\.([/\\]|$)", layout):
        raise ValueError(f"layout {layout!r} must be a relative path inside the root without '..'")
    return layout
