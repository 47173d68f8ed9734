"""CT volume and mask I/O: NIfTI, DICOM and ``.npy`` into one canonical (D, H, W) array in HU.

Every loader returns arrays in the same orientation, so masks, contours and the model see the same voxels
whatever the file's own orientation was:

- axis 0 (D): axial slices, inferior → superior,
- axis 1 (H): image rows, anterior → posterior,
- axis 2 (W): image columns, patient right → patient left.

This is the radiological view of an axial slice (patient's right on the image's left, anterior at the top),
the layout DICOM axial series are stored in and the one the Med3DVLM / M3D training images were shown in.
The ``affine`` maps a (d, h, w) index to RAS+ world millimetres (the NIfTI world convention).

This file imports only third-party packages so that it can be copied next to a saved processor
(``trust_remote_code``) and work without the ``med3dqwen`` package. ``isal`` (ISA-L's inflate, about twice as fast
as zlib) is optional: without it ``.nii.gz`` files are decompressed by the standard library, with the same result.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np


try:  # optional: the same gzip decompression, done by ISA-L (``pip install isal``)
    from isal import igzip as _isal_gzip
    from isal import isal_zlib as _isal_zlib
except ImportError:  # pragma: no cover - exercised by monkeypatching in the tests
    _isal_gzip = _isal_zlib = None

__all__ = [
    "CTInputError",
    "CTVolume",
    "CorruptFileError",
    "IMAGE_SUFFIXES",
    "InvalidVolumeError",
    "LabelMap",
    "MaskMismatchError",
    "UnknownLabelError",
    "load_label_map",
    "load_mask",
    "load_volume",
    "memory_order",
    "resolve_label",
    "select_label",
    "standard_affine",
    "to_canonical",
]

# Orientation of the (D, H, W) axes, as the world direction each index increases towards.
AXCODES_DHW = ("S", "P", "L")
# The same orientation expressed on NIfTI data axes (i, j, k) = (W, H, D).
_AXCODES_WHD = ("L", "P", "S")


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


class CTInputError(ValueError):
    """Bad CT input; the message names the file (or array) and the problem."""

    def __init__(self, source: str | os.PathLike | None, problem: str):
        self.source = None if source is None else str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}" if self.source else problem)

    def __reduce__(self):
        # Pickle with both arguments (the default passes only the message), so the error survives worker processes.
        return type(self), (self.source, self.problem)


class CorruptFileError(CTInputError):
    """The file is missing, unreadable, truncated or not the format its name says."""


class InvalidVolumeError(CTInputError):
    """The array is readable but unusable: wrong number of dimensions, NaN/inf voxels, empty."""


class MaskMismatchError(CTInputError):
    """A mask does not lie on its volume's voxel grid (shape or affine differ)."""


class UnknownLabelError(CTInputError, KeyError):
    """A label id or name that the multilabel file does not hold."""

    __str__ = ValueError.__str__


# ---------------------------------------------------------------------------------------------------------------
# Geometry helpers and writing
# ---------------------------------------------------------------------------------------------------------------


def standard_affine(
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0), origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
) -> np.ndarray:
    """Affine of a (D, H, W) array in this module's orientation.

    Args:
        spacing: voxel size in mm along (D, H, W).
        origin: RAS+ world position in mm of voxel (0, 0, 0).

    Returns:
        (4, 4) float64 matrix mapping (d, h, w, 1) to RAS+ mm: D goes superior, H posterior, W left.
    """
    sd, sh, sw = (float(s) for s in spacing)
    affine = np.zeros((4, 4))
    affine[2, 0] = sd  # d -> +S
    affine[1, 1] = -sh  # h -> +P = -A
    affine[0, 2] = -sw  # w -> +L = -R
    affine[:3, 3] = origin
    affine[3, 3] = 1.0
    return affine


