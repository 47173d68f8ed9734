"""3D image processor: CT volume (+ ROI mask) → ``pixel_values`` with the boundary prompt drawn in.

Inputs carry their orientation: a file path, a nibabel image or a MONAI ``MetaTensor`` is reoriented from its affine
to the canonical (D, H, W) layout of ``ct_io``; a bare numpy array or torch tensor has no affine, so it is refused
unless the caller states its layout (``layout="DHW"``).

Self-contained for Hub remote code: third-party imports and the sibling modules ``ct_io`` / ``ct_transforms``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import torch
from transformers.image_processing_base import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

from .ct_io import (
    CTVolume,
    InvalidVolumeError,
    LabelMap,
    MaskMismatchError,
    load_label_map,
    load_volume,
    memory_order,
    resolve_label,
    select_label,
    to_canonical,
)
from .ct_transforms import (
    WINDOW_PRESETS,
    PromptResult,
    _window_range,
    binarize_mask,
    parse_color,
    render_prompt,
    resize_labels,
    resize_mask,
    window_and_resize,
)


__all__ = ["LAYOUTS", "Med3DQwenImageProcessor"]

VolumeInput = str | os.PathLike | CTVolume | nib.spatialimages.SpatialImage | np.ndarray | torch.Tensor
MaskInput = str | os.PathLike | nib.spatialimages.SpatialImage | np.ndarray | torch.Tensor | None
_ENCODING_CHANNELS = {"burn_in": 1, "channel": 2, "rgb": 3}
#: Layouts a bare array (no affine) may be declared in: ``"DHW"`` is ``ct_io``'s canonical layout (axial slices
#: inferior → superior, rows anterior → posterior, columns patient right → left), what ``load_volume`` returns.
LAYOUTS = ("DHW",)
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SINGLE_INPUTS = (str, os.PathLike, CTVolume, nib.spatialimages.SpatialImage, np.ndarray, torch.Tensor)


def _is_meta_tensor(value) -> bool:
    """A MONAI ``MetaTensor`` (checked without importing MONAI): a tensor that carries an affine and metadata."""
    return isinstance(value, torch.Tensor) and hasattr(value, "affine") and hasattr(value, "meta")


def _describe(value, index: int, what: str) -> str:
    """How an input is named in errors and warnings: its file when it has one, else its position and type."""
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, CTVolume) and value.path:
        return value.path
    filename = value.get_filename() if isinstance(value, nib.spatialimages.SpatialImage) else None
    if filename:
        return filename
    if _is_meta_tensor(value) and value.meta.get("filename_or_obj"):
        return str(value.meta["filename_or_obj"])
    return f"{what}[{index}] ({type(value).__name__})"


def _tensor_to_numpy(value: torch.Tensor) -> np.ndarray:
    """bfloat16 has no numpy dtype: any floating tensor → float32; MetaTensor → its plain data."""
    value = value.detach().cpu()
    value = value.as_tensor() if hasattr(value, "as_tensor") else value
    return (value.float() if value.is_floating_point() else value).numpy()


def _oriented(value, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(data, index→RAS affine)`` of a nibabel image or a MetaTensor, data still in the input's own axis order."""
    if isinstance(value, nib.spatialimages.SpatialImage):
        data = np.asanyarray(value.dataobj)  # a file's proxy applies the header's slope / intercept on reading
        while data.ndim > 3 and data.shape[-1] == 1:  # NIfTI's trailing time / vector axes of length 1
            data = data[..., 0]
        affine = np.asarray(value.affine, dtype=np.float64)
    else:  # MetaTensor: channel-first (1, X, Y, Z) after EnsureChannelFirst, or (X, Y, Z) without a channel
        affine = np.asarray(_tensor_to_numpy(value.affine), dtype=np.float64)
        data = _tensor_to_numpy(value)
        if affine.shape != (4, 4):
            raise InvalidVolumeError(name, f"a MetaTensor with a {affine.shape} affine is not a 3D image")
        if data.ndim == 4:
            if data.shape[0] != 1:
                raise InvalidVolumeError(
                    name,
                    f"expected a channel-first (1, X, Y, Z) MetaTensor, got shape {data.shape}; a channel-last "
                    "image needs EnsureChannelFirstd first, and a CT has one channel",
                )
            data = data[0]
        if str(value.meta.get("space", "RAS")).upper() == "LPS":
            affine = _LPS_TO_RAS @ affine
    if data.ndim != 3:
        raise InvalidVolumeError(name, f"expected a 3D image, got shape {data.shape}")
    return data, affine


