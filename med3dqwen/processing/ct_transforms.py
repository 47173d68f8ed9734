"""CT transforms: HU windowing, resizing, slice-wise boundary prompts (paper eq. 1) and the prompt overlay.

Pure array functions (the PNG writers that use them live in ``med3dqwen.io``). Every function takes (D, H, W)
arrays in the canonical orientation of :mod:`ct_io` (D = axial slices, inferior → superior) and accepts numpy
arrays or torch tensors, returning the same kind.

Input rules, the same for every function (each violation is an :class:`InvalidVolumeError` naming the argument):

- real numbers only: strings, objects, records and complex values are refused;
- ``torch.bfloat16`` tensors (which numpy cannot hold) are computed in float32; intensity outputs come back as
  bfloat16, masks as bool;
- intensities must be finite: NaN/inf are refused (``check_finite=False`` skips the check, e.g. when the caller
  has already checked the array, as the image processor does after :func:`window_hu`);
- masks are binarised one way everywhere (:func:`binarize_mask`): bool as is, integers non-zero, floating
  values ``> 0.5`` (a probability map thresholded at one half); NaN in a mask is refused.

This file imports only third-party packages and its sibling ``ct_io`` so that it can be copied next to a saved
processor (``trust_remote_code``) and work without the ``med3dqwen`` package.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import sparse
from scipy.sparse import csgraph

from .ct_io import InvalidVolumeError, memory_order


__all__ = [
    "COLORS",
    "DEFAULT_SIZE",
    "PromptResult",
    "WINDOW_PRESETS",
    "binarize_mask",
    "boundary_mask",
    "parse_color",
    "render_prompt",
    "resize_labels",
    "resize_mask",
    "resize_volume",
    "resized_affine",
    "window_and_resize",
    "window_hu",
]

#: (low, high) HU of the common CT display windows. ``chest`` is DCFormer's CT-RATE input window.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "chest": (-1000.0, 200.0),
    "lung": (-1350.0, 150.0),  # W 1500 / L -600
    "mediastinum": (-135.0, 215.0),  # W 350 / L 40
    "abdomen": (-160.0, 240.0),  # W 400 / L 40
    "bone": (-500.0, 1300.0),  # W 1800 / L 400
}

#: Named contour colours as 8-bit RGB.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "blue": (0, 0, 255),
    "green": (0, 255, 0),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
}

BoundaryMode = Literal["inner", "outer", "two_sided"]
PromptEncoding = Literal["burn_in", "channel", "rgb"]
_MODES = ("inner", "outer", "two_sided")
_ENCODINGS = ("burn_in", "channel", "rgb")


# ---------------------------------------------------------------------------------------------------------------
# numpy / torch plumbing
# ---------------------------------------------------------------------------------------------------------------


def _numpy_lacks(dtype) -> bool:
    """True for torch floating dtypes that numpy cannot represent (bfloat16, the float8 types)."""
    import torch

    return dtype == torch.bfloat16 or (dtype.is_floating_point and torch.finfo(dtype).bits == 8)


def _to_numpy(x, name: str) -> tuple[np.ndarray, object]:
    """Return (numpy array, torch reference or None) so results can be sent back as the caller's type.

    Tensors numpy cannot hold (bfloat16) come as float32; anything that is not real numbers is refused here,
    before numpy or torch fail on it with a message that names neither the argument nor the problem.
    """
    if isinstance(x, np.ndarray):
        array, reference = x, None
    else:
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a hard dependency of the package
            torch = None
        if torch is not None and isinstance(x, torch.Tensor):
            reference = x
            x = x.detach()
            if _numpy_lacks(x.dtype):
                x = x.to(torch.float32)
            elif x.is_complex():
                raise InvalidVolumeError(name, f"expected real numbers, got a {x.dtype} tensor")
            array = x.cpu().numpy()
        else:
            array, reference = np.asarray(x), None
    if array.dtype.kind not in "biuf":
        raise InvalidVolumeError(name, f"expected real numbers, got dtype {array.dtype} ({array.dtype.name})")
    return array, reference


def _like(array: np.ndarray, reference) -> object:
    """Wrap ``array`` as the caller's type: a tensor on the reference tensor's device, or numpy.

    Intensities computed in float32 for a bfloat16 tensor go back to bfloat16.
    """
    if reference is None:
        return array
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if array.dtype.kind == "f" and _numpy_lacks(reference.dtype):
        tensor = tensor.to(reference.dtype)
    return tensor.to(reference.device)


def _check_3d(array: np.ndarray, name: str) -> None:
    if array.ndim != 3:
        raise InvalidVolumeError(name, f"expected a (D, H, W) array, got shape {tuple(array.shape)}")


def _count_nonfinite(array: np.ndarray) -> int:
    """Number of NaN/inf values; one cache-sized chunk at a time (a full-size bool temporary costs page faults)."""
    if array.dtype.kind != "f":
        return 0
    flat = array.reshape(-1)  # a view for contiguous arrays
    chunk = min(flat.size, _SLAB_VOXELS)
    finite = np.empty(chunk, dtype=bool)
    for start in range(0, flat.size, chunk):
        part = finite[: min(chunk, flat.size - start)]
        np.isfinite(flat[start : start + part.size], out=part)
        if not part.all():
            return int(flat.size - np.count_nonzero(np.isfinite(flat)))
    return 0


def _require_finite(array: np.ndarray, name: str) -> None:
    bad = _count_nonfinite(array)
    if bad:
        raise InvalidVolumeError(
            name, f"{bad} of {array.size} value(s) are NaN or infinite (pass check_finite=False to skip this check)"
        )


def binarize_mask(mask, name: str = "mask") -> np.ndarray:
    """The bool version of a mask (any shape), by the one rule every transform here uses.

    Args:
        mask: numpy array or torch tensor: bool (as is), integers (non-zero is inside) or floating values
            (``> 0.5`` is inside: a soft or probability mask is thresholded at one half, so a 0.3 voxel is outside
            both when drawn at native size and after :func:`resize_mask`).
        name: what to call the argument in errors.

    Returns:
        numpy bool array of the same shape.

    Raises:
        InvalidVolumeError: non-numeric values, or NaN in a floating mask.
    """
    return _binarize(_to_numpy(mask, name)[0], name)


def _binarize(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype == bool:
        return array
    if array.dtype.kind == "f":
        nan = np.count_nonzero(np.isnan(array))
        if nan:
            raise InvalidVolumeError(name, f"{nan} mask value(s) are NaN")
        return array > 0.5
    return array != 0


def parse_color(color: str | Sequence[int]) -> tuple[int, int, int]:
    """A colour name from :data:`COLORS`, ``"#rrggbb"`` or an (r, g, b) triple of 0-255 ints → (r, g, b)."""
    if isinstance(color, str):
        key = color.strip().lower()
        if key in COLORS:
            return COLORS[key]
        if key.startswith("#") and len(key) == 7:
            try:
                return tuple(int(key[i : i + 2], 16) for i in (1, 3, 5))
            except ValueError:
                pass
        raise ValueError(f"unknown colour {color!r}; use one of {sorted(COLORS)}, '#rrggbb' or an RGB triple")
    rgb = tuple(int(c) for c in color)
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise ValueError(f"an RGB colour needs three values in 0..255, got {color!r}")
    return rgb


# ---------------------------------------------------------------------------------------------------------------
# Intensity
# ---------------------------------------------------------------------------------------------------------------


def _window_range(window: str | tuple[float, float]) -> tuple[float, float]:
    if isinstance(window, str):
        if window not in WINDOW_PRESETS:
            raise ValueError(f"unknown window preset {window!r}; choose from {sorted(WINDOW_PRESETS)}")
        return WINDOW_PRESETS[window]
    low, high = (float(v) for v in window)
    if not high > low:
        raise ValueError(f"window needs low < high, got {window!r}")
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError(
            f"window bounds must be finite numbers (an infinite bound maps every value to NaN), got {window!r}"
        )
    return low, high


def window_hu(volume, window: str | tuple[float, float] = "chest", dtype=np.float32, check_finite: bool = True):
    """Clip HU to a window and scale it linearly to [0, 1].

    Args:
        volume: array of Hounsfield units, any shape (numpy or torch; bfloat16 is computed in float32).
        window: a preset name from :data:`WINDOW_PRESETS` or ``(low, high)`` in HU.
        dtype: numpy output dtype (float32 by default; torch inputs come back as float32 tensors, bfloat16 ones
            as bfloat16).
        check_finite: refuse NaN/inf (clipping would turn inf into a valid-looking 0 or 1 and keep NaN).

    Returns:
        Array of the input's shape in [0, 1]: ``low`` → 0, ``high`` → 1.

    Raises:
        InvalidVolumeError: non-numeric input, or NaN/inf values when ``check_finite``.
    """
    low, high = _window_range(window)
    array, reference = _to_numpy(volume, "volume")
    out = np.empty(array.shape, dtype=np.float32)
    # Chunk by chunk, so the finite check, the clip and the scaling all work on cache-resident data: the check
    # costs no extra pass over memory, and neither do the two in-place steps. A contiguous input is cut into flat
    # chunks; any other (a reoriented view of the stored integers: flipped, transposed) into slabs of whole
    # leading-axis slices, read in place through their strides, so no contiguous copy is ever made.
    if array.flags.c_contiguous or array.ndim == 0:
        source, target = array.reshape(-1), out.reshape(-1)
        step = max(1, min(source.size, _SLAB_VOXELS))
    else:
        source, target = array, out
        step = max(1, _SLAB_VOXELS // max(1, int(np.prod(array.shape[1:]))))
    check = check_finite and array.dtype.kind == "f"
    finite = np.empty(target[:step].shape, dtype=bool)
    scale = np.float32(1.0 / (high - low))
    for start in range(0, len(source), step):
        part, result = source[start : start + step], target[start : start + step]
        if check and not np.isfinite(part, out=finite[: len(part)]).all():
            _require_finite(array, "volume")
        np.clip(part, low, high, out=result, dtype=np.float32)
        result -= low
        result *= scale
    return _like(out.astype(dtype, copy=False), reference)


# ---------------------------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------------------------

DEFAULT_SIZE = (128, 256, 256)  # Med3DVLM's input (D, H, W); the projector's token counts depend on it


def _trilinear(array: np.ndarray, size: Sequence[int]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(array))[None, None]
    size = tuple(int(s) for s in size)
    return F.interpolate(tensor, size=size, mode="trilinear", align_corners=False)[0, 0].numpy()


def resize_volume(volume, size: Sequence[int] = DEFAULT_SIZE, dtype=np.float32, check_finite: bool = True):
    """Trilinearly resize a (D, H, W) volume to ``size`` (voxel centres aligned, as ``align_corners=False``).

    Args:
        volume: (D, H, W) intensities, numpy or torch (bfloat16 is computed in float32 and returned as bfloat16).
        size: output (D, H, W).
        dtype: output numpy dtype.
        check_finite: refuse NaN/inf input (interpolation would spread them to the neighbouring output voxels).

    Returns:
        (size) array of ``dtype``.

    Raises:
        InvalidVolumeError: not 3D, non-numeric, or NaN/inf values when ``check_finite``.
    """
    array, reference = _to_numpy(volume, "volume")
    _check_3d(array, "volume")
    if check_finite:
        _require_finite(array, "volume")
    if tuple(array.shape) == tuple(size):
        out = array.astype(dtype, copy=True)
    else:
        out = _trilinear(array.astype(np.float32, copy=False), size).astype(dtype, copy=False)
    return _like(out, reference)


def _linear_taps(n: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation from ``n`` to ``m`` samples with voxel centres aligned (torch's ``align_corners=False``):
    output ``k`` is ``(1 - w[k]) * x[i0[k]] + w[k] * x[i1[k]]``."""
    # As torch computes them: the scale in float32, the source position in double, rounded to float32.
    scale = np.float64(np.float32(n) / np.float32(m))
    source = np.maximum(scale * (np.arange(m, dtype=np.float64) + 0.5) - 0.5, 0).astype(np.float32)
    i0 = np.minimum(source.astype(np.int64), n - 1)
    i1 = np.minimum(i0 + 1, n - 1)
    return i0, i1, np.clip(source - i0, 0, 1).astype(np.float32)


