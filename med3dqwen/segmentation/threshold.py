"""Weight-free masks from Hounsfield thresholds: body, lungs (left/right), airway, bone.

Good enough for the phantom and demos, not a segmentation model; vectorised ``scipy.ndimage`` steps restricted to the
body's bounding box. Each structure's rule and the known limits: ``docs/segmentation.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from med3dqwen.anatomy.vocabulary import Vocabulary, default_vocabulary
from med3dqwen.processing.ct_io import CTVolume

from .base import MaskResult, MaskSource, UnknownStructureError, close_matches


__all__ = ["THRESHOLD_STRUCTURES", "HUThresholdSource"]

# In-slice 8-connectivity, nothing across slices: labels every axial slice's components in one call.
_IN_SLICE = np.zeros((3, 3, 3), dtype=bool)
_IN_SLICE[1] = True
THRESHOLD_STRUCTURES = ("body", "lung", "lung_left", "lung_right", "airway", "bone")
"""The structures :class:`HUThresholdSource` computes (the names it serves; ``trachea`` maps to ``airway``)."""
# Canonical keys served by another structure's mask.
_SERVED_AS = {"trachea": "airway"}  # the trachea is the airway's upper part; the result's resolved_name says so


class HUThresholdSource(MaskSource):
    """Body, lung, airway and bone masks from HU thresholds (no weights, CPU, deterministic).

    Args:
        body_hu: body = HU above this (-500 separates soft tissue and fat from air and lung).
        air_hu: air and lung = HU below this inside the body (-400).
        bone_hu: bone = HU above this inside the body (250).
        gas_hu: air components whose median HU is below this are gas (bowel, stomach, airway lumen), not lung.
        lung_max_hu: air components whose median HU is above this are partial-volume air, not lung.
        min_lung_fraction: lung components smaller than this fraction of the largest one are dropped.
        airway_hu: the airway tube's median HU must be below this (air, not partial-volume edges).
        airway_max_area_mm2: largest axial cross-section of the trachea / main bronchi (600 mm², a 28 mm tube).
        airway_top_mm: the airway tube must reach within this distance of the body's superior end.
        midline_fraction: the airway must lie within this fraction of the body width from the midline.
        vocabulary: resolves names such as ``"left lung"`` or ``"Windpipe"`` (default: the shared one).
    """

    source_name = "hu_threshold"

    def __init__(
        self,
        body_hu: float = -500.0,
        air_hu: float = -400.0,
        bone_hu: float = 250.0,
        gas_hu: float = -960.0,
        lung_max_hu: float = -600.0,
        min_lung_fraction: float = 0.1,
        airway_hu: float = -900.0,
        airway_max_area_mm2: float = 600.0,
        airway_top_mm: float = 20.0,
        midline_fraction: float = 0.15,
        vocabulary: Vocabulary | None = None,
    ) -> None:
        self.body_hu = float(body_hu)
        self.air_hu = float(air_hu)
        self.bone_hu = float(bone_hu)
        self.gas_hu = float(gas_hu)
        self.lung_max_hu = float(lung_max_hu)
        self.min_lung_fraction = float(min_lung_fraction)
        self.airway_hu = float(airway_hu)
        self.airway_max_area_mm2 = float(airway_max_area_mm2)
        self.airway_top_mm = float(airway_top_mm)
        self.midline_fraction = float(midline_fraction)
        self.vocabulary = vocabulary or default_vocabulary()

    # -- public API ------------------------------------------------------------------------------------------------

    def resolve_name(self, structure: str) -> str:
        """The structure this source serves for a name (``"left lung"`` → ``lung_left``, ``"trachea"`` → ``airway``).

        Raises:
            UnknownStructureError: a name this source has no rule for.
        """
        key = structure if structure in THRESHOLD_STRUCTURES else self.vocabulary.canonical(structure)
        key = _SERVED_AS.get(key, key)
        if key not in THRESHOLD_STRUCTURES:
            raise UnknownStructureError(
                structure,
                self.source_name,
                close_matches(structure, THRESHOLD_STRUCTURES + tuple(_SERVED_AS)),
                detail=f"HU thresholds give only {list(THRESHOLD_STRUCTURES)}",
            )
        return key

    def get_mask(self, volume: CTVolume, structure: str, *, volume_id: str | None = None) -> MaskResult:
        """The thresholded mask of ``structure`` (``volume_id`` is ignored)."""
        return self.get_masks(volume, [structure])[structure]

    def get_masks(
        self, volume: CTVolume, structures: Sequence[str], *, volume_id: str | None = None
    ) -> dict[str, MaskResult]:
        """Several structures of one volume, sharing the body / airway / lung steps."""
        keys = {name: self.resolve_name(name) for name in structures}
        masks = self.segment(volume, set(keys.values()))
        return {
            name: MaskResult(mask=masks[key], structure=name, resolved_name=key, source=self.source_name)
            for name, key in keys.items()
        }

    def segment(self, volume: CTVolume, structures: set[str] | None = None) -> dict[str, np.ndarray]:
        """Compute masks.

        Args:
            volume: a CT volume in HU, (D, H, W) canonical orientation.
            structures: which of ``body, lung, lung_left, lung_right, airway, bone`` to return (default: all).

        Returns:
            Name → (D, H, W) bool mask on ``volume``'s grid.

        Raises:
            ValueError: a name outside that list (use :meth:`resolve_name` for other spellings).
        """
        wanted = set(THRESHOLD_STRUCTURES) if structures is None else set(structures)
        if not wanted <= set(THRESHOLD_STRUCTURES):
            unknown = sorted(wanted - set(THRESHOLD_STRUCTURES))
            raise ValueError(f"segment() computes {list(THRESHOLD_STRUCTURES)}, not {unknown}")
        hu = volume.to_hu().array
        spacing = volume.spacing
        out: dict[str, np.ndarray] = {}
        body = self._body(hu)
        box = _bounding_box(body)
        if box is None:  # nothing above body_hu: every mask is empty
            return {name: np.zeros(hu.shape, dtype=bool) for name in wanted}
        hu_box, body_box = hu[box], body[box]

        def full(mask_box: np.ndarray) -> np.ndarray:
            mask = np.zeros(hu.shape, dtype=bool)
            mask[box] = mask_box
            return mask

        if "body" in wanted:
            out["body"] = body
        if "bone" in wanted:
            out["bone"] = full(body_box & (hu_box > self.bone_hu))
        if wanted & {"airway", "lung", "lung_left", "lung_right"}:
            air = body_box & (hu_box < self.air_hu)
            airway = self._airway(air, hu_box, body_box, spacing)
            if "airway" in wanted:
                out["airway"] = full(airway)
            if wanted & {"lung", "lung_left", "lung_right"}:
                right, left = self._lungs(air & ~airway, hu_box, body_box)
                if "lung_right" in wanted:
                    out["lung_right"] = full(right)
                if "lung_left" in wanted:
                    out["lung_left"] = full(left)
                if "lung" in wanted:
                    out["lung"] = full(right | left)
        return out

    # -- steps -----------------------------------------------------------------------------------------------------

    def _body(self, hu: np.ndarray) -> np.ndarray:
        """Largest 3D component above ``body_hu``, holes filled per axial slice."""
        return _fill_holes_per_slice(_largest_component(hu > self.body_hu))

    def _airway(
        self, air: np.ndarray, hu: np.ndarray, body: np.ndarray, spacing: tuple[float, float, float]
    ) -> np.ndarray:
        """Trachea + main bronchi: tubes of small air cross-sections reaching the top of the body near its midline."""
        labels, n = ndimage.label(air, structure=_IN_SLICE)  # every slice's air components, one label each
        if n == 0:
            return np.zeros_like(air)
        area_mm2 = np.bincount(labels.ravel(), minlength=n + 1) * spacing[1] * spacing[2]
        small = area_mm2 <= self.airway_max_area_mm2
        small[0] = False
        tubes, n_tubes = ndimage.label(small[labels])  # 6-connected across slices
        if n_tubes == 0:
            return np.zeros_like(air)
        index = np.arange(1, n_tubes + 1)
        d, _, w = np.indices(air.shape, sparse=True)
        top = np.asarray(ndimage.maximum(np.broadcast_to(d, air.shape), tubes, index))
        centre_w = np.asarray(ndimage.mean(np.broadcast_to(w, air.shape), tubes, index))

        body_slices = np.flatnonzero(body.any(axis=(1, 2)))
        body_top = body_slices[-1]
        columns = np.flatnonzero(body.any(axis=(0, 1)))
        mid_w, width = (columns[0] + columns[-1]) / 2, columns[-1] - columns[0] + 1
        reaches_top = top >= body_top - self.airway_top_mm / spacing[0]
        central = np.abs(centre_w - mid_w) <= self.midline_fraction * width
        candidates = index[reaches_top & central]
        keep = np.zeros(n_tubes + 1, dtype=bool)
        if candidates.size:
            # Median below airway_hu <=> more than half of the tube's voxels are below it (no sorting needed).
            keep[candidates[_fraction_below(tubes, n_tubes, hu, self.airway_hu)[candidates] > 0.5]] = True
        return keep[tubes]

    def _lungs(self, air: np.ndarray, hu: np.ndarray, body: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(right, left) lungs from the air inside the body (airway removed)."""
        labels, n = ndimage.label(air)
        if n == 0:
            return np.zeros_like(air), np.zeros_like(air)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        # Median HU within (gas_hu, lung_max_hu], as fractions of voxels (a median by counting, not sorting).
        lung_like = (_fraction_below(labels, n, hu, self.gas_hu)[1:] < 0.5) & (
            _fraction_below(labels, n, hu, self.lung_max_hu, inclusive=True)[1:] >= 0.5
        )
        if not lung_like.any():
            return np.zeros_like(air), np.zeros_like(air)
        lung_like &= sizes >= self.min_lung_fraction * sizes[lung_like].max()
        # Per-slice midline of the body (its column centroid), broadcast over the slice.
        w_size = air.shape[2]
        w = np.arange(w_size)
        counts = body.sum(axis=1)  # (D, W)
        totals = counts.sum(axis=1)
        midline = np.where(totals > 0, (counts * w).sum(axis=1) / np.maximum(totals, 1), (w_size - 1) / 2)
        right_side = w[None, None, :] < midline[:, None, None]  # patient right = small w
        right_side = np.broadcast_to(right_side, air.shape)

        on_right = np.bincount(labels[right_side], minlength=n + 1)[1:]
        fraction_right = on_right / np.maximum(sizes, 1)
        # 0: not lung, 1: right, 2: left, 3: straddles the midline (cut there).
        side = np.where(fraction_right >= 0.5, 1, 2)
        straddles = (np.minimum(fraction_right, 1 - fraction_right) * sizes) >= 0.1 * sizes
        side = np.where(straddles, 3, side)
        side = np.where(lung_like, side, 0)
        lut = np.concatenate([[0], side])
        assigned = lut[labels]
        right = (assigned == 1) | ((assigned == 3) & right_side)
        left = (assigned == 2) | ((assigned == 3) & ~right_side)
        return _fill_holes_per_slice(right), _fill_holes_per_slice(left)


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def _fraction_below(
    labels: np.ndarray, n: int, values: np.ndarray, threshold: float, inclusive: bool = False
) -> np.ndarray:
    """(n + 1,) fraction of each label's voxels with value below (or at) ``threshold``; entry 0 is the background."""
    inside = labels > 0
    lab = labels[inside]
    below = values[inside] <= threshold if inclusive else values[inside] < threshold
    counts = np.bincount(lab, minlength=n + 1)
    return np.bincount(lab, weights=below, minlength=n + 1) / np.maximum(counts, 1)


def _fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of every axial slice: background components (4-connected in the slice) that do not touch the
    slice border. One labelling call for the whole volume instead of one fill per slice."""
    if not mask.any():
        return mask
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    labels, n = ndimage.label(~mask, structure=in_plane)
    if n == 0:
        return mask
    border = np.zeros(n + 1, dtype=bool)
    for edge in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        border[np.unique(edge)] = True
    border[0] = True  # label 0 is the mask itself
    return mask | ~border[labels]


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    if not mask.any():
        return None
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)
