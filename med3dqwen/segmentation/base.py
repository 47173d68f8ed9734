"""The mask-source interface: ``MaskSource.get_mask(volume, structure) -> MaskResult``, and its errors.

A mask source turns a structure name (a TotalSegmentator / VISTA-3D / RadGenome / RadLex name, or a RadGenome
``Anatomy`` path) into a (D, H, W) bool mask on the voxel grid of a :class:`~med3dqwen.processing.ct_io.CTVolume`.
Sources differ in where the mask comes from (dataset files, a multilabel map, a network, HU thresholds); callers see
one result type. An empty mask is a result (``empty=True``), not an error: the contour step flags the sample.
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from med3dqwen.processing.ct_io import CTInputError, CTVolume


__all__ = [
    "MaskResult",
    "MaskSource",
    "UnknownStructureError",
    "close_matches",
]


class UnknownStructureError(CTInputError, KeyError):
    """A structure the source cannot provide; the message names the structure, the source and close matches.

    Args:
        structure: the name as asked.
        source: the source's name (``"vista3d"``, ``"totalsegmentator"``, ...) or the file it looked in.
        matches: close matches among the names the source knows (shown as "did you mean ...").
        detail: an extra sentence (why the name cannot be served).
    """

    __str__ = ValueError.__str__  # KeyError would quote the whole message

    def __init__(self, structure: str, source: str, matches: Sequence[str] = (), detail: str = ""):
        self.structure = structure
        self.matches = tuple(matches)
        self.detail = detail
        problem = f"unknown structure {structure!r}"
        if detail:
            problem += f" ({detail})"
        if self.matches:
            problem += f"; did you mean {list(self.matches)}?"
        super().__init__(source, problem)

    def __reduce__(self):
        return type(self), (self.structure, self.source, self.matches, self.detail)


def close_matches(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` candidates that look like ``name`` (case and ``_``/space insensitive), best first."""
    by_key: dict[str, str] = {}
    for candidate in candidates:
        by_key.setdefault(candidate.lower().replace("_", " "), candidate)
    keys = difflib.get_close_matches(name.lower().replace("_", " "), list(by_key), n=n, cutoff=0.6)
    return [by_key[key] for key in keys]


@dataclass
class MaskResult:
    """One structure's mask on a volume's grid, with where it came from.

    Args:
        mask: (D, H, W) bool on the volume's voxel grid.
        structure: the name as asked (a label name or a RadGenome ``Anatomy`` path).
        resolved_name: the name the source used: a file stem, a label name, a VISTA-3D class, or several joined
            with ``+`` for a union of parts.
        source: ``"dataset"``, ``"totalsegmentator"``, ``"vista3d"``, ``"hu_threshold"``, ...
        path: the file the mask was read from (``None`` for computed masks and unions; see ``components``).
        fallback: ``None`` when the structure itself was found (possibly under the source's own name for it, see
            ``resolved_name``); ``"region"`` when a RadGenome leaf file was missing and its head region was used;
            ``"whole_volume"`` for ``others`` / ``whole scan`` (all-ones mask, no contour).
        fallback_reason: why the structure's own file was not used when ``fallback="region"``: ``"missing"`` or
            ``"empty"``; ``None`` otherwise.
        components: the source names whose union gave the mask (empty for a single name).
        whole_volume: the mask is the whole volume by rule (no contour can be drawn).

    Attributes:
        empty: no voxel is set (computed).
    """

    mask: np.ndarray = field(repr=False)
    structure: str
    resolved_name: str
    source: str
    path: str | None = None
    fallback: str | None = None
    fallback_reason: str | None = None
    components: tuple[str, ...] = ()
    whole_volume: bool = False
    empty: bool = field(init=False)

    def __post_init__(self):
        mask = np.asarray(self.mask)
        if mask.ndim != 3:
            raise ValueError(f"mask of {self.structure!r} must be (D, H, W), got shape {mask.shape}")
        self.mask = mask if mask.dtype == bool else mask != 0
        self.components = tuple(self.components)
        self.empty = not bool(self.mask.any())

    @property
    def has_contour(self) -> bool:
        """Whether a boundary prompt can be drawn: a non-empty mask that is not the whole volume by rule."""
        return not self.empty and not self.whole_volume


class MaskSource(ABC):
    """Where masks come from. Subclasses implement :meth:`get_mask`; :meth:`get_masks` loops over it by default.

    Class attributes:
        source_name: the ``MaskResult.source`` value of this source.
    """

    source_name: str = "mask_source"

    @abstractmethod
    def get_mask(self, volume: CTVolume, structure: str, *, volume_id: str | None = None) -> MaskResult:
        """The mask of ``structure`` on ``volume``'s grid.

        Args:
            volume: the CT volume the mask must align with (its grid is checked where a file is read).
            structure: a structure name (any name the vocabulary knows) or a RadGenome ``Anatomy`` path.
            volume_id: which volume of a dataset (file-based sources); ``None`` derives it from ``volume.path``.

        Returns:
            A :class:`MaskResult`; ``empty=True`` when the structure is absent from this scan.

        Raises:
            UnknownStructureError: the source cannot provide this structure.
            CorruptFileError: a mask file is missing or unreadable (the message names it).
            MaskMismatchError: a mask file lies on a different grid than ``volume``.
        """

    def get_masks(
        self, volume: CTVolume, structures: Sequence[str], *, volume_id: str | None = None
    ) -> dict[str, MaskResult]:
        """:meth:`get_mask` for several structures (sources override it to share work); keyed by the names asked."""
        return {name: self.get_mask(volume, name, volume_id=volume_id) for name in structures}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(source={self.source_name!r})"
