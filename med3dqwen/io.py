"""Files safely: path checks for untrusted names, atomic writes, NIfTI volumes and masks, JSON lines, prompt PNGs.

Every writer goes through :func:`atomic_output`: the data goes to a temporary file next to the destination, which
replaces the destination only once it is complete, so a crash or a kill never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from med3dqwen.processing.ct_io import CTInputError, InvalidVolumeError, standard_affine
from med3dqwen.processing.ct_transforms import BoundaryMode, binarize_mask, boundary_mask, parse_color, window_hu


__all__ = [
    "PromptPNGs",
    "UnsafePathError",
    "atomic_output",
    "check_path_component",
    "prompt_png_stack",
    "read_jsonl",
    "safe_relpath",
    "save_nifti",
    "volume_montage_png",
    "write_jsonl",
]


class UnsafePathError(CTInputError):
    """A path or name taken from upstream data (a CSV cell, a structure name) would leave its base folder.

    A :class:`~med3dqwen.processing.ct_io.CTInputError` (hence a ``ValueError``), so mask sources and builders catch
    it with their other input errors.

    Args:
        problem: what is wrong, naming the value (``"volume id '../x' contains '..'"``).
        path: the path it would have led to, when known (prefixes the message).
    """

    def __init__(self, problem: str, path: str | os.PathLike | None = None):
        super().__init__(path, problem)

    def __reduce__(self):
        return type(self), (self.problem, self.source)


def check_path_component(value: str, what: str) -> str:
    """Return ``value`` if it can be used as one file or folder name inside a dataset root.

    Args:
        value: e.g. a RadGenome leaf ``"right lung upper lobe"`` or a volume id ``"train_362_a_1"``.
        what: what the value is, for the message (``"structure name"``, ``"volume id"``).

    Raises:
        UnsafePathError: empty, ``.``/``..`` or containing ``..``, a path separator (``/`` or ``\\``), a NUL byte,
            or an absolute / drive path.
    """
    problem = None
    if not isinstance(value, str) or not value.strip():
        problem = "is empty"
    elif ".." in value:
        problem = "contains '..'"
    elif value == "." or "/" in value or "\\" in value or os.sep in value or (os.altsep and os.altsep in value):
        problem = "contains a path separator"
    elif "\x00" in value:
        problem = "contains a NUL byte"
    elif os.path.isabs(value) or re.match(r"[A-Za-z]:", value):
        problem = "is an absolute path"
    if problem:
        raise UnsafePathError(f"{what} {value!r} {problem}; it must name one file inside the dataset folder")
    return value


def safe_relpath(*parts: str) -> str:
    """Join path pieces from untrusted input into a relative POSIX path that stays inside its base folder.

    Every ``/``-separated component must be non-empty and neither ``.`` nor ``..``; backslashes, NUL bytes, a
    leading ``/`` and Windows drive prefixes (``C:``) are refused. Spaces and other characters are kept (RadGenome
    mask names have spaces).

    Args:
        parts: path pieces, each may hold ``/`` separators (``"train_1/train_1a"``, ``"right lung.nii.gz"``).

    Returns:
        ``"a/b/c"``.

    Raises:
        UnsafePathError: naming the offending piece.
    """
    components: list[str] = []
    for part in parts:
        if not isinstance(part, str) or not part:
            raise UnsafePathError(f"empty path component in {parts!r}")
        if part.startswith("/") or re.match(r"^[A-Za-z]:", part) or "\\" in part or "\x00" in part:
            raise UnsafePathError(f"absolute or malformed path {part!r}")
        for component in part.split("/"):
            if component in ("", ".", ".."):
                raise UnsafePathError(f"path {part!r} has an empty, '.' or '..' component")
            components.append(component)
    return "/".join(components)


# The process umask, read once at import (reading it means setting it, which is not thread-safe later).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    Readers never see a half-written file and a crash leaves the previous file (if any) in place.

    Args:
        path: final destination. Parent folders are created.
        suffix: suffix of the temporary file (default: the destination's full suffix, so that writers that infer
            the format from the name, like nibabel and PIL, still work).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_nifti(
    path: str | os.PathLike, array: np.ndarray, affine: np.ndarray | None = None, dtype: np.dtype | str | None = None
) -> Path:
    """Write a (D, H, W) array as NIfTI so that :func:`load_volume` / :func:`load_mask` give it back unchanged.

    Args:
        path: destination ``.nii`` or ``.nii.gz``; written atomically.
        array: (D, H, W) array in this module's orientation.
        affine: (4, 4) index → RAS+ mm affine of ``array`` (default: :func:`standard_affine` with 1 mm voxels).
        dtype: on-disk dtype (default: the array's; bool is stored as uint8).

    Returns:
        The written path.
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise InvalidVolumeError(path, f"expected a 3D (D, H, W) array, got shape {array.shape}")
    if dtype is None:
        dtype = np.uint8 if array.dtype == bool else array.dtype
    affine = standard_affine() if affine is None else np.asarray(affine, dtype=np.float64)
    # NIfTI data axes are (i, j, k) = (W, H, D); permute the affine's columns the same way.
    image = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)).astype(dtype), affine[:, [2, 1, 0, 3]])
    image.header.set_xyzt_units("mm")
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    with atomic_output(path) as tmp:
        nib.save(image, tmp)
    return Path(path)


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> int:
    """Write records as JSON lines (UTF-8), atomically.

    The lines go to a temporary file in the destination's folder, which replaces ``path`` only once every record is
    written: if ``records`` raises, the previous file (if any) is left as it was and the temporary file is removed.

    Args:
        path: destination ``.jsonl`` file; parent folders are created.
        records: JSON-serialisable dicts, e.g. from :func:`build_record`; may be a generator.

    Returns:
        The number of records written.
    """
    count = 0
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSON-lines file written by :func:`write_jsonl`; blank lines are skipped.

    Args:
        path: the ``.jsonl`` file.

    Returns:
        The records, in file order.

    Raises:
        ValueError: if a line is not a JSON object; the message names the file and the 1-based line number.
    """
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{Path(path)}, line {number}: malformed JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise ValueError(f"{Path(path)}, line {number}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    return records


# ---------------------------------------------------------------------------------------------------------------
# Human-visible PNGs
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PromptPNGs:
    """Files written by :func:`prompt_png_stack`: one PNG per ROI slice and a montage (paths, in slice order)."""

    slices: list[Path]
    montage: Path | None
    slice_indices: list[int]
    covered_fraction: float
    roi_empty: bool


def _as_numpy(x) -> np.ndarray:
    """A numpy array of a numpy array or a torch tensor (any device; floating tensors as float32, bfloat16 too)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        return (x.float() if x.is_floating_point() else x).numpy()
    return np.asarray(x)


