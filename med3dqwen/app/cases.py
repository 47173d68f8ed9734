"""What the viewer shows, without Gradio: cases (uploaded files or phantoms), ROI masks and rendered slices.

Everything here is plain numpy on the canonical (D, H, W) layout of :mod:`med3dqwen.processing.ct_io`, so the browser
app (:mod:`med3dqwen.app.ui`) stays a thin layer of widgets and the pieces are tested without a browser.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from med3dqwen.anatomy.vocabulary import default_vocabulary
from med3dqwen.io import UnsafePathError, safe_relpath
from med3dqwen.processing.ct_io import CorruptFileError, CTInputError, CTVolume, load_mask, load_volume
from med3dqwen.processing.ct_transforms import boundary_mask, parse_color, window_hu
from med3dqwen.segmentation.base import MaskResult, MaskSource, UnknownStructureError, close_matches
from med3dqwen.segmentation.threshold import THRESHOLD_STRUCTURES


__all__ = [
    "EXAMPLE_CASES",
    "PHANTOM_SHAPE",
    "Case",
    "CaseMaskSource",
    "RoiView",
    "example_case",
    "load_case_file",
    "mask_from_file",
    "render_slice",
    "roi_view",
]

# The example phantoms' grid: small enough to generate in ~0.1 s, large enough to show lobes and lesions.
PHANTOM_SHAPE = (64, 128, 128)
# Example cases: name shown in the app → phantom seed.
EXAMPLE_CASES = {f"Phantom, seed {seed}": seed for seed in (0, 1, 2)}
# Upload limits for zipped DICOM series (a CT series is a few hundred MB at most).
MAX_ZIP_MEMBERS = 5000
MAX_ZIP_BYTES = 4 * 1024**3
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".npy", ".zip", ".dcm")


@dataclass
class Case:
    """A loaded CT and the masks that came with it.

    Attributes:
        volume: the CT in canonical (D, H, W) HU.
        name: what the app calls it (the file name or the example's name).
        masks: structure name → (D, H, W) bool mask shipped with the case (a phantom's ground truth); empty for
            uploads, whose ROI comes from a mask file or a segmenter.
    """

    volume: CTVolume
    name: str
    masks: dict[str, np.ndarray] = field(default_factory=dict, repr=False)


class CaseMaskSource(MaskSource):
    """The masks shipped with a case (a phantom's ground truth) as a mask source, so that ``predict`` and the viewer
    outline the same voxels. Names go through the anatomy vocabulary (``"right upper lobe"`` → the phantom's
    ``lung_upper_lobe_right``)."""

    source_name = "phantom"

    def __init__(self, case: Case) -> None:
        self.case = case

    def get_mask(self, volume: CTVolume, structure: str, *, volume_id: str | None = None) -> MaskResult:
        masks = self.case.masks
        key = structure if structure in masks else default_vocabulary().canonical(structure)
        if key not in masks:
            raise UnknownStructureError(
                structure,
                self.source_name,
                close_matches(structure, masks),
                detail=f"{self.case.name} has no mask of it",
            )
        if masks[key].shape != volume.shape:
            raise CTInputError(self.case.name, f"mask grid {masks[key].shape} differs from volume grid {volume.shape}")
        return MaskResult(mask=masks[key], structure=structure, resolved_name=key, source=self.source_name)


@dataclass
class RoiView:
    """The ROI as the viewer draws it.

    Attributes:
        mask: (D, H, W) bool ROI on the case's grid.
        band: (D, H, W) bool contour band (the model's inner 3-px band, :func:`boundary_mask`).
        slices: indices of the axial slices the contour is drawn on (inferior first).
        source: where the mask came from (``"phantom"``, ``"mask file"``, the segmenter's name).
    """

    mask: np.ndarray = field(repr=False)
    band: np.ndarray = field(repr=False)
    slices: list[int]
    source: str

    @property
    def empty(self) -> bool:
        return not self.slices


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _extract_series(archive: Path, into: Path) -> Path:
    """Extract a zipped DICOM series into ``into`` and return the one folder that holds its files.

    Member names are untrusted: each must be a relative path inside the archive (no ``..``, no absolute path), the
    member count and the uncompressed size are capped, and only regular files are written.
    """
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            if not members:
                raise CorruptFileError(archive, "the zip archive holds no files")
            if len(members) > MAX_ZIP_MEMBERS:
                raise CorruptFileError(archive, f"the zip holds {len(members)} files, more than {MAX_ZIP_MEMBERS}")
            total = sum(m.file_size for m in members)
            if total > MAX_ZIP_BYTES:
                raise CorruptFileError(archive, f"the zip unpacks to {total / 1024**3:.1f} GiB, more than 4 GiB")
            folders = set()
            for member in members:
                try:
                    relative = safe_relpath(member.filename)
                except UnsafePathError as err:
                    raise CorruptFileError(archive, f"unsafe member name ({err.problem})") from None
                parts = relative.split("/")
                if parts[-1].startswith(".") or "__MACOSX" in parts:
                    continue  # Finder's resource forks and hidden files are no slices
                target = into.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(target, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                folders.add(target.parent)
    except zipfile.BadZipFile as err:
        raise CorruptFileError(archive, f"not a readable zip archive ({err})") from None
    if len(folders) != 1:
        shown = sorted(str(f.relative_to(into)) for f in folders)[:5]
        raise CorruptFileError(archive, f"the zip holds files in {len(folders)} folders {shown}; zip one series")
    return folders.pop()


def load_case_file(path: str | os.PathLike, name: str | None = None) -> Case:
    """Load an uploaded CT: a NIfTI file, a canonical ``.npy`` array, one DICOM file or a zipped DICOM series.

    Args:
        path: the uploaded file (Gradio keeps uploads in a temporary folder under their original name).
        name: what to call the case (default: the file name).

    Raises:
        CorruptFileError: another file type (named with the accepted ones), an unreadable file, an unsafe zip.
        InvalidVolumeError: not a 3D CT (see :func:`~med3dqwen.processing.ct_io.load_volume`).
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix not in VOLUME_SUFFIXES:
        raise CorruptFileError(
            path.name,
            f"unsupported file type {suffix or '(none)'!r}; "
            "upload .nii, .nii.gz, .npy, .dcm or a .zip of one DICOM series",
        )
    if suffix == ".zip":
        with tempfile.TemporaryDirectory(prefix="med3dqwen-dicom-") as tmp:
            volume = load_volume(_extract_series(path, Path(tmp)))
        volume.path = str(path)
    else:
        volume = load_volume(path)
    if volume.intensity != "hu":
        raise CTInputError(path.name, "not a CT volume in Hounsfield units")
    return Case(volume=volume, name=name or path.name)


def example_case(name: str) -> Case:
    """The example case ``name`` (a key of :data:`EXAMPLE_CASES`): a phantom with its structure masks.

    Raises:
        CTInputError: an unknown example name.
    """
    from med3dqwen.builders.phantom import PhantomConfig, generate_phantom

    if name not in EXAMPLE_CASES:
        raise CTInputError(None, f"unknown example case {name!r}; expected one of {list(EXAMPLE_CASES)}")
    phantom = generate_phantom(EXAMPLE_CASES[name], PhantomConfig(shape=PHANTOM_SHAPE))
    volume = CTVolume(array=phantom.volume, affine=phantom.affine, path=None, meta={"phantom_seed": phantom.seed})
    return Case(volume=volume, name=name, masks=dict(phantom.masks))


def mask_from_file(case: Case, path: str | os.PathLike, label: str | int | None = None) -> np.ndarray:
    """A (D, H, W) bool ROI read from an uploaded mask, checked against the case's grid.

    Args:
        case: the loaded case; the mask must lie on its voxel grid (shape and affine).
        path: a NIfTI or ``.npy`` mask (binary, or multilabel with ``label``).
        label: ``None`` for a binary mask, else an integer label id or a name from the file's label table.

    Raises:
        MaskMismatchError: the mask belongs to another scan (grid differs). UnknownLabelError, CorruptFileError,
            InvalidVolumeError: see :func:`~med3dqwen.processing.ct_io.load_mask`.
    """
    if isinstance(label, str):
        label = label.strip() or None
        if label is not None and label.lstrip("-").isdigit():
            label = int(label)
    return load_mask(path, like=case.volume, label=label)


def roi_view(mask: np.ndarray, source: str, thickness: int = 3) -> RoiView:
    """The contour band of ``mask`` and the slices it appears on (the same band the model input carries)."""
    band = boundary_mask(mask, thickness=thickness)
    slices = np.flatnonzero(band.any(axis=(1, 2))).tolist()
    return RoiView(mask=np.asarray(mask, dtype=bool), band=band, slices=slices, source=source)


def render_slice(
    volume: CTVolume,
    index: int,
    band: np.ndarray | None = None,
    color: str = "red",
    window: str | tuple[float, float] = "chest",
) -> np.ndarray:
    """One axial slice as an (H, W', 3) uint8 RGB image: windowed grey with the ROI contour painted in ``color``.

    The radiological view of :mod:`ct_io` (patient's right on the image's left, anterior up). Columns are resampled
    (nearest) so that a pixel is square in millimetres: a slice with 0.7 × 1.4 mm voxels is not shown squashed.

    Args:
        volume: the CT. index: slice index along D (clipped to the volume).
        band: (D, H, W) bool contour band on the volume's grid, or ``None`` for the bare slice.
        color: contour colour (``"red"``, ``"blue"``, ... or RGB); ``"none"`` draws no contour.
        window: display window (preset name or ``(low, high)`` HU).

    Raises:
        ValueError: ``band`` is not on the volume's grid.
    """
    d = int(np.clip(index, 0, volume.shape[0] - 1))
    grey = np.rint(window_hu(volume.array[d], window) * 255.0).astype(np.uint8)  # (H, W)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if band is not None and color != "none":
        if band.shape != volume.shape:
            raise ValueError(f"contour band shape {band.shape} differs from volume shape {volume.shape}")
        rgb[band[d]] = parse_color(color)
    _, row_mm, col_mm = volume.spacing
    if not np.isclose(row_mm, col_mm, rtol=0.02):
        width = max(1, round(rgb.shape[1] * col_mm / row_mm))
        columns = np.minimum((np.arange(width) * rgb.shape[1] / width).astype(int), rgb.shape[1] - 1)
        rgb = rgb[:, columns]  # (H, W', 3)
    return rgb


def structure_choices(case: Case | None, extra: Mapping[str, str] | None = None) -> list[str]:
    """ROI names to offer for ``case``: its own masks (a phantom's), else the names the threshold segmenter serves."""
    if case is not None and case.masks:
        return sorted(case.masks)
    return sorted({*THRESHOLD_STRUCTURES, *(extra or {})})
