"""MultilabelFileSource on TotalSegmentator's real ``--ml`` output: same masks as ``load_mask``, one read per file."""

import os
import shutil

import numpy as np
import pytest

from med3dqwen.io import save_nifti
from med3dqwen.processing.ct_io import CorruptFileError, CTVolume, MaskMismatchError, load_mask, load_volume
from med3dqwen.segmentation import MultilabelFileSource, UnknownStructureError, get_mask_source
from med3dqwen.segmentation import multilabel as multilabel_module


CT_SM = "totalseg_example_ct_sm/example_ct_sm.nii.gz"
SEG_ML = "totalseg_example_ct_sm/example_seg.nii.gz"
SEG_FAST = "totalseg_example_ct_sm/example_seg_fast"
# Dice of the full model's label (example_seg.nii.gz) vs the --fast model's per-class file, measured on this fixture
# (liver 0.981, spleen 0.977, kidney_left 0.973, vertebrae_T12 0.968, lung_lower_lobe_right 0.968): the two runs
# are different models, so "the same mask" means equal to load_mask of the same file, and close to the fast file.
ORGANS = ("liver", "spleen", "kidney_left", "vertebrae_T12", "lung_lower_lobe_right")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


@pytest.fixture(scope="module")
def volume(real_ct):
    return load_volume(real_ct / CT_SM)


@pytest.fixture()
def reads(monkeypatch):
    """Counts label-map file reads."""
    calls = []
    original = multilabel_module.load_label_map

    def counting(path):
        calls.append(str(path))
        return original(path)

    monkeypatch.setattr(multilabel_module, "load_label_map", counting)
    return calls


@pytest.mark.parametrize("organ", ORGANS)
def test_same_mask_as_load_mask_and_close_to_the_fast_file(real_ct, volume, organ):
    source = MultilabelFileSource(real_ct / SEG_ML)
    result = source.get_mask(volume, organ)
    assert result.resolved_name == organ and result.source == "totalsegmentator" and not result.empty
    assert np.array_equal(result.mask, load_mask(real_ct / SEG_ML, like=volume, label=organ))
    assert dice(result.mask, load_mask(real_ct / SEG_FAST / f"{organ}.nii.gz", like=volume)) > 0.95


def test_file_is_read_once_for_many_structures(real_ct, volume, reads):
    source = MultilabelFileSource(real_ct / SEG_ML)
    for organ in ORGANS:
        source.get_mask(volume, organ)
    source.get_masks(volume, ["liver", "lung_left", "right lung lower lobe"])
    assert reads == [str(real_ct / SEG_ML)]


def test_lru_cache_evicts_and_rereads_changed_files(tmp_path, real_ct, volume, reads):
    first, second = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    shutil.copy(real_ct / SEG_ML, first)
    shutil.copy(real_ct / SEG_ML, second)
    one = MultilabelFileSource(first, cache_size=1)
    other = MultilabelFileSource(second, cache_size=1)
    one.get_mask(volume, "liver")
    one.get_mask(volume, "spleen")
    assert len(reads) == 1
    other.get_mask(volume, "liver")
    assert len(reads) == 2  # separate caches
    stat = first.stat()
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed on disk
    one.get_mask(volume, "liver")
    assert len(reads) == 3


def test_names_from_other_vocabularies_and_unions(real_ct, volume):
    source = get_mask_source("multilabel", path_or_pattern=real_ct / SEG_ML)
    by_radgenome = source.get_mask(volume, "lung/lung/right lung/right lung lower lobe")
    assert by_radgenome.resolved_name == "lung_lower_lobe_right"
    left = source.get_mask(volume, "lung_left")
    assert left.components == ("lung_upper_lobe_left", "lung_lower_lobe_left")
    expected = load_mask(real_ct / SEG_ML, like=volume, label="lung_upper_lobe_left") | load_mask(
        real_ct / SEG_ML, like=volume, label="lung_lower_lobe_left"
    )
    assert np.array_equal(left.mask, expected)


def test_known_label_absent_from_the_scan_is_empty(real_ct, volume):
    result = MultilabelFileSource(real_ct / SEG_ML).get_mask(volume, "heart")  # no heart in this abdominal crop
    assert result.empty and result.resolved_name == "heart"


def test_unknown_name_raises_with_close_matches(real_ct, volume):
    with pytest.raises(UnknownStructureError) as info:
        MultilabelFileSource(real_ct / SEG_ML).get_mask(volume, "livr")
    assert "liver" in info.value.matches and str(real_ct / SEG_ML) in str(info.value)


def test_custom_label_map_overrides_the_header(real_ct, volume):
    source = MultilabelFileSource(real_ct / SEG_ML, label_map={5: "leber", 1: "milz"}, naming=None)
    assert np.array_equal(source.get_mask(volume, "leber").mask, load_mask(real_ct / SEG_ML, like=volume, label=5))
    with pytest.raises(UnknownStructureError):
        source.get_mask(volume, "liver")


def test_pattern_with_volume_id(tmp_path, real_ct, volume):
    shutil.copy(real_ct / SEG_ML, tmp_path / "example_ct_sm.nii.gz")
    source = MultilabelFileSource(str(tmp_path / "{volume_id}.nii.gz"))
    assert source.get_mask(volume, "liver").path == str(tmp_path / "example_ct_sm.nii.gz")  # from volume.path
    with pytest.raises(CorruptFileError, match="other_ct.nii.gz"):
        source.get_mask(volume, "liver", volume_id="other_ct")


def test_grid_mismatch_raises(tmp_path, real_ct, volume):
    moved = CTVolume(array=volume.array, affine=volume.affine + _shift(2.0), path="moved")
    with pytest.raises(MaskMismatchError, match="affine"):
        MultilabelFileSource(real_ct / SEG_ML).get_mask(moved, "liver")
    small = tmp_path / "small.nii.gz"
    save_nifti(small, np.zeros((3, 4, 5), np.uint8))
    with pytest.raises(MaskMismatchError, match=r"\(3, 4, 5\)"):
        MultilabelFileSource(small).get_mask(volume, "liver")


def test_non_integer_label_map_is_rejected(tmp_path, real_ct, volume):
    image = tmp_path / "image.nii.gz"
    save_nifti(image, volume.array + 0.5, volume.affine, dtype=np.float32)
    with pytest.raises(ValueError, match="non-integer"):
        MultilabelFileSource(image).get_mask(volume, "liver")


def _shift(mm: float) -> np.ndarray:
    shift = np.zeros((4, 4))
    shift[:3, 3] = mm
    return shift