def _overlay_rgb(volume_hu: np.ndarray, band: np.ndarray, window, color) -> np.ndarray:
    """(D, H, W) HU + band → (D, H, W, 3) uint8: windowed grey with the band painted in ``color``."""
    grey = np.rint(window_hu(volume_hu, window) * 255.0).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    rgb[band] = parse_color(color)
    return rgb


def _montage(tiles: np.ndarray, columns: int | None = None) -> np.ndarray:
    """(N, H, W, 3) tiles → one (rows*H, cols*W, 3) image, row-major, black padding."""
    n, h, w, _ = tiles.shape
    cols = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = tiles[i]
    return grid


def _evenly_spaced(n: int, count: int) -> np.ndarray:
    """Indices of at most ``count`` evenly spaced items of ``n`` (first and last included)."""
    return np.unique(np.linspace(0, n - 1, num=min(count, n)).round().astype(int))


def _save_png(path: Path, rgb: np.ndarray) -> Path:
    from PIL import Image

    with atomic_output(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG", compress_level=1)  # zlib level 1: ~5x faster, ~8 % larger
    return path


def prompt_png_stack(
    volume_hu,
    mask,
    out_dir: str | os.PathLike,
    color: str | Sequence[int] = "red",
    window: str | tuple[float, float] = "chest",
    thickness: int = 3,
    mode: BoundaryMode = "inner",
    keep_largest: bool = True,
    write_slices: bool = True,
    montage: bool = True,
    max_montage_tiles: int = 16,
    prefix: str = "slice",
) -> PromptPNGs:
    """Write the human-visible prompt: HU-windowed grey slices with the coloured contour, and a montage.

    One PNG per axial slice that carries a contour (``{prefix}_{d:04d}.png``) and ``{prefix}_montage.png`` with at
    most ``max_montage_tiles`` evenly spaced contour slices (inferior first). Images keep the radiological view of
    :mod:`ct_io` (patient's right on the image's left, anterior up). Files are written atomically.

    Args:
        volume_hu: (D, H, W) HU volume, numpy or torch.
        mask: (D, H, W) ROI mask on the same grid, binarised like the model input (:func:`binarize_mask`).
        out_dir: folder for the PNGs (created).
        color: contour colour. window: display window (preset name or ``(low, high)`` HU).
        thickness, mode, keep_largest: passed to :func:`boundary_mask`.
        write_slices: write the per-slice PNGs. montage: write the montage.
        max_montage_tiles: the montage's tile budget.
        prefix: file name prefix.

    Returns:
        A :class:`PromptPNGs`. An empty ROI writes nothing and says so (``roi_empty=True``).
    """
    image, roi = _as_numpy(volume_hu), binarize_mask(mask)  # the model input's rule: floating masks > 0.5
    if image.ndim != 3:
        raise InvalidVolumeError("volume", f"expected a (D, H, W) array, got shape {image.shape}")
    if roi.shape != image.shape:
        raise InvalidVolumeError("mask", f"mask shape {tuple(roi.shape)} differs from volume shape {image.shape}")
    band = boundary_mask(roi, thickness, mode, keep_largest)
    indices = np.flatnonzero(band.any(axis=(1, 2)))
    roi_voxels = int(np.count_nonzero(roi))
    covered = float(np.count_nonzero(band & roi) / roi_voxels) if roi_voxels else 0.0
    if indices.size == 0:
        return PromptPNGs(slices=[], montage=None, slice_indices=[], covered_fraction=0.0, roi_empty=True)

    out_dir = Path(out_dir)
    rgb = _overlay_rgb(image[indices], band[indices], window, color)  # (N, H, W, 3)
    written = []
    if write_slices:
        written = [_save_png(out_dir / f"{prefix}_{d:04d}.png", tile) for d, tile in zip(indices, rgb, strict=True)]
    montage_path = None
    if montage:
        pick = _evenly_spaced(len(indices), max_montage_tiles)
        montage_path = _save_png(out_dir / f"{prefix}_montage.png", _montage(rgb[pick]))
    return PromptPNGs(
        slices=written,
        montage=montage_path,
        slice_indices=indices.tolist(),
        covered_fraction=covered,
        roi_empty=False,
    )


def volume_montage_png(
    volume_hu, path: str | os.PathLike, window: str | tuple[float, float] = "chest", max_tiles: int = 16
) -> Path:
    """A montage of at most ``max_tiles`` evenly spaced axial slices of ``volume_hu`` (D, H, W), windowed grey and
    without a contour (what :func:`prompt_png_stack`'s montage is for a volume with no ROI); written atomically.

    Raises:
        InvalidVolumeError: ``volume_hu`` is not 3D.
    """
    image = _as_numpy(volume_hu)
    if image.ndim != 3:
        raise InvalidVolumeError("volume", f"expected a (D, H, W) array, got shape {image.shape}")
    picked = image[_evenly_spaced(image.shape[0], max_tiles)]
    return _save_png(Path(path), _montage(_overlay_rgb(picked, np.zeros(picked.shape, dtype=bool), window, "red")))
