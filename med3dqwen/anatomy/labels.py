"""Label tables of the mask sources (facts, no code): TotalSegmentator v2's and VISTA-3D's class ids,
RadGenome-ChestCT's mask names.

- :data:`TOTALSEGMENTATOR_V2_LABELS`: TotalSegmentator v2's ``total`` task, ids 1-117 (its ``class_map``).
- :data:`VISTA3D_LABELS`: the global class index of the MONAI VISTA-3D bundle (``vista3d``, model-zoo
  ``models/vista3d/configs/metadata.json`` → ``network_data_format.outputs.pred.channel_def``, bundle 0.5.4-0.6.0;
  the same ids as the bundle's ``docs/labels.json`` = MONAI tutorials ``vista_3d/label_dict.json``). 132 ids; the
  bundle supports 127 of them as class prompts (:data:`VISTA3D_SUPPORTED`); ``2`` kidney, ``20`` lung and ``21`` bone
  are expanded into their parts (:data:`VISTA3D_SUBCLASS`, from the bundle's ``inference.json``).
- :data:`RADGENOME_REGIONS`: the ten region mask files of RadGenome-ChestCT (``*_region_mask/seg_<volume>/``).
- :data:`RADGENOME_SUBSET_LEAVES`: the 139 distinct leaves of the ``Anatomy`` paths of the official 2,000-volume
  train subset (``xiaoman-zhang/RadGenome-ChestCT``, ``src/RadGenome-ChestCT/dataset/radgenome_files/subset_2000``
  VQA CSVs). Anatomy masks are named by these leaves; ``others`` is a head, not a mask.
"""

from __future__ import annotations


__all__ = [
    "TOTALSEGMENTATOR_V2_LABELS",
    "RADGENOME_ANATOMY_PATHS",
    "RADGENOME_NO_CONTOUR",
    "RADGENOME_REGIONS",
    "RADGENOME_SUBSET_LEAVES",
    "VISTA3D_EVERYTHING_LABELS",
    "VISTA3D_LABELS",
    "VISTA3D_SUBCLASS",
    "VISTA3D_SUPPORTED",
]


def _totalsegmentator_v2_names() -> tuple[str, ...]:
    """Class names of TotalSegmentator v2's ``total`` task, in label-id order (ids 1-117)."""
    head = (
        "spleen kidney_right kidney_left gallbladder liver stomach pancreas adrenal_gland_right adrenal_gland_left "
        "lung_upper_lobe_left lung_lower_lobe_left lung_upper_lobe_right lung_middle_lobe_right lung_lower_lobe_right "
        "esophagus trachea thyroid_gland small_bowel duodenum colon urinary_bladder prostate kidney_cyst_left "
        "kidney_cyst_right sacrum"
    ).split()
    vertebrae = ["S1", *(f"L{i}" for i in range(5, 0, -1)), *(f"T{i}" for i in range(12, 0, -1))]
    vertebrae += [f"C{i}" for i in range(7, 0, -1)]
    middle = (
        "heart aorta pulmonary_vein brachiocephalic_trunk subclavian_artery_right subclavian_artery_left "
        "common_carotid_artery_right common_carotid_artery_left brachiocephalic_vein_left brachiocephalic_vein_right "
        "atrial_appendage_left superior_vena_cava inferior_vena_cava portal_vein_and_splenic_vein iliac_artery_left "
        "iliac_artery_right iliac_vena_left iliac_vena_right humerus_left humerus_right scapula_left scapula_right "
        "clavicula_left clavicula_right femur_left femur_right hip_left hip_right spinal_cord gluteus_maximus_left "
        "gluteus_maximus_right gluteus_medius_left gluteus_medius_right gluteus_minimus_left gluteus_minimus_right "
        "autochthon_left autochthon_right iliopsoas_left iliopsoas_right brain skull"
    ).split()
    ribs = [f"rib_{side}_{i}" for side in ("left", "right") for i in range(1, 13)]
    return (*head, *(f"vertebrae_{v}" for v in vertebrae), *middle, *ribs, "sternum", "costal_cartilages")


