"""Tests for med3dqwen.processing.ct_transforms: windows, resizing, the boundary band and its rendering."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from med3dqwen.io import prompt_png_stack, volume_montage_png
from med3dqwen.processing import ct_transforms
from med3dqwen.processing.ct_io import InvalidVolumeError, load_mask, load_volume
from med3dqwen.processing.ct_transforms import (
    binarize_mask,
    boundary_mask,
    parse_color,
    render_prompt,
    resize_labels,
    resize_mask,
    resize_volume,
    resized_affine,
    window_and_resize,
    window_hu,
)


REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "build" / "test_artifacts"
EIGHT = np.ones((3, 3), dtype=bool)


def one_slice(plane: np.ndarray) -> np.ndarray:
    return np.asarray(plane, dtype=bool)[None]


def square(size: int, top: int, left: int, side: int) -> np.ndarray:
    plane = np.zeros((size, size), dtype=bool)
    plane[top : top + side, left : left + side] = True
    return plane


# ---------------------------------------------------------------------------------------------------------------
# A direct, slow reference of DESIGN.md's contour semantics (scipy, slice by slice)
# ---------------------------------------------------------------------------------------------------------------


def reference_band(mask: np.ndarray, thickness: int, mode: str, keep_largest: bool) -> np.ndarray:
    band = np.zeros_like(mask, dtype=bool)
    square_t = np.ones((2 * thickness + 1, 2 * thickness + 1), dtype=bool)
    for z in range(mask.shape[0]):
        roi = mask[z].astype(bool)
        if not roi.any():
            continue
        kept = roi
        if keep_largest:
            labels, count = ndimage.label(roi, structure=EIGHT)
            sizes = np.bincount(labels.ravel())[1:]
            kept = labels == int(np.argmax(sizes)) + 1  # argmax: first label of the largest size
        if mode == "inner":
            band[z] = kept & ~ndimage.binary_erosion(kept, square_t, border_value=0)
        elif mode == "outer":
            band[z] = ndimage.binary_dilation(kept, square_t) & ~roi
        else:  # eq. 1: a voxel whose 8-neighbourhood holds a different value, on either side
            padded = np.pad(kept, 1)
            edge = ndimage.binary_dilation(padded, EIGHT) & ~ndimage.binary_erosion(padded, EIGHT, border_value=0)
            if thickness > 1:
                edge = ndimage.binary_dilation(edge, EIGHT, iterations=thickness - 1)
            band[z] = edge[1:-1, 1:-1]
    return band


def random_blobs(shape, seed: int, density: float = 0.5) -> np.ndarray:
    """Blobby random masks with several components per slice, some touching the image edge."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=(0.5, 2.0, 2.0))
    return noise > np.quantile(noise, 1 - density)


# ---------------------------------------------------------------------------------------------------------------
# boundary_mask on hand-made masks with known answers
# ---------------------------------------------------------------------------------------------------------------


