"""Deterministic synthetic chest-CT phantoms: the project's embedded default data.

A phantom is a CT volume in Hounsfield units with one binary mask per structure (TotalSegmentator v2 names),
lesions placed inside chosen structures, and RadGenome-style questions about them. Everything follows from an
integer seed, so data can be regenerated instead of downloaded (no real chest CT dataset can be redistributed).

Geometry. Arrays are (D, H, W) in the orientation of :mod:`med3dqwen.processing.ct_io`: D runs inferior →
superior, H anterior → posterior (row 0 is anterior), W patient right → left (column 0 is the patient's right).
So the right lung sits at small ``w``, the heart anterior-left, the spine posterior and the liver inferior-right.
Anatomy is laid out in millimetres around the centre of the field of view, so a phantom keeps its proportions
at any grid size; with the default ``spacing=None`` the field of view is :data:`DEFAULT_FOV_MM`
(320 × 384 × 384 mm: lung apices to upper abdomen, a typical chest CT), i.e. (2.5, 1.5, 1.5) mm voxels at the
default (128, 256, 256) shape and (10, 6, 6) mm at (32, 64, 64).

Structures (mask keys are TotalSegmentator v2 class names, plus unions): ``body``; the five lobes
``lung_{upper,middle,lower}_lobe_right`` / ``lung_{upper,lower}_lobe_left`` and their unions ``lung_right`` /
``lung_left`` (intrapulmonary vessels included, as in TotalSegmentator); ``heart``, ``aorta``, ``trachea``,
``esophagus``, ``liver``, ``spleen``, ``stomach``; ``vertebrae`` (C5-L3 as far as the field of view reaches);
``ribs`` and ``sternum`` (``ribs=True``); with ``bone_levels=True`` also ``vertebrae_T1``... and ``rib_left_1``....
Structure masks do not overlap, except unions and their parts. The main bronchi, pulmonary arteries, vena cava,
fat, muscle, discs and spinal canal are drawn but unlabelled. :data:`ANATOMY_PATHS` / :data:`ANATOMY_NAMES` give
each key's RadGenome-ChestCT anatomy path and name.

Intensities (non-contrast CT, before Gaussian noise of ``noise_sigma`` HU and clipping at -1024 HU):

==============================  ===========================================================================
air outside the body            -1000
fat                             -100 ± 10 per phantom (subcutaneous, mediastinal, pericardial, abdominal)
muscle, soft tissue, esophagus  40 ± 8
lung parenchyma                 -850 ± 25 per phantom, a posterior (dependent) gradient of ±30 and smooth
                                low-frequency variation of a few HU; vessel trees at blood density
heart, aorta, great vessels     blood 50 ± 8; myocardium = soft tissue
liver / spleen                  55 ± 8 / 45 ± 5
stomach                         soft-tissue wall, fluid 15, gas -1000 (anterior, the patient is supine)
trachea / main bronchi          lumen -1000, wall 60
bone                            vertebral and rib cortex 800, cancellous bone 230-280, posterior arch 650
lesions                         lung nodules/masses -50…60, liver lesions 20-60 HU below the liver,
                                pleural effusion 5-20
==============================  ===========================================================================

Lesions: nodules (round, <= 30 mm) and masses (lobulated, >= 30 mm) in each lung lobe and the liver, pleural
effusions (a dependent posterior layer at the lung base) in each lung, drawn independently per structure. Lesions
never change a structure mask (so a contour drawn from a mask never leaks whether a finding is present); a
lesion's voxels are clipped to its host structure. Sizes are physical: on a coarse grid ((10, 6, 6) mm voxels at
(32, 64, 64)) a small nodule covers one or two voxels, so miniature experiments need larger lesions (masses).

Determinism. Four independent random streams are spawned from ``np.random.default_rng(seed)`` (anatomy,
intensities, lesions, noise), so the same seed with lesions disabled gives the same masks and the same voxels
everywhere outside the lesions. Everything is computed in bounding boxes with broadcasting: a default
128 × 256 × 256 phantom takes about 0.15-0.2 s on one core.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from med3dqwen.io import atomic_output, save_nifti
from med3dqwen.processing.ct_io import standard_affine


__all__ = [
    "ABNORMALITY_TEMPLATES",
    "ANATOMY_NAMES",
    "ANATOMY_PATHS",
    "DEFAULT_FOV_MM",
    "Finding",
    "LESION_KINDS",
    "LOCATION_TEMPLATES",
    "PRESENCE_TEMPLATES",
    "Phantom",
    "PhantomConfig",
    "REGION_REPORT_TEMPLATES",
    "SIZE_TEMPLATES",
    "generate_phantom",
    "generate_questions",
]

# Field of view in mm along (D, H, W) used when PhantomConfig.spacing is None.
DEFAULT_FOV_MM = (320.0, 384.0, 384.0)

LESION_KINDS = ("nodule", "mass", "effusion")

# ---------------------------------------------------------------------------------------------------------------
# Structures: mask keys (TotalSegmentator v2 names) → RadGenome-ChestCT anatomy paths and human names
# ---------------------------------------------------------------------------------------------------------------

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

# ---------------------------------------------------------------------------------------------------------------
# Question templates (raw RadGenome style; rewriting for the contour prompt is another module's job)
# ---------------------------------------------------------------------------------------------------------------

PRESENCE_TEMPLATES = (
    "Is there a {finding} in the {region}?",
    "Can a {finding} be identified in the {region}?",
    "Is a {finding} present in the {region}?",
    "Does the {region} contain a {finding}?",
)
ABNORMALITY_TEMPLATES = (
    "What abnormalities are seen in the {region}?",
    "What are the abnormalities in the {region}?",
    "What abnormal findings are present in the {region}?",
)
LOCATION_TEMPLATES = (
    "Where is the {finding} located?",
    "Where is the {finding} located in the image?",
    "In which region is the {finding} found?",
)
SIZE_TEMPLATES = (
    "What is the approximate size of the {finding} in the {region}?",
    "How large is the {finding} in the {region}?",
)
REGION_REPORT_TEMPLATES = (
    "Describe the {region}.",
    "Please describe the findings in the {region}.",
    "What does the {region} look like on this scan?",
)
_FINDING_NOUNS = {"nodule": "nodule", "mass": "mass", "effusion": "pleural effusion"}
# Structures asked about in presence questions, by finding kind (effusions are asked about at lung level).
_PRESENCE_ROIS = {
    "nodule": (*_SOLID_HOSTS, *_EFFUSION_HOSTS),
    "mass": (*_SOLID_HOSTS, *_EFFUSION_HOSTS),
    "effusion": _EFFUSION_HOSTS,
}
_REPORT_ROIS = (*_LOBES, *_EFFUSION_HOSTS, "liver", "heart")


# ---------------------------------------------------------------------------------------------------------------
# Configuration and results
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PhantomConfig:
    """How phantoms are generated. Values are checked in ``__post_init__``.

    Args:
        shape: grid size (D, H, W).
        spacing: voxel size in mm along (D, H, W); None spreads :data:`DEFAULT_FOV_MM` over ``shape``
            ((2.5, 1.5, 1.5) mm at the default shape). Anatomy is laid out in mm around the volume centre, so an
            explicit spacing with a small field of view crops the patient.
        noise_sigma: standard deviation of the Gaussian image noise in HU.
        position_jitter_mm: half-width of the uniform random offset of the patient and of each organ, per axis.
        size_jitter: half-width of the uniform relative random scaling of the body and organs.
        lesion_probability: independent probability that each lung lobe and the liver hold a nodule or mass.
        effusion_probability: independent probability of a pleural effusion in each lung.
        lesion_kinds: the finding kinds that may occur, a subset of :data:`LESION_KINDS`; questions only ask
            about these kinds.
        mass_fraction: probability that a solid lesion is a mass rather than a nodule (when both kinds occur).
        nodule_size_mm: diameter range of nodules (log-uniform); nodules are at most 30 mm by definition.
        mass_size_mm: diameter range of masses (uniform); masses are at least 30 mm by definition.
        effusion_size_mm: range of the largest thickness of a pleural effusion.
        lung_lesion_hu: HU range of lung nodules and masses (solid).
        liver_lesion_contrast_hu: HU range of liver lesions relative to the liver (negative: hypodense).
        effusion_hu: HU range of pleural fluid.
        ribs: draw ribs and sternum (masks ``ribs`` and ``sternum``).
        bone_levels: also give one mask per vertebra (``vertebrae_T7``...) and per rib (``rib_left_4``...).

    Raises:
        ValueError: a value is out of range; the message names the field.
    """

    shape: tuple[int, int, int] = (128, 256, 256)
    spacing: tuple[float, float, float] | None = None
    noise_sigma: float = 20.0
    position_jitter_mm: float = 6.0
    size_jitter: float = 0.08
    lesion_probability: float = 0.5
    effusion_probability: float = 0.2
    lesion_kinds: tuple[str, ...] = LESION_KINDS
    mass_fraction: float = 0.25
    nodule_size_mm: tuple[float, float] = (4.0, 30.0)
    mass_size_mm: tuple[float, float] = (30.0, 60.0)
    effusion_size_mm: tuple[float, float] = (10.0, 40.0)
    lung_lesion_hu: tuple[float, float] = (-50.0, 60.0)
    liver_lesion_contrast_hu: tuple[float, float] = (-60.0, -20.0)
    effusion_hu: tuple[float, float] = (5.0, 20.0)
    ribs: bool = True
    bone_levels: bool = False

    def __post_init__(self):
        # Accept lists (YAML, JSON) and normalise them to tuples.
        try:
            valid = len(tuple(self.shape)) == 3 and all(int(s) == s and s >= 16 for s in self.shape)
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise ValueError(f"shape must be 3 integers >= 16, got {self.shape!r}")
        self.shape = tuple(int(s) for s in self.shape)
        if self.spacing is not None:
            self.spacing = _check_floats("spacing", self.spacing, 3)
            if min(self.spacing) <= 0:
                raise ValueError(f"spacing must be positive, got {self.spacing!r}")
        _check_range("noise_sigma", self.noise_sigma, 0.0, 500.0)
        _check_range("position_jitter_mm", self.position_jitter_mm, 0.0, 30.0)
        _check_range("size_jitter", self.size_jitter, 0.0, 0.3)
        for name in ("lesion_probability", "effusion_probability", "mass_fraction"):
            _check_range(name, getattr(self, name), 0.0, 1.0)
        kinds = tuple(self.lesion_kinds)
        if len(set(kinds)) != len(kinds) or not set(kinds) <= set(LESION_KINDS):
            raise ValueError(f"lesion_kinds must be distinct values from {LESION_KINDS}, got {self.lesion_kinds!r}")
        self.lesion_kinds = kinds
        for name, low, high in (
            ("nodule_size_mm", 1.0, 30.0),
            ("mass_size_mm", 30.0, 150.0),
            ("effusion_size_mm", 1.0, 100.0),
            ("lung_lesion_hu", -1000.0, 1000.0),
            ("liver_lesion_contrast_hu", -200.0, 200.0),
            ("effusion_hu", -50.0, 100.0),
        ):
            value = _check_floats(name, getattr(self, name), 2)
            if not low <= value[0] <= value[1] <= high:
                raise ValueError(f"{name} must be (low, high) with {low} <= low <= high <= {high}, got {value!r}")
            setattr(self, name, value)
        for name in ("ribs", "bone_levels"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def resolved_spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along (D, H, W): ``spacing``, or the default field of view divided by ``shape``."""
        if self.spacing is not None:
            return self.spacing
        return tuple(fov / n for fov, n in zip(DEFAULT_FOV_MM, self.shape, strict=True))


