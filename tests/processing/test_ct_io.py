"""Tests for med3dqwen.processing.ct_io: readers, canonical (D, H, W) = (S, P, L) orientation, masks, errors.

Real fixtures (``../shared/data/real_ct``, see its README.md) prove voxel alignment against independent numbers:
TotalSegmentator's ``statistics.json``, pydicom pixel arrays and the files' own affines. Synthetic files are written
under ``tmp_path``.
"""

import gzip
import json
import os
import pickle
import shutil
import stat
import warnings
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from med3dqwen.anatomy.labels import TOTALSEGMENTATOR_V2_LABELS
from med3dqwen.io import atomic_output, save_nifti
from med3dqwen.processing.ct_io import (
    CorruptFileError,
    CTInputError,
    CTVolume,
    InvalidVolumeError,
    MaskMismatchError,
    UnknownLabelError,
    _label_table_from_header,
    load_mask,
    load_volume,
    standard_affine,
)


CT_SM = "totalseg_example_ct_sm/example_ct_sm.nii.gz"
SEG_ML = "totalseg_example_ct_sm/example_seg.nii.gz"
SEG_FAST = "totalseg_example_ct_sm/example_seg_fast"
DICOM_SERIES = "totalseg_example_ct_dicom/example_ct_dicom"
DICOM_SEG = "totalseg_example_ct_dicom/example_seg_dicom.nii.gz"
CT_SMALL = "pydicom_ct_small/CT_small.dcm"


# ---------------------------------------------------------------------------------------------------------------
# Helpers and module-scoped fixtures (the DICOM series takes ~0.5 s to decode: load it once)
# ---------------------------------------------------------------------------------------------------------------


def world(affine: np.ndarray, index: tuple[float, float, float]) -> np.ndarray:
    """RAS+ mm of a voxel index under a (4, 4) affine."""
    return (np.asarray(affine, dtype=np.float64) @ np.array([*index, 1.0]))[:3]


def dicom_files_by_z(folder: Path) -> list[Path]:
    """The slice files of a DICOM folder sorted by ImagePositionPatient z (inferior first), read with pydicom."""
    z_of = {f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in folder.iterdir()}
    return sorted(z_of, key=z_of.get)


def assert_error(
    error: type[CTInputError], path: Path, fragments: tuple[str, ...], call: Callable[[], object]
) -> CTInputError:
    """Run ``call``; require exactly ``error`` with ``path`` and every fragment in its message."""
    with pytest.raises(error) as info:
        call()
    assert type(info.value) is error
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return info.value


@pytest.fixture(scope="module")
def ct_sm(real_ct: Path) -> CTVolume:
    return load_volume(real_ct / CT_SM)


@pytest.fixture(scope="module")
def dicom_volume(real_ct: Path) -> CTVolume:
    return load_volume(real_ct / DICOM_SERIES)


@pytest.fixture(scope="module")
def dicom_by_z(real_ct: Path) -> list[Path]:
    return dicom_files_by_z(real_ct / DICOM_SERIES)


# ---------------------------------------------------------------------------------------------------------------
# NIfTI fixture: shape, HU, orientation and the affine bookkeeping
# ---------------------------------------------------------------------------------------------------------------


def test_nifti_fixture_loads_canonical(ct_sm):
    assert ct_sm.shape == (30, 101, 122)  # on disk (122, 101, 30) RAS
    assert ct_sm.array.dtype == np.float32
    assert ct_sm.array.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(ct_sm.spacing, (3.0, 3.0, 3.0))
    assert (float(ct_sm.array.min()), float(ct_sm.array.max())) == (-1100.0, 1207.0)
    assert tuple(ct_sm.meta["source_axcodes"]) == ("R", "A", "S")
    assert nib.aff2axcodes(ct_sm.affine) == ("S", "P", "L")
    assert ct_sm.path.endswith("example_ct_sm.nii.gz")


def test_nifti_fixture_voxels_keep_their_world_position(real_ct, ct_sm):
    """Voxel (d, h, w) holds the original voxel (i, j, k) = (W-1-w, H-1-h, d) and sits at the same world point."""
    image = nib.load(real_ct / CT_SM)
    original = np.asarray(image.dataobj)
    ni, nj, _ = original.shape
    for i, j, k in [(0, 0, 0), (121, 100, 29), (0, 100, 0), (121, 0, 29), (10, 20, 5), (60, 50, 15), (97, 3, 28)]:
        d, h, w = k, nj - 1 - j, ni - 1 - i  # RAS -> (S, P, L): keep k, flip j and i
        assert ct_sm.array[d, h, w] == original[i, j, k]
        np.testing.assert_allclose(world(ct_sm.affine, (d, h, w)), world(image.affine, (i, j, k)), atol=1e-4)
    np.testing.assert_array_equal(ct_sm.array, original[::-1, ::-1, :].transpose(2, 1, 0))


# ---------------------------------------------------------------------------------------------------------------
# Masks on the NIfTI fixture: per-structure files against TotalSegmentator's statistics, multilabel tables
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["liver", "spleen", "lung_lower_lobe_left", "aorta", "kidney_left"])
def test_structure_mask_matches_totalsegmentator_statistics(real_ct, ct_sm, name):
    stats = json.loads((real_ct / SEG_FAST / "statistics.json").read_text())[name]
    mask = load_mask(real_ct / SEG_FAST / f"{name}.nii.gz", like=ct_sm)
    assert mask.dtype == bool and mask.shape == ct_sm.shape and mask.any()
    mean_hu = float(np.mean(ct_sm.array[mask], dtype=np.float64))
    np.testing.assert_allclose(mean_hu, stats["intensity"], atol=1e-3)
    np.testing.assert_allclose(np.count_nonzero(mask) * np.prod(ct_sm.spacing), stats["volume"], rtol=1e-9)