TOTALSEGMENTATOR_V2_LABELS: dict[int, str] = dict(enumerate(_totalsegmentator_v2_names(), start=1))


def _vista3d_labels() -> dict[int, str]:
    labels = {
        1: "liver",
        2: "kidney",
        3: "spleen",
        4: "pancreas",
        5: "right kidney",
        6: "aorta",
        7: "inferior vena cava",
        8: "right adrenal gland",
        9: "left adrenal gland",
        10: "gallbladder",
        11: "esophagus",
        12: "stomach",
        13: "duodenum",
        14: "left kidney",
        15: "bladder",
        16: "prostate or uterus",
        17: "portal vein and splenic vein",
        18: "rectum",
        19: "small bowel",
        20: "lung",
        21: "bone",
        22: "brain",
        23: "lung tumor",
        24: "pancreatic tumor",
        25: "hepatic vessel",
        26: "hepatic tumor",
        27: "colon cancer primaries",
        28: "left lung upper lobe",
        29: "left lung lower lobe",
        30: "right lung upper lobe",
        31: "right lung middle lobe",
        32: "right lung lower lobe",
    }
    # 33-56: vertebrae L5, L4, ..., L1, T12, ..., T1, C7, ..., C1 (caudal to cranial).
    levels = [f"L{i}" for i in range(5, 0, -1)] + [f"T{i}" for i in range(12, 0, -1)]
    levels += [f"C{i}" for i in range(7, 0, -1)]
    labels.update({33 + i: f"vertebrae {level}" for i, level in enumerate(levels)})
    labels.update({57: "trachea", 58: "left iliac artery", 59: "right iliac artery", 60: "left iliac vena"})
    labels.update({61: "right iliac vena", 62: "colon"})
    # 63-74 left ribs 1-12, 75-86 right ribs 1-12.
    labels.update({62 + i: f"left rib {i}" for i in range(1, 13)})
    labels.update({74 + i: f"right rib {i}" for i in range(1, 13)})
    tail = (
        "left humerus|right humerus|left scapula|right scapula|left clavicula|right clavicula|left femur|"
        "right femur|left hip|right hip|sacrum|left gluteus maximus|right gluteus maximus|left gluteus medius|"
        "right gluteus medius|left gluteus minimus|right gluteus minimus|left autochthon|right autochthon|"
        "left iliopsoas|right iliopsoas|left atrial appendage|brachiocephalic trunk|left brachiocephalic vein|"
        "right brachiocephalic vein|left common carotid artery|right common carotid artery|costal cartilages|"
        "heart|left kidney cyst|right kidney cyst|prostate|pulmonary vein|skull|spinal cord|sternum|"
        "left subclavian artery|right subclavian artery|superior vena cava|thyroid gland|vertebrae S1|"
        "bone lesion|kidney mass|liver tumor|vertebrae L6|airway"
    ).split("|")
    labels.update({87 + i: name for i, name in enumerate(tail)})  # 87 left humerus ... 132 airway
    return labels


VISTA3D_LABELS: dict[int, str] = _vista3d_labels()
"""VISTA-3D global class id (1-132) → class name, as in the bundle's label dictionary (0 is background)."""

VISTA3D_SUPPORTED: frozenset[int] = frozenset(VISTA3D_LABELS) - {16, 18, 129, 130, 131}
"""The 127 class ids the bundle accepts as class prompts (it rejects 16 prostate or uterus, 18 rectum, 129 kidney
mass, 130 liver tumor and 131 vertebrae L6: "Undefined label prompt detected", bundle ``scripts/evaluator.py``)."""

VISTA3D_SUBCLASS: dict[int, tuple[int, ...]] = {
    2: (14, 5),
    20: (28, 29, 30, 31, 32),
    21: (*range(33, 57), *range(63, 98), 114, 120, 122),
}
"""Class prompts the bundle expands into their parts before inference (``subclass`` in ``inference.json``)."""

VISTA3D_EVERYTHING_LABELS: tuple[int, ...] = tuple(
    sorted(set(range(1, 133)) - {2, 16, 18, 20, 21, 23, 24, 25, 26, 27, 128, 129, 130, 131, 132})
)
"""The 117 classes the bundle segments when no prompt is given (``everything_labels`` in ``inference.json``)."""