# ---------------------------------------------------------------------------------------------------------------
# The volume object
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class CTVolume:
    """A CT volume in the canonical (D, H, W) orientation of this module.

    Attributes:
        array: (D, H, W) float32 Hounsfield units (rescale slope/intercept applied); from
            ``load_volume(..., stored_integers=True)`` possibly the stored integers as a read-only view (HU
            themselves, or HU after ``meta["stored_scale"]``).
        affine: (4, 4) float64 map from a (d, h, w, 1) index to RAS+ world mm.
        path: the file or folder it was read from (``None`` for in-memory arrays).
        meta: reader-specific extras (e.g. DICOM series UID, source orientation).
    """

    array: np.ndarray
    affine: np.ndarray
    path: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)

    @property
    def intensity(self) -> str:
        """``"hu"`` (Hounsfield units, the default) or ``"unit"`` (already in [0, 1], e.g. a 2D figure)."""
        return self.meta.get("intensity", "hu")

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along (D, H, W)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    def to_hu(self) -> CTVolume:
        """This volume with ``array`` in HU: the raw integers of ``load_volume(..., stored_integers=True)`` from a
        header-scaled file become float32 HU (``meta["stored_scale"]`` applied and dropped); any other volume is
        returned as it is (no copy). For readers that need HU values rather than a window (segmenters)."""
        if "stored_scale" not in self.meta:
            return self
        slope, intercept = self.meta["stored_scale"]
        meta = {key: value for key, value in self.meta.items() if key != "stored_scale"}
        array = self.array * np.float32(slope) + np.float32(intercept)
        return CTVolume(array=array.astype(np.float32, copy=False), affine=self.affine, path=self.path, meta=meta)

    @classmethod
    def from_array(
        cls,
        array: np.ndarray,
        spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
        affine: np.ndarray | None = None,
        name: str | None = None,
        stored_integers: bool = False,
    ) -> CTVolume:
        """Wrap an HU array that is already in (D, H, W) canonical orientation (validated like a file).

        ``stored_integers``: integer HU stay as given (not copied to float32), as ``load_volume(...,
        stored_integers=True)`` keeps a file's, so that a reader that windows them at once gives the same values
        from an array, a nibabel image or a file."""
        array = _validate_volume(np.asarray(array), name or "<array>", keep_integers=stored_integers)
        affine = standard_affine(spacing) if affine is None else np.asarray(affine, dtype=np.float64)
        return cls(array=array, affine=affine, path=name)


# ---------------------------------------------------------------------------------------------------------------
# Orientation
# ---------------------------------------------------------------------------------------------------------------