def test_totalsegmentator_label_table():
    assert len(TOTALSEGMENTATOR_V2_LABELS) == 117
    assert sorted(TOTALSEGMENTATOR_V2_LABELS) == list(range(1, 118))
    assert len(set(TOTALSEGMENTATOR_V2_LABELS.values())) == 117
    expected = {
        1: "spleen",
        5: "liver",
        26: "vertebrae_S1",
        50: "vertebrae_C1",
        51: "heart",
        92: "rib_left_1",
        115: "rib_right_12",
        117: "costal_cartilages",
    }
    assert {k: TOTALSEGMENTATOR_V2_LABELS[k] for k in expected} == expected


def test_multilabel_header_table_matches_totalsegmentator(real_ct):
    table = _label_table_from_header(nib.load(real_ct / SEG_ML))
    for label_id in (1, 5, 11, 26, 52, 92, 115, 117):
        assert table[label_id] == TOTALSEGMENTATOR_V2_LABELS[label_id]
    assert table == TOTALSEGMENTATOR_V2_LABELS


def test_multilabel_by_name_and_id(real_ct, ct_sm):
    by_name = load_mask(real_ct / SEG_ML, like=ct_sm, label="liver")
    by_id = load_mask(real_ct / SEG_ML, like=ct_sm, label=5)
    np.testing.assert_array_equal(by_name, by_id)
    # The --fast per-structure liver is a different run, so compare by overlap, not equality.
    fast = load_mask(real_ct / SEG_FAST / "liver.nii.gz", like=ct_sm)
    dice = 2 * np.count_nonzero(by_id & fast) / (np.count_nonzero(by_id) + np.count_nonzero(fast))
    assert dice > 0.9
    assert 20.0 < float(ct_sm.array[by_id].mean()) < 80.0
    assert not load_mask(real_ct / SEG_ML, like=ct_sm, label="heart").any()  # the README: no heart in this crop


def test_multilabel_names_come_from_the_header_extension(real_ct, ct_sm, tmp_path):
    """Renaming label 5 in the file's XML label table renames it for ``load_mask`` (the header wins)."""
    image = nib.load(real_ct / SEG_ML)
    extension = image.header.extensions[0]
    content = extension.get_content().replace(b"<![CDATA[liver]]>", b"<![CDATA[hepar]]>")
    header = image.header.copy()
    header.extensions.clear()
    header.extensions.append(nib.nifti1.Nifti1Extension(extension.get_code(), content))
    path = tmp_path / "renamed.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), image.affine, header), path)

    liver = load_mask(real_ct / SEG_ML, like=ct_sm, label=5)
    np.testing.assert_array_equal(load_mask(path, like=ct_sm, label="hepar"), liver)
    assert_error(UnknownLabelError, path, ("'liver'",), lambda: load_mask(path, label="liver"))
    # An explicit label_map beats both tables.
    np.testing.assert_array_equal(load_mask(real_ct / SEG_ML, label="foie", label_map={5: "foie"}), liver)


# ---------------------------------------------------------------------------------------------------------------
# DICOM series (JPEG 2000) and its LAS segmentation
# ---------------------------------------------------------------------------------------------------------------


def test_dicom_series_shape_spacing_hu(dicom_volume):
    assert dicom_volume.shape == (20, 512, 512)
    assert dicom_volume.array.dtype == np.float32
    np.testing.assert_allclose(dicom_volume.spacing, (2.0, 0.9765625, 0.9765625), atol=1e-6)
    assert (float(dicom_volume.array.min()), float(dicom_volume.array.max())) == (-1024.0, 1839.0)
    assert nib.aff2axcodes(dicom_volume.affine) == ("S", "P", "L")
    assert dicom_volume.meta["num_skipped_files"] == 0


def test_dicom_slices_go_inferior_to_superior(dicom_volume, dicom_by_z):
    z = np.array([world(dicom_volume.affine, (d, 0, 0))[2] for d in range(dicom_volume.shape[0])])
    assert np.all(np.diff(z) > 0)
    ipp_z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in dicom_by_z]
    np.testing.assert_allclose(z, ipp_z, atol=1e-4)  # LPS and RAS share z


def test_dicom_slice_equals_pydicom_pixels(dicom_volume, dicom_by_z):
    """Slice 7 is pydicom's pixel array of the 8th-lowest slice with rescale applied, not flipped.

    With ImageOrientationPatient (1,0,0, 0,1,0), columns run towards patient left and rows towards posterior:
    already the canonical (P, L) in-plane layout, so no flip is expected.
    """
    d = 7
    ds = pydicom.dcmread(dicom_by_z[d])
    assert [float(v) for v in ds.ImageOrientationPatient] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(dicom_volume.array[d], expected)
    # World position of pixel (row r, column c): IPP + r * PixelSpacing[0] * col_cos + c * PixelSpacing[1] * row_cos.
    ipp = np.array(ds.ImagePositionPatient, dtype=np.float64)
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    for r, c in [(0, 0), (511, 0), (0, 511), (200, 311)]:
        lps = ipp + r * row_spacing * np.array([0.0, 1.0, 0.0]) + c * col_spacing * np.array([1.0, 0.0, 0.0])
        np.testing.assert_allclose(world(dicom_volume.affine, (d, r, c)), lps * lps_to_ras, atol=1e-4)


