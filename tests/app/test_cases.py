"""The viewer's pieces without a browser: loading uploads (NIfTI, zipped DICOM), masks, rendered slices, errors."""

import zipfile
from pathlib import Path

import numpy as np
import pytest

from med3dqwen.app.cases import (
    EXAMPLE_CASES,
    PHANTOM_SHAPE,
    example_case,
    load_case_file,
    mask_from_file,
    render_slice,
    roi_view,
    structure_choices,
)
from med3dqwen.io import save_nifti
from med3dqwen.processing.ct_io import (
    CorruptFileError,
    CTInputError,
    CTVolume,
    MaskMismatchError,
    UnknownLabelError,
    load_volume,
    standard_affine,
)


DICOM_SERIES = "totalseg_example_ct_dicom/example_ct_dicom"


@pytest.fixture(scope="module")
def phantom():
    return example_case(next(iter(EXAMPLE_CASES)))


def test_example_case_is_a_phantom_with_its_masks(phantom):
    assert phantom.volume.shape == PHANTOM_SHAPE
    assert phantom.volume.intensity == "hu" and phantom.volume.array.min() >= -1024
    assert {"lung_upper_lobe_right", "liver", "heart"} <= set(phantom.masks)
    assert structure_choices(phantom) == sorted(phantom.masks)
    with pytest.raises(CTInputError, match="unknown example case 'nope'"):
        example_case("nope")


def test_nifti_upload_round_trips(tmp_path, phantom):
    path = save_nifti(tmp_path / "ct.nii.gz", phantom.volume.array, phantom.volume.affine, dtype=np.float32)
    case = load_case_file(path)
    assert case.name == "ct.nii.gz" and not case.masks
    np.testing.assert_array_equal(case.volume.array, phantom.volume.array)


def test_zipped_dicom_series_equals_the_folder(tmp_path, real_ct):
    folder = real_ct / DICOM_SERIES
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for file in sorted(folder.iterdir()):
            zf.write(file, f"patient/series/{file.name}")  # nested folders, as exported zips are
        zf.writestr("__MACOSX/patient/series/._x", b"resource fork")  # skipped, not a second folder
    case = load_case_file(archive)
    expected = load_volume(folder)
    np.testing.assert_array_equal(case.volume.array, expected.array)
    np.testing.assert_allclose(case.volume.affine, expected.affine)
    assert case.volume.path == str(archive)


@pytest.mark.parametrize(
    ("members", "problem"),
    [
        ({"../evil.dcm": b"x"}, "unsafe member name"),
        ({"/abs.dcm": b"x"}, "unsafe member name"),
        ({"a/1.dcm": b"x", "b/2.dcm": b"x"}, "files in 2 folders"),
        ({}, "holds no files"),
        ({"1.dcm": b"not dicom"}, "no DICOM image found"),
    ],
)
def test_bad_zips_are_one_line_errors(tmp_path, members, problem):
    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    with pytest.raises(CorruptFileError, match=problem) as info:
        load_case_file(archive)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "evil.dcm").exists()


def test_not_a_zip_and_unsupported_types(tmp_path):
    fake = tmp_path / "series.zip"
    fake.write_bytes(b"PK but not really")
    with pytest.raises(CorruptFileError, match="not a readable zip archive"):
        load_case_file(fake)
    report = tmp_path / "report.pdf"
    report.write_bytes(b"%PDF")
    with pytest.raises(CorruptFileError, match=r"report.pdf: unsupported file type '.pdf'; upload .nii"):
        load_case_file(report)


def test_mask_upload_checks_the_grid_and_the_label(tmp_path, phantom):
    affine = phantom.volume.affine
    lobe = phantom.masks["lung_upper_lobe_right"]
    np.testing.assert_array_equal(mask_from_file(phantom, save_nifti(tmp_path / "m.nii.gz", lobe, affine)), lobe)

    labels = lobe.astype(np.uint8) + 2 * phantom.masks["liver"].astype(np.uint8)
    multi = save_nifti(tmp_path / "multi.nii.gz", labels, affine)
    np.testing.assert_array_equal(mask_from_file(phantom, multi, " 2 "), phantom.masks["liver"])
    with pytest.raises(UnknownLabelError, match="multilabel mask"):
        mask_from_file(phantom, multi, "")
    with pytest.raises(UnknownLabelError, match="label id 7 is neither in the file"):
        mask_from_file(phantom, multi, "7")

    other_scan = save_nifti(tmp_path / "other.nii.gz", lobe[:, :, :-8], affine)
    with pytest.raises(MaskMismatchError, match=r"other.nii.gz: mask grid \(64, 128, 120\) differs from volume"):
        mask_from_file(phantom, other_scan)
    shifted = save_nifti(tmp_path / "shifted.nii.gz", lobe, standard_affine(phantom.volume.spacing))
    with pytest.raises(MaskMismatchError, match="mask affine differs"):
        mask_from_file(phantom, shifted)


def test_render_slice_paints_the_contour_on_its_slices_only(phantom):
    view = roi_view(phantom.masks["lung_upper_lobe_right"], "phantom")
    assert view.slices == np.flatnonzero(view.band.any(axis=(1, 2))).tolist() and not view.empty
    inside, outside = view.slices[len(view.slices) // 2], 0
    assert outside not in view.slices
    red = render_slice(phantom.volume, inside, view.band, "red")
    assert red.shape == (*PHANTOM_SHAPE[1:], 3) and red.dtype == np.uint8
    painted = np.all(red == (255, 0, 0), axis=-1)
    np.testing.assert_array_equal(painted, view.band[inside])
    bare = render_slice(phantom.volume, inside)
    assert np.all(bare[..., 0] == bare[..., 1]) and not np.array_equal(bare, red)  # grey, no contour
    np.testing.assert_array_equal(render_slice(phantom.volume, inside, view.band, "none"), bare)
    blue = render_slice(phantom.volume, inside, view.band, "blue")
    assert np.all(blue[view.band[inside]] == (0, 0, 255))
    np.testing.assert_array_equal(render_slice(phantom.volume, outside, view.band), render_slice(phantom.volume, 0))
    # Out-of-range indices clip to the volume (a stale slider value after loading a smaller scan).
    np.testing.assert_array_equal(render_slice(phantom.volume, 10_000), render_slice(phantom.volume, 63))
    with pytest.raises(ValueError, match="contour band shape"):
        render_slice(phantom.volume, 0, view.band[:, :10])


def test_render_slice_keeps_millimetres_square(phantom):
    volume = CTVolume.from_array(phantom.volume.array[:, :, :64], spacing=(5.0, 1.0, 2.0))
    image = render_slice(volume, 3)
    assert image.shape == (128, 128, 3)  # 64 columns of 2 mm shown as 128 columns of 1 mm
    np.testing.assert_array_equal(image[:, 0::2], image[:, 1::2])  # each column shown twice, in order
    isotropic = render_slice(CTVolume.from_array(volume.array, spacing=(5.0, 2.0, 2.0)), 3)
    np.testing.assert_array_equal(image[:, 0::2], isotropic)


def test_empty_roi_has_no_slices(phantom):
    view = roi_view(np.zeros(PHANTOM_SHAPE, dtype=bool), "phantom")
    assert view.empty and view.slices == []


def test_upload_names_its_file_in_errors(tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(CorruptFileError) as info:
        load_case_file(bad)
    assert "broken.nii.gz" in str(info.value)
    assert Path(bad).exists()