def to_canonical(data: np.ndarray, affine: np.ndarray, copy: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Reorient a 3D array with its index→RAS affine to the (D, H, W) = (S, P, L) layout (flips and swaps only).

    Args:
        data: the array in its file's axis order.
        affine: its index→RAS affine.
        copy: return a C-contiguous array; ``False`` returns the reoriented *view* of ``data`` (flips and a
            transpose, no copy), for a caller that reads it once (windowing straight from the stored integers).

    Returns:
        ``(array, affine)``: the (D, H, W) array and its index→RAS affine.
    """
    source = nib.orientations.io_orientation(affine)
    transform = nib.orientations.ornt_transform(source, nib.orientations.axcodes2ornt(_AXCODES_WHD))
    whd = nib.orientations.apply_orientation(data, transform)
    whd_affine = affine @ nib.orientations.inv_ornt_aff(transform, data.shape)
    # (W, H, D) -> (D, H, W); permute the affine's columns to match.
    dhw = whd.transpose(2, 1, 0)
    return (np.ascontiguousarray(dhw) if copy else dhw), whd_affine[:, [2, 1, 0, 3]]


def memory_order(array: np.ndarray) -> tuple[np.ndarray, tuple[int, ...], tuple[int, ...]]:
    """``array`` viewed in the order its values lie in memory: flipped axes unflipped, axes by decreasing stride.

    For a reoriented view (:func:`to_canonical` with ``copy=False``: flips and a transpose of the stored data) this
    is the stored array again. numpy does not undo negative strides itself: a ``min`` over CT-RATE's reoriented
    view took 3.7× as long as over this one. Order-free work (reductions, counts, element-wise passes whose result
    is reoriented afterwards) should run on it.

    Returns:
        ``(view, axes, flips)`` with ``view = array[<flips reversed>].transpose(axes)``.
    """
    flips = tuple(axis for axis in range(array.ndim) if array.strides[axis] < 0)
    positive = array[tuple(slice(None, None, -1) if axis in flips else slice(None) for axis in range(array.ndim))]
    axes = tuple(sorted(range(array.ndim), key=lambda axis: -positive.strides[axis]))
    return positive.transpose(axes), axes, flips


def _require_real_numbers(array: np.ndarray, source: str | os.PathLike, what: str) -> None:
    """Refuse arrays that are not real numbers (strings, records, complex, dates) before any arithmetic."""
    if array.dtype.kind not in "biuf":
        raise InvalidVolumeError(
            source, f"a {what} must hold real numbers, got dtype {array.dtype} ({array.dtype.name})"
        )


def _validate_volume(array: np.ndarray, source: str | os.PathLike, keep_integers: bool = False) -> np.ndarray:
    """Squeeze trailing singleton dims, then require a finite, non-empty 3D array; returns float32 (integer arrays
    as they are with ``keep_integers``: always finite)."""
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise InvalidVolumeError(source, f"expected a 3D volume, got a {array.ndim}D array of shape {array.shape}")
    if 0 in array.shape:
        raise InvalidVolumeError(source, f"the volume is empty (shape {array.shape})")
    _require_real_numbers(array, source, "volume")
    if keep_integers and array.dtype.kind in "iu":
        return array
    array = array.astype(np.float32, copy=False)
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(array.size - np.count_nonzero(finite))
        raise InvalidVolumeError(source, f"{bad} voxel(s) are NaN or infinite")
    return array


# ---------------------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------------------

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Errors that a damaged or mislabelled file raises somewhere inside nibabel / gzip / numpy / pydicom.
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile, nib.filebasedimages.ImageFileError) + (
    () if _isal_zlib is None else (_isal_zlib.error,)
)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""File suffixes read as 2D figures (one-slice volumes of grey levels in [0, 1], intensity ``"unit"``)."""


def _read_image(path: Path, spacing: tuple[float, float, float] | None) -> CTVolume:
    """A 2D figure (PMC-VQA) as a one-slice volume: grey levels scaled to [0, 1], ``meta["intensity"] = "unit"``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            grey = np.asarray(image.convert("L"), dtype=np.float32) / 255.0  # colour figures → luminance
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise CorruptFileError(path, f"cannot read image ({type(err).__name__}: {err})") from err
    array = _validate_volume(grey[None], path)
    affine = standard_affine(spacing or (1.0, 1.0, 1.0))
    return CTVolume(array=array, affine=affine, path=str(path), meta={"intensity": "unit"})


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(_NIFTI_SUFFIXES)


def gunzip(path: str | os.PathLike) -> bytes:
    """The whole decompressed content of a gzip file, in one shot (ISA-L when ``isal`` is installed, else zlib).

    Both check every member's CRC-32 and length, so a flipped bit anywhere, the trailer included, is an error
    (``gzip.BadGzipFile``), and a truncated file raises ``EOFError``. One call on the whole file, not a stream: the
    file is read once and inflated without Python-level buffering.
    """
    raw = Path(path).read_bytes()
    return (_isal_gzip or gzip).decompress(raw)


def _read_nifti(
    path: Path, dtype: type | None, keep_stored_integers: bool = False
) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Image]:
    """Read NIfTI data (scaled by slope/intercept; stored dtype when ``dtype`` is None) and its affine.

    ``keep_stored_integers``: integer data of a ``.nii.gz`` comes back as stored whatever ``dtype`` says, also when
    the header scales it (the caller applies ``image.dataobj.slope`` / ``inter``).

    A ``.nii.gz`` is decompressed whole and in one shot by :func:`gunzip`, so that its CRC-32 and length trailer
    are checked: nibabel on its own reads only as many bytes as the header says and never reaches the trailer, so a
    flipped bit in the last compressed block loaded silently as wrong voxels. Data without scaling is then a view of
    the decompressed bytes (read-only; no copy when ``dtype`` is None or the stored dtype); scaled data is read
    through nibabel's array proxy, exactly as from a file.
    """
    try:
        if not path.name.lower().endswith(".gz"):
            image = nib.load(path)
            return _nifti_data(image, dtype), image.affine.astype(np.float64), image
        image_class = type(nib.load(path))  # Nifti1 or Nifti2, from the header alone (a few hundred bytes)
        content = gunzip(path)
        image = image_class.from_bytes(content)
        proxy = image.dataobj  # nibabel's array proxy knows where and how the data is stored
        unscaled = proxy.slope == 1.0 and proxy.inter == 0.0
        if unscaled or (keep_stored_integers and np.dtype(proxy.dtype).kind in "iu"):  # the stored values, in place
            count = int(np.prod(proxy.shape, dtype=np.int64))
            data = np.frombuffer(content, proxy.dtype, count, int(proxy.offset)).reshape(
                proxy.shape, order=proxy.order
            )
            if dtype is not None and not (keep_stored_integers and data.dtype.kind in "iu"):
                data = data.astype(dtype, copy=False)
        else:
            data = _nifti_data(image, dtype)
    except _READ_ERRORS as err:
        raise CorruptFileError(path, f"cannot read NIfTI ({type(err).__name__}: {err})") from err
    return data, image.affine.astype(np.float64), image


def _nifti_data(image: nib.Nifti1Image, dtype: type | None) -> np.ndarray:
    return np.asarray(image.dataobj) if dtype is None else np.asarray(image.dataobj, dtype=dtype)


def _has_dicom_magic(path: Path) -> bool:
    """True for a DICOM Part 10 file ("DICM" after the 128-byte preamble), whatever its name (UID-style names)."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except _READ_ERRORS as err:
        raise CorruptFileError(path, f"cannot read .npy ({type(err).__name__}: {err})") from err


def _dicom_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != "DICOMDIR")


