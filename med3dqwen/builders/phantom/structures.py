"""The phantom's structures: mask keys (TotalSegmentator v2 names) → RadGenome-ChestCT anatomy paths and names."""

from __future__ import annotations


_LOBES = (
    "lung_upper_lobe_right",
    "lung_middle_lobe_right",
    "lung_lower_lobe_right",
    "lung_upper_lobe_left",
    "lung_lower_lobe_left",
)
# (TotalSegmentator name, RadGenome leaf) of the vertebrae a 320 mm chest field of view can show, top down.
_VERTEBRAE = (
    [("vertebrae_C5", "cervical vertebrae 5 (c5)"), ("vertebrae_C6", "cervical vertebrae 6 (c6)")]
    + [("vertebrae_C7", "cervical vertebrae 7 (c7)")]
    + [(f"vertebrae_T{i}", f"thoracic vertebrae {i} (t{i})") for i in range(1, 13)]
    + [(f"vertebrae_L{i}", f"lumbar vertebrae {i} (l{i})") for i in range(1, 4)]
)
_VERTEBRA_GROUP = {"C": "cervical vertebrae", "T": "thoracic vertebrae", "L": "lumbar vertebrae"}

ANATOMY_PATHS: dict[str, str] = {
    "body": "whole scan",
    "lung_right": "lung/lung/right lung",
    "lung_left": "lung/lung/left lung",
    "lung_upper_lobe_right": "lung/lung/right lung/right lung upper lobe",
    "lung_middle_lobe_right": "lung/lung/right lung/right lung middle lobe",
    "lung_lower_lobe_right": "lung/lung/right lung/right lung lower lobe",
    "lung_upper_lobe_left": "lung/lung/left lung/left lung upper lobe",
    "lung_lower_lobe_left": "lung/lung/left lung/left lung lower lobe",
    "heart": "heart/heart",
    "aorta": "mediastinum/aorta",
    "trachea": "trachea and bronchie/trachea",
    "esophagus": "esophagus/esophagus",
    "liver": "abdomen/abdomen/liver",
    "spleen": "abdomen/abdomen/spleen",
    "stomach": "abdomen/abdomen/stomach",
    "vertebrae": "bone/bone/vertebrae",
    "ribs": "bone/bone/rib",
    "sternum": "bone/bone/sternum",
    **{name: f"bone/bone/vertebrae/{_VERTEBRA_GROUP[name[10]]}/{leaf}" for name, leaf in _VERTEBRAE},
    **{
        f"rib_{side}_{k}": f"bone/bone/rib/{side} rib/{side} rib {k}"
        for side in ("left", "right")
        for k in range(1, 13)
    },
}
# The human name of a structure is the leaf of its path ("right lung upper lobe", "liver", ...).
ANATOMY_NAMES: dict[str, str] = {
    name: ("body" if path == "whole scan" else path.rsplit("/", 1)[-1]) for name, path in ANATOMY_PATHS.items()
}

# Structures a finding can be placed in, and the structure a lobe belongs to.
_SOLID_HOSTS = (*_LOBES, "liver")
_EFFUSION_HOSTS = ("lung_right", "lung_left")
_PARENT = {lobe: "lung_right" if lobe.endswith("right") else "lung_left" for lobe in _LOBES}