@dataclass(frozen=True)
class Finding:
    """One lesion of a phantom.

    Args:
        kind: ``"nodule"``, ``"mass"`` or ``"effusion"``.
        structure: mask key of the host structure; the lesion's voxels all lie inside that mask.
        center_voxel: (d, h, w) index of a voxel of the lesion (the sphere centre; for an effusion, the voxel
            nearest its centroid).
        size_mm: diameter in mm of a nodule or mass (before clipping to the host), largest thickness of an
            effusion.
        hu: intensity of the lesion before noise.
        n_voxels: number of voxels of the lesion.
    """

    kind: str
    structure: str
    center_voxel: tuple[int, int, int]
    size_mm: float
    hu: float
    n_voxels: int


@dataclass(eq=False)
class Phantom:
    """A generated phantom.

    Args:
        volume: (D, H, W) float32 HU.
        masks: structure name → (D, H, W) bool mask; lesions never change them.
        findings: the lesions, in the order of ``lesion_masks``.
        lesion_masks: one (D, H, W) bool mask per finding; lesions do not overlap.
        spacing: voxel size in mm along (D, H, W).
        affine: (4, 4) index → RAS+ mm (:func:`~med3dqwen.processing.ct_io.standard_affine`, volume centre at 0).
        seed: the seed the phantom was generated from.
        config: the configuration it was generated with.
        tissue_hu: this phantom's tissue intensities before noise and texture (``"fat"``, ``"soft"``, ``"blood"``,
            ``"liver"``, ``"spleen"``, ``"lung"``).
    """

    volume: np.ndarray = field(repr=False)
    masks: dict[str, np.ndarray] = field(repr=False)
    findings: list[Finding]
    lesion_masks: list[np.ndarray] = field(repr=False)
    spacing: tuple[float, float, float]
    affine: np.ndarray = field(repr=False)
    seed: int
    config: PhantomConfig = field(repr=False)
    tissue_hu: dict[str, float] = field(repr=False)
    _reaches: dict[tuple[int, str], bool] = field(default_factory=dict, init=False, repr=False)

    def findings_in(self, structure: str) -> list[Finding]:
        """Findings inside ``structure``: those it hosts, those its lobes host (for a lung), and, for a lobe, a
        pleural effusion of its lung that reaches into it (the fluid is then visible inside the lobe's outline)."""
        found = []
        for i, (f, mask) in enumerate(zip(self.findings, self.lesion_masks, strict=True)):
            if structure in (f.structure, _PARENT.get(f.structure)):
                found.append(f)
            elif f.kind == "effusion" and _PARENT.get(structure) == f.structure:
                if (i, structure) not in self._reaches:  # cached: a full-volume test per (effusion, lobe)
                    box = _tight_box(mask, tuple(slice(0, n) for n in mask.shape))
                    reaches = box is not None and bool((mask[box] & self.masks[structure][box]).any())
                    self._reaches[(i, structure)] = reaches
                if self._reaches[(i, structure)]:
                    found.append(f)
        return found

    def lesion_labels(self) -> np.ndarray:
        """(D, H, W) uint8 label volume: 0 outside lesions, i + 1 inside ``findings[i]``."""
        labels = np.zeros(self.volume.shape, dtype=np.uint8)
        for i, mask in enumerate(self.lesion_masks):
            labels[mask] = i + 1
        return labels

    def save(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Write the phantom as NIfTI + JSON, each file atomically.

        Layout: ``volume.nii.gz`` (int16 HU), ``masks/<name>.nii.gz`` (uint8 0/1), ``lesions.nii.gz`` (uint8
        labels, see :meth:`lesion_labels`) and ``findings.json`` (seed, spacing, shape, config, tissue HU,
        findings with their label and anatomy path).

        Args:
            out_dir: destination folder (created).

        Returns:
            ``{"volume": ..., "lesions": ..., "findings": ..., "masks/<name>": ...}`` → written paths.
        """
        out_dir = Path(out_dir)
        hu = np.clip(np.rint(self.volume), -1024, 3071).astype(np.int16)
        paths = {"volume": save_nifti(out_dir / "volume.nii.gz", hu, self.affine, dtype=np.int16)}
        for name, mask in self.masks.items():
            paths[f"masks/{name}"] = save_nifti(out_dir / "masks" / f"{name}.nii.gz", mask, self.affine, np.uint8)
        paths["lesions"] = save_nifti(out_dir / "lesions.nii.gz", self.lesion_labels(), self.affine, np.uint8)
        record = {
            "seed": self.seed,
            "shape": list(self.volume.shape),
            "spacing": list(self.spacing),
            "config": asdict(self.config),
            "tissue_hu": self.tissue_hu,
            "findings": [
                {"label": i + 1, **asdict(f), "anatomy": ANATOMY_PATHS[f.structure]}
                for i, f in enumerate(self.findings)
            ],
        }
        paths["findings"] = out_dir / "findings.json"
        with atomic_output(paths["findings"]) as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n")
        return paths


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------


def generate_phantom(seed: int, config: PhantomConfig | None = None) -> Phantom:
    """Generate the phantom of ``seed``; the same seed and config give bit-identical results.

    Args:
        seed: non-negative integer.
        config: generation settings (default: :class:`PhantomConfig()`).

    Returns:
        The phantom: HU volume, structure masks, findings and lesion masks.

    Raises:
        ValueError: ``seed`` is not a non-negative integer.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    config = PhantomConfig() if config is None else config
    anatomy_rng, intensity_rng, lesion_rng, noise_rng = np.random.default_rng(int(seed)).spawn(4)
    grid = _Grid(config.shape, config.resolved_spacing)

    anatomy = _build_anatomy(grid, anatomy_rng, config)
    volume, tissue_hu = _render(grid, anatomy, intensity_rng)
    findings, lesion_masks = _add_lesions(grid, anatomy.masks, volume, tissue_hu, lesion_rng, config)
    if config.noise_sigma > 0:
        # (D, H, W) float32 noise; drawn from its own stream so lesions never shift it.
        noise = noise_rng.standard_normal(grid.shape, dtype=np.float32)
        noise *= np.float32(config.noise_sigma)
        volume += noise
    np.maximum(volume, np.float32(-1024.0), out=volume)  # scanners clip at -1024 HU

    spacing = grid.spacing
    centre = (np.array(grid.shape) - 1) / 2
    origin = -(standard_affine(spacing)[:3, :3] @ centre)  # volume centre at world (0, 0, 0)
    return Phantom(
        volume=volume,
        masks=anatomy.masks,
        findings=findings,
        lesion_masks=lesion_masks,
        spacing=spacing,
        affine=standard_affine(spacing, tuple(origin)),
        seed=int(seed),
        config=config,
        tissue_hu=tissue_hu,
    )


def generate_questions(phantom: Phantom, seed: int | None = None) -> list[dict]:
    """RadGenome-style raw questions about a phantom.

    Per volume: presence (closed, "Yes."/"No."; as many absent findings asked about as present ones, at least
    one), abnormality and region report (open; every structure holding a finding plus as many normal ones),
    location (open, whole volume, one per finding) and size (open, one per finding).

    Args:
        phantom: the phantom asked about.
        seed: seed of the template and structure choices (default: the phantom's seed).

    Returns:
        One dict per question with ``question``, ``answer``, ``question_type`` (presence | abnormality | location |
        size | region_report), ``answer_type`` (closed | open), ``roi`` (mask key the question is about, None for
        whole-volume questions) and ``anatomy`` (RadGenome anatomy path of ``roi``, ``"whole scan"`` if None).
    """
    rng = np.random.default_rng([phantom.seed if seed is None else int(seed), 0x51])
    kinds = phantom.config.lesion_kinds
    questions: list[dict] = []

    def ask(question_type: str, templates: tuple[str, ...], answer: str, roi: str | None, **slots: str):
        text = templates[int(rng.integers(len(templates)))].format(**slots)
        questions.append(
            {
                "question": text,
                "answer": answer,
                "question_type": question_type,
                "answer_type": "closed" if question_type == "presence" else "open",
                "roi": roi,
                "anatomy": ANATOMY_PATHS[roi] if roi is not None else "whole scan",
            }
        )

    # Presence: one "Yes." per finding (asked at its host or, for a lobe, at the whole lung), then as many "No.".
    def present(roi: str, kind: str) -> bool:
        return any(f.kind == kind for f in phantom.findings_in(roi))

    positives: list[tuple[str, str]] = []
    for f in phantom.findings:
        roi = f.structure
        if f.structure in _PARENT and rng.random() < 0.5:
            roi = _PARENT[f.structure]
        if (roi, f.kind) not in positives:
            positives.append((roi, f.kind))
    negatives = [(roi, kind) for kind in kinds for roi in _PRESENCE_ROIS[kind] if not present(roi, kind)]
    n_negative = min(len(negatives), max(len(positives), 1))
    negatives = [negatives[i] for i in sorted(rng.choice(len(negatives), n_negative, replace=False))]
    for roi, kind in sorted(positives + negatives, key=lambda p: (_structure_order(p[0]), p[1])):
        answer = "Yes." if present(roi, kind) else "No."
        ask("presence", PRESENCE_TEMPLATES, answer, roi, finding=_FINDING_NOUNS[kind], region=ANATOMY_NAMES[roi])

    # Abnormality and region report: structures with findings plus as many normal ones.
    for question_type, candidates in (
        ("abnormality", (*_SOLID_HOSTS, *_EFFUSION_HOSTS)),
        ("region_report", _REPORT_ROIS),
    ):
        hosts = sorted({f.structure for f in phantom.findings}, key=_structure_order)
        normal = [roi for roi in candidates if not phantom.findings_in(roi)]
        n_normal = min(len(normal), max(len(hosts), 1))
        picked = [normal[i] for i in sorted(rng.choice(len(normal), n_normal, replace=False))]
        for roi in sorted(hosts + picked, key=_structure_order):
            if question_type == "abnormality":
                ask(
                    question_type,
                    ABNORMALITY_TEMPLATES,
                    _abnormality_answer(phantom, roi),
                    roi,
                    region=ANATOMY_NAMES[roi],
                )
            else:
                ask(
                    question_type,
                    REGION_REPORT_TEMPLATES,
                    _region_report(phantom, roi),
                    roi,
                    region=ANATOMY_NAMES[roi],
                )

    # Location (whole volume: a contour around the answer would give it away), one per finding; a finding is
    # named by its kind, plus its size or side when the kind occurs twice. Findings that still share a name
    # (two 5 mm nodules) are asked about together.
    locations: dict[str, list[Finding]] = {}
    for f in phantom.findings:
        described = _FINDING_NOUNS[f.kind]
        if sum(g.kind == f.kind for g in phantom.findings) > 1:
            qualifier = _side(f.structure) if f.kind == "effusion" else f"{_fmt_mm(f.size_mm)} mm"
            described = f"{qualifier} {described}"
        locations.setdefault(described, []).append(f)
    for described, group in locations.items():
        answer = _location_answer(group[0])
        if len(group) > 1:
            answer = "In the " + " and the ".join(ANATOMY_NAMES[f.structure] for f in group) + "."
        ask("location", LOCATION_TEMPLATES, answer, None, finding=described)
    for f in phantom.findings:
        ask(
            "size",
            SIZE_TEMPLATES,
            f"{_fmt_mm(f.size_mm)} mm",
            f.structure,
            finding=_FINDING_NOUNS[f.kind],
            region=ANATOMY_NAMES[f.structure],
        )
    return questions


# ---------------------------------------------------------------------------------------------------------------
# Answer text
# ---------------------------------------------------------------------------------------------------------------


def _structure_order(name: str) -> int:
    return list(ANATOMY_PATHS).index(name)


def _fmt_mm(value: float) -> str:
    return f"{value:.0f}"


def _side(structure: str) -> str:
    return "right" if structure.endswith("right") else "left"


def _effusion_grade(thickness_mm: float) -> str:
    return "small" if thickness_mm < 20 else "moderate" if thickness_mm < 40 else "large"


def _finding_phrase(phantom: Phantom, f: Finding) -> str:
    """'a 12 mm nodule', 'an 8 mm nodule', 'a 35 mm hypodense mass', 'a small right pleural effusion'."""
    if f.kind == "effusion":
        return f"a {_effusion_grade(f.size_mm)} {_side(f.structure)} pleural effusion"
    density = ""
    if f.structure == "liver":
        density = "hypodense " if f.hu < phantom.tissue_hu["liver"] else "hyperdense "
    size = _fmt_mm(f.size_mm)
    article = "an" if size.startswith("8") or size in ("11", "18") else "a"  # "an eight", "an eleven"
    return f"{article} {size} mm {density}{f.kind}"


def _join(phrases: list[str]) -> str:
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return text[0].upper() + text[1:] + "."


def _abnormality_answer(phantom: Phantom, roi: str) -> str:
    findings = phantom.findings_in(roi)
    return _join([_finding_phrase(phantom, f) for f in findings]) if findings else "No abnormality."


def _location_answer(f: Finding) -> str:
    if f.kind == "effusion":
        return f"At the base of the {ANATOMY_NAMES[f.structure]}, posteriorly."
    return f"In the {ANATOMY_NAMES[f.structure]}."


def _region_report(phantom: Phantom, roi: str) -> str:
    """A report-like sentence about ``roi``."""
    findings = phantom.findings_in(roi)
    name = ANATOMY_NAMES[roi]
    sentences = []
    for f in findings:
        if f.kind == "effusion":
            sentences.append(
                f"There is {_finding_phrase(phantom, f)} layering posteriorly, {_fmt_mm(f.size_mm)} mm thick."
            )
        else:
            sentences.append(f"There is {_finding_phrase(phantom, f)} in the {ANATOMY_NAMES[f.structure]}.")
    if sentences:
        return " ".join(sentences)
    if roi == "liver":
        return "The liver is normal in size and attenuation, with no focal lesion."
    if roi == "heart":
        return "The heart is normal in size. There is no pericardial effusion."
    if roi in _EFFUSION_HOSTS:
        return f"The {name} is clear, with no nodule, mass or pleural effusion."
    return f"The {name} is clear, with no nodule or mass."


# ---------------------------------------------------------------------------------------------------------------
# Grid and shape helpers
# ---------------------------------------------------------------------------------------------------------------

Box = tuple[slice, slice, slice]


class _Grid:
    """Voxel-centre coordinates in mm relative to the volume centre: z superior, y posterior, x patient-left."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]):
        self.shape = tuple(int(s) for s in shape)
        self.spacing = tuple(float(s) for s in spacing)
        self.z, self.y, self.x = (
            ((np.arange(n) - (n - 1) / 2) * s).astype(np.float32)
            for n, s in zip(self.shape, self.spacing, strict=True)
        )

    def box(self, low: tuple[float, float, float], high: tuple[float, float, float]) -> Box:
        """Index slices of the voxels whose centres lie in [low, high] mm along (z, y, x) (maybe empty)."""
        slices = []
        for lo, hi, n, s in zip(low, high, self.shape, self.spacing, strict=True):
            start = max(math.ceil(lo / s + (n - 1) / 2 - 1e-6), 0)
            stop = min(math.floor(hi / s + (n - 1) / 2 + 1e-6) + 1, n)
            slices.append(slice(start, max(start, stop)))
        return tuple(slices)

    def around(self, centre: tuple[float, float, float], half: tuple[float, float, float]) -> Box:
        return self.box(
            tuple(c - h for c, h in zip(centre, half, strict=True)),
            tuple(c + h for c, h in zip(centre, half, strict=True)),
        )

    def coords(self, box: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(z, y, x) of ``box`` shaped (d, 1, 1), (1, h, 1), (1, 1, w) for broadcasting."""
        return self.z[box[0]][:, None, None], self.y[box[1]][None, :, None], self.x[box[2]][None, None, :]


def _union(a: Box, b: Box) -> Box:
    return tuple(slice(min(p.start, q.start), max(p.stop, q.stop)) for p, q in zip(a, b, strict=True))


def _tight_box(mask: np.ndarray, box: Box) -> Box | None:
    """Smallest box holding the True voxels of ``mask`` inside ``box``; None when there are none."""
    local = mask[box]
    slices = []
    for axis in range(3):
        hit = np.flatnonzero(local.any(axis=tuple(a for a in range(3) if a != axis)))
        if hit.size == 0:
            return None
        slices.append(slice(box[axis].start + int(hit[0]), box[axis].start + int(hit[-1]) + 1))
    return tuple(slices)


def _paint(labels: np.ndarray, box: Box, where: np.ndarray, label: int) -> None:
    np.copyto(labels[box], np.uint8(label), where=where)


def _ellipse2d(y: np.ndarray, x: np.ndarray, centre: tuple[float, float], semi: tuple[float, float]) -> np.ndarray:
    """Normalised squared radius ((y - cy)/sy)² + ((x - cx)/sx)² (broadcast shapes)."""
    return ((y - centre[0]) / semi[0]) ** 2 + ((x - centre[1]) / semi[1]) ** 2


def _tube(
    grid: _Grid, labels: np.ndarray, points: np.ndarray, radius: np.ndarray, label: int, within: int | None = None
) -> Box:
    """Paint a tube along a polyline and return its bounding box.

    Each segment is a capsule whose radius varies linearly from one vertex to the next, rasterised in its own
    bounding box.

    Args:
        points: (N, 3) polyline vertices in mm (z, y, x).
        radius: (N,) radius in mm at each vertex.
        label: tissue label painted.
        within: only paint voxels that currently hold this label (None: paint over anything).
    """
    points = np.asarray(points, dtype=np.float32)
    radius = np.asarray(radius, dtype=np.float32)
    total = None
    for a, b, ra, rb in zip(points[:-1], points[1:], radius[:-1], radius[1:], strict=True):
        r = max(ra, rb)
        box = grid.box(tuple(np.minimum(a, b) - r), tuple(np.maximum(a, b) + r))
        z, y, x = grid.coords(box)
        ab = b - a
        pz, py, px = z - a[0], y - a[1], x - a[2]
        t = (pz * ab[0] + py * ab[1] + px * ab[2]) / max(float(ab @ ab), 1e-6)
        np.clip(t, 0.0, 1.0, out=t)  # (d, h, w) position of the nearest point along the segment
        d2 = (pz - t * ab[0]) ** 2 + (py - t * ab[1]) ** 2 + (px - t * ab[2]) ** 2
        inside = d2 <= (ra + t * (rb - ra)) ** 2
        if within is not None:
            inside &= labels[box] == within
        _paint(labels, box, inside, label)
        total = box if total is None else _union(total, box)
    return total


def _bezier(p0, p1, p2, n: int = 24) -> np.ndarray:
    """(n, 3) points of the quadratic Bézier curve p0 → p2 with control point p1."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    p0, p1, p2 = (np.asarray(p, dtype=float) for p in (p0, p1, p2))
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


# ---------------------------------------------------------------------------------------------------------------
# Anatomy
# ---------------------------------------------------------------------------------------------------------------

# Tissue label ids. Each structure owns a contiguous id range so that its mask is one range test.
_AIR, _FAT, _SOFT, _DISC, _CANAL = 0, 1, 2, 3, 4
_BRONCHUS_WALL, _BRONCHUS_LUMEN, _VESSEL = 5, 6, 7  # main bronchi, pulmonary arteries and vena cava: unlabelled
_LUNG_RIGHT, _LUNG_VESSEL_RIGHT, _LUNG_LEFT, _LUNG_VESSEL_LEFT = 8, 9, 10, 11
_LIVER, _SPLEEN, _STOMACH_WALL, _STOMACH_FLUID, _STOMACH_GAS = 12, 13, 14, 15, 16
_HEART_WALL, _HEART_BLOOD = 17, 18
_AORTA = 19
_ESOPHAGUS = 20
_TRACHEA_WALL, _TRACHEA_LUMEN = 21, 22
_VERT_CORTEX, _VERT_CANCELLOUS, _VERT_POSTERIOR = 23, 24, 25
_RIB_CORTEX, _RIB_MARROW = 26, 27
_STERNUM_CORTEX, _STERNUM_MARROW = 28, 29
_N_LABELS = 30

_STRUCTURE_LABELS = {
    "lung_right": (_LUNG_RIGHT, _LUNG_VESSEL_RIGHT),  # intrapulmonary vessels belong to the lung
    "lung_left": (_LUNG_LEFT, _LUNG_VESSEL_LEFT),
    "heart": (_HEART_WALL, _HEART_BLOOD),
    "aorta": (_AORTA, _AORTA),
    "trachea": (_TRACHEA_WALL, _TRACHEA_LUMEN),
    "esophagus": (_ESOPHAGUS, _ESOPHAGUS),
    "liver": (_LIVER, _LIVER),
    "spleen": (_SPLEEN, _SPLEEN),
    "stomach": (_STOMACH_WALL, _STOMACH_GAS),
    "vertebrae": (_VERT_CORTEX, _VERT_POSTERIOR),
    "ribs": (_RIB_CORTEX, _RIB_MARROW),
    "sternum": (_STERNUM_CORTEX, _STERNUM_MARROW),
}


@dataclass
class _Anatomy:
    labels: np.ndarray  # (D, H, W) uint8 tissue labels
    masks: dict[str, np.ndarray]
    lung_box: Box  # box holding both lungs, for the parenchyma texture


@dataclass
class _Patient:
    """Random patient-level geometry in mm (z superior, y posterior, x patient-left), shared by the builders."""

    cy: float  # body centre
    cx: float
    body_semi: tuple[float, float]  # (AP, LR) semi-axes of the skin outline
    fat: float  # subcutaneous fat thickness
    cavity_semi: tuple[float, float]  # inner chest wall at full width
    apex: float  # z of the lung apices
    dome_right: float  # z of the top of the right hemidiaphragm
    dome_left: float
    t1_top: float  # z of the upper endplate of T1
    spine_y: float  # y of the vertebral body centres
    carina: tuple[float, float, float]  # (z, y, x) of the tracheal bifurcation

    def taper(self, z: np.ndarray) -> np.ndarray:
        """Relative width of the thoracic cage at height z: 1 below the mid-chest, narrowing to the apex."""
        u = np.clip((z - 30.0) / (self.apex - 30.0 + 10.0), 0.0, 1.0)
        return 1.0 - 0.22 * u**1.5

    def in_cavity(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        return _ellipse2d(y, x, (self.cy, self.cx), self.cavity_semi) <= self.taper(z) ** 2

    def diaphragm(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """z of the diaphragm surface over (y, x): two domes, deeper laterally and in the posterior recesses."""
        ry = (y - self.cy) / 90.0
        domes = [
            top - 55.0 * ((x - (self.cx + side * 55.0)) / 75.0) ** 2 - 35.0 * ry**2 - 20.0 * ry
            for top, side in ((self.dome_right, -1.0), (self.dome_left, 1.0))
        ]
        return np.maximum(*domes)


def _build_anatomy(grid: _Grid, rng: np.random.Generator, cfg: PhantomConfig) -> _Anatomy:
    """Paint the tissue label volume, later structures over earlier ones, and cut the structure masks from it."""
    jit, sj = cfg.position_jitter_mm, cfg.size_jitter

    def offset(scale: float = 1.0) -> float:
        return float(rng.uniform(-jit, jit)) * scale

    def grow() -> float:
        return 1.0 + float(rng.uniform(-sj, sj))

    scale = grow()
    gz, gy, gx = offset(), offset(), offset()
    body_semi = (115.0 * scale, 160.0 * scale)
    fat = float(rng.uniform(8.0, 25.0))
    wall = fat + 14.0  # fat + chest-wall muscle
    dome_right = -35.0 + gz + offset(0.5)
    t1_top = 122.0 + gz + offset(0.3)
    p = _Patient(
        cy=10.0 + gy,
        cx=gx,
        body_semi=body_semi,
        fat=fat,
        cavity_semi=(body_semi[0] - wall, body_semi[1] - wall),
        apex=128.0 + gz + offset(0.5),
        dome_right=dome_right,
        dome_left=dome_right - 15.0 + offset(0.5),
        t1_top=t1_top,
        spine_y=10.0 + gy + 48.0 + offset(0.3),
        carina=(t1_top - 72.0 + offset(0.3), 2.0 + gy + offset(0.3), gx - 3.0 + offset(0.3)),
    )
    labels = np.zeros(grid.shape, dtype=np.uint8)
    boxes: dict[str, Box] = {}

    _body(grid, labels, p)
    _abdomen(grid, labels, p)
    boxes["lung_right"], boxes["lung_left"], fissures = _lungs(grid, labels, p, rng, offset, grow)
    boxes["spleen"], boxes["stomach"] = _spleen_and_stomach(grid, labels, p, offset, grow)
    boxes["liver"] = _liver(grid, labels, p, offset, grow)
    boxes["heart"] = _heart(grid, labels, p, rng, offset, grow)
    hila = _great_vessels(grid, labels, p, offset)
    for hilum, lung, vessel, box in zip(
        hila,
        (_LUNG_RIGHT, _LUNG_LEFT),
        (_LUNG_VESSEL_RIGHT, _LUNG_VESSEL_LEFT),
        (boxes["lung_right"], boxes["lung_left"]),
        strict=True,
    ):
        _lung_vessels(grid, labels, rng, hilum, lung, vessel, box)
    boxes["esophagus"] = _esophagus(grid, labels, p, offset)
    boxes["aorta"] = _aorta(grid, labels, p, offset)
    boxes["trachea"] = _airways(grid, labels, p)
    boxes["vertebrae"], level_boxes = _spine(grid, labels, p)
    rib_voxels: dict[str, np.ndarray] = {}
    if cfg.ribs:
        boxes["ribs"], boxes["sternum"], rib_voxels = _ribs_and_sternum(grid, labels, p, rng)

    masks = {"body": labels != _AIR}
    for name, box in boxes.items():
        lo, hi = _STRUCTURE_LABELS[name]
        mask = np.zeros(grid.shape, dtype=bool)
        local = labels[box]
        mask[box] = (local >= lo) & (local <= hi) if lo != hi else local == lo
        masks[name] = mask
    masks.update(_split_lobes(grid, masks, boxes, fissures))
    if cfg.bone_levels:
        for name, box in level_boxes.items():
            masks[name] = np.zeros(grid.shape, dtype=bool)
            masks[name][box] = masks["vertebrae"][box]
        for name, flat in rib_voxels.items():
            masks[name] = np.zeros(grid.shape, dtype=bool)
            masks[name].reshape(-1)[flat] = True
    order = {name: i for i, name in enumerate(ANATOMY_PATHS)}
    masks = dict(sorted(masks.items(), key=lambda item: order[item[0]]))
    return _Anatomy(labels, masks, _union(boxes["lung_right"], boxes["lung_left"]))


def _body(grid: _Grid, labels: np.ndarray, p: _Patient) -> None:
    """Skin outline (a squarish super-ellipse, the same on every slice), subcutaneous fat and muscle."""
    y, x = grid.y[:, None], grid.x[None, :]
    power = 2.4
    outer = np.abs((y - p.cy) / p.body_semi[0]) ** power + np.abs((x - p.cx) / p.body_semi[1]) ** power <= 1
    inner_semi = (p.body_semi[0] - p.fat, p.body_semi[1] - p.fat)
    inner = np.abs((y - p.cy) / inner_semi[0]) ** power + np.abs((x - p.cx) / inner_semi[1]) ** power <= 1
    section = np.where(inner, np.uint8(_SOFT), np.where(outer, np.uint8(_FAT), np.uint8(_AIR)))
    labels[...] = section  # (H, W) → every slice


def _abdomen(grid: _Grid, labels: np.ndarray, p: _Patient) -> None:
    """Below the diaphragm: intra-abdominal fat under a 6 mm diaphragm muscle (organs are painted over it)."""
    cay, cax = p.cavity_semi
    box = grid.box((-1e4, p.cy - cay, p.cx - cax), (max(p.dome_right, p.dome_left), p.cy + cay, p.cx + cax))
    z, y, x = grid.coords(box)
    inside = _ellipse2d(y, x, (p.cy, p.cx), p.cavity_semi) <= 1  # (1, h, w)
    dome = p.diaphragm(y, x)
    below = inside & (z < dome)
    _paint(labels, box, below, _FAT)
    _paint(labels, box, below & (z >= dome - 6.0), _SOFT)


def _lungs(grid: _Grid, labels: np.ndarray, p: _Patient, rng, offset, grow):
    """Mediastinal fat, then both lungs: ellipsoids cut by the chest wall, the diaphragm and the mediastinum."""
    # Mediastinum: an elliptic column between the lungs, fat above the diaphragm.
    med_centre, med_semi = (p.cy - 5.0, p.cx + 2.0), (72.0, 28.0 * grow())
    box = grid.box(
        (-200.0, med_centre[0] - med_semi[0], med_centre[1] - med_semi[1]),
        (200.0, med_centre[0] + med_semi[0], med_centre[1] + med_semi[1]),
    )
    z, y, x = grid.coords(box)
    column = _ellipse2d(y, x, med_centre, med_semi) <= 1
    _paint(labels, box, column & (z > p.diaphragm(y, x)) & (z < p.apex + 10.0), _FAT)

    lung_boxes, fissures = [], {}
    cay, cax = p.cavity_semi
    for side, label in ((-1.0, _LUNG_RIGHT), (1.0, _LUNG_LEFT)):
        s = grow()
        semi = (170.0 * s, cay + 10.0, (0.5 * cax + 2.0) * (1.0 if side < 0 else 0.95))
        centre = (p.apex - semi[0], p.cy + 2.0 + offset(0.3), p.cx + side * (0.5 * cax + 4.0) + offset(0.3))
        box = grid.around(centre, semi)
        z, y, x = grid.coords(box)
        inside = ((z - centre[0]) / semi[0]) ** 2 + _ellipse2d(y, x, centre[1:], semi[1:]) <= 1
        inside &= p.in_cavity(z, y, x)
        inside &= z > p.diaphragm(y, x)
        inside &= ~(_ellipse2d(y, x, med_centre, med_semi) <= 1)
        _paint(labels, box, inside, label)
        lung_boxes.append(box)
        # Oblique fissure z = z0 + slope (y - cy): the lower lobe is below/behind it (posterior-inferior).
        fissures[label] = {
            "oblique": (-5.0 + offset(0.5), 0.9 + float(rng.uniform(-0.08, 0.08))),
            "horizontal": 5.0 + offset(0.5),  # right lung only: upper/middle lobe boundary
            "cy": p.cy,
        }
    return lung_boxes[0], lung_boxes[1], fissures


def _split_lobes(grid: _Grid, masks: dict[str, np.ndarray], boxes: dict[str, Box], fissures) -> dict[str, np.ndarray]:
    """Lobe masks: each lung cut by its oblique fissure (and, on the right, the horizontal fissure)."""
    lobes = {}
    for name, label in (("lung_right", _LUNG_RIGHT), ("lung_left", _LUNG_LEFT)):
        box, f = boxes[name], fissures[label]
        z, y, _ = grid.coords(box)
        lung = masks[name][box]
        z0, slope = f["oblique"]
        lower = z < z0 + slope * (y - f["cy"])  # (d, h, 1)
        parts = {"lower": lung & lower}
        if label == _LUNG_RIGHT:
            middle = z < f["horizontal"]
            parts["middle"] = lung & ~lower & middle
            parts["upper"] = lung & ~lower & ~middle
        else:
            parts["upper"] = lung & ~lower
        side = "right" if label == _LUNG_RIGHT else "left"
        for part, local in parts.items():
            mask = np.zeros(grid.shape, dtype=bool)
            mask[box] = local
            lobes[f"lung_{part}_lobe_{side}"] = mask
    return lobes


def _liver(grid: _Grid, labels: np.ndarray, p: _Patient, offset, grow) -> Box:
    """Liver: right upper abdomen under the diaphragm; its left lobe is thinner and anterior."""
    s = grow()
    semi = (80.0 * s, 85.0 * s, 100.0 * s)
    centre = (p.dome_right - 65.0 + offset(0.5), p.cy + offset(0.5), p.cx - 45.0 + offset())
    box = grid.around(centre, semi)
    z, y, x = grid.coords(box)
    inside = ((z - centre[0]) / semi[0]) ** 2 + _ellipse2d(y, x, centre[1:], semi[1:]) <= 1
    inside &= z < p.diaphragm(y, x) - 6.0  # below the diaphragm muscle
    inside &= _ellipse2d(y, x, (p.cy, p.cx), p.cavity_semi) <= 1  # inside the abdominal wall
    inside &= (y - p.cy) < 90.0 - 1.2 * np.maximum(x - p.cx + 10.0, 0.0)  # the left lobe is anterior only
    _paint(labels, box, inside, _LIVER)
    return box


def _spleen_and_stomach(grid: _Grid, labels: np.ndarray, p: _Patient, offset, grow) -> tuple[Box, Box]:
    """Spleen (posterior-left) and stomach (anterior-left: 4 mm wall, fluid, gas rising anteriorly) under the
    left hemidiaphragm."""

    def organ(centre, semi) -> tuple[Box, np.ndarray, np.ndarray]:
        box = grid.around(centre, semi)
        z, y, x = grid.coords(box)
        r2 = ((z - centre[0]) / semi[0]) ** 2 + _ellipse2d(y, x, centre[1:], semi[1:])
        allowed = (z < p.diaphragm(y, x) - 6.0) & (_ellipse2d(y, x, (p.cy, p.cx), p.cavity_semi) <= 1)
        return box, r2, allowed & (r2 <= 1)

    cay, cax = p.cavity_semi  # organs sit relative to the abdominal wall, whatever the body size
    s = grow()
    spleen_box, _, spleen = organ(
        (p.dome_left - 45.0 + offset(0.5), p.cy + 0.55 * cay + offset(0.5), p.cx + cax - 32.0 + offset(0.3)),
        (50.0 * s, 50.0 * s, 25.0 * s),
    )
    _paint(labels, spleen_box, spleen, _SPLEEN)
    s = grow()
    semi = (55.0 * s, 45.0 * s, 40.0 * s)
    centre = (p.dome_left - 50.0 + offset(0.5), p.cy - 15.0 + offset(0.5), p.cx + 0.45 * cax + offset(0.5))
    box, r2, stomach = organ(centre, semi)
    lumen = stomach & (r2 <= (1 - 4.0 / min(semi)) ** 2)
    _, y, _ = grid.coords(box)
    _paint(labels, box, stomach, _STOMACH_WALL)
    _paint(labels, box, lumen, _STOMACH_FLUID)
    _paint(labels, box, lumen & (y < centre[1] - 0.55 * semi[1]), _STOMACH_GAS)  # supine: gas is anterior
    return spleen_box, box


def _heart(grid: _Grid, labels: np.ndarray, p: _Patient, rng, offset, grow) -> Box:
    """Heart: an ellipsoid whose long axis points anterior-left-inferior, wrapped in pericardial fat."""
    s = grow()
    semi = (52.0 * s, 68.0 * s, 50.0 * s)  # (z, long axis, short axis)
    centre = (p.dome_left + 28.0 + offset(0.5), p.cy - 30.0 + offset(0.5), p.cx + 22.0 + offset(0.5))
    angle = math.radians(35.0 + float(rng.uniform(-8.0, 8.0)))
    box = grid.around(centre, (semi[0] + 5.0, semi[1] + 5.0, semi[1] + 5.0))
    z, y, x = grid.coords(box)
    dy, dx = y - centre[1], x - centre[2]
    u = dx * math.cos(angle) - dy * math.sin(angle)  # towards patient-left and anterior
    v = dx * math.sin(angle) + dy * math.cos(angle)
    dz = z - centre[0]
    cavity = p.in_cavity(z, y, x)

    def radius2(grow_mm: float) -> np.ndarray:
        a, b, c = semi[0] + grow_mm, semi[1] + grow_mm, semi[2] + grow_mm
        return (dz / a) ** 2 + (u / b) ** 2 + (v / c) ** 2

    _paint(labels, box, (radius2(4.0) <= 1) & cavity, _FAT)  # pericardial fat
    heart = (radius2(0.0) <= 1) & cavity
    _paint(labels, box, heart, _HEART_WALL)
    _paint(labels, box, heart & (radius2(-8.0) <= 1), _HEART_BLOOD)  # 8 mm myocardium
    return box


def _great_vessels(grid: _Grid, labels: np.ndarray, p: _Patient, offset) -> list[np.ndarray]:
    """Superior vena cava, pulmonary trunk and pulmonary arteries (unlabelled). Returns the right and left hila
    (the ends of the pulmonary arteries, inside the lungs) in mm."""
    cz = p.carina[0]
    cy, cx = p.cy + offset(0.3), p.cx + offset(0.3)
    bifurcation = [cz - 15.0, cy - 15.0, cx + 25.0]
    right = np.array([bifurcation, [cz - 22.0, cy - 17.0, cx - 20.0], [cz - 25.0, cy - 12.0, cx - 52.0]])
    left = np.array([bifurcation, [cz - 5.0, cy + 8.0, cx + 50.0]])
    for points, radius in (
        ([[110.0, cy - 35.0, cx - 28.0], [p.dome_left + 45.0, cy - 30.0, cx - 27.0]], [10.0, 10.0]),  # SVC
        ([[p.dome_left + 60.0, cy - 50.0, cx + 30.0], bifurcation], [13.0, 13.0]),  # pulmonary trunk
        (right, [9.0, 8.0, 7.0]),
        (left, [9.0, 7.0]),
    ):
        _tube(grid, labels, np.array(points), np.array(radius), _VESSEL)
    return [right[-1], left[-1]]


def _lung_vessels(
    grid: _Grid, labels: np.ndarray, rng: np.random.Generator, hilum: np.ndarray, lung: int, vessel: int, box: Box
) -> None:
    """A three-generation pulmonary vessel tree from the hilum, drawn only over that lung's parenchyma.

    Branches head for random lung voxels: 5 from the hilum (radius 4 → 2.8 mm), 3 from each of their ends
    (2.4 → 1.6 mm) and 2 from each of those (1.4 → 0.9 mm).
    """
    idx = np.stack([rng.integers(s.start, max(s.stop, s.start + 1), size=600) for s in box], axis=1)
    idx = idx[labels[idx[:, 0], idx[:, 1], idx[:, 2]] == lung]
    if len(idx) == 0:
        return
    targets = np.stack([grid.z[idx[:, 0]], grid.y[idx[:, 1]], grid.x[idx[:, 2]]], axis=1).astype(np.float64)

    def branch(start: np.ndarray, outward: np.ndarray | None, max_length: float, r0: float, r1: float):
        picks = targets[rng.integers(len(targets), size=8)]
        if outward is not None:
            picks = picks[(picks - start) @ outward > 0]  # keep heading away from the hilum
        if len(picks) == 0:
            return None
        step = picks[0] - start
        length = float(np.linalg.norm(step))
        end = start + step * min(0.55, max_length / max(length, 1e-6))
        _tube(grid, labels, np.array([start, end]), np.array([r0, r1]), vessel, within=lung)
        return end

    for _ in range(5):
        end1 = branch(hilum, None, 1e4, 4.0, 2.8)
        for _ in range(3 if end1 is not None else 0):
            end2 = branch(end1, end1 - hilum, 50.0, 2.4, 1.6)
            for _ in range(2 if end2 is not None else 0):
                branch(end2, end2 - end1, 30.0, 1.4, 0.9)


def _esophagus(grid: _Grid, labels: np.ndarray, p: _Patient, offset) -> Box:
    """Esophagus: behind the trachea, in front of the spine, turning left through the diaphragm to the stomach."""
    shift = np.array([offset(0.3), offset(0.3), offset(0.3)])
    points = np.array([[200.0, p.cy + 15, p.cx + 3], [-40.0, p.cy + 14, p.cx + 8], [-85.0, p.cy, p.cx + 35]])
    return _tube(grid, labels, points + shift, np.full(3, 7.5), _ESOPHAGUS)


def _aorta(grid: _Grid, labels: np.ndarray, p: _Patient, offset) -> Box:
    """Aorta: root inside the heart, ascending anterior, arch over the left main bronchus, descending left of
    the spine into the abdomen."""
    shift = np.array([offset(0.5), offset(0.5), offset(0.5)])
    cy, cx = p.cy, p.cx
    ascending = np.array([[p.dome_left + 45.0, cy - 30.0, cx + 2.0], [60.0, cy - 38.0, cx + 4.0]])
    arch = _bezier((60.0, cy - 38.0, cx + 4.0), (100.0, cy - 5.0, cx + 24.0), (62.0, cy + 28.0, cx + 26.0))
    descending = np.array([[-90.0, cy + 28.0, cx + 24.0], [-200.0, cy + 26.0, cx + 8.0]])
    points = np.concatenate([ascending, arch[1:], descending]) + shift
    radius = np.concatenate([[15.0, 15.0], np.linspace(15.0, 12.0, len(arch) - 1), [12.0, 11.0]])
    return _tube(grid, labels, points, radius, _AORTA)


def _airways(grid: _Grid, labels: np.ndarray, p: _Patient) -> Box:
    """Trachea (lumen + 2 mm wall) down to the carina, then the two main bronchi (not in the trachea mask)."""
    carina = np.array(p.carina)
    trachea = np.array([[220.0, carina[1], carina[2]], carina])
    right = np.array([carina, carina + [-25.0, 6.0, -35.0]])
    left = np.array([carina, carina + [-35.0, 10.0, 43.0]])
    # All walls first, then all lumens, so that no wall covers the lumen of an airway drawn earlier.
    for points, radius, label in (
        (right, 7.0, _BRONCHUS_WALL),
        (left, 6.0, _BRONCHUS_WALL),
        (trachea, 10.0, _TRACHEA_WALL),
        (right, 5.5, _BRONCHUS_LUMEN),
        (left, 4.5, _BRONCHUS_LUMEN),
        (trachea, 8.0, _TRACHEA_LUMEN),
    ):
        box = _tube(grid, labels, points, np.full(len(points), radius), label)
        if label == _TRACHEA_WALL:
            trachea_box = box
    return trachea_box


def _spine(grid: _Grid, labels: np.ndarray, p: _Patient) -> tuple[Box, dict[str, Box]]:
    """Vertebrae C5-L3 (bodies with cortex and endplates, posterior arch, spinous and transverse processes),
    discs and the spinal canal. Returns the spine box and each level's box."""
    n_levels = len(_VERTEBRAE)
    first_t = 3  # index of T1 in _VERTEBRAE
    # Body heights grow down the spine (mm); discs are thicker in the lumbar spine.
    heights = np.interp(np.arange(n_levels), [0, first_t, first_t + 11, n_levels - 1], [13.0, 17.0, 23.0, 26.0])
    discs = np.where(np.arange(n_levels) >= first_t + 12, 8.0, 4.5)
    tops = np.empty(n_levels)
    tops[first_t] = p.t1_top
    for i in range(first_t + 1, n_levels):
        tops[i] = tops[i - 1] - heights[i - 1] - discs[i - 1]
    for i in range(first_t - 1, -1, -1):
        tops[i] = tops[i + 1] + discs[i] + heights[i]

    body_semi_y = np.interp(np.arange(n_levels), [0, first_t, n_levels - 1], [9.0, 12.0, 18.0])
    body_semi_x = np.interp(np.arange(n_levels), [0, first_t, n_levels - 1], [13.0, 15.0, 24.0])
    canal_y = p.spine_y + 14.0 + 8.0
    half = (60.0, 46.0)  # in-plane half extent of the whole vertebra (y, x) around (spine_y + 25, cx)
    centre_y = p.spine_y + 25.0
    box = grid.box((-1e4, centre_y - half[0], p.cx - half[1]), (1e4, centre_y + half[0], p.cx + half[1]))
    _, y, x = grid.coords(box)
    y, x = y[0], x[0]  # (h, 1), (1, w)

    def extrude(z_low: float, z_high: float, area: np.ndarray, label: int) -> None:
        zbox = grid.box((z_low, 0, 0), (z_high, 0, 0))[0]
        sub = (zbox, box[1], box[2])
        _paint(labels, sub, area[None], label)

    # Spinal canal (CSF and cord) runs through every level and disc.
    canal = _ellipse2d(y, x, (canal_y, p.cx), (8.0, 8.0)) <= 1
    arch = (_ellipse2d(y, x, (canal_y, p.cx), (14.0, 13.0)) <= 1) & ~canal
    arch |= _ellipse2d(y, x, (canal_y + 22.0, p.cx), (9.0, 4.0)) <= 1  # spinous process
    arch |= _ellipse2d(y, x, (canal_y - 2.0, p.cx - 22.0), (5.0, 12.0)) <= 1  # transverse processes
    arch |= _ellipse2d(y, x, (canal_y - 2.0, p.cx + 22.0), (5.0, 12.0)) <= 1
    endplate = max(grid.spacing[0], 2.0)
    level_boxes = {}
    for i, (name, _) in enumerate(_VERTEBRAE):
        top, bottom = tops[i], tops[i] - heights[i]
        body_r2 = _ellipse2d(y, x, (p.spine_y, p.cx), (body_semi_y[i], body_semi_x[i]))
        body = body_r2 <= 1
        cortex_in = (1 - 2.5 / min(body_semi_y[i], body_semi_x[i])) ** 2
        extrude(bottom, top, arch & ~body, _VERT_POSTERIOR)
        extrude(bottom, top, body, _VERT_CORTEX)
        extrude(bottom + endplate, top - endplate, body_r2 <= cortex_in, _VERT_CANCELLOUS)
        extrude(bottom - discs[i], bottom, body, _DISC)
        level_boxes[name] = (grid.box((bottom, 0, 0), (top, 0, 0))[0], box[1], box[2])
    extrude(-1e4, 1e4, canal, _CANAL)
    level_boxes = {k: v for k, v in level_boxes.items() if v[0].stop > v[0].start}
    return box, level_boxes


def _ribs_and_sternum(grid: _Grid, labels: np.ndarray, p: _Patient, rng):
    """Twelve pairs of ribs in the chest wall and the sternum.

    Each rib follows the (tapered) inner chest-wall ellipse 5 mm outside the lungs, from the transverse process
    around to the front, dropping ~60 mm from back to front. All ribs are rasterised in one pass over the ring of
    pixels near that ellipse, as a (D, K) problem (K ring pixels), instead of one sweep per rib.

    Returns:
        Rib box, sternum box and ``{"rib_left_4": flat voxel indices, ...}``.
    """
    semi = (p.cavity_semi[0] + 5.0, p.cavity_semi[1] + 5.0)
    dy, dx = grid.y[:, None] - p.cy, grid.x[None, :] - p.cx
    rho = np.sqrt((dy / semi[0]) ** 2 + (dx / semi[1]) ** 2)
    taper = p.taper(grid.z)  # (D,)
    ring = (rho > taper.min() - 0.12) & (rho < 1.12)
    rows, cols = np.nonzero(ring)
    rho_k, dy_k, dx_k = rho[rows, cols], dy[rows, 0], dx[0, cols]
    mm_per_rho = np.sqrt(dy_k**2 + dx_k**2) / np.maximum(rho_k, 1e-6)
    phi = np.arctan2(np.abs(dx_k) / semi[1], dy_k / semi[0]) / np.pi  # 0 at the spine, 1 at the sternum

    # Posterior heights of ribs 1..12 at their vertebrae (T1..T12), spaced like the vertebrae.
    level_z = p.t1_top - 10.0 - np.arange(12) * 24.5 - np.cumsum(np.linspace(0.0, 1.2, 12))
    drop = 60.0 + float(rng.uniform(-8.0, 8.0))
    reach = np.array([0.78] * 7 + [0.72, 0.68, 0.62, 0.5, 0.38])  # anterior end of each rib, as phi

    radial = (rho_k[None, :] - taper[:, None]) * mm_per_rho[None, :]  # (D, K) mm from the rib ellipse
    d_idx, k_idx = np.nonzero(np.abs(radial) < 3.5)
    radial = radial[d_idx, k_idx]
    u = grid.z[d_idx] + drop * phi[k_idx]  # height the point would have at the rib's posterior end
    rib = np.clip(np.rint(np.interp(-u, -level_z, np.arange(12))), 0, 11).astype(int)
    dist = ((u - level_z[rib]) / 6.0) ** 2 + (radial / 3.5) ** 2  # elliptic cross-section, 12 x 7 mm
    keep = (dist <= 1) & (phi[k_idx] >= 0.13) & (phi[k_idx] <= reach[rib])
    d_idx, k_idx, rib, dist = d_idx[keep], k_idx[keep], rib[keep], dist[keep]
    flat = np.ravel_multi_index((d_idx, rows[k_idx], cols[k_idx]), grid.shape)
    labels.reshape(-1)[flat] = np.where(dist > 0.45, _RIB_CORTEX, _RIB_MARROW).astype(np.uint8)
    left = dx_k[k_idx] > 0
    rib_voxels = {
        f"rib_{'left' if is_left else 'right'}_{k + 1}": flat[(rib == k) & (left == is_left)]
        for is_left in (False, True)
        for k in range(12)
    }
    rib_voxels = {name: idx for name, idx in rib_voxels.items() if idx.size}
    rib_box = grid.box((-1e4, -1e4, -1e4), (1e4, 1e4, 1e4))

    # Sternum: a flat elliptic bar in the anterior chest wall from the manubrium to the xiphoid.
    centre = (p.cy - p.cavity_semi[0] - 8.0, p.cx)
    sternum_box = grid.box(
        (p.dome_left - 15.0, centre[0] - 7.0, centre[1] - 15.0), (p.t1_top - 25.0, centre[0] + 7.0, centre[1] + 15.0)
    )
    _, y, x = grid.coords(sternum_box)
    r2 = _ellipse2d(y, x, centre, (6.0, 14.0))
    _paint(labels, sternum_box, r2 <= 1, _STERNUM_CORTEX)
    _paint(labels, sternum_box, r2 <= 0.4, _STERNUM_MARROW)
    return rib_box, sternum_box, rib_voxels


# ---------------------------------------------------------------------------------------------------------------
# Intensities and lesions
# ---------------------------------------------------------------------------------------------------------------


def _render(grid: _Grid, anatomy: _Anatomy, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, float]]:
    """HU volume (float32, no noise) from the tissue labels; per-phantom tissue values vary a little."""
    tissue = {
        "fat": -100.0 + float(rng.uniform(-10, 10)),
        "soft": 40.0 + float(rng.uniform(-8, 8)),
        "blood": 50.0 + float(rng.uniform(-8, 8)),
        "liver": 55.0 + float(rng.uniform(-8, 8)),
        "spleen": 45.0 + float(rng.uniform(-5, 5)),
        "lung": -850.0 + float(rng.uniform(-25, 25)),
    }
    lut = np.zeros(_N_LABELS, dtype=np.float32)
    lut[[_AIR, _BRONCHUS_LUMEN, _TRACHEA_LUMEN]] = -1000.0
    lut[_FAT] = tissue["fat"]
    lut[[_SOFT, _HEART_WALL, _ESOPHAGUS, _STOMACH_WALL]] = tissue["soft"]
    lut[[_HEART_BLOOD, _AORTA, _VESSEL, _LUNG_VESSEL_RIGHT, _LUNG_VESSEL_LEFT]] = tissue["blood"]
    lut[_LIVER] = tissue["liver"]
    lut[_SPLEEN] = tissue["spleen"]
    lut[_STOMACH_FLUID], lut[_STOMACH_GAS] = 15.0, -1000.0
    lut[[_LUNG_RIGHT, _LUNG_LEFT]] = tissue["lung"]
    lut[[_BRONCHUS_WALL, _TRACHEA_WALL]] = 60.0
    lut[_DISC], lut[_CANAL] = 90.0, 20.0
    lut[[_VERT_CORTEX, _RIB_CORTEX]] = 800.0
    lut[_VERT_CANCELLOUS], lut[_VERT_POSTERIOR] = 230.0, 650.0
    lut[_RIB_MARROW], lut[_STERNUM_MARROW], lut[_STERNUM_CORTEX] = 280.0, 250.0, 700.0
    volume = lut[anatomy.labels]  # (D, H, W) float32

    # Lung parenchyma: denser posteriorly (gravity) plus smooth low-frequency variation, separable in z, y, x.
    box = anatomy.lung_box
    z, y, x = grid.coords(box)
    texture = np.float32(30.0 / 90.0) * (y - np.float32(np.mean(grid.y[box[1]])))
    for _ in range(3):
        wavelength = rng.uniform(50.0, 140.0, size=3)
        phase = rng.uniform(0.0, 2 * np.pi, size=3)
        amp = np.float32(rng.uniform(4.0, 8.0))
        term = np.cos(z * np.float32(2 * np.pi / wavelength[0]) + np.float32(phase[0])) * amp
        term = term * np.cos(y * np.float32(2 * np.pi / wavelength[1]) + np.float32(phase[1]))
        texture = texture + term * np.cos(x * np.float32(2 * np.pi / wavelength[2]) + np.float32(phase[2]))
    local = anatomy.labels[box]
    lung = (local == _LUNG_RIGHT) | (local == _LUNG_LEFT)
    volume[box] += np.where(lung, texture, np.float32(0.0))
    return volume, tissue