class TestBoundaryKnownShapes:
    def test_square_inner_one_pixel_is_its_perimeter(self):
        band = boundary_mask(one_slice(square(9, 2, 2, 5)), thickness=1)[0]
        expected = square(9, 2, 2, 5) & ~square(9, 3, 3, 3)
        np.testing.assert_array_equal(band, expected)
        assert band.sum() == 16

    @pytest.mark.parametrize(("thickness", "count"), [(1, 16), (2, 24), (3, 25)])
    def test_square_thickness_grows_inwards_only(self, thickness, count):
        roi = square(11, 3, 3, 5)
        band = boundary_mask(one_slice(roi), thickness=thickness)[0]
        assert band.sum() == count
        assert not (band & ~roi).any()

    def test_interior_stays_empty(self):
        roi = square(32, 4, 4, 20)
        band = boundary_mask(one_slice(roi), thickness=3)[0]
        np.testing.assert_array_equal(band, roi & ~square(32, 7, 7, 14))

    def test_ring_has_outer_and_hole_boundaries(self):
        roi = square(11, 2, 2, 7) & ~square(11, 4, 4, 3)  # 7x7 with a 3x3 hole: every voxel touches background
        band = boundary_mask(one_slice(roi), thickness=1)[0]
        np.testing.assert_array_equal(band, roi)
        wide = square(15, 1, 1, 13) & ~square(15, 6, 6, 3)  # thick ring: inner band of 1 leaves a middle ring empty
        band = boundary_mask(one_slice(wide), thickness=1)[0]
        expected = (square(15, 1, 1, 13) & ~square(15, 2, 2, 11)) | (square(15, 5, 5, 5) & ~square(15, 6, 6, 3))
        np.testing.assert_array_equal(band, expected)

    def test_two_components_keep_largest(self):
        big, small = square(20, 2, 2, 8), square(20, 14, 14, 3)
        roi = one_slice(big | small)
        kept = boundary_mask(roi, thickness=1, keep_largest=True)[0]
        both = boundary_mask(roi, thickness=1, keep_largest=False)[0]
        np.testing.assert_array_equal(kept, big & ~square(20, 3, 3, 6))
        np.testing.assert_array_equal(both, (big & ~square(20, 3, 3, 6)) | (small & ~square(20, 15, 15, 1)))

    def test_diagonal_touch_is_one_component(self):
        # 8-connectivity: two squares touching at a corner form one component, so both keep their contour.
        roi = square(12, 1, 1, 4) | square(12, 5, 5, 4)
        kept = boundary_mask(one_slice(roi), thickness=1, keep_largest=True)[0]
        np.testing.assert_array_equal(kept, boundary_mask(one_slice(roi), thickness=1, keep_largest=False)[0])
        assert kept[1, 1] and kept[8, 8]  # outer corners of both squares

    def test_equal_components_keep_the_first_in_raster_order(self):
        roi = square(16, 1, 9, 4) | square(16, 9, 1, 4)
        band = boundary_mask(one_slice(roi), thickness=1)[0]
        assert band[1:5, 9:13].any() and not band[9:13, 1:5].any()

    def test_single_voxel(self):
        plane = np.zeros((7, 7), dtype=bool)
        plane[3, 3] = True
        roi = one_slice(plane)
        np.testing.assert_array_equal(boundary_mask(roi, thickness=3)[0], plane)
        outer = boundary_mask(roi, thickness=1, mode="outer")[0]
        np.testing.assert_array_equal(outer, square(7, 2, 2, 3) & ~plane)
        np.testing.assert_array_equal(boundary_mask(roi, thickness=1, mode="two_sided")[0], square(7, 2, 2, 3))

    def test_roi_touching_the_image_edge_is_outlined_along_the_edge(self):
        roi = square(10, 0, 0, 4)  # corner square: outside the image counts as background
        band = boundary_mask(one_slice(roi), thickness=1)[0]
        np.testing.assert_array_equal(band, roi & ~square(10, 1, 1, 2))
        full = np.ones((1, 6, 6), dtype=bool)
        np.testing.assert_array_equal(boundary_mask(full, thickness=1)[0], ~square(6, 1, 1, 4))
        outer = boundary_mask(one_slice(roi), thickness=2, mode="outer")[0]
        np.testing.assert_array_equal(outer, square(10, 0, 0, 6) & ~roi)

    def test_outer_band_never_covers_roi_voxels(self):
        roi = random_blobs((4, 40, 40), seed=3)
        outer = boundary_mask(roi, thickness=3, mode="outer", keep_largest=True)
        assert not (outer & roi).any()

    def test_only_intersected_slices_get_a_contour(self):
        mask = np.zeros((9, 16, 16), dtype=bool)
        mask[2, 4:9, 4:9] = True
        mask[5:7, 3:12, 5:10] = True
        band = boundary_mask(mask)
        np.testing.assert_array_equal(np.flatnonzero(band.any(axis=(1, 2))), [2, 5, 6])

    def test_empty_mask_gives_empty_band(self):
        band = boundary_mask(np.zeros((3, 8, 8), dtype=bool))
        assert band.shape == (3, 8, 8) and not band.any()

    def test_dilation_stays_inside_the_slice(self):
        mask = np.zeros((3, 12, 12), dtype=bool)
        mask[1, 3:9, 3:9] = True
        for mode in ("inner", "outer", "two_sided"):
            band = boundary_mask(mask, thickness=3, mode=mode)
            assert not band[0].any() and not band[2].any()

    def test_bad_arguments(self):
        mask = np.zeros((2, 4, 4), dtype=bool)
        with pytest.raises(ValueError, match="mode"):
            boundary_mask(mask, mode="thick")
        with pytest.raises(ValueError, match="thickness"):
            boundary_mask(mask, thickness=0)
        with pytest.raises(InvalidVolumeError, match="shape"):
            boundary_mask(np.zeros((4, 4), dtype=bool))


# ---------------------------------------------------------------------------------------------------------------
# boundary_mask against the slow reference on random masks (all modes, thicknesses, slab boundaries)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["inner", "outer", "two_sided"])
@pytest.mark.parametrize("thickness", [1, 2, 3])
@pytest.mark.parametrize("keep_largest", [True, False])
@pytest.mark.parametrize("shape", [(1, 7, 9), (5, 33, 34), (3, 40, 21)])
def test_matches_reference(mode, thickness, keep_largest, shape):
    for seed in range(2):
        mask = random_blobs(shape, seed=seed + 10 * thickness)
        np.testing.assert_array_equal(
            boundary_mask(mask, thickness, mode, keep_largest), reference_band(mask, thickness, mode, keep_largest)
        )


@pytest.mark.parametrize("mode", ["inner", "outer", "two_sided"])
def test_matches_reference_across_many_slabs(monkeypatch, mode):
    # Force slabs of a couple of slices so slab seams, per-slab boxes and empty slabs are all exercised.
    monkeypatch.setattr(ct_transforms, "_SLAB_VOXELS", 600)
    mask = random_blobs((11, 30, 26), seed=7, density=0.3)
    mask[4:6] = False  # a gap between two parts of the ROI
    np.testing.assert_array_equal(boundary_mask(mask, 2, mode, True), reference_band(mask, 2, mode, True))