def test_dicom_segmentation_lands_on_the_right_tissue(real_ct, dicom_volume):
    seg = real_ct / DICOM_SEG
    assert nib.aff2axcodes(nib.load(seg).affine) == ("L", "A", "S")  # on disk it differs from the DICOM
    hu = dicom_volume.array
    liver, spleen, aorta = (load_mask(seg, like=dicom_volume, label=n) for n in ("liver", "spleen", "aorta"))
    assert liver.any() and spleen.any() and aorta.any()
    liver_hu = float(hu[liver].mean())
    assert 60.0 < liver_hu < 120.0  # contrast-enhanced liver
    assert 60.0 < float(hu[spleen].mean()) < 120.0
    assert float(hu[aorta].mean()) > liver_hu + 40.0  # contrast-filled lumen
    assert np.all(hu[:, :16, :16] < -950.0)  # air outside the body at the top-left corner
    # A mask flipped along W (left-right) or H (front-back) misses the liver: misalignment would show.
    assert float(hu[liver[:, :, ::-1]].mean()) < liver_hu - 40.0
    assert float(hu[liver[:, ::-1, :]].mean()) < liver_hu - 40.0


def test_dicom_subset_with_stray_file_matches_full_series(tmp_path, dicom_volume, dicom_by_z):
    folder = tmp_path / "series"
    folder.mkdir()
    for f in dicom_by_z[4:9]:
        shutil.copy(f, folder / f.name)
    (folder / "README.txt").write_text("not a DICOM file")
    subset = load_volume(folder)
    assert subset.meta["num_skipped_files"] == 1
    np.testing.assert_array_equal(subset.array, dicom_volume.array[4:9])
    np.testing.assert_allclose(subset.affine[:, :3], dicom_volume.affine[:, :3])
    np.testing.assert_allclose(world(subset.affine, (0, 0, 0)), world(dicom_volume.affine, (4, 0, 0)), atol=1e-4)


def test_single_uid_named_dicom_slice(dicom_volume, dicom_by_z):
    """A lone slice whose file name is a UID (dots, no extension) is read as DICOM, not rejected by its 'suffix'."""
    one = load_volume(dicom_by_z[12])
    assert one.shape == (1, 512, 512)
    np.testing.assert_array_equal(one.array[0], dicom_volume.array[12])
    np.testing.assert_allclose(one.spacing, (3.0, 0.9765625, 0.9765625), atol=1e-6)  # SliceThickness 3
    np.testing.assert_allclose(world(one.affine, (0, 5, 9)), world(dicom_volume.affine, (12, 5, 9)), atol=1e-4)


def test_single_file_dicom(real_ct):
    path = real_ct / CT_SMALL
    volume = load_volume(path)
    assert volume.shape == (1, 128, 128)
    np.testing.assert_allclose(volume.spacing, (5.0, 0.661468, 0.661468), atol=1e-6)
    assert (float(volume.array.min()), float(volume.array.max())) == (-896.0, 1167.0)
    ds = pydicom.dcmread(path)
    expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(volume.array[0], expected)
    assert volume.meta["series_uid"] == str(ds.SeriesInstanceUID)


def _copy_series(source: list[Path], folder: Path) -> Path:
    folder.mkdir()
    for f in source:
        shutil.copy(f, folder / f.name)
    return folder


def test_dicom_missing_slice_is_rejected(tmp_path, dicom_by_z):
    folder = _copy_series(dicom_by_z[:10] + dicom_by_z[11:], tmp_path / "gap")
    assert_error(InvalidVolumeError, folder, ("uneven slice spacing", "4.0", "missing"), lambda: load_volume(folder))


def test_dicom_duplicate_slice_is_rejected(tmp_path, dicom_by_z):
    folder = _copy_series(dicom_by_z, tmp_path / "dup")
    shutil.copy(dicom_by_z[5], folder / "copy_of_slice_5")
    assert_error(InvalidVolumeError, folder, ("share one position",), lambda: load_volume(folder))


def _truncate(file: Path, size: int) -> Path:
    file.write_bytes(file.read_bytes()[:size])
    return file


@pytest.mark.parametrize("end", [0, -1])  # the first or the last slice along z
@pytest.mark.parametrize(("size", "fragment"), [(0, "empty file"), (100, "preamble"), (1500, "no Rows")])
def test_dicom_damaged_end_slice_is_named_not_dropped(tmp_path, dicom_by_z, end, size, fragment):
    """A cut first/last slice used to be skipped as 'not DICOM', and the series loaded one slice short."""
    folder = _copy_series(dicom_by_z, tmp_path / "series")
    damaged = _truncate(folder / dicom_by_z[end].name, size)
    assert_error(CorruptFileError, damaged, (fragment,), lambda: load_volume(folder))


def test_dicom_truncated_header_mid_series_names_the_file(tmp_path, dicom_by_z):
    """It used to surface as 'uneven slice spacing' on the folder, which does not say which file to replace."""
    folder = _copy_series(dicom_by_z, tmp_path / "series")
    damaged = _truncate(folder / dicom_by_z[10].name, 2000)
    fragments = ("truncated", "no Rows", "CT Image Storage")
    err = assert_error(CorruptFileError, damaged, fragments, lambda: load_volume(folder))
    assert err.source == str(damaged)


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter:UserWarning")
def test_dicom_truncated_pixel_data_names_the_file(tmp_path, dicom_by_z):
    folder = _copy_series(dicom_by_z, tmp_path / "series")
    damaged = _truncate(folder / dicom_by_z[-1].name, 20000)
    assert_error(CorruptFileError, damaged, ("pixel",), lambda: load_volume(folder))