RADGENOME_REGIONS: tuple[str, ...] = (
    "abdomen",
    "bone",
    "breast",
    "esophagus",
    "heart",
    "lung",
    "mediastinum",
    "pleura",
    "thyroid",
    "trachea and bronchie",
)
"""The region mask files of RadGenome-ChestCT (``<region>.nii.gz``), also the heads of the ``Anatomy`` paths."""

RADGENOME_NO_CONTOUR: frozenset[str] = frozenset({"others", "whole scan"})
"""Heads/leaves that the official linking rule maps to an all-ones mask (no contour can be drawn)."""


def _radgenome_leaves() -> tuple[str, ...]:
    plain = (
        "abdomen|abdominal tissue|adrenal gland|aorta|bone|breast|bronchie|caudate lobe|celiac trunk|"
        "cervical esophagus|cervical vertebrae|clavicle|colon|esophagus|gallbladder|heart|heart ascending aorta|"
        "heart atrium|heart tissue|heart ventricle|humerus|iliac artery|iliac vena|inferior vena cava|intestine|"
        "kidney|larynx|left adrenal gland|left breast|left clavicle|left humerus|left kidney|left lung|"
        "left lung lower lobe|left lung upper lobe|left rib|left scapula|left subclavian artery|left thyroid|"
        "liver|liver vessel|lumbar vertebrae|lung|lung lower lobe|lung upper lobe|manubrium of sternum|"
        "mediastinal tissue|mediastinum|others|pancreas|pleura|portal vein and splenic vein|prostate|"
        "pulmonary artery|pulmonary vein|renal artery|rib|right adrenal gland|right breast|right clavicle|"
        "right heart atrium|right humerus|right kidney|right lung|right lung lower lobe|right lung middle lobe|"
        "right lung upper lobe|right rib|right scapula|right subclavian artery|right thyroid|scapula|"
        "spinal canal|spleen|sternum|stomach|subclavian artery|superior vena cava|thoracic cavity|"
        "thoracic vertebrae|thymus|thyroid|thyroid gland|trachea|trachea and bronchie|urinary bladder|vertebrae"
    ).split("|")
    numbered = [f"{side}rib {i}" for side in ("", "left ", "right ") for i in range(1, 13)]
    numbered = [name for name in numbered if name not in ("left rib 3", "left rib 12")]  # absent from the subset
    numbered += ["cervical vertebrae 6 (c6)"] + [f"lumbar vertebrae {i} (l{i})" for i in range(1, 6)]
    numbered += [f"thoracic vertebrae {i} (t{i})" for i in range(1, 13)]
    return tuple(sorted(plain + numbered))


RADGENOME_SUBSET_LEAVES: tuple[str, ...] = _radgenome_leaves()
"""The 139 ``Anatomy`` leaves seen in RadGenome-ChestCT's official 2,000-volume train subset (sorted)."""


def _radgenome_anatomy_paths() -> dict[str, str]:
    paths = {
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
    }
    groups = {"C": ("cervical vertebrae", 7), "T": ("thoracic vertebrae", 12), "L": ("lumbar vertebrae", 5)}
    for letter, (group, count) in groups.items():
        for i in range(1, count + 1):
            leaf = f"{group} {i} ({letter.lower()}{i})"
            paths[f"vertebrae_{letter}{i}"] = f"bone/bone/vertebrae/{group}/{leaf}"
    for side in ("left", "right"):
        for k in range(1, 13):
            paths[f"rib_{side}_{k}"] = f"bone/bone/rib/{side} rib/{side} rib {k}"
    return paths


RADGENOME_ANATOMY_PATHS: dict[str, str] = _radgenome_anatomy_paths()
"""Canonical key (TotalSegmentator-style) → RadGenome-ChestCT ``Anatomy`` path (``head/.../leaf``) of the chest
structures whose place in RadGenome's anatomy tree is known; the leaf is RadGenome's mask file name."""