@pytest.mark.parametrize("mode", ["inner", "outer", "two_sided"])
@pytest.mark.parametrize("thickness", [1, 2, 3, 4])
def test_thin_rois_match_reference(mode, thickness):
    # ROIs narrower than the band (1-8 px) and touching the image edge: crops smaller than the filter window.
    for width in range(1, 9):
        for height in (1, 2, 5):
            mask = np.zeros((2, 12, 12), dtype=bool)
            mask[0, 3 : 3 + height, 2 : 2 + width] = True
            mask[1, : height + 1, -width:] = True
            np.testing.assert_array_equal(
                boundary_mask(mask, thickness, mode), reference_band(mask, thickness, mode, True), err_msg=f"{width=}"
            )


def test_numpy_and_torch_inputs_agree():
    mask = random_blobs((3, 21, 23), seed=1)
    expected = boundary_mask(mask)
    result = boundary_mask(torch.from_numpy(mask))
    assert isinstance(result, torch.Tensor) and result.dtype == torch.bool
    np.testing.assert_array_equal(result.numpy(), expected)
    np.testing.assert_array_equal(boundary_mask(mask.astype(np.uint8)), expected)


# ---------------------------------------------------------------------------------------------------------------
# Real organ masks (TotalSegmentator fixture)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_volume(real_ct):
    return load_volume(real_ct / "totalseg_example_ct_sm" / "example_ct_sm.nii.gz")


@pytest.mark.parametrize("organ", ["liver", "lung_lower_lobe_left", "lung_lower_lobe_right", "spleen"])
def test_real_organ_contours(real_ct, real_volume, organ):
    mask = load_mask(real_ct / "totalseg_example_ct_sm" / "example_seg_fast" / f"{organ}.nii.gz", like=real_volume)
    assert mask.any()
    band = boundary_mask(mask, thickness=1, keep_largest=False)
    # Every band voxel lies in the mask; every mask voxel with an outside 8-neighbour (in its slice) is in the band.
    assert not (band & ~mask).any()
    touches_outside = np.zeros_like(mask)
    for z in range(mask.shape[0]):
        touches_outside[z] = mask[z] & ~ndimage.binary_erosion(mask[z], EIGHT, border_value=0)
    np.testing.assert_array_equal(band, touches_outside)
    # The contour is drawn on exactly the slices the ROI intersects.
    np.testing.assert_array_equal(band.any(axis=(1, 2)), mask.any(axis=(1, 2)))
    # The default (3 px, largest component) band stays inside the mask and on the same slices.
    default = boundary_mask(mask)
    assert not (default & ~mask).any()
    np.testing.assert_array_equal(default.any(axis=(1, 2)), mask.any(axis=(1, 2)))


def test_real_overlay_montage_is_written(real_ct, real_volume):
    """Writes build/test_artifacts/liver_overlay/ (not committed) so anyone can look at a real contour."""
    mask = load_mask(real_ct / "totalseg_example_ct_sm" / "example_seg_fast" / "liver.nii.gz", like=real_volume)
    out_dir = ARTIFACTS / "liver_overlay"
    result = prompt_png_stack(real_volume.array, mask, out_dir, color="red", window="abdomen", prefix="liver")
    assert result.montage == out_dir / "liver_montage.png"
    assert len(result.slices) == int(mask.any(axis=(1, 2)).sum())
    montage = np.asarray(Image.open(result.montage).convert("RGB"))
    red = (montage[..., 0] == 255) & (montage[..., 1] == 0) & (montage[..., 2] == 0)
    assert red.sum() > 100
    assert 0.0 < result.covered_fraction < 1.0


# ---------------------------------------------------------------------------------------------------------------
# render_prompt
# ---------------------------------------------------------------------------------------------------------------


def _volume_and_mask():
    rng = np.random.default_rng(0)
    volume = rng.uniform(0.0, 0.8, size=(4, 24, 24)).astype(np.float32)
    mask = np.zeros(volume.shape, dtype=bool)
    mask[1:3, 6:18, 5:17] = True
    return volume, mask