def _add_lesions(
    grid: _Grid,
    masks: dict[str, np.ndarray],
    volume: np.ndarray,
    tissue: dict[str, float],
    rng: np.random.Generator,
    cfg: PhantomConfig,
) -> tuple[list[Finding], list[np.ndarray]]:
    """Draw and paint the lesions; effusions first, then solid lesions, never overlapping each other."""
    kinds = cfg.lesion_kinds
    # One draw per slot whatever the outcome, so slot i's decision does not depend on the others.
    effusion_draws = rng.random(len(_EFFUSION_HOSTS))
    solid_draws = rng.random(len(_SOLID_HOSTS))
    occupied = np.zeros(grid.shape, dtype=bool)
    findings, lesion_masks = [], []

    def record(kind: str, host: str, box: Box, local: np.ndarray, centre, size: float, hu: float) -> None:
        hu = round(float(hu), 1)  # the recorded value is the painted one
        volume[box][local] = np.float32(hu)
        occupied[box] |= local
        mask = np.zeros(grid.shape, dtype=bool)
        mask[box] = local
        findings.append(Finding(kind, host, tuple(int(c) for c in centre), float(size), hu, int(local.sum())))
        lesion_masks.append(mask)

    if "effusion" in kinds:
        for host, draw in zip(_EFFUSION_HOSTS, effusion_draws, strict=True):
            if draw >= cfg.effusion_probability:
                continue
            thickness = float(round(rng.uniform(*cfg.effusion_size_mm)))
            hu = float(rng.uniform(*cfg.effusion_hu))
            placed = _effusion(grid, masks[host], occupied, thickness)
            if placed is not None:
                record("effusion", host, *placed, thickness, hu)

    solid_kinds = [k for k in ("nodule", "mass") if k in kinds]
    if solid_kinds:
        for host, draw in zip(_SOLID_HOSTS, solid_draws, strict=True):
            if draw >= cfg.lesion_probability:
                continue
            kind = solid_kinds[0]
            if len(solid_kinds) == 2:
                kind = "mass" if rng.random() < cfg.mass_fraction else "nodule"
            if kind == "nodule":
                low, high = cfg.nodule_size_mm
                diameter = float(np.exp(rng.uniform(np.log(low), np.log(high))))  # small nodules are commoner
            else:
                low, high = cfg.mass_size_mm
                diameter = float(rng.uniform(low, high))
            diameter = max(round(diameter), 1.0)
            if host == "liver":
                hu = tissue["liver"] + float(rng.uniform(*cfg.liver_lesion_contrast_hu))
            else:
                hu = float(rng.uniform(*cfg.lung_lesion_hu))
            lobulation = (float(rng.uniform(0.08, 0.15)), float(rng.uniform(0, 2 * np.pi))) if kind == "mass" else None
            placed = _solid_lesion(grid, masks[host], occupied, diameter, max(low, 1.0), lobulation, rng)
            if placed is not None:
                box, local, centre, diameter = placed
                record(kind, host, box, local, centre, diameter, hu)
    return findings, lesion_masks


