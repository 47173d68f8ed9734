"""MaskResult, the error classes and the ``get_mask_source`` factory."""

import pickle

import numpy as np
import pytest

from med3dqwen.processing.ct_io import CTInputError
from med3dqwen.segmentation import (
    MASK_SOURCE_KINDS,
    HUThresholdSource,
    MaskResult,
    MultilabelFileSource,
    PerStructureFileSource,
    UnknownStructureError,
    get_mask_source,
)
from med3dqwen.segmentation.base import close_matches


def test_mask_result_computes_empty_and_contour_flags():
    mask = np.zeros((2, 3, 4), dtype=np.uint8)
    result = MaskResult(mask=mask, structure="liver", resolved_name="liver", source="dataset")
    assert result.mask.dtype == bool and result.empty and not result.has_contour
    mask[1, 1, 1] = 1
    result = MaskResult(mask=mask, structure="liver", resolved_name="liver", source="dataset")
    assert not result.empty and result.has_contour
    whole = MaskResult(np.ones((2, 3, 4), bool), "whole scan", "whole scan", "dataset", whole_volume=True)
    assert not whole.empty and not whole.has_contour


def test_mask_result_rejects_non_3d_masks():
    with pytest.raises(ValueError, match=r"\(D, H, W\)"):
        MaskResult(mask=np.zeros((3, 4), bool), structure="x", resolved_name="x", source="dataset")


def test_unknown_structure_error_names_structure_source_and_matches():
    err = UnknownStructureError("livr", "totalsegmentator", ["liver"], detail="no file 'livr.nii.gz'")
    assert isinstance(err, CTInputError) and isinstance(err, KeyError)
    text = str(err)
    assert "'livr'" in text and "totalsegmentator" in text and "['liver']" in text and "livr.nii.gz" in text
    clone = pickle.loads(pickle.dumps(err))
    assert type(clone) is UnknownStructureError and str(clone) == text and clone.matches == ("liver",)


def test_close_matches_ignores_case_and_underscores():
    assert close_matches("Lung Upper Lobe Left", ["lung_upper_lobe_left", "liver"]) == ["lung_upper_lobe_left"]


def test_factory_builds_each_kind(tmp_path):
    assert isinstance(get_mask_source("hu_threshold"), HUThresholdSource)
    files = get_mask_source("radgenome", root=tmp_path)
    assert isinstance(files, PerStructureFileSource) and files.layout == "seg_{volume_id}/{name}.nii.gz"
    assert files.naming == "radgenome" and files.source_name == "dataset"
    ts = get_mask_source("totalsegmentator", root=tmp_path)
    assert ts.layout == "{name}.nii.gz" and ts.source_name == "totalsegmentator"
    assert isinstance(get_mask_source("multilabel", path_or_pattern=tmp_path / "x.nii.gz"), MultilabelFileSource)
    assert isinstance(get_mask_source("files", root=tmp_path, layout="folder"), PerStructureFileSource)
    assert "vista3d" in MASK_SOURCE_KINDS  # built in tests/segmentation/test_vista3d.py
    with pytest.raises(ValueError, match="unknown mask source kind 'sam'"):
        get_mask_source("sam")


@pytest.mark.parametrize("layout", ["{volume_id}/mask.nii.gz", "{name}/{other}.nii.gz", "../{name}.nii.gz"])
def test_bad_layouts_are_rejected(tmp_path, layout):
    with pytest.raises(ValueError, match="layout"):
        PerStructureFileSource(tmp_path, layout=layout)