class TestRenderPrompt:
    def test_burn_in(self):
        volume, mask = _volume_and_mask()
        result = render_prompt(volume, mask, thickness=2)
        band = boundary_mask(mask, thickness=2)
        assert result.pixel_values.shape == (1, 4, 24, 24) and result.pixel_values.dtype == np.float32
        np.testing.assert_array_equal(result.pixel_values[0][band], 1.0)
        np.testing.assert_array_equal(result.pixel_values[0][~band], volume[~band])
        np.testing.assert_array_equal(result.boundary, band)
        assert result.covered_fraction == pytest.approx(band.sum() / mask.sum())
        assert result.slices == [1, 2] and not result.roi_empty
        assert not np.shares_memory(result.pixel_values, volume)

    def test_inplace_burn_in_writes_into_the_input(self):
        volume, mask = _volume_and_mask()
        result = render_prompt(volume, mask, inplace=True)
        assert np.shares_memory(result.pixel_values, volume)
        assert (volume[boundary_mask(mask)] == 1.0).all()

    def test_channel_encoding(self):
        volume, mask = _volume_and_mask()
        result = render_prompt(volume, mask, encoding="channel")
        assert result.pixel_values.shape == (2, 4, 24, 24)
        np.testing.assert_array_equal(result.pixel_values[0], volume)  # the image is not occluded
        np.testing.assert_array_equal(result.pixel_values[1], boundary_mask(mask).astype(np.float32))

    def test_rgb_encoding_paints_the_colour(self):
        volume, mask = _volume_and_mask()
        result = render_prompt(volume, mask, encoding="rgb", color="blue")
        band = boundary_mask(mask)
        assert result.pixel_values.shape == (3, 4, 24, 24)
        np.testing.assert_array_equal(result.pixel_values[:, band].T, np.tile([0.0, 0.0, 1.0], (band.sum(), 1)))
        for c in range(3):
            np.testing.assert_array_equal(result.pixel_values[c][~band], volume[~band])

    def test_outer_mode_covers_nothing(self):
        volume, mask = _volume_and_mask()
        result = render_prompt(volume, mask, mode="outer")
        assert result.covered_fraction == 0.0
        np.testing.assert_array_equal(result.pixel_values[0][mask], volume[mask])

    @pytest.mark.parametrize("mask", [None, np.zeros((4, 24, 24), dtype=bool)])
    def test_empty_roi_is_reported_not_an_error(self, mask):
        volume, _ = _volume_and_mask()
        result = render_prompt(volume, mask)
        assert result.roi_empty and result.slices == [] and result.covered_fraction == 0.0
        np.testing.assert_array_equal(result.pixel_values[0], volume)
        assert not result.boundary.any()

    def test_torch_in_torch_out(self):
        volume, mask = _volume_and_mask()
        result = render_prompt(torch.from_numpy(volume), torch.from_numpy(mask))
        assert isinstance(result.pixel_values, torch.Tensor) and isinstance(result.boundary, torch.Tensor)
        np.testing.assert_array_equal(result.pixel_values.numpy(), render_prompt(volume, mask).pixel_values)

    def test_bad_input(self):
        volume, mask = _volume_and_mask()
        with pytest.raises(InvalidVolumeError, match="differs"):
            render_prompt(volume, mask[:, :10])
        with pytest.raises(ValueError, match="encoding"):
            render_prompt(volume, mask, encoding="overlay")
        with pytest.raises(ValueError, match="colour"):
            render_prompt(volume, mask, encoding="rgb", color="reddish")


# ---------------------------------------------------------------------------------------------------------------
# Windowing and resizing
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("window", "hu", "expected"),
    [
        ("chest", [-1100.0, -1000.0, -400.0, 200.0, 900.0], [0.0, 0.0, 0.5, 1.0, 1.0]),
        ("lung", [-1350.0, -600.0, 150.0], [0.0, 0.5, 1.0]),
        ("mediastinum", [-135.0, 40.0, 215.0], [0.0, 0.5, 1.0]),
        ("abdomen", [-160.0, 40.0, 240.0], [0.0, 0.5, 1.0]),
        ((0.0, 100.0), [-5.0, 25.0, 100.0], [0.0, 0.25, 1.0]),
    ],
)
def test_window_values(window, hu, expected):
    out = window_hu(np.array(hu, dtype=np.float32), window)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out.dtype == np.float32
    torch_out = window_hu(torch.tensor(hu), window)
    assert isinstance(torch_out, torch.Tensor)
    np.testing.assert_allclose(torch_out.numpy(), expected, atol=1e-6)


def test_window_rejects_bad_settings():
    with pytest.raises(ValueError, match="preset"):
        window_hu(np.zeros(3), "brain")
    with pytest.raises(ValueError, match="low < high"):
        window_hu(np.zeros(3), (200.0, -1000.0))


@pytest.mark.parametrize(
    ("input_shape", "size"),
    [((33, 34, 35), (16, 32, 32)), ((2, 5, 7), (4, 9, 11)), ((8, 8, 8), (8, 8, 8)), ((30, 101, 122), (128, 64, 64))],
)
def test_resize_shapes_and_types(input_shape, size):
    volume = np.random.default_rng(0).normal(size=input_shape).astype(np.float32)
    mask = volume > 0.5
    assert resize_volume(volume, size).shape == size
    resized = resize_mask(mask, size)
    assert resized.shape == size and resized.dtype == bool
    as_torch = resize_mask(torch.from_numpy(mask), size)
    assert isinstance(as_torch, torch.Tensor)
    np.testing.assert_array_equal(as_torch.numpy(), resized)


