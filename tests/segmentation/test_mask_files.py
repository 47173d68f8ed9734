"""PerStructureFileSource: RadGenome-ChestCT's linking rule on a tree built from the real TotalSegmentator fixture.

The tree lives in ``tmp_path``: TotalSegmentator ``--fast`` per-class masks of ``example_ct_sm`` copied under RadGenome
leaf names into ``anatomy/seg_example_ct_sm/`` and a ``lung`` region mask (the union of the five lobes) into
``region/seg_example_ct_sm/``, exactly the layout of the ``*_anatomy_mask`` / ``*_region_mask`` archives.
"""

import shutil

import numpy as np
import pytest

from med3dqwen.io import UnsafePathError, save_nifti
from med3dqwen.processing.ct_io import CorruptFileError, MaskMismatchError, load_mask, load_volume
from med3dqwen.segmentation import (
    MaskFileNotFoundError,
    PerStructureFileSource,
    UnknownStructureError,
    get_mask_source,
)
from med3dqwen.segmentation import files as files_module


CT_SM = "totalseg_example_ct_sm/example_ct_sm.nii.gz"
SEG_FAST = "totalseg_example_ct_sm/example_seg_fast"
LOBES = (
    "lung_upper_lobe_left",
    "lung_lower_lobe_left",
    "lung_upper_lobe_right",
    "lung_middle_lobe_right",
    "lung_lower_lobe_right",
)
# RadGenome leaf file name ← TotalSegmentator class file.
LEAVES = {
    "liver": "liver",
    "spleen": "spleen",
    "right lung lower lobe": "lung_lower_lobe_right",
    "left lung lower lobe": "lung_lower_lobe_left",
    "thoracic vertebrae 12 (t12)": "vertebrae_T12",
    "heart tissue": "heart",  # empty in this abdominal scan
}


@pytest.fixture(scope="module")
def volume(real_ct):
    return load_volume(real_ct / CT_SM)


@pytest.fixture(scope="module")
def lungs(real_ct, volume):
    return np.logical_or.reduce([load_mask(real_ct / SEG_FAST / f"{lobe}.nii.gz", like=volume) for lobe in LOBES])


@pytest.fixture()
def tree(tmp_path, real_ct, volume, lungs):
    anatomy = tmp_path / "anatomy" / "seg_example_ct_sm"
    region = tmp_path / "region" / "seg_example_ct_sm"
    anatomy.mkdir(parents=True)
    for leaf, cls in LEAVES.items():
        shutil.copy(real_ct / SEG_FAST / f"{cls}.nii.gz", anatomy / f"{leaf}.nii.gz")
    save_nifti(region / "lung.nii.gz", lungs, volume.affine)
    return tmp_path


@pytest.fixture()
def source(tree):
    return get_mask_source("radgenome", root=tree / "anatomy", region_root=tree / "region")


def test_leaf_file_is_used_when_present(source, volume, real_ct, tree):
    result = source.get_mask(volume, "lung/lung/right lung/right lung lower lobe")
    assert result.fallback is None and result.source == "dataset"
    assert result.path == str(tree / "anatomy" / "seg_example_ct_sm" / "right lung lower lobe.nii.gz")
    assert result.resolved_name == "right lung lower lobe"
    expected = load_mask(real_ct / SEG_FAST / "lung_lower_lobe_right.nii.gz", like=volume)
    assert np.array_equal(result.mask, expected) and not result.empty and result.has_contour


def test_missing_leaf_falls_back_to_head_region_and_is_flagged(source, volume, lungs, tree):
    result = source.get_mask(volume, "lung/lung/left lung/left lung upper lobe")  # no leaf file
    assert result.fallback == "region"
    assert result.path == str(tree / "region" / "seg_example_ct_sm" / "lung.nii.gz")
    assert np.array_equal(result.mask, lungs)


def test_resolve_applies_the_rule_without_loading(source, monkeypatch, tree):
    def no_loading(*args, **kwargs):
        raise AssertionError("resolve must not load masks")

    monkeypatch.setattr(files_module, "load_mask", no_loading)
    files, fallback = source.resolve("lung/lung/left lung/left lung upper lobe", "example_ct_sm.nii.gz")
    assert fallback == "region" and files == (tree / "region" / "seg_example_ct_sm" / "lung.nii.gz",)
    resolution = source.resolve("abdomen/abdomen/liver", "example_ct_sm")
    assert resolution.fallback is None and resolution.file.name == "liver.nii.gz" and resolution.names == ("liver",)
    assert source.resolve("others/thoracic cavity", "example_ct_sm") == ((), "whole_volume")


