"""Phantom configuration and results: :class:`PhantomConfig`, :class:`Finding`, :class:`Phantom`."""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from med3dqwen.io import atomic_output, save_nifti

from .geometry import tight_box
from .structures import _PARENT, ANATOMY_PATHS


# Field of view in mm along (D, H, W) used when PhantomConfig.spacing is None.
DEFAULT_FOV_MM = (320.0, 384.0, 384.0)

LESION_KINDS = ("nodule", "mass", "effusion")


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
                    box = tight_box(mask, tuple(slice(0, n) for n in mask.shape))
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