def test_resize_keeps_constants_and_geometry():
    volume = np.full((10, 20, 30), 7.0, dtype=np.float32)
    np.testing.assert_allclose(resize_volume(volume, (5, 40, 15)), 7.0)
    # A centred box stays centred, and the mask follows the image: both resized on the same voxel-centre grid.
    mask = np.zeros((20, 40, 40), dtype=bool)
    mask[4:16, 10:30, 10:30] = True
    image = mask.astype(np.float32)
    small_mask, small_image = resize_mask(mask, (10, 20, 20)), resize_volume(image, (10, 20, 20))
    np.testing.assert_array_equal(np.argwhere(small_mask).mean(axis=0), [4.5, 9.5, 9.5])
    assert small_image[small_mask].min() > 0.5 and small_image[~small_mask].max() < 0.5


# The reorientations a NIfTI's stored array comes in: (D, H, W) views with flips and a transpose, never copied.
VIEWS = {
    "contiguous": lambda a: a,
    "in-plane flips (CT-RATE)": lambda a: a[:, ::-1, ::-1],
    "all flipped": lambda a: a[::-1, ::-1, ::-1],
    "transposed": lambda a: a.transpose(0, 2, 1),
    "sagittal storage": lambda a: a.transpose(2, 1, 0)[::-1],
}


def _stored(shape, dtype, seed=0):
    """Integer HU as a file stores it, covering every window's clip on both sides."""
    info = np.iinfo(dtype)
    low, high = max(info.min, -3000), min(info.max, 3000)
    return np.random.default_rng(seed).integers(low, high, size=shape, endpoint=True).astype(dtype)


