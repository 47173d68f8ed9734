"""Mask sources for boundary prompts: dataset masks, TotalSegmentator label maps, VISTA-3D (MONAI), HU thresholds.

Every source answers ``get_mask(volume, structure, volume_id=None) -> MaskResult`` with a (D, H, W) bool mask on the
volume's grid::

    from med3dqwen.processing.ct_io import load_volume
    from med3dqwen.segmentation import get_mask_source

    volume = load_volume("train_362_a_1.nii.gz")
    source = get_mask_source("radgenome", root="train_anatomy_mask", region_root="train_region_mask")
    result = source.get_mask(volume, "lung/lung/right lung/right lung upper lobe")
    result.mask, result.fallback, result.has_contour

Names are translated between VISTA-3D, TotalSegmentator, RadGenome-ChestCT and RadLex by
:class:`med3dqwen.anatomy.Vocabulary` (canonical keys are TotalSegmentator-style snake_case names).
``Vista3DSource`` needs ``monai`` (the ``seg`` extra) and is imported on first use.
"""

from .base import MaskResult, MaskSource, UnknownStructureError
from .files import (
    FLAT_LAYOUT,
    FOLDER_LAYOUT,
    RADGENOME_LAYOUT,
    MaskFileNotFoundError,
    PerStructureFileSource,
    Resolution,
)
from .multilabel import MultilabelFileSource
from .threshold import HUThresholdSource


__all__ = [
    "FLAT_LAYOUT",
    "FOLDER_LAYOUT",
    "HUThresholdSource",
    "MASK_SOURCE_KINDS",
    "MaskFileNotFoundError",
    "MaskResult",
    "MaskSource",
    "MultilabelFileSource",
    "PerStructureFileSource",
    "RADGENOME_LAYOUT",
    "Resolution",
    "UnknownStructureError",
    "Vista3DSource",
    "get_mask_source",
]

MASK_SOURCE_KINDS = ("files", "radgenome", "totalsegmentator", "multilabel", "vista3d", "hu_threshold")


def __getattr__(name: str):
    # Vista3DSource imports torch/monai only when used.
    if name == "Vista3DSource":
        from .vista3d import Vista3DSource

        return Vista3DSource
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_mask_source(kind: str, **kwargs) -> MaskSource:
    """Build a mask source by name.

    Args:
        kind: one of :data:`MASK_SOURCE_KINDS`:

            - ``"files"``: :class:`PerStructureFileSource` (``root``, ``layout="{volume_id}/{name}.nii.gz"``, ...);
            - ``"radgenome"``: per-structure files in RadGenome-ChestCT's layout (``root`` = the anatomy-mask tree,
              ``region_root`` = the region-mask tree, ``layout="seg_{volume_id}/{name}.nii.gz"``, RadGenome naming);
            - ``"totalsegmentator"``: a TotalSegmentator per-class output folder (``root``; ``layout="flat"`` by
              default, ``"{volume_id}/{name}.nii.gz"`` for one folder per volume), TotalSegmentator naming;
            - ``"multilabel"``: :class:`MultilabelFileSource` (``path_or_pattern``, ``label_map``);
            - ``"vista3d"``: :class:`Vista3DSource` (``bundle_dir``, ``device``, ...);
            - ``"hu_threshold"``: :class:`HUThresholdSource`.
        **kwargs: passed to the source's constructor (presets above can be overridden).

    Raises:
        ValueError: unknown ``kind``.
    """
    if kind == "files":
        return PerStructureFileSource(**kwargs)
    if kind == "radgenome":
        kwargs.setdefault("layout", RADGENOME_LAYOUT)
        kwargs.setdefault("naming", "radgenome")
        return PerStructureFileSource(**kwargs)
    if kind == "totalsegmentator":
        kwargs.setdefault("layout", FLAT_LAYOUT)
        kwargs.setdefault("naming", "totalsegmentator")
        kwargs.setdefault("source_name", "totalsegmentator")
        return PerStructureFileSource(**kwargs)
    if kind == "multilabel":
        return MultilabelFileSource(**kwargs)
    if kind == "vista3d":
        from .vista3d import Vista3DSource

        return Vista3DSource(**kwargs)
    if kind == "hu_threshold":
        return HUThresholdSource(**kwargs)
    raise ValueError(f"unknown mask source kind {kind!r}; expected one of {MASK_SOURCE_KINDS}")