def _edited_ct_small(real_ct: Path, path: Path, **tags) -> Path:
    """CT_small.dcm with some tags replaced (values written as given, also invalid ones)."""
    ds = pydicom.dcmread(real_ct / CT_SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about invalid DS values; writing them is the point
        for name, value in tags.items():
            setattr(ds, name, value)
    ds.save_as(path)
    return path


@pytest.mark.parametrize("modality", ["MR", "PT", "US"])
def test_non_ct_modality_is_refused_unless_allowed(real_ct, tmp_path, modality):
    path = _edited_ct_small(real_ct, tmp_path / f"{modality}.dcm", Modality=modality)
    assert_error(InvalidVolumeError, path, (repr(modality), "not CT", "allow_non_ct=True"), lambda: load_volume(path))
    volume = load_volume(path, allow_non_ct=True)
    assert volume.meta["modality"] == modality
    np.testing.assert_array_equal(volume.array, load_volume(real_ct / CT_SMALL).array)


def test_non_ct_slice_in_a_series_is_named(tmp_path, dicom_by_z):
    folder = _copy_series(dicom_by_z[:4], tmp_path / "series")
    odd = folder / dicom_by_z[2].name
    ds = pydicom.dcmread(odd)
    ds.Modality = "MR"
    ds.save_as(odd)
    assert_error(InvalidVolumeError, odd, ("'MR'", "not CT"), lambda: load_volume(folder))
    assert load_volume(folder, allow_non_ct=True).shape == (4, 512, 512)


BAD_DICOM_GEOMETRY = {
    "nan-position": ({"ImagePositionPatient": ["NaN", "0", "0"]}, "ImagePositionPatient"),
    "inf-position": ({"ImagePositionPatient": ["0", "inf", "0"]}, "ImagePositionPatient"),
    "two-value-position": ({"ImagePositionPatient": ["0", "0"]}, "ImagePositionPatient"),
    "zero-pixel-spacing": ({"PixelSpacing": ["0", "0.661468"]}, "PixelSpacing"),
    "negative-pixel-spacing": ({"PixelSpacing": ["0.66", "-0.66"]}, "PixelSpacing"),
    "nan-pixel-spacing": ({"PixelSpacing": ["NaN", "0.66"]}, "PixelSpacing"),
    "zero-orientation": ({"ImageOrientationPatient": ["0"] * 6}, "ImageOrientationPatient"),
    "parallel-orientation": ({"ImageOrientationPatient": ["1", "0", "0", "1", "0", "0"]}, "ImageOrientationPatient"),
    "nan-rescale-slope": ({"RescaleSlope": "NaN"}, "RescaleSlope"),
}


@pytest.mark.parametrize("case", list(BAD_DICOM_GEOMETRY))
def test_bad_dicom_geometry_is_named(real_ct, tmp_path, case):
    """These used to load with NaN spacing or crash inside nibabel ('Unable to find out axis')."""
    tags, fragment = BAD_DICOM_GEOMETRY[case]
    path = _edited_ct_small(real_ct, tmp_path / f"{case}.dcm", **tags)
    assert_error(CorruptFileError, path, (fragment,), lambda: load_volume(path))


def test_single_slice_with_unusable_thickness_falls_back_to_1_mm(real_ct, tmp_path):
    """A NaN thickness used to reach the affine and crash in nibabel; a single slice has no step to measure."""
    path = _edited_ct_small(real_ct, tmp_path / "t.dcm", SpacingBetweenSlices="NaN", SliceThickness="0")
    np.testing.assert_allclose(load_volume(path).spacing, (1.0, 0.661468, 0.661468), atol=1e-6)
    path = _edited_ct_small(real_ct, tmp_path / "u.dcm", SpacingBetweenSlices="0", SliceThickness="2.5")
    np.testing.assert_allclose(load_volume(path).spacing, (2.5, 0.661468, 0.661468), atol=1e-6)


def test_nan_position_in_a_series_names_the_file(tmp_path, dicom_by_z):
    folder = _copy_series(dicom_by_z[:4], tmp_path / "series")
    odd = folder / dicom_by_z[1].name
    ds = pydicom.dcmread(odd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.ImagePositionPatient = ["NaN", "0", "0"]
    ds.save_as(odd)
    assert_error(CorruptFileError, odd, ("ImagePositionPatient", "nan"), lambda: load_volume(folder))


# ---------------------------------------------------------------------------------------------------------------
# .npy, in-memory arrays, writing and round trips
# ---------------------------------------------------------------------------------------------------------------


def test_npy_loads_unchanged_with_spacing(tmp_path):
    array = np.random.default_rng(0).integers(-1024, 3000, size=(7, 9, 11)).astype(np.int16)
    np.save(tmp_path / "vol.npy", array)
    volume = load_volume(tmp_path / "vol.npy", spacing=(2.5, 0.8, 0.7))
    assert volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.spacing, (2.5, 0.8, 0.7))
    np.testing.assert_array_equal(volume.affine, standard_affine((2.5, 0.8, 0.7)))
    assert nib.aff2axcodes(volume.affine) == ("S", "P", "L")
    np.testing.assert_allclose(load_volume(tmp_path / "vol.npy").spacing, (1.0, 1.0, 1.0))


def test_from_array():
    array = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 3, 4)
    volume = CTVolume.from_array(array, spacing=(3.0, 1.5, 1.25), name="phantom")
    assert volume.array.dtype == np.float32 and volume.shape == (2, 3, 4) and volume.path == "phantom"
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.spacing, (3.0, 1.5, 1.25))
    affine = standard_affine((1.0, 2.0, 3.0), origin=(5.0, 6.0, 7.0))
    np.testing.assert_array_equal(CTVolume.from_array(array, affine=affine).affine, affine)
    with pytest.raises(InvalidVolumeError, match="<array>: 1 voxel"):
        CTVolume.from_array(np.where(array == 5, np.nan, array))