@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.int8, np.uint16, np.int32])
@pytest.mark.parametrize("window", ["chest", "bone", (-50.0, 60.0)])
def test_window_and_resize_equals_the_two_steps_on_integer_views(view, dtype, window):
    """The fused path (pairs summed in integers) gives the two steps' values on every reorientation of the data."""
    stored = _stored((18, 60, 48), dtype)  # in-plane sizes with many whole divisors
    volume = VIEWS[view](stored)
    size = tuple(n // 2 for n in volume.shape[:1]) + tuple(n // 2 for n in volume.shape[1:])
    if view != "sagittal storage":  # memory's inner axes must shrink by whole factors for the fast path
        assert ct_transforms._fused_plan(volume, ct_transforms._window_range(window), size) is not None
    targets = [size, (7, volume.shape[1], volume.shape[2] // 2), (31, volume.shape[1] // 2, volume.shape[2])]
    targets += [(5, volume.shape[1] // 4, volume.shape[2] // 3), (9, volume.shape[1] // 5, volume.shape[2] // 6)]
    for target in targets:
        fused = window_and_resize(volume, window, target)
        expected = resize_volume(window_hu(volume, window), target)
        assert fused.shape == target and fused.dtype == np.float32 and fused.flags.c_contiguous
        np.testing.assert_allclose(fused, expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(VIEWS[view](stored), volume)  # the input is read, never written


@pytest.mark.parametrize(
    ("volume", "window", "size", "fast"),
    [
        (_stored((12, 16, 16), np.int16), "chest", (6, 8, 8), True),
        (_stored((12, 16, 16), np.int16), "chest", (6, 5, 8), False),  # 16 -> 5: no whole factor
        (_stored((12, 24, 24), np.int16), "chest", (6, 8, 6), True),  # factors 3 and 4 (768, 1024 -> 256)
        (_stored((12, 16, 16), np.int16), "chest", (6, 32, 32), False),  # upsampled in-plane
        (_stored((12, 16, 16), np.int16), (-1000.5, 200.0), (6, 8, 8), False),  # clip not exact in integers
        (_stored((12, 16, 16), np.int16).astype(np.float32), "chest", (6, 8, 8), False),  # float HU
        (_stored((12, 16, 16), np.int64), "chest", (6, 8, 8), False),  # no exact cast to int32
        (_stored((12, 16, 16), np.int16), (-9000.0, 200.0), (6, 8, 8), True),  # sums in int32
        (_stored((12, 16, 16), np.int16).astype(">i2"), "chest", (6, 8, 8), True),  # a big-endian file
    ],
)
def test_window_and_resize_takes_the_fast_path_only_where_it_is_exact(volume, window, size, fast):
    bounds = ct_transforms._window_range(window)
    assert (ct_transforms._fused_plan(volume, bounds, size) is not None) is fast
    expected = resize_volume(window_hu(volume, window), size)
    np.testing.assert_allclose(window_and_resize(volume, window, size), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("window", [(-np.inf, 200.0), (-1000.0, np.inf), (np.nan, 200.0)])
def test_infinite_or_nan_window_bounds_are_refused(window):
    """An infinite bound used to give NaN everywhere (window_hu) or an OverflowError (the integer fast path)."""
    volume = _stored((4, 8, 8), np.int16)
    for call in (lambda: window_hu(volume, window), lambda: window_and_resize(volume, window, (2, 4, 4))):
        with pytest.raises(ValueError, match="window"):
            call()


def test_window_and_resize_skips_slices_no_output_reads():
    """Downsampled by more than two in depth, some slices are never read: values there cannot matter."""
    volume = _stored((40, 8, 8), np.int16)
    size = (4, 4, 4)
    i0, i1, weight = ct_transforms._linear_taps(40, 4)
    unread = np.setdiff1d(np.arange(40), np.concatenate([i0, i1[weight > 0]]))
    assert unread.size > 20
    changed = volume.copy()
    changed[unread] = 3000
    np.testing.assert_array_equal(window_and_resize(changed, "chest", size), window_and_resize(volume, "chest", size))
    np.testing.assert_allclose(
        window_and_resize(volume, "chest", size), resize_volume(window_hu(volume), size), rtol=0, atol=1e-5
    )


def test_window_and_resize_returns_torch_for_torch():
    volume = torch.from_numpy(_stored((6, 8, 8), np.int16))
    out = window_and_resize(volume, "chest", (3, 4, 4))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    torch.testing.assert_close(out, resize_volume(window_hu(volume), (3, 4, 4)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("view", list(VIEWS))
def test_resize_labels_picks_what_torch_nearest_exact_picks(view):
    rng = np.random.default_rng(1)
    for _ in range(25):
        stored = rng.integers(0, 6, size=tuple(rng.integers(1, 30, size=3)), dtype=np.uint8)
        labels = VIEWS[view](stored)
        size = tuple(int(n) for n in rng.integers(1, 30, size=3))
        expected = torch.nn.functional.interpolate(
            torch.from_numpy(labels.copy())[None, None], size=size, mode="nearest-exact"
        )[0, 0].numpy()
        out = resize_labels(labels, size)
        assert out.dtype == np.uint8 and out.flags.c_contiguous and min(out.strides) >= 0
        assert isinstance(resize_labels(torch.from_numpy(labels.copy()), size), torch.Tensor)
        np.testing.assert_array_equal(out, expected)
        np.testing.assert_array_equal(resize_mask(labels == 3, size), expected == 3)


def test_resize_labels_never_aliases_its_input():
    labels = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    same = resize_labels(labels, labels.shape)
    np.testing.assert_array_equal(same, labels)
    same[0, 0, 0] = 99
    assert labels[0, 0, 0] == 0


def test_resized_affine_keeps_the_world_extent():
    affine = np.diag([2.0, -1.0, -1.5, 1.0])
    affine[:3, 3] = [10.0, 20.0, 30.0]
    new = resized_affine(affine, (10, 20, 30), (5, 40, 15))
    # The outer faces of the volume (index -0.5 and n - 0.5) map to the same world points before and after.
    for old_idx, new_idx in (([-0.5, -0.5, -0.5], [-0.5, -0.5, -0.5]), ([9.5, 19.5, 29.5], [4.5, 39.5, 14.5])):
        np.testing.assert_allclose(affine @ [*old_idx, 1.0], new @ [*new_idx, 1.0])


# ---------------------------------------------------------------------------------------------------------------
# PNG stack, colours and dictionary wrappers
# ---------------------------------------------------------------------------------------------------------------


def test_prompt_png_stack_writes_roi_slices_and_montage(tmp_path):
    hu = np.full((5, 20, 20), -1000.0, dtype=np.float32)
    mask = np.zeros(hu.shape, dtype=bool)
    mask[1:4, 5:15, 5:15] = True
    result = prompt_png_stack(hu, mask, tmp_path, color="blue", thickness=1)
    assert [p.name for p in result.slices] == ["slice_0001.png", "slice_0002.png", "slice_0003.png"]
    assert result.slice_indices == [1, 2, 3]
    first = np.asarray(Image.open(result.slices[0]).convert("RGB"))
    np.testing.assert_array_equal(first[5, 5], [0, 0, 255])  # contour pixel in blue
    np.testing.assert_array_equal(first[10, 10], [0, 0, 0])  # interior: -1000 HU in the chest window is black
    montage = Image.open(result.montage)
    assert montage.size == (2 * 20, 2 * 20)  # 3 tiles on a 2x2 grid
    written = sorted(p.name for p in tmp_path.iterdir())  # no temporary files left behind
    assert written == sorted([*(p.name for p in result.slices), "slice_montage.png"])


def test_prompt_png_stack_empty_roi_writes_nothing(tmp_path):
    result = prompt_png_stack(np.zeros((2, 8, 8)), np.zeros((2, 8, 8), dtype=bool), tmp_path / "out")
    assert result.roi_empty and result.montage is None and not (tmp_path / "out").exists()


def test_volume_montage_png_tiles_evenly_spaced_grey_slices(tmp_path):
    hu = np.stack([np.full((6, 8), v, dtype=np.float32) for v in np.linspace(-1000, 1000, 10)])  # (10, 6, 8)
    path = volume_montage_png(hu, tmp_path / "m.png", window=(-1000.0, 1000.0), max_tiles=4)
    grid = np.asarray(Image.open(path).convert("RGB"))
    assert grid.shape == (2 * 6, 2 * 8, 3)  # 4 tiles (slices 0, 3, 6, 9) on a 2x2 grid
    tiles = [grid[r * 6, c * 8] for r in (0, 1) for c in (0, 1)]
    assert [int(t[0]) for t in tiles] == [0, 85, 170, 255] and all(t[0] == t[1] == t[2] for t in tiles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.png"]  # written atomically
    with pytest.raises(InvalidVolumeError, match="D, H, W"):
        volume_montage_png(hu[0], tmp_path / "flat.png")


@pytest.mark.parametrize(
    ("color", "rgb"), [("red", (255, 0, 0)), ("Blue", (0, 0, 255)), ("#10ff00", (16, 255, 0)), ((1, 2, 3), (1, 2, 3))]
)
def test_parse_color(color, rgb):
    assert parse_color(color) == rgb


@pytest.mark.parametrize("color", ["reddish", "#12345", (256, 0, 0), (1, 2)])
def test_parse_color_rejects(color):
    with pytest.raises(ValueError):
        parse_color(color)


def test_written_files_get_the_usual_permissions(tmp_path):
    # Atomic writes go through mkstemp (mode 0600); the final file must be readable like any other output.
    umask = os.umask(0o022)
    os.umask(umask)
    mask = np.zeros((1, 8, 8), dtype=bool)
    mask[0, 2:6, 2:6] = True
    result = prompt_png_stack(np.zeros((1, 8, 8)), mask, tmp_path)
    assert result.montage.stat().st_mode & 0o777 == 0o666 & ~umask


# ---------------------------------------------------------------------------------------------------------------
# Input rules shared by every transform: real numbers, bfloat16, finite intensities, one way to binarise masks
# ---------------------------------------------------------------------------------------------------------------


def _hu_and_mask(shape=(4, 24, 24)):
    rng = np.random.default_rng(3)
    hu = rng.uniform(-1100.0, 400.0, size=shape).astype(np.float32)
    mask = np.zeros(shape, dtype=bool)
    mask[1:3, 6:18, 5:17] = True
    return hu, mask


# Each transform with its intensity and mask arguments; ``volume`` is HU for window_hu and [0, 1] elsewhere.
TRANSFORMS = {
    "window_hu": lambda volume, mask: window_hu(volume, "chest"),
    "window_and_resize": lambda volume, mask: window_and_resize(volume, "chest", (3, 17, 30)),
    "resize_volume": lambda volume, mask: resize_volume(volume, (3, 17, 30)),
    "resize_mask": lambda volume, mask: resize_mask(mask, (3, 17, 30)),
    "resize_labels": lambda volume, mask: resize_labels(mask, (3, 17, 30)),
    "boundary_mask": lambda volume, mask: boundary_mask(mask, thickness=2),
    "render_prompt": lambda volume, mask: render_prompt(volume, mask).pixel_values,
}
INTENSITY_TRANSFORMS = ("window_hu", "window_and_resize", "resize_volume", "render_prompt")
HU_TRANSFORMS = ("window_hu", "window_and_resize")  # given HU; the others a windowed image
MASK_TRANSFORMS = {"resize_mask": "mask", "boundary_mask": "mask", "resize_labels": "labels"}  # and their argument


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_bfloat16_tensors_are_computed_in_float32(name):
    """bf16 used to crash every transform: 'Got unsupported ScalarType BFloat16' from Tensor.numpy()."""
    hu, mask = _hu_and_mask()
    volume = hu if name in HU_TRANSFORMS else window_hu(hu)
    bf16_volume = torch.from_numpy(volume).to(torch.bfloat16)
    bf16_mask = torch.from_numpy(mask).to(torch.bfloat16)
    out = TRANSFORMS[name](bf16_volume, bf16_mask)
    # The reference: the same bf16-rounded values, given as float32.
    expected = TRANSFORMS[name](bf16_volume.float(), bf16_mask.float())
    assert isinstance(out, torch.Tensor)
    if name in INTENSITY_TRANSFORMS:
        assert out.dtype == torch.bfloat16  # computed in float32, returned as the input dtype
        torch.testing.assert_close(out, expected.to(torch.bfloat16), rtol=0, atol=0)
    elif name == "resize_labels":  # values and dtype kept
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, expected.to(torch.bfloat16), rtol=0, atol=0)
        assert out.any()
    else:
        assert out.dtype == torch.bool
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        assert out.any()


NON_NUMERIC = {
    "str": lambda shape: np.full(shape, "12"),
    "object": lambda shape: np.full(shape, 1.0, dtype=object),
    "complex": lambda shape: np.ones(shape, dtype=np.complex64),
    "complex-tensor": lambda shape: torch.ones(shape, dtype=torch.complex64),
}


@pytest.mark.parametrize("kind", list(NON_NUMERIC))
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_non_numeric_input_is_a_named_error(name, kind):
    """Strings and objects used to crash deep in numpy (np.clip: 'ufunc clip did not contain a loop')."""
    hu, mask = _hu_and_mask()
    volume = hu if name in HU_TRANSFORMS else window_hu(hu)
    bad = NON_NUMERIC[kind](hu.shape)
    args = (volume, bad) if name in MASK_TRANSFORMS else (bad, mask)
    argument = MASK_TRANSFORMS.get(name, "volume")
    with pytest.raises(InvalidVolumeError, match=f"^{argument}: expected real numbers"):
        TRANSFORMS[name](*args)
    if name == "render_prompt":  # the mask argument of render_prompt too
        with pytest.raises(InvalidVolumeError, match="^mask: expected real numbers"):
            render_prompt(volume, bad)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", INTENSITY_TRANSFORMS)
@pytest.mark.parametrize("as_torch", [False, True])
def test_nan_and_inf_intensities_are_refused(name, value, as_torch):
    """They used to pass into pixel_values (window_hu even turned inf into a plausible 0 or 1)."""
    hu, mask = _hu_and_mask()
    volume = hu if name in HU_TRANSFORMS else window_hu(hu)
    volume[2, 7, 9] = value
    volume[3, 0, 0] = value
    given = torch.from_numpy(volume) if as_torch else volume
    with pytest.raises(InvalidVolumeError, match=r"^volume: 2 of 2304 value\(s\) are NaN or infinite"):
        TRANSFORMS[name](given, mask)


def test_check_finite_false_skips_the_check():
    hu, mask = _hu_and_mask()
    hu[0, 0, 0] = np.nan
    assert np.isnan(window_hu(hu, check_finite=False)[0, 0, 0])
    image = window_hu(np.nan_to_num(hu))
    image[0, 0, 1] = np.inf
    assert np.isinf(resize_volume(image, image.shape, check_finite=False)[0, 0, 1])
    assert np.isinf(render_prompt(image, mask, check_finite=False).pixel_values[0, 0, 0, 1])


def test_non_finite_values_are_found_in_every_chunk(monkeypatch):
    """The check runs chunk by chunk: a NaN in the last, partial chunk is still found, and counted exactly."""
    monkeypatch.setattr(ct_transforms, "_SLAB_VOXELS", 1000)
    volume = np.zeros((5, 30, 41), dtype=np.float32)  # 6150 voxels: 6 full chunks and a partial one
    assert ct_transforms._count_nonfinite(volume) == 0
    volume[4, 29, 40] = np.nan
    volume[0, 0, 0] = np.inf
    assert ct_transforms._count_nonfinite(volume) == 2
    assert ct_transforms._count_nonfinite(volume[:, ::2]) == 1  # non-contiguous view
    assert ct_transforms._count_nonfinite(np.zeros((2, 2, 2), dtype=np.int16)) == 0


@pytest.mark.parametrize("level", [0.3, 0.7, 1.0, 255.0])
@pytest.mark.parametrize("as_torch", [False, True])
def test_soft_masks_are_binarised_the_same_at_native_size_and_after_resizing(level, as_torch):
    """A 0.7 mask used to be drawn at native size (astype(bool)) but vanish in resize_mask (astype(uint8) → 0)."""
    hu, mask = _hu_and_mask((4, 24, 24))
    soft = mask.astype(np.float32) * np.float32(level)
    inside = level > 0.5
    given = torch.from_numpy(soft) if as_torch else soft

    def numpy(x):
        return x.numpy() if isinstance(x, torch.Tensor) else x

    expected_band = boundary_mask(mask if inside else np.zeros_like(mask))
    np.testing.assert_array_equal(numpy(boundary_mask(given)), expected_band)
    np.testing.assert_array_equal(numpy(resize_mask(given, (8, 48, 48))), resize_mask(mask & inside, (8, 48, 48)))
    result = render_prompt(window_hu(hu), given)
    assert result.roi_empty is not inside
    np.testing.assert_array_equal(numpy(result.boundary), expected_band)
    np.testing.assert_array_equal(binarize_mask(given), mask & inside)


def test_integer_masks_keep_every_non_zero_label_and_nan_masks_are_refused():
    _, mask = _hu_and_mask()
    labels = mask.astype(np.int16) * 7
    np.testing.assert_array_equal(resize_mask(labels, (8, 48, 48)), resize_mask(mask, (8, 48, 48)))
    np.testing.assert_array_equal(boundary_mask(labels), boundary_mask(mask))
    soft = mask.astype(np.float32)
    soft[0, 0, 0] = np.nan
    for call in (lambda: resize_mask(soft, (8, 48, 48)), lambda: boundary_mask(soft), lambda: binarize_mask(soft)):
        with pytest.raises(InvalidVolumeError, match=r"^mask: 1 mask value\(s\) are NaN"):
            call()


def test_prompt_png_stack_binarises_soft_masks_like_the_model_input(tmp_path):
    hu, mask = _hu_and_mask((4, 24, 24))
    hu[:] = -1000.0
    faint = prompt_png_stack(hu, mask * np.float32(0.3), tmp_path / "faint")
    assert faint.roi_empty and not (tmp_path / "faint").exists()
    strong = prompt_png_stack(hu, mask * np.float32(0.7), tmp_path / "strong")
    assert strong.slice_indices == [1, 2]
    with pytest.raises(InvalidVolumeError, match="expected real numbers"):
        prompt_png_stack(hu, np.full(hu.shape, "x"), tmp_path / "text")
