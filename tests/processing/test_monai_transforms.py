"""DrawBoundaryPromptd: the boundary prompt in a MONAI Compose pipeline, on axial slices found from the affine."""

import nibabel as nib
import numpy as np
import pytest
import torch


monai = pytest.importorskip("monai")
from monai.data import MetaTensor  # noqa: E402
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, MapTransform, ScaleIntensityRanged  # noqa: E402

from med3dqwen.processing.ct_io import CTInputError, load_mask, load_volume, standard_affine, to_canonical  # noqa: E402
from med3dqwen.processing.ct_transforms import render_prompt, window_hu  # noqa: E402
from med3dqwen.processing.monai_transforms import DrawBoundaryPromptd, canonical_axes  # noqa: E402


def pipeline(**kwargs) -> Compose:
    return Compose(
        [
            LoadImaged(keys=["image", "roi"]),
            EnsureChannelFirstd(keys=["image", "roi"]),
            ScaleIntensityRanged(keys="image", a_min=-1000, a_max=200, b_min=0, b_max=1, clip=True),
            DrawBoundaryPromptd(keys="image", mask_key="roi", **kwargs),
        ]
    )


def expected_canonical(ct_path, roi_path, label=None, thickness=3):
    """The prompt as the processor draws it: canonical (D, H, W), chest window, no resize."""
    volume = load_volume(ct_path)
    roi = load_mask(roi_path, like=volume, label=label)
    return render_prompt(window_hu(volume.array, (-1000, 200)), roi, thickness=thickness)