def test_standard_affine_orientation():
    affine = standard_affine((2.0, 0.5, 0.25), origin=(1.0, 2.0, 3.0))
    assert nib.aff2axcodes(affine) == ("S", "P", "L")
    np.testing.assert_allclose(world(affine, (1, 1, 1)), (1.0 - 0.25, 2.0 - 0.5, 3.0 + 2.0))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_save_nifti_round_trip_is_exact(tmp_path, suffix, dtype):
    rng = np.random.default_rng(1)
    array = (rng.normal(0.0, 500.0, size=(7, 9, 11)) + 40.0).astype(dtype)
    affine = standard_affine((2.5, 0.75, 0.8), origin=(-120.5, 80.25, -300.0))
    path = save_nifti(tmp_path / f"vol{suffix}", array, affine)
    assert path == tmp_path / f"vol{suffix}"
    assert nib.load(path).get_data_dtype() == dtype
    volume = load_volume(path)
    np.testing.assert_array_equal(volume.array, array.astype(np.float32))
    np.testing.assert_allclose(volume.affine, affine, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left


def test_save_nifti_mask_round_trip(tmp_path, ct_sm):
    mask = ct_sm.array > 200.0  # bones
    path = save_nifti(tmp_path / "bones.nii.gz", mask, ct_sm.affine)
    assert nib.load(path).get_data_dtype() == np.uint8
    np.testing.assert_array_equal(load_mask(path, like=ct_sm), mask)


# On-disk layouts of one anatomy: for each NIfTI data axis, (canonical axis it runs along, reversed?).
# Canonical axes: 0 = D (towards S), 1 = H (towards P), 2 = W (towards L).
LAYOUTS = {
    ("R", "A", "S"): [(2, True), (1, True), (0, False)],
    ("L", "P", "S"): [(2, False), (1, False), (0, False)],
    ("L", "A", "S"): [(2, False), (1, True), (0, False)],
    ("P", "S", "L"): [(1, False), (0, False), (2, False)],  # axes permuted (sagittal-style storage)
    ("A", "I", "R"): [(1, True), (0, True), (2, True)],  # permuted and every axis reversed
}


def disk_layout(canonical: np.ndarray, affine: np.ndarray, layout: list[tuple[int, bool]]):
    """The on-disk (i, j, k) array and affine that store ``canonical`` (D, H, W) with the given axis layout.

    Returns:
        ``(data, disk_affine)`` with ``data[i, j, k] == canonical[index_map @ (i, j, k, 1)]`` and
        ``disk_affine = affine @ index_map``.
    """
    data = canonical.transpose([axis for axis, _ in layout])
    index_map = np.zeros((4, 4))
    index_map[3, 3] = 1.0
    for disk_axis, (axis, reverse) in enumerate(layout):
        if reverse:
            data = np.flip(data, axis=disk_axis)
        index_map[axis, disk_axis] = -1.0 if reverse else 1.0
        index_map[axis, 3] = canonical.shape[axis] - 1 if reverse else 0.0
    return np.ascontiguousarray(data), affine @ index_map


def test_orientation_on_disk_does_not_change_the_canonical_array(tmp_path):
    rng = np.random.default_rng(2)
    canonical = rng.integers(-1000, 1500, size=(6, 7, 8)).astype(np.int16)
    # Dyadic spacing and origin: NIfTI stores the affine as float32, and these survive every flip exactly.
    affine = standard_affine((2.0, 0.75, 0.625), origin=(10.5, -20.25, 30.0))
    loaded = []
    for codes, layout in LAYOUTS.items():
        data, disk_affine = disk_layout(canonical, affine, layout)
        assert nib.aff2axcodes(disk_affine) == codes  # the file really is stored that way
        path = tmp_path / f"{''.join(codes)}.nii.gz"
        nib.save(nib.Nifti1Image(data, disk_affine), path)
        volume = load_volume(path)
        assert tuple(volume.meta["source_axcodes"]) == codes
        np.testing.assert_array_equal(volume.array, canonical)
        np.testing.assert_allclose(volume.affine, affine, atol=1e-5)
        loaded.append(volume)
        mask_path = tmp_path / f"{''.join(codes)}_mask.nii.gz"
        nib.save(nib.Nifti1Image((data > 0).astype(np.uint8), disk_affine), mask_path)
        np.testing.assert_array_equal(load_mask(mask_path, like=loaded[0]), canonical > 0)
    for volume in loaded[1:]:
        np.testing.assert_array_equal(volume.array, loaded[0].array)
        np.testing.assert_array_equal(volume.affine, loaded[0].affine)


def test_disk_layout_helper_places_voxels():
    canonical = np.arange(6 * 7 * 8).reshape(6, 7, 8)
    for layout in LAYOUTS.values():
        data, disk_affine = disk_layout(canonical, np.eye(4), layout)
        for ijk in [(0, 0, 0), (1, 2, 3), tuple(s - 1 for s in data.shape)]:
            d, h, w = (disk_affine @ [*ijk, 1])[:3].round().astype(int)
            assert data[ijk] == canonical[d, h, w]


def test_nifti_slope_and_intercept_are_applied(tmp_path):
    raw = np.random.default_rng(3).integers(0, 2000, size=(8, 6, 5)).astype(np.int16)  # (i, j, k) on disk
    image = nib.Nifti1Image(raw, np.diag([-1.0, -1.0, 1.0, 1.0]))  # L, P, S: canonical = raw transposed
    image.header.set_slope_inter(2.0, -1024.0)
    path = tmp_path / "scaled.nii.gz"
    nib.save(image, path)
    proxy = nib.load(path).dataobj
    assert (proxy.slope, proxy.inter) == (2.0, -1024.0)  # the file holds the scaling
    volume = load_volume(path)
    np.testing.assert_array_equal(volume.array, (raw.astype(np.float32) * 2.0 - 1024.0).transpose(2, 1, 0))


def test_4d_with_trailing_singleton_loads(tmp_path):
    array = np.random.default_rng(4).normal(size=(4, 5, 6)).astype(np.float32)
    np.save(tmp_path / "vol.npy", array[..., None])
    np.testing.assert_array_equal(load_volume(tmp_path / "vol.npy").array, array)
    nib.save(nib.Nifti1Image(array.transpose(2, 1, 0)[..., None], np.diag([-1.0, -1.0, 1.0, 1.0])), tmp_path / "v.nii")
    np.testing.assert_array_equal(load_volume(tmp_path / "v.nii").array, array)


# ---------------------------------------------------------------------------------------------------------------
# Bad volume input: each error names the file and the problem
# ---------------------------------------------------------------------------------------------------------------


def _nifti(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def _valid_nifti_bytes(tmp: Path, suffix: str) -> bytes:
    noise = np.random.default_rng(5).integers(-1024, 2000, size=(24, 20, 16)).astype(np.int16)
    return _nifti(tmp / f"valid{suffix}", noise).read_bytes()


def _truncated_nifti(tmp: Path, suffix: str) -> Path:
    """The first half of a valid NIfTI file (compressed or not)."""
    data = _valid_nifti_bytes(tmp, suffix)
    return _write(tmp / f"cut{suffix}", data[: len(data) // 2])


def _nan_volume() -> np.ndarray:
    array = np.zeros((4, 5, 6), dtype=np.float32)
    array[0, 0, 0], array[1, 2, 3], array[3, 4, 5] = np.nan, np.inf, -np.inf
    return array


def _write(path: Path, content: bytes | str) -> Path:
    if isinstance(content, str):
        path.write_text(content)
    else:
        path.write_bytes(content)
    return path


def _npy(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path


def _folder(path: Path, files: dict[str, str]) -> Path:
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


BAD_VOLUMES = {
    "missing-file": (CorruptFileError, ("file not found",), lambda t: t / "absent.nii.gz"),
    "empty-nii-gz": (CorruptFileError, ("cannot read NIfTI", "Empty file"), lambda t: _write(t / "e.nii.gz", b"")),
    "empty-npy": (CorruptFileError, ("cannot read .npy",), lambda t: _write(t / "e.npy", b"")),
    "random-bytes-nii-gz": (
        CorruptFileError,
        ("cannot read NIfTI", "not a gzip file"),
        lambda t: _write(t / "r.nii.gz", np.random.default_rng(6).bytes(4096)),
    ),
    "truncated-nii-gz": (
        CorruptFileError,
        ("cannot read NIfTI", "EOFError"),
        lambda t: _truncated_nifti(t, ".nii.gz"),
    ),
    "truncated-nii": (
        CorruptFileError,
        ("cannot read NIfTI", "bytes"),
        lambda t: _truncated_nifti(t, ".nii"),
    ),
    "text-named-dcm": (CorruptFileError, ("no DICOM image found", "x.dcm"), lambda t: _write(t / "x.dcm", "hello")),
    "folder-without-dicom": (
        CorruptFileError,
        ("no DICOM image found", "notes.txt"),
        lambda t: _folder(t / "series", {"notes.txt": "hi", "thumb.png": "x"}),
    ),
    "empty-folder": (CorruptFileError, ("no DICOM image found",), lambda t: _folder(t / "series", {})),
    "unknown-extension": (CorruptFileError, ("unknown format",), lambda t: _write(t / "volume.txt", "1 2 3")),
    "2d-npy": (
        InvalidVolumeError,
        ("expected a 3D volume", "2D", "(4, 5)"),
        lambda t: _npy(t / "a.npy", np.ones((4, 5))),
    ),
    "2d-nifti": (
        InvalidVolumeError,
        ("expected a 3D volume", "2D"),
        lambda t: _nifti(t / "a.nii.gz", np.ones((4, 5), np.int16)),
    ),
    "4d-3-frames-npy": (
        InvalidVolumeError,
        ("expected a 3D volume", "(4, 5, 6, 3)"),
        lambda t: _npy(t / "a.npy", np.ones((4, 5, 6, 3))),
    ),
    "4d-3-frames-nifti": (
        InvalidVolumeError,
        ("expected a 3D volume", "(4, 5, 6, 3)"),
        lambda t: _nifti(t / "a.nii.gz", np.ones((4, 5, 6, 3), np.int16)),
    ),
    "nan-inf-npy": (InvalidVolumeError, ("3 voxel(s)", "NaN or infinite"), lambda t: _npy(t / "a.npy", _nan_volume())),
    "nan-inf-nifti": (
        InvalidVolumeError,
        ("3 voxel(s)", "NaN or infinite"),
        lambda t: _nifti(t / "a.nii.gz", _nan_volume()),
    ),
    "empty-shape-npy": (InvalidVolumeError, ("empty", "(0, 5, 6)"), lambda t: _npy(t / "a.npy", np.ones((0, 5, 6)))),
    "string-npy": (
        InvalidVolumeError,
        ("real numbers", "<U3"),
        lambda t: _npy(t / "a.npy", np.full((4, 5, 6), "abc")),
    ),
    "bytes-npy": (InvalidVolumeError, ("real numbers", "|S2"), lambda t: _npy(t / "a.npy", np.full((4, 5, 6), b"ab"))),
    "complex-npy": (
        InvalidVolumeError,
        ("real numbers", "complex"),
        lambda t: _npy(t / "a.npy", np.ones((4, 5, 6), complex)),
    ),
    "record-npy": (
        InvalidVolumeError,
        ("real numbers",),
        lambda t: _npy(t / "a.npy", np.zeros((4, 5, 6), dtype=[("hu", "f4"), ("q", "i2")])),
    ),
}


@pytest.mark.parametrize("case", list(BAD_VOLUMES))
def test_bad_volume_raises_named_error(tmp_path, case):
    error, fragments, build = BAD_VOLUMES[case]
    path = build(tmp_path)
    err = assert_error(error, path, fragments, lambda: load_volume(path))
    assert isinstance(err, CTInputError) and isinstance(err, ValueError)
    assert err.source == str(path)


@pytest.mark.parametrize(
    "error", [CTInputError, CorruptFileError, InvalidVolumeError, MaskMismatchError, UnknownLabelError]
)
def test_errors_survive_pickling(error):
    """Errors raised in worker processes (``multiprocessing``, ``datasets.map(num_proc=...)``) reach the parent.

    Without this a bad file in a ``multiprocessing.Pool`` worker kills the pool's result thread and ``map`` hangs.
    """
    original = error("/data/ct/case_001.nii.gz", "file not found")
    copy = pickle.loads(pickle.dumps(original))
    assert type(copy) is error
    assert (copy.source, copy.problem, str(copy)) == (original.source, original.problem, str(original))
    bare = pickle.loads(pickle.dumps(error(None, "no source")))
    assert bare.source is None and str(bare) == "no source"


# ---------------------------------------------------------------------------------------------------------------
# Bad masks
# ---------------------------------------------------------------------------------------------------------------


def test_mask_grid_shape_mismatch(tmp_path, ct_sm):
    path = save_nifti(tmp_path / "m.nii.gz", np.zeros((30, 101, 121), np.uint8), ct_sm.affine)
    assert_error(MaskMismatchError, path, ("(30, 101, 121)", "(30, 101, 122)"), lambda: load_mask(path, like=ct_sm))
    np.save(tmp_path / "m.npy", np.zeros((29, 101, 122), np.uint8))
    npy = tmp_path / "m.npy"
    assert_error(MaskMismatchError, npy, ("(29, 101, 122)", "(30, 101, 122)"), lambda: load_mask(npy, like=ct_sm))


def test_mask_affine_mismatch(tmp_path, ct_sm):
    shifted = ct_sm.affine.copy()
    shifted[0, 3] += 10.0  # 10 mm to the right: same shape, wrong place
    path = save_nifti(tmp_path / "m.nii.gz", np.zeros(ct_sm.shape, np.uint8), shifted)
    fragments = ("affine differs", "185.0437", "195.0437")  # both x origins, as printed
    assert_error(MaskMismatchError, path, fragments, lambda: load_mask(path, like=ct_sm))
    # Float32 header storage (sub-micrometre) is within the default tolerance.
    nudged = ct_sm.affine.copy()
    nudged[:3, 3] += 1e-4
    same = save_nifti(tmp_path / "ok.nii.gz", np.zeros(ct_sm.shape, np.uint8), nudged)
    assert not load_mask(same, like=ct_sm).any()


def test_unknown_label_name_suggests_close_match(real_ct):
    path = real_ct / SEG_ML
    err = assert_error(
        UnknownLabelError, path, ("'livr'", "did you mean", "liver"), lambda: load_mask(path, label="livr")
    )
    assert isinstance(err, KeyError) and isinstance(err, ValueError)
    with pytest.raises(KeyError):
        load_mask(path, label="no_such_organ")
    with pytest.raises(ValueError):
        load_mask(path, label="no_such_organ")


def test_label_none_on_multilabel_file(real_ct):
    path = real_ct / SEG_ML
    assert_error(UnknownLabelError, path, ("multilabel", "label="), lambda: load_mask(path))


def test_non_integer_float_mask(tmp_path):
    path = _nifti(tmp_path / "prob.nii.gz", np.full((4, 5, 6), 0.5, np.float32))
    assert_error(InvalidVolumeError, path, ("non-integer",), lambda: load_mask(path))
    integral = _nifti(tmp_path / "float01.nii.gz", np.eye(6, dtype=np.float32)[:4, :5, None].repeat(6, axis=2))
    assert load_mask(integral).any()


@pytest.mark.parametrize("array", [np.full((4, 5, 6), "1"), np.ones((4, 5, 6), complex)], ids=["str", "complex"])
def test_non_numeric_npy_mask(tmp_path, array):
    """A string mask used to crash inside np.isfinite (TypeError), not naming the file."""
    path = _npy(tmp_path / "m.npy", array)
    assert_error(InvalidVolumeError, path, ("mask must hold real numbers",), lambda: load_mask(path))


def test_empty_mask_is_all_false_not_an_error(tmp_path, ct_sm):
    path = save_nifti(tmp_path / "empty.nii.gz", np.zeros(ct_sm.shape, np.uint8), ct_sm.affine)
    mask = load_mask(path, like=ct_sm)
    assert mask.dtype == bool and mask.shape == ct_sm.shape and not mask.any()
    npy = _npy(tmp_path / "empty.npy", np.zeros(ct_sm.shape, np.uint8))
    assert not load_mask(npy, like=ct_sm).any()


def test_mask_missing_and_unknown_format(tmp_path):
    assert_error(
        CorruptFileError, tmp_path / "no.nii.gz", ("file not found",), lambda: load_mask(tmp_path / "no.nii.gz")
    )
    path = _write(tmp_path / "mask.png", b"\x89PNG")
    assert_error(CorruptFileError, path, ("unknown mask format",), lambda: load_mask(path))


# ---------------------------------------------------------------------------------------------------------------
# atomic_output
# ---------------------------------------------------------------------------------------------------------------


def test_atomic_output_keeps_old_content_on_error(tmp_path):
    dest = tmp_path / "vol.nii.gz"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output(dest) as tmp:
            assert tmp.parent == dest.parent and tmp.name.endswith(".nii.gz") and tmp != dest
            tmp.write_bytes(b"half-writ")
            raise RuntimeError("boom")
    assert dest.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["vol.nii.gz"]


def test_atomic_output_replaces_on_success(tmp_path):
    dest = tmp_path / "new" / "dir" / "vol.npy"  # parents are created
    with atomic_output(dest) as tmp:
        tmp.write_bytes(b"new")
        assert not dest.exists()  # readers never see a partial file
    assert dest.read_bytes() == b"new"
    assert os.listdir(dest.parent) == ["vol.npy"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o666 & ~umask  # usual permissions, not mkstemp's 0600
    with atomic_output(dest) as tmp:
        tmp.write_bytes(b"newer")
    assert dest.read_bytes() == b"newer"
    assert os.listdir(dest.parent) == ["vol.npy"]


def test_save_nifti_rejects_non_3d_without_writing(tmp_path):
    path = tmp_path / "flat.nii.gz"
    assert_error(InvalidVolumeError, path, ("3D",), lambda: save_nifti(path, np.zeros((4, 5))))
    assert not any(tmp_path.iterdir())


def test_truncated_gzip_really_is_truncated(tmp_path):
    """Guard for the 'truncated-nii-gz' case: the first half is a gzip stream cut mid-data, not garbage."""
    data = _valid_nifti_bytes(tmp_path, ".nii.gz")
    with pytest.raises(EOFError):
        gzip.decompress(data[: len(data) // 2])
    assert gzip.decompress(data)[344:348] == b"n+1\x00"  # NIfTI-1 single-file magic


def _flip_bit(path: Path, from_end: int) -> Path:
    data = bytearray(path.read_bytes())
    data[len(data) - from_end] ^= 0x01
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("from_end", [12, 6, 3])  # last deflate block, CRC-32, ISIZE
def test_nii_gz_with_a_flipped_bit_near_the_end_is_rejected(tmp_path, from_end):
    """nibabel stops reading where the image ends, before the gzip trailer: these used to load silently."""
    noise = np.random.default_rng(7).integers(-1024, 2000, size=(24, 20, 16)).astype(np.int16)
    volume = _flip_bit(_nifti(tmp_path / "vol.nii.gz", noise), from_end)
    assert_error(CorruptFileError, volume, ("cannot read NIfTI", "BadGzipFile"), lambda: load_volume(volume))
    mask = _flip_bit(_nifti(tmp_path / "mask.nii.gz", (noise > 0).astype(np.uint8)), from_end)
    assert_error(CorruptFileError, mask, ("cannot read NIfTI", "BadGzipFile"), lambda: load_mask(mask))


def test_nii_gz_with_two_gzip_members_loads(tmp_path):
    """Reading on to the end of the stream still accepts a valid file that gzip split into members."""
    noise = np.random.default_rng(8).integers(-1024, 2000, size=(6, 5, 4)).astype(np.int16)
    raw = gzip.decompress(_nifti(tmp_path / "one.nii.gz", noise).read_bytes())
    two = _write(tmp_path / "two.nii.gz", gzip.compress(raw[:200]) + gzip.compress(raw[200:]))
    np.testing.assert_array_equal(load_volume(two).array, load_volume(tmp_path / "one.nii.gz").array)


def test_npy_with_a_leading_channel_and_2d_figures(tmp_path):
    volume = np.arange(2 * 3 * 4, dtype=np.float32).reshape(1, 2, 3, 4)  # M3D-VQA stores (1, D, H, W)
    np.save(tmp_path / "m3d.npy", volume)
    loaded = load_volume(tmp_path / "m3d.npy")
    assert loaded.shape == (2, 3, 4) and loaded.intensity == "hu"
    np.testing.assert_array_equal(loaded.array, volume[0])

    from PIL import Image

    Image.fromarray(np.full((5, 7), 255, dtype=np.uint8)).save(tmp_path / "figure.png")
    figure = load_volume(tmp_path / "figure.png")
    assert figure.shape == (1, 5, 7) and figure.intensity == "unit"
    np.testing.assert_allclose(figure.array, 1.0)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(CorruptFileError, match="cannot read image") as err:
        load_volume(tmp_path / "broken.jpg")
    assert str(tmp_path / "broken.jpg") in str(err.value)


def test_label_map_view_equals_the_copy_and_is_read_only(tmp_path):
    """``copy=False`` keeps a file's labels as the reoriented view of its stored values (no full-size copy)."""
    import nibabel as nib

    from med3dqwen.processing.ct_io import load_label_map, memory_order, resolve_label

    stored = np.zeros((12, 10, 6), dtype=np.uint8)  # stored (i, j, k) = RAS: loading flips and transposes
    stored[2:9, 3:7, 1:5] = 3
    nib.save(nib.Nifti1Image(stored, np.diag([0.8, 0.8, 2.0, 1.0])), tmp_path / "roi.nii.gz")
    view = load_label_map(tmp_path / "roi.nii.gz", copy=False)
    owned = load_label_map(tmp_path / "roi.nii.gz")
    np.testing.assert_array_equal(view.array, owned.array)
    assert not view.array.flags.writeable and not view.array.flags.c_contiguous
    assert owned.array.flags.writeable and owned.array.flags.c_contiguous
    assert view.array.shape == (6, 10, 12) and np.array_equal(view.affine, owned.affine)
    in_memory, axes, flips = memory_order(view.array)  # the stored bytes again: NIfTI keeps i fastest
    np.testing.assert_array_equal(in_memory, stored.transpose(2, 1, 0))
    assert in_memory.flags.c_contiguous and axes == (0, 1, 2) and flips == (1, 2)
    assert resolve_label(view, None) is None and resolve_label(view, 3) == 3


def test_a_zero_size_label_map_selects_an_empty_mask():
    from med3dqwen.processing.ct_io import LabelMap, select_label

    empty = select_label(LabelMap(np.zeros((0, 4, 4), np.uint8), None, {}, "x"), None)
    assert empty.shape == (0, 4, 4) and empty.dtype == bool