def _finite_values(file: Path, ds, tag: str, count: int) -> np.ndarray:
    """The ``count`` numbers of a multi-valued DICOM tag as float64, or a named error (missing, wrong count, NaN)."""
    try:
        values = np.array(ds[tag].value if tag in ds else None, dtype=np.float64).reshape(-1)
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptFileError(file, f"missing or unreadable {tag} ({err})") from err
    if values.size != count or not np.isfinite(values).all():
        raise CorruptFileError(file, f"{tag} must be {count} finite numbers, got {values.tolist()}")
    return values


def _position(file: Path, ds) -> np.ndarray:
    return _finite_values(file, ds, "ImagePositionPatient", 3)


def _geometry(file: Path, ds) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Row and column direction cosines and (row, column) pixel spacing in mm, checked to make a valid affine."""
    orientation = _finite_values(file, ds, "ImageOrientationPatient", 6)
    row_cos, col_cos = orientation[:3], orientation[3:]
    # Real headers round the cosines to a few digits; 1e-3 still rejects zero, parallel or unnormalised vectors.
    if not (abs(np.linalg.norm(row_cos) - 1) < 1e-3 and abs(np.linalg.norm(col_cos) - 1) < 1e-3):
        raise CorruptFileError(file, f"ImageOrientationPatient {orientation.tolist()} is not two unit vectors")
    if abs(float(row_cos @ col_cos)) > 1e-3:
        raise CorruptFileError(file, f"ImageOrientationPatient {orientation.tolist()}: the vectors are not orthogonal")
    spacing = _finite_values(file, ds, "PixelSpacing", 2)
    if not (spacing > 0).all():
        raise CorruptFileError(file, f"PixelSpacing {spacing.tolist()} must be two positive sizes in mm")
    return row_cos, col_cos, float(spacing[0]), float(spacing[1])


def _rescale(file: Path, ds) -> tuple[float, float]:
    """(slope, intercept) from the header (1, 0 when absent), or a named error when not finite."""
    try:
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    except (TypeError, ValueError) as err:
        raise CorruptFileError(file, f"unreadable RescaleSlope / RescaleIntercept ({err})") from err
    if not (np.isfinite(slope) and np.isfinite(intercept)):
        raise CorruptFileError(file, f"RescaleSlope {slope} / RescaleIntercept {intercept} must be finite")
    return slope, intercept


def _is_non_image_object(ds) -> bool:
    """True for a complete DICOM object of a known non-image class (structured report, DICOMDIR, presentation state).

    A file whose class is an image class, or unknown because the header is cut before it, is not one: it is a
    damaged slice, and skipping it would load the series silently short.
    """
    from pydicom.uid import UID

    sop = ds.file_meta.get("MediaStorageSOPClassUID") if hasattr(ds, "file_meta") else None
    sop = sop or ds.get("SOPClassUID")
    if not sop:
        return False
    name = UID(str(sop)).name
    return name != str(sop) and "Image" not in name


def _dicom_header(file: Path):
    """The header (no pixels) of one file of a DICOM folder; ``None`` for a file that is not DICOM at all.

    Raises:
        CorruptFileError: an empty file, one cut inside its preamble, or one whose header ends before the image
            tags (``Rows``) although it is not a known non-image object: such files are damaged slices.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    size = file.stat().st_size
    if size == 0:
        raise CorruptFileError(file, "empty file (0 bytes) among DICOM files: a slice cut off while copying?")
    try:
        ds = pydicom.dcmread(file, stop_before_pixels=True)
    except InvalidDicomError as err:
        if size < 132 and not file.read_bytes().strip(b"\x00"):
            problem = f"truncated DICOM file: {size} bytes of zeros, cut inside the preamble"
            raise CorruptFileError(file, problem) from err
        return None  # not a DICOM file (README, thumbnails, ...)
    except _READ_ERRORS as err:
        raise CorruptFileError(file, f"cannot read DICOM header ({type(err).__name__}: {err})") from err
    if "Rows" not in ds and not _is_non_image_object(ds):
        sop = ds.file_meta.get("MediaStorageSOPClassUID") if hasattr(ds, "file_meta") else None
        kind = f"its SOP class is {sop.name}" if sop else "its SOP class is unknown (cut before it)"
        raise CorruptFileError(file, f"truncated or incomplete DICOM header: no Rows tag (image size), and {kind}")
    return ds