@pytest.mark.parametrize("path", ["whole scan", "others/thoracic cavity", "others/larynx", "Whole Scan"])
def test_whole_scan_and_others_give_a_flagged_whole_volume(source, volume, path):
    result = source.get_mask(volume, path)
    assert result.whole_volume and result.fallback == "whole_volume" and result.path is None
    assert result.mask.all() and result.mask.shape == volume.shape
    assert not result.has_contour  # nothing to outline


def test_missing_leaf_and_region_raise_naming_both_files(source, volume):
    with pytest.raises(CorruptFileError) as info:
        source.get_mask(volume, "mediastinum/mediastinal tissue")
    assert "mediastinal tissue.nii.gz" in str(info.value) and "mediastinum.nii.gz" in str(info.value)


def test_missing_volume_folder_names_the_file(source, volume):
    with pytest.raises(CorruptFileError, match="seg_train_1_a_1/liver.nii.gz"):
        source.get_mask(volume, "abdomen/abdomen/liver", volume_id="train_1_a_1")


def test_unknown_bare_name_suggests_close_matches(source, volume):
    with pytest.raises(UnknownStructureError) as info:
        source.get_mask(volume, "livr")
    assert "'livr'" in str(info.value) and "liver" in info.value.matches


def test_empty_mask_is_a_result_not_an_error(source, volume):
    result = source.get_mask(volume, "heart/heart/heart tissue")
    assert result.empty and result.fallback is None and not result.has_contour


def test_empty_leaf_falls_back_to_head_region_like_a_missing_one(source, volume, lungs, tree):
    # RadGenome's builder and this source once disagreed here (builder: region; source: the empty leaf). An empty
    # SAT output means "not found in this scan", exactly as a missing file does.
    empty = tree / "anatomy" / "seg_example_ct_sm" / "left lung upper lobe.nii.gz"
    save_nifti(empty, np.zeros(volume.shape, dtype=bool), volume.affine)
    result = source.get_mask(volume, "lung/lung/left lung/left lung upper lobe")
    assert (result.fallback, result.fallback_reason) == ("region", "empty")
    assert result.path == str(tree / "region" / "seg_example_ct_sm" / "lung.nii.gz")
    assert np.array_equal(result.mask, lungs)
    missing = source.get_mask(volume, "lung/lung/left lung/left lung middle lobe")
    assert (missing.fallback, missing.fallback_reason) == ("region", "missing")


@pytest.mark.parametrize("fault", ["unreadable", "mismatch"])
def test_broken_leaf_file_is_an_error_not_a_silent_region(source, volume, tree, fault):
    # The other place they disagreed: the builder used the region mask for a leaf it could not read. A broken file
    # is a data fault to report, not a reason to outline a different structure.
    leaf = tree / "anatomy" / "seg_example_ct_sm" / "left lung upper lobe.nii.gz"
    if fault == "unreadable":
        leaf.write_bytes(b"\x1f\x8b not a nifti")
    else:
        save_nifti(leaf, np.ones((4, 4, 4), dtype=bool), np.eye(4))
    error = CorruptFileError if fault == "unreadable" else MaskMismatchError
    with pytest.raises(error, match="left lung upper lobe.nii.gz"):
        source.get_mask(volume, "lung/lung/left lung/left lung upper lobe")


def test_head_only_path_found_in_the_region_tree_is_flagged_region(source, volume, tree):
    # "heart/heart" style paths: the anatomy tree is looked at first, so a region file is a fallback.
    assert source.resolve("lung/lung", "example_ct_sm").fallback == "region"
    assert source.get_mask(volume, "lung").fallback == "region"


def test_missing_leaf_and_region_is_a_mask_file_not_found_error(source, volume):
    with pytest.raises(MaskFileNotFoundError):
        source.get_mask(volume, "mediastinum/mediastinal tissue")


def test_volume_id_is_derived_from_the_volume_file(source, volume):
    derived = source.get_mask(volume, "liver")
    explicit = source.get_mask(volume, "liver", volume_id="example_ct_sm.nii.gz")
    assert derived.path == explicit.path and np.array_equal(derived.mask, explicit.mask)