def _file_of(value) -> str | None:
    """The file a nibabel image was loaded from, when its data still is that file's: an unmodified array proxy, with
    the file's own affine and shape. Such an image (what ``datasets``' ``Nifti`` feature decodes to) is then read from
    the file the fast way — one-shot decompression with its CRC checked, stored integers windowed in place — instead
    of through nibabel's gzip stream, which stops before the CRC trailer and expands the data to float first."""
    if not isinstance(value, nib.spatialimages.SpatialImage) or not nib.is_proxy(value.dataobj):
        return None
    filename = value.get_filename()
    if not filename or not os.path.isfile(filename):
        return None
    try:
        on_disk = nib.load(filename)  # the header only
    except Exception:  # noqa: BLE001 - an unreadable file: let nibabel's own read report it, as before
        return None
    if on_disk.shape != value.shape or not np.allclose(on_disk.affine, value.affine, rtol=0, atol=1e-6):
        return None
    header, given = on_disk.header, value.header
    if header.get_data_dtype() != given.get_data_dtype() or header.get_slope_inter() != given.get_slope_inter():
        return None
    return filename


def _label_map(data: np.ndarray, affine: np.ndarray | None, name: str) -> LabelMap:
    """An integer :class:`LabelMap` of mask data already in the canonical layout (integral floats → int32)."""
    if data.dtype.kind not in "iub":
        if not np.isfinite(data).all() or not np.array_equal(data, np.round(data)):
            raise InvalidVolumeError(name, "mask holds non-integer values; a label= needs an integer label map")
        data = data.astype(np.int32)
    return LabelMap(array=np.ascontiguousarray(data), affine=affine, header_table={}, path=name)


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
        if not isinstance(window, str):
            _window_range(window)  # two finite numbers, low < high: refused here, not at the first volume
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

    def _volume(self, volume: VolumeInput, layout: str | None, name: str) -> CTVolume:
        """The volume in the canonical (D, H, W) layout, oriented from its affine or from the stated ``layout``."""
        volume = _file_of(volume) or volume  # a file-backed nibabel image (datasets' Nifti feature): its file
        if isinstance(volume, (str, os.PathLike)):
            # A NIfTI's stored integers, reoriented as a view and windowed straight from there (no float32 copy of
            # the whole volume); the window's clip and scaling give the same float32 values as from float32 HU.
            return load_volume(volume, stored_integers=True)
        if isinstance(volume, CTVolume):
            return volume
        # Integer HU stay integers here too (a view, reoriented without a copy), so the same values give the same
        # model input whether they come as a file, a nibabel image (datasets' Nifti feature), a MetaTensor or an array.
        if isinstance(volume, nib.spatialimages.SpatialImage) or _is_meta_tensor(volume):
            data, affine = _oriented(volume, name)
            array, affine = to_canonical(data, affine, copy=False)
            # validates: real numbers, finite
            return CTVolume.from_array(array, affine=affine, name=name, stored_integers=True)
        if isinstance(volume, (np.ndarray, torch.Tensor)):
            array = _tensor_to_numpy(volume) if isinstance(volume, torch.Tensor) else volume
            _require_layout(layout, name, "volume")
            # validates: 3D, real numbers, finite
            return CTVolume.from_array(np.asarray(array), name=name, stored_integers=True)
        raise TypeError(
            f"{name}: unsupported volume type {type(volume).__name__}; give a file path, a nibabel image, a MONAI "
            "MetaTensor, a CTVolume, or a numpy array / torch tensor with layout='DHW'"
        )

    def _grid_mask(self, mask: MaskInput, volume: CTVolume, layout: str | None, label, name: str) -> np.ndarray | None:
        """The ROI (one ``label`` of a multi-label map) as a bool mask on the model grid, checked against
        ``volume``'s grid; nearest-neighbour resizing as :func:`resize_mask`."""
        if mask is None:
            return None
        mask = _file_of(mask) or mask
        if isinstance(mask, (str, os.PathLike)):
            # A file's labels stay the reoriented view of its stored values: the whole map is checked (grid, label,
            # binary), then only the model grid's voxels are picked and compared, never a full-size bool copy.
            labels = load_label_map(mask, copy=False)
            labels.check_grid(volume)
            label_id = resolve_label(labels, label)
            picked = resize_labels(labels.array, self.volume_size)
            return picked != 0 if label_id is None else picked == label_id
        if isinstance(mask, nib.spatialimages.SpatialImage) or _is_meta_tensor(mask):
            data, affine = _oriented(mask, name)
            array, affine = to_canonical(data, affine)
            labels = _label_map(array, affine, name)
            labels.check_grid(volume)
            return resize_mask(select_label(labels, label), self.volume_size)
        if isinstance(mask, (np.ndarray, torch.Tensor)):
            _require_layout(layout, name, "mask")
            array = _tensor_to_numpy(mask) if isinstance(mask, torch.Tensor) else np.asarray(mask)
            if array.shape != volume.shape:
                raise MaskMismatchError(name, f"mask shape {array.shape} differs from volume shape {volume.shape}")
            if label is None:
                # one rule for soft masks: floating values > 0.5 (binarize_mask), applied by resize_mask
                return resize_mask(binarize_mask(array, name), self.volume_size)
            return resize_mask(select_label(_label_map(array, None, name), label), self.volume_size)
        raise TypeError(f"{name}: unsupported mask type {type(mask).__name__}")

    def _warn_once(self, kind: str, message: str) -> None:
        """Warn about the first input of a kind of likely mistake; later ones of that kind stay quiet."""
        warned = self.__dict__.setdefault("_warned", set())
        if kind not in warned:
            warned.add(kind)
            warnings.warn(f"{message} (warned once per processor)", UserWarning, stacklevel=4)

    def preprocess(
        self,
        volumes: VolumeInput | Sequence[VolumeInput],
        masks: MaskInput | Sequence[MaskInput] = None,
        return_tensors: str | None = "pt",
        intensity: str | Sequence[str | None] | None = None,
        rescale: tuple[float, float] | Sequence[tuple[float, float] | None] | None = None,
        layout: str | Sequence[str | None] | None = None,
        label: int | str | Sequence[int | str | None] | None = None,
        return_prompt_info: bool = False,
    ) -> BatchFeature:
        """Process one volume or a list of volumes.

        Args:
            volumes: file paths (NIfTI, DICOM folder, `.npy`, 2D figure), nibabel images, MONAI `MetaTensor`s
                (channel-first `(1, X, Y, Z)` or `(X, Y, Z)`, oriented from their affine), :class:`CTVolume`
                objects, or numpy arrays / torch tensors with `layout="DHW"`.
            masks: one ROI mask per volume (path, nibabel image, MetaTensor, array with `layout="DHW"`, or None for
                no prompt), or None for none at all. Files and images must lie on their volume's voxel grid.
            return_tensors: `"pt"` or `"np"`.
            intensity: per volume (or one for all) `"hu"` — windowed with `window` — or `"unit"` — already in
                [0, 1] (M3D-VQA volumes, 2D figures), only clipped. Default: what the loaded file says (figures are
                `"unit"`), else `"hu"`. Datasets record it in their `intensity` field.
            rescale: per volume (or one for all) `(slope, intercept)` applied before windowing, for files whose
                header lacks it (CT-RATE's `rescale_slope` / `rescale_intercept` fields).
            layout: per volume (or one for all) the axis layout of bare arrays, which carry no affine: `"DHW"` (see
                :data:`LAYOUTS`). Required for arrays and tensors; inputs with an affine ignore it.
            label: per volume (or one for all) the label id or name to outline in a multi-label mask (names need a
                file with a label table); None for binary masks.
            return_prompt_info: also return `covered_fraction` (B,) — the share of ROI voxels the band covers — and
                `roi_empty` (B,) bool. They are not model inputs, so they are left out by default.

        Returns:
            `BatchFeature` with `pixel_values` (B, C, D, H, W) float32 in [0, 1] (+ the prompt info on request).

        Warns:
            UserWarning, once per processor and kind, naming the input: a one-slice volume (a 2D figure) repeated to
            the model depth; values already in [0, 1] windowed as HU (pass `intensity="unit"`).
        """
        if isinstance(volumes, _SINGLE_INPUTS):
            volumes, masks = [volumes], [masks]
        volumes = list(volumes)
        masks = [None] * len(volumes) if masks is None else list(masks)
        if len(masks) != len(volumes):
            raise ValueError(f"got {len(volumes)} volumes but {len(masks)} masks")
        intensities = _per_volume(intensity, len(volumes), "intensity", lambda v: isinstance(v, str))
        rescales = _per_volume(rescale, len(volumes), "rescale", _is_number_pair)
        layouts = _per_volume(layout, len(volumes), "layout", lambda v: isinstance(v, str))
        labels = _per_volume(label, len(volumes), "label", lambda v: isinstance(v, (str, int, np.integer)))
        pixel_values, covered, empty = [], [], []
        for i, (volume, mask, kind, scale, axes, roi_label) in enumerate(
            zip(volumes, masks, intensities, rescales, layouts, labels, strict=True)
        ):
            image, roi = self._model_grid(i, volume, mask, kind, scale, axes, roi_label)
            result = self.draw_prompt(image, roi)
            pixel_values.append(result.pixel_values)
            covered.append(result.covered_fraction)
            empty.append(result.roi_empty)
        data = {"pixel_values": np.stack(pixel_values)}
        if return_prompt_info:
            data["covered_fraction"] = np.asarray(covered, dtype=np.float32)
            data["roi_empty"] = np.asarray(empty, dtype=bool)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def model_grid(
        self,
        volume: VolumeInput,
        mask: MaskInput = None,
        intensity: str | None = None,
        rescale: tuple[float, float] | None = None,
        layout: str | None = None,
        label: int | str | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """One volume (+ ROI mask) on the model grid, before the prompt: what :meth:`preprocess` draws on.

        The steps that depend on the volume and mask only (read, reorient, window, resize); the prompt settings
        (colour, width, mode, encoding) act later in :meth:`draw_prompt`, so a cache of these arrays serves every
        prompt setting. ``preprocess(volume, mask, ...)`` equals ``draw_prompt(*model_grid(volume, mask, ...))``.

        Args:
            volume, mask, intensity, rescale, layout, label: one volume's values of :meth:`preprocess`'s arguments.

        Returns:
            ``(image, roi)``: (D, H, W) = ``volume_size`` float32 in [0, 1], and the (D, H, W) bool ROI mask
            resized with nearest-neighbour sampling (None without a mask).
        """
        return self._model_grid(0, volume, mask, intensity, rescale, layout, label)

    def model_grid_mask(
        self,
        mask: MaskInput,
        volume: VolumeInput,
        layout: str | None = None,
        label: int | str | None = None,
    ) -> np.ndarray:
        """The ROI mask alone on the model grid: the ``roi`` of :meth:`model_grid` without windowing and resizing the
        volume again (``volume`` — best a loaded :class:`CTVolume` — gives the grid the mask must lie on).

        Returns:
            (D, H, W) = ``volume_size`` bool.
        """
        ct = self._volume(volume, layout, _describe(volume, 0, "volumes"))
        roi = self._grid_mask(mask, ct, layout, label, _describe(mask, 0, "masks"))
        if roi is None:
            raise ValueError("model_grid_mask needs a mask, got None")
        return roi

    def draw_prompt(self, image: np.ndarray, roi: np.ndarray | None) -> PromptResult:
        """The boundary prompt of ``roi`` drawn into ``image`` (both on the model grid) with this processor's
        prompt settings; ``pixel_values`` of the result is (C, D, H, W). ``image`` is drawn into in place."""
        return render_prompt(
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

    def _model_grid(self, i, volume, mask, kind, scale, axes, roi_label) -> tuple[np.ndarray, np.ndarray | None]:
        name = _describe(volume, i, "volumes")
        ct = self._volume(volume, axes, name)
        roi = self._grid_mask(mask, ct, axes, roi_label, _describe(mask, i, "masks"))
        values = ct.array
        kind = kind or ct.intensity
        if kind not in ("hu", "unit"):
            raise ValueError(f"intensity must be 'hu' or 'unit', got {kind!r}")
        window = self.window if kind == "hu" else (0.0, 1.0)
        low, high = _window_range(window)
        slope, intercept = (1.0, 0.0) if scale is None else (float(v) for v in scale)
        if not (np.isfinite(slope) and np.isfinite(intercept)) or slope == 0.0:
            raise InvalidVolumeError(
                name, f"rescale {scale!r}: slope and intercept must be finite (not NaN or infinite), slope non-zero"
            )
        if "stored_scale" in ct.meta:  # a file's raw integers and its header's scaling, then the given rescale
            stored_slope, stored_intercept = ct.meta["stored_scale"]
            slope, intercept = stored_slope * slope, stored_intercept * slope + intercept
        if slope < 0:  # rare; the window cannot be moved onto the stored values, so rescale them
            values, slope, intercept = values * np.float32(slope) + np.float32(intercept), 1.0, 0.0
        if ct.shape[0] == 1 and self.volume_size[0] > 1:
            self._warn_once(
                "one_slice",
                f"{name}: a single slice (a 2D figure?) is repeated to the model depth of {self.volume_size[0]}",
            )
        in_memory = memory_order(values)[0]  # the same values; min/max at memory speed on a reoriented view
        if kind == "hu" and float(in_memory.min()) * slope + intercept >= 0.0:
            if float(in_memory.max()) * slope + intercept <= 1.0:
                self._warn_once(
                    "unit_as_hu",
                    f"{name}: values lie in [0, 1] but are windowed as HU, which maps them all to about one grey; "
                    "pass intensity='unit' if the volume is already normalised",
                )
        # value = stored * slope + intercept, so windowing it on [low, high] is windowing the stored values on
        # [(low - intercept) / slope, (high - intercept) / slope]: the stored integers stay integers (CT-RATE's
        # slope 1, intercept -1024 keeps whole-number bounds, the fused fast path).
        window = ((low - intercept) / slope, (high - intercept) / slope)
        return window_and_resize(values, window, self.volume_size), roi

    def __call__(self, volumes, masks=None, **kwargs) -> BatchFeature:
        return self.preprocess(volumes, masks, **kwargs)


def _require_layout(layout: str | None, name: str, what: str) -> None:
    """A bare array carries no affine: its layout must be stated, never guessed."""
    if layout is None:
        raise ValueError(
            f"{name}: a bare {what} array has no affine, so its orientation is unknown; pass layout='DHW' if it is "
            "(D, H, W) = axial slices inferior→superior, rows anterior→posterior, columns patient right→left (what "
            "load_volume returns), or give a file path, a nibabel image or a MONAI MetaTensor"
        )
    if layout not in LAYOUTS:
        raise ValueError(f"{name}: layout must be one of {LAYOUTS}, got {layout!r}")


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
