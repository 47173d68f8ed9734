"""3D image processor: CT volume (+ ROI mask) → ``pixel_values`` with the boundary prompt drawn in.

Self-contained for Hub remote code: third-party imports and the sibling modules ``ct_io`` / ``ct_transforms``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from transformers.image_processing_base import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

from .ct_io import CTVolume, InvalidVolumeError, load_mask, load_volume
from .ct_transforms import (
    WINDOW_PRESETS,
    binarize_mask,
    parse_color,
    render_prompt,
    resize_mask,
    resize_volume,
    window_hu,
)


__all__ = ["Med3DQwenImageProcessor"]

VolumeInput = str | os.PathLike | CTVolume | np.ndarray | torch.Tensor
MaskInput = str | os.PathLike | np.ndarray | torch.Tensor | None
_ENCODING_CHANNELS = {"burn_in": 1, "channel": 2, "rgb": 3}


class Med3DQwenImageProcessor(BaseImageProcessor):
    r"""Turns CT volumes into model inputs: HU window → [0, 1] → resize to `volume_size` → boundary prompt.

    A 3D pipeline of its own: it subclasses `BaseImageProcessor` (which the Auto registry requires) but none of
    its 2D backends.

    The mask follows the volume's geometric transform with nearest-neighbour sampling and the contour is drawn
    after resizing, so it stays `contour_thickness` pixels thin at the model's resolution (docs/design.md).

    Args:
        volume_size (`list[int]`, *optional*, defaults to `[128, 256, 256]`): model input (D, H, W).
        window (`str` or `list[float]`, *optional*, defaults to `"chest"`): HU window preset or `[low, high]`.
        prompt_encoding (`str`, *optional*, defaults to `"burn_in"`): `"burn_in"`, `"channel"` or `"rgb"`.
        prompt_color (`str`, *optional*, defaults to `"red"`): contour colour (for `rgb` and PNG rendering).
        contour_thickness (`int`, *optional*, defaults to 3): band width in pixels.
        contour_mode (`str`, *optional*, defaults to `"inner"`): `"inner"`, `"outer"` or `"two_sided"`.
        keep_largest (`bool`, *optional*, defaults to `True`): largest 8-connected component per slice only.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        volume_size: Sequence[int] = (128, 256, 256),
        window: str | Sequence[float] = "chest",
        prompt_encoding: str = "burn_in",
        prompt_color: str | Sequence[int] = "red",
        contour_thickness: int = 3,
        contour_mode: str = "inner",
        keep_largest: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if prompt_encoding not in _ENCODING_CHANNELS:
            raise ValueError(f"prompt_encoding must be one of {sorted(_ENCODING_CHANNELS)}, got {prompt_encoding!r}")
        if isinstance(window, str) and window not in WINDOW_PRESETS:
            raise ValueError(f"unknown window preset {window!r}; choose from {sorted(WINDOW_PRESETS)}")
        if len(volume_size) != 3:
            raise ValueError(f"volume_size must be (D, H, W), got {volume_size!r}")
        parse_color(prompt_color)
        self.volume_size = [int(s) for s in volume_size]
        self.window = window if isinstance(window, str) else [float(v) for v in window]
        self.prompt_encoding = prompt_encoding
        self.prompt_color = prompt_color if isinstance(prompt_color, str) else list(prompt_color)
        self.contour_thickness = int(contour_thickness)
        self.contour_mode = contour_mode
        self.keep_largest = keep_largest

    @property
    def num_channels(self) -> int:
        return _ENCODING_CHANNELS[self.prompt_encoding]

    def _load(self, volume: VolumeInput, mask: MaskInput) -> tuple[np.ndarray, np.ndarray | None, str | None]:
        """(values, mask, intensity of the file or None): loads paths and checks the mask against the volume."""
        intensity = None
        if isinstance(volume, (str, os.PathLike)):
            volume = load_volume(volume)
        if isinstance(volume, CTVolume):
            if isinstance(mask, (str, os.PathLike)):
                mask = load_mask(mask, like=volume)
            hu, intensity = volume.array, volume.intensity
        else:
            if isinstance(mask, (str, os.PathLike)):
                raise ValueError("a mask file needs the volume as a file or CTVolume, so its grid can be checked")
            if isinstance(volume, torch.Tensor):  # bfloat16 has no numpy dtype: any floating tensor → float32
                volume = volume.detach().cpu()
                volume = (volume.float() if volume.is_floating_point() else volume).numpy()
            hu = CTVolume.from_array(np.asarray(volume)).array  # validates: 3D, real numbers, finite
        if mask is not None:
            mask = binarize_mask(mask)  # one rule for every path: floating values > 0.5
            if mask.shape != hu.shape:
                raise InvalidVolumeError("mask", f"mask shape {mask.shape} differs from volume shape {hu.shape}")
        return hu, mask, intensity

    def preprocess(
        self,
        volumes: VolumeInput | Sequence[VolumeInput],
        masks: MaskInput | Sequence[MaskInput] = None,
        return_tensors: str | None = "pt",
        intensity: str | Sequence[str | None] | None = None,
        rescale: tuple[float, float] | Sequence[tuple[float, float] | None] | None = None,
    ) -> BatchFeature:
        """Process one volume or a list of volumes.

        Args:
            volumes: file paths (NIfTI, DICOM folder, `.npy`, 2D figure), :class:`CTVolume` objects or (D, H, W)
                HU arrays.
            masks: one ROI mask per volume (path, array or None for no prompt), or None for none at all.
            return_tensors: `"pt"` or `"np"`.
            intensity: per volume (or one for all) `"hu"` — windowed with `window` — or `"unit"` — already in
                [0, 1] (M3D-VQA volumes, 2D figures), only clipped. Default: what the loaded file says (figures are
                `"unit"`), else `"hu"`. Datasets record it in their `intensity` field.
            rescale: per volume (or one for all) `(slope, intercept)` applied before windowing, for files whose
                header lacks it (CT-RATE's `rescale_slope` / `rescale_intercept` fields).

        Returns:
            `BatchFeature` with `pixel_values` (B, C, D, H, W) float32 in [0, 1], `covered_fraction` (B,) — the
            share of ROI voxels the band covers — and `roi_empty` (B,) bool.
        """
        if isinstance(volumes, (str, os.PathLike, CTVolume, np.ndarray, torch.Tensor)):
            volumes, masks = [volumes], [masks]
        volumes = list(volumes)
        masks = [None] * len(volumes) if masks is None else list(masks)
        if len(masks) != len(volumes):
            raise ValueError(f"got {len(volumes)} volumes but {len(masks)} masks")
        intensities = _per_volume(intensity, len(volumes), "intensity", lambda v: isinstance(v, str))
        rescales = _per_volume(rescale, len(volumes), "rescale", _is_number_pair)
        pixel_values, covered, empty = [], [], []
        for volume, mask, kind, scale in zip(volumes, masks, intensities, rescales, strict=True):
            values, roi, file_kind = self._load(volume, mask)
            kind = kind or file_kind or "hu"
            if kind not in ("hu", "unit"):
                raise ValueError(f"intensity must be 'hu' or 'unit', got {kind!r}")
            if scale is not None:
                slope, intercept = (float(v) for v in scale)
                values = values * np.float32(slope) + np.float32(intercept)
            window = self.window if kind == "hu" else (0.0, 1.0)
            # window_hu refuses NaN/inf; its output is finite, so the later steps skip their own (full-size) check.
            image = resize_volume(window_hu(values, window), self.volume_size, check_finite=False)
            roi = None if roi is None else resize_mask(roi, self.volume_size)
            result = render_prompt(
                image,
                roi,
                color=self.prompt_color,
                encoding=self.prompt_encoding,
                thickness=self.contour_thickness,
                mode=self.contour_mode,
                keep_largest=self.keep_largest,
                inplace=True,
                check_finite=False,
            )
            pixel_values.append(result.pixel_values)
            covered.append(result.covered_fraction)
            empty.append(result.roi_empty)
        data = {
            "pixel_values": np.stack(pixel_values),
            "covered_fraction": np.asarray(covered, dtype=np.float32),
            "roi_empty": np.asarray(empty, dtype=bool),
        }
        return BatchFeature(data=data, tensor_type=return_tensors)

    def __call__(self, volumes, masks=None, **kwargs) -> BatchFeature:
        return self.preprocess(volumes, masks, **kwargs)


def _is_number_pair(value) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)


def _per_volume(value, count: int, name: str, is_single) -> list:
    """Broadcast one setting to every volume, or check a per-volume list's length."""
    if value is None or is_single(value):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise ValueError(f"got {count} volumes but {len(values)} {name} values")
    return values