@pytest.mark.parametrize(
    "path",
    ["../../etc/passwd", "lung/../../secret", "lung/..", "/etc/passwd", "lung\\..\\x", "lung//x", "", "lung/a\x00b"],
)
def test_path_escapes_are_rejected(source, volume, path):
    with pytest.raises(UnsafePathError):
        source.get_mask(volume, path)


@pytest.mark.parametrize("volume_id", ["../anatomy", "seg/x", "/tmp", ".."])
def test_volume_id_escapes_are_rejected(source, volume, volume_id):
    with pytest.raises(UnsafePathError, match="volume id"):
        source.get_mask(volume, "liver", volume_id=volume_id)


def test_grid_mismatch_raises(tree, volume):
    folder = tree / "anatomy" / "seg_example_ct_sm"
    save_nifti(folder / "cropped.nii.gz", np.zeros((30, 100, 122), bool), volume.affine)  # one row short
    shifted = volume.affine.copy()
    shifted[:3, 3] += 1.5
    save_nifti(folder / "shifted.nii.gz", np.zeros(volume.shape, bool), shifted)
    source = get_mask_source("radgenome", root=tree / "anatomy")
    with pytest.raises(MaskMismatchError, match=r"\(30, 100, 122\)"):
        source.get_mask(volume, "cropped")
    with pytest.raises(MaskMismatchError, match="affine"):
        source.get_mask(volume, "shifted")


def test_available_lists_the_volume_folder(source):
    assert source.available("example_ct_sm") == sorted(LEAVES)
    assert source.available("example_ct_sm", region=True) == ["lung"]
    assert source.available("no_such_volume") == []


def test_radgenome_naming_translates_other_vocabularies(source, volume, real_ct):
    # TotalSegmentator / RadLex names of a structure find the RadGenome leaf file.
    for name in ("lung_lower_lobe_right", "lower lobe of right lung", "vertebrae_T12"):
        result = source.get_mask(volume, name)
        assert result.fallback is None and result.path.endswith(".nii.gz") and not result.empty
    assert source.get_mask(volume, "vertebrae_T12").resolved_name == "thoracic vertebrae 12 (t12)"


# ---------------------------------------------------------------------------------------------------------------
# TotalSegmentator per-class output folder (the real --fast folder, read in place)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ts_source(real_ct):
    return get_mask_source("totalsegmentator", root=real_ct / SEG_FAST)


def test_totalsegmentator_folder_by_class_and_other_names(ts_source, volume, real_ct):
    direct = ts_source.get_mask(volume, "liver")
    assert direct.source == "totalsegmentator" and direct.path.endswith("example_seg_fast/liver.nii.gz")
    for name in ("right lung lower lobe", "lower lobe of right lung", "lung/lung/right lung/right lung lower lobe"):
        result = ts_source.get_mask(volume, name)
        assert result.resolved_name == "lung_lower_lobe_right" and result.fallback is None
    assert len(ts_source.available()) == 117


def test_totalsegmentator_folder_builds_unions_from_parts(ts_source, volume, real_ct, lungs):
    left = ts_source.get_mask(volume, "lung_left")
    assert left.components == ("lung_upper_lobe_left", "lung_lower_lobe_left") and left.path is None
    expected = load_mask(real_ct / SEG_FAST / "lung_upper_lobe_left.nii.gz", like=volume) | load_mask(
        real_ct / SEG_FAST / "lung_lower_lobe_left.nii.gz", like=volume
    )
    assert np.array_equal(left.mask, expected)
    assert np.array_equal(ts_source.get_mask(volume, "lung").mask, lungs)
    # The RadGenome region "lung" resolves the same way when a path's leaf is unknown to the folder.
    region = ts_source.get_mask(volume, "lung/lung/lung lower lobe/some leaf")
    assert region.fallback == "region" and np.array_equal(region.mask, lungs)


def test_plain_source_without_naming_uses_names_as_given(real_ct, volume):
    source = PerStructureFileSource(real_ct / SEG_FAST, layout="flat")
    assert source.get_mask(volume, "spleen").resolved_name == "spleen"
    with pytest.raises(UnknownStructureError):
        source.get_mask(volume, "lung_left")