def _integer_factor_taps(n: int, m: int) -> list[slice] | None:
    """The taps of linear resizing from ``n`` to ``m`` samples (voxel centres aligned) when ``n`` is a whole multiple
    ``k`` of ``m``, as slices; None otherwise.

    Output ``i`` then sits exactly at input ``k·i + (k-1)/2``: one voxel for odd ``k`` (``k = 1`` keeps the axis),
    the mean of two for even ``k`` — weights exactly 1 or 1/2 in torch's float arithmetic too.
    """
    if m < 1 or n < m or n % m:
        return None
    k = n // m
    if k % 2:
        return [slice((k - 1) // 2, None, k)]
    return [slice(k // 2 - 1, None, k), slice(k // 2, None, k)]


def _fused_plan(array: np.ndarray, window, size: Sequence[int]):
    """How :func:`window_and_resize` can take the fast path for ``array``, or None.

    Needs integer values (a file's stored HU), whole-number window bounds (the clip is then exact in integers) and,
    in memory order, each of the two inner axes reduced by a whole factor (kept, halved: 512 → 256, quartered:
    1024 → 256, ...). Returns the memory-ordered positive-stride view, its axis order, the flipped axes, the
    in-plane taps and the integer type the sums fit in.
    """
    low, high = window  # finite: checked by _window_range
    if array.dtype.kind not in "iu" or low != int(low) or high != int(high):
        return None
    memory, axes, flips = memory_order(array)
    taps = [_integer_factor_taps(memory.shape[axis], int(size[axes[axis]])) for axis in (1, 2)]
    if None in taps:
        return None
    # The clip runs in the sums' type, so the input must cast to it safely; up to four clipped values are summed.
    bound = max(abs(low), abs(high)) * 4
    stored = array.dtype.newbyteorder("=")  # a big-endian file's int16 is int16 too (the clip swaps the bytes)
    if stored in (np.int8, np.uint8, np.int16) and bound <= np.iinfo(np.int16).max:
        sums = np.int16
    elif stored in (np.int8, np.uint8, np.int16, np.uint16, np.int32) and bound <= np.iinfo(np.int32).max:
        sums = np.int32
    else:
        return None
    return memory, axes, flips, taps, sums


def _reoriented_copy(array: np.ndarray, axes: tuple[int, ...], flips: tuple[int, ...]) -> np.ndarray:
    """A new C-contiguous array of ``array`` (in :func:`~ct_io.memory_order`) back in its source's axis order and
    orientation. ``np.ascontiguousarray`` is not enough: it keeps a negative stride on a length-1 axis."""
    view = array.transpose(np.argsort(axes))
    view = view[tuple(slice(None, None, -1) if axis in flips else slice(None) for axis in range(view.ndim))]
    out = np.empty(view.shape, dtype=view.dtype)
    np.copyto(out, view)
    return out


def window_and_resize(volume, window="chest", size: Sequence[int] = DEFAULT_SIZE, check_finite: bool = True):
    """:func:`window_hu` then :func:`resize_volume`, fused: what the image processor does to every volume.

    Equal to ``resize_volume(window_hu(volume, window), size)`` to float32 rounding (a few 1e-6 at most, as far as
    torch's own float32 result lies from the exact one: the same taps and weights, summed in another order). The usual
    training input takes a fast path that never makes a float32 copy at full size: integer HU (a NIfTI's stored values,
    also as the flipped and transposed view that reorienting gives), a window with whole-number bounds (every preset)
    and in-plane sizes reduced by whole factors (CT-RATE's 512 × 512 or 1024 × 1024 → 256 × 256). There the clip is
    exact in integers, and trilinear interpolation with aligned voxel centres at a whole factor ``k`` reads one voxel
    (odd ``k``) or the mean of two (even ``k``) per axis, so slab by slab the clipped tap voxels are summed in
    integers (exact); only the in-plane-size sums become float32, are interpolated along the remaining axis and
    scaled to [0, 1] once. The work is done in the array's memory order and the (small) output is reoriented at the
    end: flips and transposes commute with this resizing. About 3× faster than the two steps on a CT-RATE volume
    (31 vs 96 ms, ``bench/bench_data.py``). Other inputs take the two steps.

    Args:
        volume: (D, H, W) HU values, numpy or torch (any strides).
        window: a preset name from :data:`WINDOW_PRESETS` or ``(low, high)`` in HU.
        size: output (D, H, W).
        check_finite: refuse NaN/inf (integer input has none).

    Returns:
        (size) float32 in [0, 1] (numpy or torch like the input).
    """
    low, high = _window_range(window)
    array, reference = _to_numpy(volume, "volume")
    _check_3d(array, "volume")
    plan = _fused_plan(array, (low, high), size)
    if plan is None:  # the two steps, on the float32 values (a bfloat16 tensor is not rounded in between)
        out = resize_volume(window_hu(array, (low, high), check_finite=check_finite), size, check_finite=False)
        return _like(out, reference)
    memory, axes, flips, (rows, columns), sums = plan
    depth = memory.shape[0]
    out_size = [int(size[axis]) for axis in axes]  # the output in memory order
    i0, i1, weight = _linear_taps(depth, out_size[0])
    needed = np.zeros(depth, dtype=bool)
    needed[i0] = True
    needed[i1[weight > 0]] = True
    # Pass 1, slab by slab (cache-sized): clip in integers, sum the in-plane taps in integers.
    # (depth, H, W) -> (depth, H', W'); only the slices an output slice reads.
    summed = np.empty((depth, out_size[1], out_size[2]), dtype=sums)
    step = max(1, _SLAB_VOXELS * 4 // (memory.shape[1] * memory.shape[2]))
    for start in range(0, depth, step):
        stop = min(start + step, depth)
        if not needed[start:stop].any():
            continue
        part = memory[start:stop]
        if memory.shape[1] <= 2 * out_size[1]:  # every row is a tap: clip the slab whole, then take the rows
            part = np.clip(part, int(low), int(high), dtype=sums)
            picked = [part[:, tap] for tap in rows]
        else:  # most rows are never read: clip only the tap rows
            picked = [np.clip(part[:, tap], int(low), int(high), dtype=sums) for tap in rows]
        lines = picked[0] + picked[1] if len(picked) == 2 else picked[0]  # (k, H, W) -> (k, H', W)
        if len(columns) == 2:
            np.add(lines[:, :, columns[0]], lines[:, :, columns[1]], out=summed[start:stop])  # -> (k, H', W')
        else:
            summed[start:stop] = lines[:, :, columns[0]]
    # Pass 2: linear along the outer axis, then window scaling: value = (mean - low) / (high - low).
    count = len(rows) * len(columns)  # values in each sum
    offset, scale = np.float32(low * count), np.float32(1.0 / ((high - low) * count))
    out = np.empty(out_size, dtype=np.float32)
    for k in range(out_size[0]):
        target = out[k]
        if weight[k] == 0:
            np.subtract(summed[i0[k]], offset, out=target, dtype=np.float32)
        else:
            np.multiply(summed[i0[k]], np.float32(1.0) - weight[k], out=target, dtype=np.float32)
            target += summed[i1[k]] * weight[k]
            target -= offset
        target *= scale
    # Memory order -> the input's axes, its flips undone: (d0, d1, d2) -> size.
    if flips or axes != (0, 1, 2):
        out = _reoriented_copy(out, axes, flips)
    return _like(out, reference)


def _nearest_indices(n: int, m: int) -> np.ndarray:
    """The input indices that nearest-exact resizing from ``n`` to ``m`` samples picks along one axis: torch's own
    ``nearest-exact`` rule, float rounding included, taken from it on an index ramp (equal to torch's 3D resize for
    every size pair we tried)."""
    import torch
    import torch.nn.functional as F

    if n == m:
        return np.arange(n)
    ramp = torch.arange(n, dtype=torch.float32)[None, None]  # (1, 1, n): exact integers up to 2**24
    return F.interpolate(ramp, size=m, mode="nearest-exact")[0, 0].numpy().astype(np.int64)


def _as_slice(index: np.ndarray) -> np.ndarray | slice:
    """``index`` as a slice when evenly spaced and increasing (512 → 256 picks ``1::2``): picking it is a view."""
    steps = np.diff(index)
    if len(index) == 1 or (steps[0] > 0 and np.all(steps == steps[0])):
        step = int(steps[0]) if len(index) > 1 else 1
        return slice(int(index[0]), int(index[-1]) + 1, step)
    return index


def resize_labels(labels, size: Sequence[int] = DEFAULT_SIZE):
    """Resize a (D, H, W) label map (or mask) by nearest-neighbour sampling, values and dtype kept.

    The sampling grid is :func:`resize_volume`'s (voxel centres aligned) and the picks are exactly those of
    ``torch.nn.functional.interpolate(..., mode="nearest-exact")``. They are read straight from ``labels``, which
    may be any strided view (the reoriented view of a file's stored labels), in its memory order: only the output's
    voxels are touched and no full-size copy is made.

    Returns:
        (size) array of ``labels``' dtype (numpy or torch like the input).
    """
    array, reference = _to_numpy(labels, "labels")
    _check_3d(array, "labels")
    memory, axes, flips = memory_order(array)
    picked, gathers = memory, []
    for axis, source in enumerate(axes):  # memory axis ``axis`` is the input's axis ``source``
        n = array.shape[source]
        index = _nearest_indices(n, int(size[source]))
        if source in flips:  # the same voxels counted from the other end; the output is flipped back below
            index = (n - 1 - index)[::-1]
        pick = _as_slice(index)
        if isinstance(pick, slice):
            picked = picked[(slice(None),) * axis + (pick,)]  # a view
        else:
            gathers.append((axis, pick))
    for axis, index in gathers:  # uneven picks gather, outermost axis first (whole slices)
        picked = picked[(slice(None),) * axis + (index,)]
    # Memory order -> the input's axes, its flips undone: the (size) result, a new array (never the input's memory).
    return _like(_reoriented_copy(picked, axes, flips), reference)


def resize_mask(mask, size: Sequence[int] = DEFAULT_SIZE):
    """Resize a (D, H, W) mask with nearest-neighbour sampling on the same voxel-centre grid as :func:`resize_volume`.

    The mask is binarised by :func:`binarize_mask` (floating values ``> 0.5``), exactly as :func:`boundary_mask`
    and :func:`render_prompt` binarise it at native size; the voxels are those :func:`resize_labels` picks.

    Returns:
        (size) bool array (numpy or torch like the input).
    """
    array, reference = _to_numpy(mask, "mask")
    _check_3d(array, "mask")
    if array.dtype.kind == "f":
        array = _binarize(array, "mask")  # NaN anywhere is refused, not only where the grid samples
    picked = resize_labels(array, size)
    return _like(_binarize(picked, "mask"), reference)


def resized_affine(affine: np.ndarray, in_shape: Sequence[int], out_shape: Sequence[int]) -> np.ndarray:
    """The affine of a volume resized from ``in_shape`` to ``out_shape`` with voxel centres aligned."""
    scale = np.asarray(in_shape, dtype=np.float64) / np.asarray(out_shape, dtype=np.float64)
    index_map = np.eye(4)
    index_map[:3, :3] = np.diag(scale)
    index_map[:3, 3] = 0.5 * (scale - 1.0)  # centre of output voxel 0 in input index space
    return np.asarray(affine, dtype=np.float64) @ index_map


# ---------------------------------------------------------------------------------------------------------------
# Boundary prompt (paper eq. 1, docs/design.md "Contours")
# ---------------------------------------------------------------------------------------------------------------


def _bbox(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Tight bounding box of the non-zero voxels of a (D, H, W) array, or None if there are none."""
    slices_hit = np.flatnonzero(mask.any(axis=(1, 2)))
    if slices_hit.size == 0:
        return None
    d = slice(int(slices_hit[0]), int(slices_hit[-1]) + 1)
    plane = mask[d].any(axis=0)  # (H, W) footprint of the ROI slices
    rows, cols = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    return d, slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def _square(mask: np.ndarray, radius: int, erode: bool) -> np.ndarray:
    """In-plane erosion (AND) or dilation (OR) of a (D, H, W) bool array with a (2r+1)² square.

    The square is separable: a 1-D window along H, then along W, each as ``2r`` in-place ``op`` calls on shifted
    views (no temporaries: fresh large allocations cost page faults that dominate at these sizes). Results
    within ``radius`` of the H/W array edges are False: exact for erosion when the array is padded with background,
    and for dilation when the padding is at least ``2 * radius``.
    """
    if radius == 0:
        return mask
    op = np.logical_and if erode else np.logical_or
    src = mask
    for axis in (1, 2):
        n = mask.shape[axis]
        if n <= 2 * radius:  # no full window fits: an erosion is empty (dilations are always padded wider)
            src = np.zeros_like(mask)
            continue
        out = np.empty_like(mask)
        lead = [slice(None)] * 3
        for edge in (slice(0, radius), slice(n - radius, n)):
            lead[axis] = edge
            out[tuple(lead)] = False
        lead[axis] = slice(radius, n - radius)
        centre = out[tuple(lead)]
        for k in range(2 * radius + 1):
            lead[axis] = slice(k, n - 2 * radius + k)
            if k == 0:
                np.copyto(centre, src[tuple(lead)])
            else:
                op(centre, src[tuple(lead)], out=centre)
        src = out
    return src


def _largest_component_per_slice(mask: np.ndarray) -> np.ndarray:
    """Keep, in every axial slice, only the largest 8-connected component (ties: the first in raster order).

    Connected components of row runs rather than of voxels: each row's runs of ROI voxels are nodes, runs in
    consecutive rows that overlap or touch diagonally are joined, and ``scipy.sparse.csgraph`` finds the components
    of that small graph (thousands of runs instead of millions of voxels; about twice as fast as ``ndimage.label``).
    ``mask`` is a (D, H, W) crop whose first and last rows and columns of every slice are background (``_band``
    pads it), so the slices can be stacked into one (D*H, W) image whose slices never touch and whose runs all
    start and end inside the row.
    """
    depth, height, width = mask.shape
    flat = mask.reshape(depth * height, width)
    # Row runs: transitions alternate start (False→True) and end (True→False) in raster order.
    transitions = np.flatnonzero(flat[:, 1:] != flat[:, :-1])
    if transitions.size == 0:
        return mask
    rows = transitions[0::2] // (width - 1)
    starts = transitions[0::2] % (width - 1) + 1  # first ROI column of the run
    ends = transitions[1::2] % (width - 1)  # last ROI column of the run
    slice_of = rows // height
    if np.all(np.diff(rows) > 0) and slice_of.size == np.unique(slice_of).size:
        return mask  # one run per slice: nothing to choose

    # Runs j of row r + 1 joined to run i of row r: start_j <= end_i + 1 and end_j >= start_i - 1. Sorted keys
    # give each i a contiguous range [lo, hi) of such j.
    n = rows.size
    key_start, key_end = rows * width + starts, rows * width + ends
    lo = np.searchsorted(key_end, (rows + 1) * width + starts - 1, side="left")
    hi = np.searchsorted(key_start, (rows + 1) * width + ends + 1, side="right")
    counts = np.maximum(hi - lo, 0)
    src = np.repeat(np.arange(n), counts)
    dst = np.repeat(lo, counts) + np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    graph = sparse.csr_matrix((np.ones(src.size, dtype=np.int8), (src, dst)), shape=(n, n))
    count, component = csgraph.connected_components(graph, directed=False)
    first_run = np.unique(component, return_index=True)[1]  # raster order of each component's first run
    component_slice = slice_of[first_run]
    if count == np.unique(component_slice).size:
        return mask  # one component per slice
    area = np.bincount(component, weights=ends - starts + 1, minlength=count)
    order = np.lexsort((first_run, -area, component_slice))  # by slice, then area desc, then raster order
    largest = np.ones(count, dtype=bool)
    largest[1:] = component_slice[order][1:] != component_slice[order][:-1]
    keep = np.zeros(count, dtype=bool)
    keep[order[largest]] = True

    # Erase the runs of the other components, only on the rows that hold one (a prefix sum of +1/-1 marks).
    drop = ~keep[component]
    drop_rows, row_index = np.unique(rows[drop], return_inverse=True)
    marks = np.zeros((drop_rows.size, width + 1), dtype=np.int32)
    np.add.at(marks, (row_index, starts[drop]), 1)
    np.add.at(marks, (row_index, ends[drop] + 1), -1)
    kept = mask.copy()
    kept_flat = kept.reshape(depth * height, width)
    kept_flat[drop_rows] &= np.cumsum(marks[:, :width], axis=1) == 0
    return kept


# Voxels per slab in ``_band``: small enough that a slab's temporaries stay in cache and below malloc's mmap
# threshold (fresh large arrays cost page faults that dominated the run time), big enough to amortise Python.
_SLAB_VOXELS = 1 << 18


def _band_slab(crop: np.ndarray, thickness: int, mode: str, keep_largest: bool) -> np.ndarray:
    """The band of a (d, h, w) slab padded in-plane with background as ``_band`` does."""
    kept = _largest_component_per_slice(crop) if keep_largest else crop
    if mode == "inner":  # kept & ~erode(kept)
        out = _square(kept, thickness, erode=True)
        np.logical_not(out, out=out)
        out &= kept
    elif mode == "outer":  # dilate(kept) & ~roi
        out = _square(kept, thickness, erode=False)
        out &= ~crop
    else:  # eq. 1: dilate(kept) & ~erode(kept), then thickened
        out = _square(kept, 1, erode=False)
        out &= ~_square(kept, 1, erode=True)
        out = _square(out, thickness - 1, erode=False)
    return out


def _band(
    roi: np.ndarray, thickness: int, mode: str, keep_largest: bool
) -> tuple[tuple[slice, slice, slice] | None, np.ndarray | None]:
    """The band of :func:`boundary_mask`, computed and returned only on a region around the ROI.

    Returns:
        ``(region, band)``: ``region`` slices the image around the ROI (its bounding box widened in-plane by the
        padding, clipped to the image) and ``band`` is the bool band on that region; ``(None, None)`` for an
        empty ROI.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if int(thickness) != thickness or thickness < 1:
        raise ValueError(f"thickness must be a positive integer, got {thickness!r}")
    thickness = int(thickness)
    box = _bbox(roi)
    if box is None:
        return None, None
    # The band lives on the ROI's bounding box widened in-plane by ``pad`` (clipped to the image). Slabs of slices
    # are copied into buffers padded in-plane with background around their own, tighter bounding box, so every
    # filter is exact where it matters and voxels beyond the image edge count as background.
    # Erosion is exact with one background row/column around the ROI (beyond it everything is background);
    # dilations reach ``thickness`` past the ROI and ``_square`` needs ``radius`` more.
    pad = 1 if mode == "inner" else 2 * thickness + 2
    d, h, w = box
    h0, w0 = max(h.start - pad, 0), max(w.start - pad, 0)
    h1, w1 = min(h.stop + pad, roi.shape[1]), min(w.stop + pad, roi.shape[2])
    region = (d, slice(h0, h1), slice(w0, w1))
    band = np.zeros((d.stop - d.start, h1 - h0, w1 - w0), dtype=bool)
    depth = max(1, _SLAB_VOXELS // ((h.stop - h.start + 2 * pad) * (w.stop - w.start + 2 * pad)))
    for start in range(0, band.shape[0], depth):  # each slab is processed as a whole array
        slab = roi[d.start + start : min(d.start + start + depth, d.stop), h0:h1, w0:w1]
        slab_box = _bbox(slab)
        if slab_box is None:  # slices between separate parts of the ROI
            continue
        _, sh, sw = slab_box
        crop = np.zeros((slab.shape[0], sh.stop - sh.start + 2 * pad, sw.stop - sw.start + 2 * pad), dtype=bool)
        crop[:, pad:-pad, pad:-pad] = slab[:, sh, sw]
        out = _band_slab(crop, thickness, mode, keep_largest)
        r0, c0 = max(sh.start - pad, 0), max(sw.start - pad, 0)
        r1, c1 = min(sh.stop + pad, band.shape[1]), min(sw.stop + pad, band.shape[2])
        dr, dc = r0 - (sh.start - pad), c0 - (sw.start - pad)  # offset of the kept part inside the buffer
        band[start : start + slab.shape[0], r0:r1, c0:c1] = out[:, dr : dr + r1 - r0, dc : dc + c1 - c0]
    return region, band


def boundary_mask(
    mask,
    thickness: int = 3,
    mode: BoundaryMode = "inner",
    keep_largest: bool = True,
):
    """Slice-wise boundary band of a 3D ROI mask (paper eq. 1 with the semantics of docs/design.md).

    Per axial slice, with 8-neighbourhoods and Chebyshev (square) distances measured inside the slice only:

    - ``keep_largest``: first keep the largest 8-connected component of the ROI in that slice;
    - ``inner`` (default): ROI voxels within ``thickness`` px of a non-ROI voxel, i.e. ``S & ~erode(S)``
      thickened inwards by 3x3 dilation; the band lies inside the ROI and the interior stays empty;
    - ``outer``: non-ROI voxels within ``thickness`` px of the ROI; hides none of the ROI's own voxels;
    - ``two_sided``: eq. 1 literally (voxels with a differing 8-neighbour, on both sides of the edge), then
      dilated by ``thickness - 1`` px, so it is about ``2 * thickness`` px wide.

    Voxels beyond the image edge count as background, so an ROI cut by the field of view is outlined along the
    cut. Slices the ROI does not intersect stay empty; an empty ROI gives an all-false band.

    Args:
        mask: (D, H, W) ROI mask, numpy or torch, binarised by :func:`binarize_mask` (floating values ``> 0.5``).
        thickness: band width in pixels (3 = the paper's line; 1 = the one-pixel variant).
        mode: ``"inner"``, ``"outer"`` or ``"two_sided"``.
        keep_largest: keep only the largest 8-connected component per slice before drawing.

    Returns:
        (D, H, W) bool band, numpy or torch like the input.
    """
    array, reference = _to_numpy(mask, "mask")
    _check_3d(array, "mask")
    roi = _binarize(array, "mask")
    band = np.zeros(roi.shape, dtype=bool)
    region, band_crop = _band(roi, thickness, mode, keep_largest)
    if region is not None:
        band[region] = band_crop
    return _like(band, reference)


@dataclass
class PromptResult:
    """What :func:`render_prompt` returns.

    Attributes:
        pixel_values: (C, D, H, W) model input: C = 1 (``burn_in``), 2 (``channel``: image, contour) or 3 (``rgb``).
        covered_fraction: fraction of ROI voxels under the band (burn-in hides them); 0 for an empty ROI.
        roi_empty: the ROI mask had no voxel, so nothing was drawn.
        slices: indices of the axial slices that carry a contour.
        shape: (D, H, W) of the volume.
        region: slices of the volume around the ROI that hold the whole band (``None`` for an empty ROI).
        band: the bool band on ``region`` (``None`` for an empty ROI); :attr:`boundary` gives it full size.
    """

    pixel_values: object
    covered_fraction: float
    roi_empty: bool
    slices: list[int]
    shape: tuple[int, int, int]
    region: tuple[slice, slice, slice] | None = field(default=None, repr=False)
    band: np.ndarray | None = field(default=None, repr=False)
    _reference: object = field(default=None, repr=False)

    @property
    def boundary(self):
        """(D, H, W) bool band that was drawn (numpy or torch like the input volume), built on access."""
        full = np.zeros(self.shape, dtype=bool)
        if self.region is not None:
            full[self.region] = self.band
        return _like(full, self._reference)


def render_prompt(
    volume01,
    mask,
    color: str | Sequence[int] = "red",
    encoding: PromptEncoding = "burn_in",
    thickness: int = 3,
    mode: BoundaryMode = "inner",
    keep_largest: bool = True,
    burn_value: float = 1.0,
    inplace: bool = False,
    dtype=np.float32,
    check_finite: bool = True,
) -> PromptResult:
    """Draw the boundary prompt of ``mask`` into a windowed volume, as the model will see it.

    The DCFormer stem has one input channel, so a colour cannot reach it (docs/design.md):

    - ``burn_in`` (default, the paper's way): band voxels set to ``burn_value`` (the maximum normalised intensity);
    - ``channel``: a second channel holding the band as 0/1 (the stem's kernel for it starts at zero);
    - ``rgb``: three channels, grey image with the band painted in ``color`` (for 2D / RGB encoders).

    Args:
        volume01: (D, H, W) windowed volume in [0, 1], numpy or torch (bfloat16 comes back as bfloat16).
        mask: (D, H, W) ROI mask on the same grid, binarised by :func:`binarize_mask` (floating values ``> 0.5``).
            ``None`` or an empty mask draws nothing.
        color: contour colour (name, ``#rrggbb`` or RGB); used by ``rgb`` only (and by the PNGs).
        encoding: ``"burn_in"``, ``"channel"`` or ``"rgb"``.
        thickness, mode, keep_largest: passed to :func:`boundary_mask`.
        burn_value: intensity written on the band for ``burn_in``.
        inplace: for ``burn_in`` on a numpy float32 input, draw into ``volume01`` itself (no copy).
        dtype: numpy output dtype.
        check_finite: refuse NaN/inf in ``volume01`` (they would reach ``pixel_values``).

    Returns:
        A :class:`PromptResult`; ``pixel_values`` and ``boundary`` are numpy or torch like ``volume01``.

    Raises:
        ValueError: unknown encoding. InvalidVolumeError: volume and mask shapes differ or are not 3D, non-numeric
            input, NaN in the mask, NaN/inf in the volume when ``check_finite``.
    """
    if encoding not in _ENCODINGS:
        raise ValueError(f"encoding must be one of {_ENCODINGS}, got {encoding!r}")
    image, reference = _to_numpy(volume01, "volume")
    _check_3d(image, "volume")
    if check_finite:
        _require_finite(image, "volume")
    roi = np.zeros(image.shape, dtype=bool) if mask is None else _binarize(_to_numpy(mask, "mask")[0], "mask")
    if roi.shape != image.shape:
        raise InvalidVolumeError("mask", f"mask shape {tuple(roi.shape)} differs from volume shape {image.shape}")

    region, band = _band(roi, thickness, mode, keep_largest)
    if region is None:
        roi_voxels, covered, slices = 0, 0.0, []
    else:
        # The ROI lies inside ``region``, so all counting stays on that crop.
        roi_crop = roi[region]
        roi_voxels = int(np.count_nonzero(roi_crop))
        covered = float(np.count_nonzero(np.logical_and(band, roi_crop)) / roi_voxels)
        slices = (region[0].start + np.flatnonzero(band.any(axis=(1, 2)))).tolist()

    if encoding == "burn_in":
        inplace = inplace and reference is None and image.dtype == dtype
        out = image if inplace else image.astype(dtype, copy=True)
        channels = [out]
    elif encoding == "channel":
        contour = np.zeros(image.shape, dtype=dtype)
        channels = [image.astype(dtype, copy=False), contour]
    else:
        channels = [image.astype(dtype, copy=True) for _ in range(3)]
    if region is not None:
        if encoding == "burn_in":
            np.copyto(out[region], burn_value, where=band, casting="unsafe")
        elif encoding == "channel":
            np.copyto(contour[region], 1, where=band, casting="unsafe")
        else:
            for channel, value in zip(channels, np.asarray(parse_color(color), dtype=np.float64) / 255.0, strict=True):
                np.copyto(channel[region], value, where=band, casting="unsafe")
    pixel_values = out[None] if encoding == "burn_in" else np.stack(channels)
    return PromptResult(
        pixel_values=_like(pixel_values, reference),
        covered_fraction=covered,
        roi_empty=roi_voxels == 0,
        slices=slices,
        shape=tuple(image.shape),
        region=region,
        band=band,
        _reference=reference,
    )