def _read_dicom(path: Path, series_uid: str | None, allow_non_ct: bool) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read a DICOM series (folder) or single file into a (slice, row, col) HU array and its RAS affine."""
    import pydicom

    headers, skipped = [], []
    for file in _dicom_files(path):
        ds = _dicom_header(file)
        if ds is None:
            skipped.append(file.name)
        elif "Rows" in ds:  # image objects (not SR, presentation states, ...)
            headers.append((file, ds))
        else:
            skipped.append(file.name)
    if not headers:
        note = f" (skipped non-DICOM files: {skipped[:5]})" if skipped else ""
        raise CorruptFileError(path, f"no DICOM image found{note}")

    series = sorted({str(getattr(ds, "SeriesInstanceUID", "")) for _, ds in headers})
    if series_uid is not None:
        headers = [(f, ds) for f, ds in headers if str(getattr(ds, "SeriesInstanceUID", "")) == series_uid]
        if not headers:
            raise CorruptFileError(path, f"series {series_uid!r} not found; the folder holds {series}")
    elif len(series) > 1:
        raise CorruptFileError(path, f"the folder holds {len(series)} DICOM series {series}; pass series_uid=...")
    if int(getattr(headers[0][1], "NumberOfFrames", 1) or 1) > 1:
        raise CorruptFileError(headers[0][0], "multi-frame (enhanced) DICOM is not supported; convert it to NIfTI")

    modalities = {str(getattr(ds, "Modality", "")).upper() for _, ds in headers}
    if modalities != {"CT"} and not allow_non_ct:
        file, ds = next((f, ds) for f, ds in headers if str(getattr(ds, "Modality", "")).upper() != "CT")
        raise InvalidVolumeError(
            file,
            f"Modality is {str(getattr(ds, 'Modality', '')) or '(missing)'!r}, not CT: its values are not Hounsfield "
            "units; pass allow_non_ct=True to load it anyway",
        )

    row_cos, col_cos, row_spacing, col_spacing = _geometry(*headers[0])  # direction of increasing column / row
    positions = np.array([_position(file, ds) for file, ds in headers])
    normal = np.cross(row_cos, col_cos)
    order = np.argsort(positions @ normal, kind="stable")
    headers = [headers[i] for i in order]
    positions = positions[order]

    if len(headers) > 1:
        steps = np.diff(positions @ normal)
        step = float(np.median(steps))
        if np.any(np.abs(steps) < 1e-3):
            raise InvalidVolumeError(path, "two slices share one position (duplicate or mixed series)")
        if np.any(np.abs(steps - step) > 0.1 * abs(step)):
            raise InvalidVolumeError(
                path, f"uneven slice spacing (steps {np.unique(np.round(steps, 2)).tolist()} mm): missing slices?"
            )
        slice_vector = (positions[-1] - positions[0]) / (len(headers) - 1)
    else:
        ds = headers[0][1]
        # One slice has no step to measure: the first usable header value, else 1 mm (as before, now never NaN/0).
        thickness = 1.0
        for tag in ("SpacingBetweenSlices", "SliceThickness"):
            try:
                value = abs(float(ds.get(tag) if ds.get(tag) is not None else "nan"))
            except (TypeError, ValueError):
                continue
            if np.isfinite(value) and value > 0:
                thickness = value
                break
        slice_vector = normal * thickness

    slices = []
    for file, _ in headers:
        try:
            ds = pydicom.dcmread(file)
            pixels = ds.pixel_array.astype(np.float32)
        except _READ_ERRORS + (RuntimeError, AttributeError) as err:
            raise CorruptFileError(file, f"cannot decode DICOM pixels ({type(err).__name__}: {err})") from err
        slope, intercept = _rescale(file, ds)
        slices.append(pixels * slope + intercept)
    if len({s.shape for s in slices}) > 1:
        raise InvalidVolumeError(path, f"slices have different sizes {sorted({s.shape for s in slices})}")
    data = np.stack(slices)  # (slice, row, col)

    lps = np.eye(4)
    lps[:3, 0] = slice_vector
    lps[:3, 1] = col_cos * row_spacing
    lps[:3, 2] = row_cos * col_spacing
    lps[:3, 3] = positions[0]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM world is LPS+, NIfTI world is RAS+
    meta = {
        "series_uid": series[0] if series_uid is None else series_uid,
        "num_skipped_files": len(skipped),
        "modality": ",".join(sorted(modalities)),
    }
    return data, ras, meta


def load_volume(
    path: str | os.PathLike,
    *,
    spacing: tuple[float, float, float] | None = None,
    series_uid: str | None = None,
    allow_non_ct: bool = False,
    stored_integers: bool = False,
) -> CTVolume:
    """Load a CT volume into the canonical (D, H, W) float32 HU layout.

    Args:
        path: a NIfTI file (``.nii``/``.nii.gz``; slope/intercept applied), a DICOM series folder or a single
            DICOM file (sorted by position along the slice normal; rescale applied; JPEG 2000 needs Pillow >= 10),
            a ``.npy`` array that is already (D, H, W) in canonical orientation (a leading channel of 1 is
            dropped), or a 2D figure (PNG/JPEG/TIFF/BMP) read as a one-slice volume of grey levels in [0, 1]
            (``volume.intensity == "unit"``: not HU).
        spacing: voxel size in mm along (D, H, W) for ``.npy`` and image input (default 1 mm); ignored for others.
        series_uid: which series to read when a DICOM folder holds several.
        allow_non_ct: load DICOM whose ``Modality`` is not ``CT`` (MR, PET, ...). Their values are not Hounsfield
            units, so windowing them as HU is meaningless; refused by default. ``meta["modality"]`` says what it was.
        stored_integers: a gzip NIfTI stored as integers keeps them: ``array`` is then the read-only canonical
            *view* of the decompressed data (flips and a transpose, no float32 copy, no contiguity), for a reader
            that windows it straight away (the image processor, which folds the scaling into its window). Without
            header scaling they are the HU values themselves; with it (dcm2niix writes the scanner's raw values and
            ``scl_slope`` / ``scl_inter``) ``meta["stored_scale"] = (slope, intercept)`` and HU = ``array`` × slope
            + intercept. Other inputs load as float32 HU as usual.

    Returns:
        A :class:`CTVolume`.

    Raises:
        CorruptFileError: missing, unreadable, truncated or mislabelled file, naming the file; in a DICOM folder
            also an empty or truncated slice file and invalid geometry tags (NaN position, zero pixel spacing).
        InvalidVolumeError: not 3D (2D, or 4D with more than one frame), empty, NaN/inf voxels, broken DICOM series,
            a DICOM modality other than CT (unless ``allow_non_ct``).
    """
    path = Path(path)
    if not path.exists():
        raise CorruptFileError(path, "file not found")
    meta: dict = {}
    if path.suffix.lower() == ".npy":
        array = _read_npy(path)
        if array.ndim == 4 and array.shape[0] == 1:
            array = array[0]  # channel-first (1, D, H, W), as M3D's volumes are stored
        array = _validate_volume(array, path)
        affine = standard_affine(spacing or (1.0, 1.0, 1.0))
        return CTVolume(array=array, affine=affine, path=str(path), meta={"source_axcodes": AXCODES_DHW})
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return _read_image(path, spacing)
    if _is_nifti(path):
        data, affine, image = _read_nifti(path, np.float32, keep_stored_integers=stored_integers)
        stored_integers = data.dtype.kind in "iu"  # float data: the float32 array as usual
        scale = (float(image.dataobj.slope), float(image.dataobj.inter)) if stored_integers else (1.0, 0.0)
        if scale != (1.0, 0.0):
            meta["stored_scale"] = scale
    elif path.is_dir() or path.suffix.lower() in ("", ".dcm", ".ima") or _has_dicom_magic(path):
        data, affine, meta = _read_dicom(path, series_uid, allow_non_ct)
        stored_integers = False
    else:
        raise CorruptFileError(
            path, "unknown format; expected .nii, .nii.gz, .npy, .dcm, a DICOM folder or a PNG/JPEG figure"
        )
    data = _validate_volume(data, path, keep_integers=stored_integers)
    meta["source_axcodes"] = nib.aff2axcodes(affine)
    array, affine = to_canonical(data, affine, copy=not stored_integers)
    return CTVolume(array=array, affine=affine, path=str(path), meta=meta)


# ---------------------------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------------------------


def _label_table_from_header(image: nib.Nifti1Image) -> dict[int, str]:
    """Label names stored in a NIfTI header extension (the XML label table TotalSegmentator writes), if any."""
    import re

    table: dict[int, str] = {}
    for extension in image.header.extensions:
        content = extension.get_content()
        if isinstance(content, bytes) and b"<LabelTable>" in content:
            text = content.decode("utf-8", errors="replace")
            for key, name in re.findall(r'<Label Key="(\d+)"[^>]*><!\[CDATA\[(.*?)\]\]></Label>', text):
                table[int(key)] = name
    return table


@dataclass(frozen=True)
class LabelMap:
    """An integer label map (or binary mask) in the canonical (D, H, W) orientation.

    Attributes:
        array: (D, H, W) integer labels (the file's integer dtype; integral floats become int32).
        affine: (4, 4) index → RAS+ mm, or ``None`` for ``.npy`` files (already canonical; no grid to check).
        header_table: id → name from the file header (TotalSegmentator's XML label table), empty if none.
        path: the file.
    """

    array: np.ndarray
    affine: np.ndarray | None
    header_table: dict[int, str]
    path: str

    def check_grid(self, like: CTVolume, atol: float = 1e-3) -> None:
        """Raise :class:`MaskMismatchError` (naming both grids) unless this map lies on ``like``'s voxel grid."""
        if self.array.shape != like.shape:
            raise MaskMismatchError(
                self.path, f"mask grid {self.array.shape} differs from volume grid {like.shape} ({like.path})"
            )
        if self.affine is not None and not np.allclose(self.affine, like.affine, rtol=0, atol=atol):
            raise MaskMismatchError(
                self.path,
                f"mask affine differs from the volume's ({like.path}):\n"
                f"mask:\n{np.round(self.affine, 4)}\nvolume:\n{np.round(like.affine, 4)}",
            )


def load_label_map(path: str | os.PathLike, *, copy: bool = True) -> LabelMap:
    """Read a binary or multilabel NIfTI (or a canonical ``.npy``), reoriented exactly like :func:`load_volume`.

    Args:
        path: the file.
        copy: ``False`` keeps integer labels as the read-only reoriented *view* of the decompressed data (flips and a
            transpose, not contiguous), for a reader that only picks some voxels (the image processor picks the
            model grid's); ``True`` returns an owned C-contiguous array.

    Raises:
        CorruptFileError: missing or unreadable file, unknown format. InvalidVolumeError: not 3D, or non-integer
            values (an image rather than a label map).
    """
    path = Path(path)
    if not path.exists():
        raise CorruptFileError(path, "file not found")
    header_table: dict[int, str] = {}
    if path.suffix.lower() == ".npy":
        data, affine = _read_npy(path), None
    elif _is_nifti(path):
        data, affine, image = _read_nifti(path, None)
        header_table = _label_table_from_header(image)
    else:
        raise CorruptFileError(path, "unknown mask format; expected .nii, .nii.gz or .npy")
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InvalidVolumeError(path, f"expected a 3D mask, got shape {data.shape}")
    _require_real_numbers(data, path, "mask")
    if data.dtype.kind not in "iub":
        if not np.isfinite(data).all() or not np.array_equal(data, np.round(data)):
            raise InvalidVolumeError(path, "mask holds non-integer values (is this an image, not a label map?)")
        data = data.astype(np.int32)
    if affine is not None:
        data, affine = to_canonical(data, affine, copy=copy)
    if not copy:
        return LabelMap(array=data, affine=affine, header_table=header_table, path=str(path))
    if not data.flags.writeable:  # a view of the decompressed bytes (already canonical on disk): own a copy
        data = data.copy()
    return LabelMap(array=np.ascontiguousarray(data), affine=affine, header_table=header_table, path=str(path))


def load_mask(
    path: str | os.PathLike,
    like: CTVolume | None = None,
    label: int | str | None = None,
    *,
    label_map: Mapping[int, str] | None = None,
    atol: float = 1e-3,
) -> np.ndarray:
    """Load a segmentation as a (D, H, W) bool mask, reoriented exactly like :func:`load_volume`.

    Args:
        path: a NIfTI or ``.npy`` mask. Binary files need no ``label``; multilabel files need one.
        like: the volume the mask belongs to; its voxel grid (shape and affine) must match, else
            :class:`MaskMismatchError`. Omit it only when there is no volume to check against.
        label: ``None`` for a binary file (any non-zero voxel), an integer label id, or a label name. Names are
            looked up in ``label_map``, else in the table stored in the file's header (TotalSegmentator writes
            one); ``med3dqwen.anatomy.TOTALSEGMENTATOR_V2_LABELS`` is TotalSegmentator v2's ``total`` class map.
        label_map: id → name table for ``label`` names.
        atol: tolerance in mm when comparing affines.

    Returns:
        (D, H, W) bool array. An empty mask is returned as is (not an error): callers report it.

    Raises:
        CorruptFileError: unreadable file. InvalidVolumeError: not 3D or non-integer labels.
        MaskMismatchError: grid differs from ``like``. UnknownLabelError: a name not in the label table, an id
            neither in the table nor in the file, or ``label=None`` on a multilabel file.
    """
    labels = load_label_map(path)
    if like is not None:
        labels.check_grid(like, atol)
    return select_label(labels, label, label_map)


def resolve_label(labels: LabelMap, label: int | str | None, label_map: Mapping[int, str] | None = None) -> int | None:
    """Which value of ``labels`` is the ROI: the integer id of ``label``, or None for "any non-zero voxel" (a binary
    file). Checks the whole map (see :func:`load_mask` for the rules), so that a caller may then pick only some
    voxels (``labels.array == id`` on a resized grid) and still refuse a multilabel file read as binary."""
    path, header_table = labels.path, labels.header_table
    array = memory_order(labels.array)[0]  # order-free counts, at memory speed on a reoriented view
    if label is None:
        # Binary means at most one non-zero value (0/1 and 0/255 masks both are); checked without np.unique's sort,
        # and without a full-size comparison when the values lie in {0, 1}.
        if array.size == 0 or array.dtype == bool:
            return None
        if array.max() <= 1 and (array.dtype.kind == "u" or array.min() >= 0):
            return None
        nonzero = np.count_nonzero(array)
        if nonzero and nonzero != np.count_nonzero(array == array.max()):
            shown = np.unique(array[array != 0])[:10].tolist()
            raise UnknownLabelError(path, f"multilabel mask (labels {shown}...); pass label=<id or name>")
        return None
    table = label_map or header_table
    if isinstance(label, str):
        if not table:
            raise UnknownLabelError(
                path,
                f"label name {label!r} given but the file has no label table; pass label_map= (for TotalSegmentator "
                "output, med3dqwen.anatomy.TOTALSEGMENTATOR_V2_LABELS) or an integer label id",
            )
        ids = [k for k, v in table.items() if v == label]
        if not ids:
            import difflib

            close = difflib.get_close_matches(label, list(table.values()), n=3)
            raise UnknownLabelError(
                path,
                f"label name {label!r} is not in the label table" + (f" (did you mean {close}?)" if close else ""),
            )
        return ids[0]
    if int(label) not in table and not (array == int(label)).any():
        raise UnknownLabelError(path, f"label id {label} is neither in the file nor in its label table")
    # A known label that this scan does not contain is an empty mask, which callers report (not an error).
    return int(label)


def select_label(labels: LabelMap, label: int | str | None, label_map: Mapping[int, str] | None = None) -> np.ndarray:
    """The (D, H, W) bool mask of one label of a :class:`LabelMap` (see :func:`load_mask` for the rules)."""
    label_id = resolve_label(labels, label, label_map)
    return labels.array != 0 if label_id is None else labels.array == label_id