@pytest.fixture
def oblique_case(tmp_path):
    """A scan stored with the axial axis FIRST in the file ((z, x, y) voxel order, LPS-like flips), with an ROI that is
    a cone: its slices differ along the axial axis, so drawing on the wrong axis gives another band."""
    d, h, w = 12, 40, 36
    hu = np.full((d, h, w), -1000.0, dtype=np.float32)
    roi = np.zeros((d, h, w), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for z in range(2, 10):
        radius = 4 + z
        disk = (yy - 20) ** 2 + (xx - 18) ** 2 <= radius**2
        hu[z][disk] = 40.0
        roi[z][(yy - 20) ** 2 + (xx - 18) ** 2 <= (radius - 2) ** 2] = 1
    # canonical (D, H, W) = (S, P, L) → file voxel order (S, R, A): axis 0 superior, axis 1 = -W, axis 2 = -H.
    to_file = lambda a: np.ascontiguousarray(np.flip(np.flip(a.transpose(0, 2, 1), axis=1), axis=2))  # noqa: E731
    canonical = standard_affine((2.5, 1.0, 1.0))
    # file index (i, j, k) = (d, w' = W-1-w, h' = H-1-h)  →  canonical index (d, h, w) = (i, H-1-k, W-1-j)
    index_map = np.array([[1, 0, 0, 0], [0, 0, -1, h - 1], [0, -1, 0, w - 1], [0, 0, 0, 1]], dtype=float)
    affine = canonical @ index_map
    assert nib.aff2axcodes(affine) == ("S", "R", "A")
    nib.save(nib.Nifti1Image(to_file(hu).astype(np.int16), affine), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(to_file(roi), affine), tmp_path / "roi.nii.gz")
    return tmp_path / "ct.nii.gz", tmp_path / "roi.nii.gz", hu, roi


def test_is_a_monai_map_transform():
    assert issubclass(DrawBoundaryPromptd, MapTransform)


def test_draws_on_axial_slices_found_from_the_affine_and_keeps_the_metadata(oblique_case):
    ct_path, roi_path, _, roi = oblique_case
    sample = pipeline(thickness=2)({"image": str(ct_path), "roi": str(roi_path)})
    image = sample["image"]
    assert isinstance(image, MetaTensor) and image.shape == (1, 12, 36, 40)  # the file's own (z, x, y) layout
    source = nib.load(ct_path)
    np.testing.assert_allclose(image.affine.numpy(), source.affine, atol=1e-5)  # affine and metadata kept
    assert str(image.meta["filename_or_obj"]) == str(ct_path)
    assert canonical_axes(image.affine)[0][0] == 0  # the axial axis is the file's first
    # Back in canonical (D, H, W), the drawing is the processor's, voxel for voxel.
    drawn, _ = to_canonical(image[0].numpy(), image.affine.numpy())
    expected = expected_canonical(ct_path, roi_path, thickness=2)
    np.testing.assert_allclose(drawn, expected.pixel_values[0], atol=1e-6)
    info = sample["image_prompt_info"]
    assert info == {"covered_fraction": pytest.approx(expected.covered_fraction), "roi_empty": False}
    # Drawn on the wrong axis (what a transform that assumes the last axis is axial does), the band differs.
    wrong = render_prompt(np.zeros(roi.shape[::-1], np.float32), roi.transpose(2, 1, 0), thickness=2)
    assert not np.array_equal(wrong.boundary.transpose(2, 1, 0), expected.boundary)


def test_multilabel_mask_and_channel_encoding(oblique_case, tmp_path):
    ct_path, _, _, roi = oblique_case
    labels = roi.copy()
    labels[5:8] *= 3  # slices 5-7 become label 3
    source = nib.load(ct_path)
    to_file = lambda a: np.ascontiguousarray(np.flip(np.flip(a.transpose(0, 2, 1), axis=1), axis=2))  # noqa: E731
    nib.save(nib.Nifti1Image(to_file(labels), source.affine), tmp_path / "labels.nii.gz")
    sample = pipeline(label=3, encoding="channel")({"image": str(ct_path), "roi": str(tmp_path / "labels.nii.gz")})
    assert sample["image"].shape == (2, 12, 36, 40)
    contour, _ = to_canonical(sample["image"][1].numpy(), sample["image"].affine.numpy())
    assert set(np.flatnonzero(contour.any(axis=(1, 2))).tolist()) == {5, 6, 7}


def test_refuses_inputs_whose_orientation_it_cannot_know(oblique_case):
    ct_path, roi_path, _, _ = oblique_case
    loaded = Compose([LoadImaged(keys=["image", "roi"]), EnsureChannelFirstd(keys=["image", "roi"])])(
        {"image": str(ct_path), "roi": str(roi_path)}
    )
    image = loaded["image"] / 2000.0 + 0.5  # in [0, 1]
    draw = DrawBoundaryPromptd(keys="image", mask_key="roi")
    channel_last = image.permute(1, 2, 3, 0)  # (X, Y, Z, 1): used to be drawn on sagittal slices without a word
    with pytest.raises(CTInputError, match="channel-first"):
        draw({"image": channel_last, "roi": loaded["roi"]})
    with pytest.raises(CTInputError, match="no channel axis"):
        draw({"image": image[0], "roi": loaded["roi"]})
    with pytest.raises(TypeError, match="no affine"):
        draw({"image": image.numpy(), "roi": loaded["roi"]})
    with pytest.raises(TypeError, match="no affine"):
        draw({"image": image, "roi": torch.as_tensor(loaded["roi"].numpy())})
    with pytest.raises(CTInputError, match=r"values span .* ScaleIntensityRanged"):
        draw({"image": loaded["image"], "roi": loaded["roi"]})  # raw HU
    moved = loaded["roi"].clone()
    moved.affine = moved.affine @ torch.diag(torch.tensor([2.0, 1.0, 1.0, 1.0], dtype=moved.affine.dtype))
    with pytest.raises(CTInputError, match="mask affine differs"):
        draw({"image": image, "roi": moved})


def test_on_the_real_ct_fixture(real_ct):
    ct_path = real_ct / "totalseg_example_ct_sm" / "example_ct_sm.nii.gz"
    seg_path = real_ct / "totalseg_example_ct_sm" / "example_seg.nii.gz"
    sample = pipeline(label=5)({"image": str(ct_path), "roi": str(seg_path)})  # 5 = liver
    image = sample["image"]
    assert image.shape == (1, *nib.load(ct_path).shape)
    drawn, _ = to_canonical(image[0].numpy(), image.affine.numpy())
    expected = expected_canonical(ct_path, seg_path, label=5)
    np.testing.assert_allclose(drawn, expected.pixel_values[0], atol=1e-6)
    assert not sample["image_prompt_info"]["roi_empty"] and expected.slices
