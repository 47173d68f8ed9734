"""MONAI dictionary transform that draws the boundary prompt into channel-first ``MetaTensor``s.

``DrawBoundaryPromptd`` is the processor's prompt step for MONAI pipelines: put it after ``LoadImaged``,
``EnsureChannelFirstd`` and an intensity window to [0, 1] (``ScaleIntensityRanged(..., b_min=0, b_max=1,
clip=True)``)::

    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, ScaleIntensityRanged
    from med3dqwen.processing.monai_transforms import DrawBoundaryPromptd

    pipeline = Compose([
        LoadImaged(keys=["image", "roi"]),
        EnsureChannelFirstd(keys=["image", "roi"]),
        ScaleIntensityRanged(keys="image", a_min=-1000, a_max=200, b_min=0, b_max=1, clip=True),
        DrawBoundaryPromptd(keys="image", mask_key="roi", thickness=3),
    ])

The contour is drawn per axial slice, and which array axis is axial comes from the affine: the image is reoriented
to the canonical (D, H, W) layout of ``ct_io`` (D inferior → superior, H anterior → posterior, W right → left),
drawn exactly as ``Med3DQwenImageProcessor`` draws it, and put back in the input's own layout, with its affine and
metadata. An input whose orientation cannot be known is refused: a plain array or tensor (no affine), a tensor
without a channel axis, or a channel-last one. The transform trusts the affine it is given; a ``MetaTensor`` made
from a bare array carries MONAI's default identity affine, which is only right if the array really is (R, A, S).

This module imports MONAI, so import it only where MONAI is installed (``pip install monai``); the rest of
``med3dqwen`` works without it. Self-contained for Hub remote code: third-party imports and sibling modules only.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch


try:
    from monai.data import MetaTensor
    from monai.transforms import MapTransform
except ImportError as err:  # pragma: no cover - exercised only without MONAI
    raise ImportError(
        "med3dqwen.processing.monai_transforms needs MONAI: `pip install monai`. The processor itself does not."
    ) from err

from .ct_io import InvalidVolumeError, MaskMismatchError
from .ct_transforms import binarize_mask, parse_color, render_prompt


__all__ = ["DrawBoundaryPromptd", "canonical_axes"]

# World axis (RAS index) and direction of each canonical (D, H, W) axis: +S, -A (= P), -R (= L).
_CANONICAL_WORLD = ((2, 1.0), (1, -1.0), (0, -1.0))


def canonical_axes(affine) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """How to read a 3D array with this index→RAS affine in the canonical (D, H, W) layout.

    Args:
        affine: (4, 4) index → RAS (or LPS: the axis permutation is the same) affine.

    Returns:
        ``(order, flips)``: ``np.transpose(array, order)`` then flipping the axes where ``flips`` is true gives
        the (D, H, W) array; ``order[0]`` is the axial axis (the one closest to superior-inferior).
    """
    ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))  # per array axis: (world axis, ±1)
    if np.isnan(ornt).any():
        raise ValueError(f"the affine does not define a 3D orientation:\n{np.round(np.asarray(affine), 4)}")
    order, flips = [], []
    for world, direction in _CANONICAL_WORLD:
        axis = int(np.flatnonzero(ornt[:, 0] == world)[0])
        order.append(axis)
        flips.append(bool(ornt[axis, 1] != direction))
    return tuple(order), tuple(flips)


def _to_dhw(array: np.ndarray, order, flips) -> np.ndarray:
    out = np.transpose(array, order)
    return np.flip(out, axis=[i for i, flip in enumerate(flips) if flip])


def _from_dhw(array: np.ndarray, order, flips) -> np.ndarray:
    """Inverse of :func:`_to_dhw` on the last three axes of ``array`` (leading channel axes are kept)."""
    lead = array.ndim - 3
    out = np.flip(array, axis=[lead + i for i, flip in enumerate(flips) if flip])
    inverse = np.argsort(order)
    return np.transpose(out, [*range(lead), *(lead + int(i) for i in inverse)])


class DrawBoundaryPromptd(MapTransform):
    """Draw the boundary prompt of a mask into windowed channel-first images, slice by axial slice.

    Args:
        keys: the image keys to draw into: channel-first ``(1, X, Y, Z)`` ``MetaTensor``s in [0, 1].
        mask_key: the key of the ROI mask: a channel-first ``(1, X, Y, Z)`` ``MetaTensor`` on the image's grid.
        label: the label id to outline when the mask is a multi-label map; ``None`` for a binary mask (floating
            values ``> 0.5``).
        encoding: ``"burn_in"`` (1 channel), ``"channel"`` (image + contour) or ``"rgb"`` (3 channels).
        color: contour colour for ``"rgb"``.
        thickness: band width in pixels.
        mode: ``"inner"``, ``"outer"`` or ``"two_sided"``.
        keep_largest: largest 8-connected component per slice only.
        info_key_postfix: the drawing's ``{"covered_fraction", "roi_empty"}`` goes to ``d[f"{key}_{postfix}"]``;
            ``None`` stores nothing.
        allow_missing_keys: don't raise if an image key is missing.

    Raises:
        TypeError: an image or mask without an affine (not a ``MetaTensor``).
        InvalidVolumeError: not channel-first with one channel (e.g. channel-last, or no channel axis), values
            outside [0, 1] (not windowed), NaN/inf.
        MaskMismatchError: the mask's grid (shape or affine) differs from the image's.
    """

    def __init__(
        self,
        keys,
        mask_key: Hashable,
        label: int | None = None,
        encoding: str = "burn_in",
        color: str | Sequence[int] = "red",
        thickness: int = 3,
        mode: str = "inner",
        keep_largest: bool = True,
        info_key_postfix: str | None = "prompt_info",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        parse_color(color)
        if label is not None and int(label) != label:
            raise ValueError(f"label must be an integer label id, got {label!r}")
        self.mask_key = mask_key
        self.label = label
        self.encoding = encoding
        self.color = color
        self.thickness = thickness
        self.mode = mode
        self.keep_largest = keep_largest
        self.info_key_postfix = info_key_postfix

    def _spatial(self, value, key: Hashable) -> np.ndarray:
        """The (X, Y, Z) array of a channel-first one-channel MetaTensor; refuses what has no known orientation."""
        if not isinstance(value, MetaTensor):
            raise TypeError(
                f"{key!r}: a {type(value).__name__} has no affine, so its axial axis is unknown; load it with "
                "LoadImaged (or wrap it in a MetaTensor with its affine)"
            )
        if value.ndim != 4 or value.shape[0] != 1 or tuple(value.affine.shape) != (4, 4):
            hint = "no channel axis" if value.ndim == 3 else "channel-last or not one channel"
            raise InvalidVolumeError(
                str(key),
                f"expected a channel-first (1, X, Y, Z) 3D image, got shape {tuple(value.shape)} ({hint}); add "
                "EnsureChannelFirstd before this transform",
            )
        array = value.as_tensor().detach().cpu()
        return (array.float() if array.is_floating_point() else array).numpy()[0]

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        mask_value = d[self.mask_key]
        mask = self._spatial(mask_value, self.mask_key)
        roi = binarize_mask(mask, str(self.mask_key)) if self.label is None else mask == int(self.label)
        for key in self.key_iterator(d):
            image_value = d[key]
            image = self._spatial(image_value, key)
            if image.shape != roi.shape:
                raise MaskMismatchError(
                    str(self.mask_key), f"mask grid {roi.shape} differs from the grid {image.shape} of {key!r}"
                )
            affine = image_value.affine.detach().cpu().double().numpy()
            mask_affine = mask_value.affine.detach().cpu().double().numpy()
            if not np.allclose(affine, mask_affine, rtol=0, atol=1e-3):
                raise MaskMismatchError(str(self.mask_key), f"mask affine differs from the affine of {key!r}")
            if not np.isfinite(image).all():
                raise InvalidVolumeError(str(key), "image holds NaN or infinite values")
            low, high = float(image.min()), float(image.max())
            if low < 0.0 or high > 1.0:
                raise InvalidVolumeError(
                    str(key),
                    f"values span [{low:g}, {high:g}]; the prompt is drawn on a windowed image in [0, 1] (add "
                    "ScaleIntensityRanged(..., b_min=0, b_max=1, clip=True) before this transform)",
                )
            order, flips = canonical_axes(affine)
            result = render_prompt(
                np.ascontiguousarray(_to_dhw(image, order, flips)),
                np.ascontiguousarray(_to_dhw(roi, order, flips)),
                color=self.color,
                encoding=self.encoding,
                thickness=self.thickness,
                mode=self.mode,
                keep_largest=self.keep_largest,
                check_finite=False,
            )
            pixels = np.ascontiguousarray(_from_dhw(result.pixel_values, order, flips))  # (C, X, Y, Z)
            d[key] = MetaTensor(
                torch.from_numpy(pixels).to(image_value.dtype if image_value.is_floating_point() else torch.float32),
                meta=dict(image_value.meta),  # holds the affine too
                applied_operations=list(image_value.applied_operations),
            )
            if self.info_key_postfix is not None:
                d[f"{key}_{self.info_key_postfix}"] = {
                    "covered_fraction": result.covered_fraction,
                    "roi_empty": result.roi_empty,
                }
        return d
