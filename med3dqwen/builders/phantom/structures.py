"""The phantom's structures: mask keys (TotalSegmentator v2 names) → RadGenome-ChestCT anatomy paths and names."""

from __future__ import annotations

from med3dqwen.anatomy.labels import RADGENOME_ANATOMY_PATHS


_LOBES = (
    "lung_upper_lobe_right",
    "lung_middle_lobe_right",
    "lung_lower_lobe_right",
    "lung_upper_lobe_left",
    "lung_lower_lobe_left",
)
# The vertebrae a 320 mm chest field of view can show, top down.
_VERTEBRAE = (
    "vertebrae_C5",
    "vertebrae_C6",
    "vertebrae_C7",
    *(f"vertebrae_T{i}" for i in range(1, 13)),
    *(f"vertebrae_L{i}" for i in range(1, 4)),
)
_RIBS = tuple(f"rib_{side}_{k}" for side in ("left", "right") for k in range(1, 13))
_STRUCTURES = (
    "lung_right",
    "lung_left",
    *_LOBES,
    "heart",
    "aorta",
    "trachea",
    "esophagus",
    "liver",
    "spleen",
    "stomach",
    "vertebrae",
    "ribs",
    "sternum",
    *_VERTEBRAE,
    *_RIBS,
)
# Paths come from the one RadGenome table in med3dqwen.anatomy; the order here is the phantom's structure order.
ANATOMY_PATHS: dict[str, str] = {"body": "whole scan", **{name: RADGENOME_ANATOMY_PATHS[name] for name in _STRUCTURES}}
# The human name of a structure is the leaf of its path ("right lung upper lobe", "liver", ...).
ANATOMY_NAMES: dict[str, str] = {
    name: ("body" if path == "whole scan" else path.rsplit("/", 1)[-1]) for name, path in ANATOMY_PATHS.items()
}

# Structures a finding can be placed in, and the structure a lobe belongs to.
_SOLID_HOSTS = (*_LOBES, "liver")
_EFFUSION_HOSTS = ("lung_right", "lung_left")
_PARENT = {lobe: "lung_right" if lobe.endswith("right") else "lung_left" for lobe in _LOBES}