def _solid_lesion(
    grid: _Grid,
    host: np.ndarray,
    occupied: np.ndarray,
    diameter: float,
    min_diameter: float,
    lobulation: tuple[float, float] | None,
    rng: np.random.Generator,
):
    """Place a sphere (lobulated for masses) with its centre in ``host`` and at least 80% of it inside.

    Tries random centres; if none fits, shrinks the diameter by 15% (not below ``min_diameter``) and tries again;
    finally keeps the best candidate seen. The lesion is clipped to the host (minus earlier lesions).

    Returns:
        ``(box, local mask, centre voxel, diameter)``, or None if the host is empty.
    """
    tight = _tight_box(host, tuple(slice(0, n) for n in grid.shape))
    if tight is None:
        return None
    best = None
    for _ in range(5):
        r = diameter / 2
        candidates = np.stack([rng.integers(s.start, s.stop, size=48) for s in tight], axis=1)
        for c in candidates:
            c = tuple(int(i) for i in c)
            if not host[c] or occupied[c]:
                continue
            centre_mm = (grid.z[c[0]], grid.y[c[1]], grid.x[c[2]])
            box = grid.around(centre_mm, (r * 1.2, r * 1.2, r * 1.2))
            z, y, x = grid.coords(box)
            dz, dy, dx = z - centre_mm[0], y - centre_mm[1], x - centre_mm[2]
            dist2 = dz * dz + dy * dy + dx * dx
            limit = np.float32(r)
            if lobulation is not None:
                # Lobulated outline: the radius varies by ±amp with three lobes around the axial plane.
                amp, phase = lobulation
                horizontal = np.sqrt(dy * dy + dx * dx)
                lobes = np.cos(3 * np.arctan2(dy, dx) + np.float32(phase)) * horizontal / np.sqrt(dist2 + 1e-6)
                limit = np.float32(r) * (1 + np.float32(amp) * lobes)
            sphere = dist2 <= limit * limit
            free = host[box] & ~occupied[box]
            inside = sphere & free
            fraction = inside.sum() / max(int(sphere.sum()), 1)
            if best is None or fraction > best[0]:
                best = (fraction, box, inside, c, diameter)
            if fraction >= 0.8:
                return box, inside, c, diameter
        if diameter <= min_diameter:
            break
        diameter = float(max(round(diameter * 0.85), min_diameter))
    if best is None:
        return None
    return best[1:]


def _effusion(grid: _Grid, lung: np.ndarray, occupied: np.ndarray, thickness: float):
    """Dependent pleural fluid: the posterior layer of the lung, ``thickness`` mm at the base, thinning upwards.

    Returns:
        ``(box, local mask, centre voxel)`` or None if the lung is empty.
    """
    box = _tight_box(lung, tuple(slice(0, n) for n in grid.shape))
    if box is None:
        return None
    local = lung[box]
    z, _, _ = grid.coords(box)
    n_h = local.shape[1]
    has = local.any(axis=1)  # (d, w)
    posterior = n_h - 1 - np.argmax(local[:, ::-1, :], axis=1)  # (d, w) last lung row in each column
    depth_mm = (posterior[:, None, :] - np.arange(n_h)[None, :, None]) * grid.spacing[1]  # (d, h, w)
    base = float(z[0, 0, 0])
    height = 3.0 * thickness + 40.0
    layer = thickness * np.clip(1.0 - ((z - base) / height) ** 2, 0.0, 1.0)  # (d, 1, 1)
    fluid = local & has[:, None, :] & (depth_mm < layer) & ~occupied[box]
    if not fluid.any():
        return None
    idx = np.argwhere(fluid)
    nearest = idx[np.argmin(((idx - idx.mean(0)) ** 2).sum(1))]
    centre = tuple(int(s.start + i) for s, i in zip(box, nearest, strict=True))
    return box, fluid, centre


def _check_floats(name: str, value, n: int) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {n} numbers, got {value!r}") from None
    if len(values) != n or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be {n} finite numbers, got {value!r}")
    return values


def _check_range(name: str, value, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low <= value <= high:
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
