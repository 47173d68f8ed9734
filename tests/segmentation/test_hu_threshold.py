"""HUThresholdSource on the phantom (against its own masks) and on the real TotalSegmentator fixture.

Measured (this commit): phantom (64, 128, 128), default config, seeds 0-5: lung Dice 0.946-0.999 (left) and
0.902-0.999 (right) against the phantom's lung masks, which include pleural effusions that no HU threshold calls lung;
0.975-0.999 against the lungs without effusion voxels; without effusions 0.974-0.999. Real fixture
(``example_ct_sm``, lung bases at 3 mm): Dice 0.960 against the union of TotalSegmentator's ``--fast`` lobes
(left 0.959, right 0.961); bone: 94.5 % of the > 250 HU voxels lie in TotalSegmentator's vertebrae or ribs, which in
turn are only 26 % covered (their cancellous interior is below 250 HU at this resolution).

Speed at the model input size is measured by ``bench/bench_hu_threshold.py`` (BENCHMARKS.md), not asserted here.
"""

from pathlib import Path

import numpy as np
import pytest

from med3dqwen.builders.phantom import PhantomConfig, generate_phantom
from med3dqwen.processing.ct_io import CTVolume, load_mask, load_volume
from med3dqwen.segmentation import HUThresholdSource, UnknownStructureError


CT_SM = "totalseg_example_ct_sm/example_ct_sm.nii.gz"
SEG_FAST = "totalseg_example_ct_sm/example_seg_fast"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


def phantom_volume(seed: int, **config):
    phantom = generate_phantom(seed, PhantomConfig(shape=(64, 128, 128), **config))
    return phantom, CTVolume.from_array(phantom.volume, affine=phantom.affine)


@pytest.fixture(scope="module")
def source():
    return HUThresholdSource()


@pytest.mark.parametrize("seed", range(6))
def test_phantom_lungs_left_right_and_body(source, seed):
    phantom, volume = phantom_volume(seed)
    masks = source.segment(volume)
    effusion = np.zeros(volume.shape, dtype=bool)
    for finding, lesion in zip(phantom.findings, phantom.lesion_masks, strict=True):
        if finding.kind == "effusion":
            effusion |= lesion
    for side in ("lung_left", "lung_right"):
        truth = phantom.masks[side]
        assert dice(masks[side], truth & ~effusion) > 0.95, side
        assert dice(masks[side], truth) > 0.9, side
    # Not swapped: each predicted lung overlaps the phantom's other lung hardly at all.
    assert dice(masks["lung_left"], phantom.masks["lung_right"]) < 0.05
    assert dice(masks["lung_right"], phantom.masks["lung_left"]) < 0.05
    # Patient right is at small w in the (D, H, W) layout.
    w = np.arange(volume.shape[2])
    assert (masks["lung_right"].sum(axis=(0, 1)) @ w) / masks["lung_right"].sum() < volume.shape[2] / 2
    assert (masks["lung_left"].sum(axis=(0, 1)) @ w) / masks["lung_left"].sum() > volume.shape[2] / 2
    assert not (masks["lung"] & ~masks["body"]).any()  # body contains the lungs
    assert dice(masks["body"], phantom.masks["body"]) > 0.99


@pytest.mark.parametrize("seed", range(4))
def test_phantom_lungs_without_effusions(source, seed):
    phantom, volume = phantom_volume(seed, effusion_probability=0.0)
    results = source.get_masks(volume, ["lung_left", "lung_right"])
    for side, result in results.items():
        assert result.source == "hu_threshold" and result.resolved_name == side
        assert dice(result.mask, phantom.masks[side]) > 0.95


@pytest.mark.parametrize("seed", range(3))
def test_phantom_airway_is_the_trachea_lumen_outside_the_lungs(source, seed):
    phantom, volume = phantom_volume(seed)
    masks = source.segment(volume, {"airway", "lung"})
    lumen = phantom.masks["trachea"] & (phantom.volume < -400)
    assert np.count_nonzero(masks["airway"] & lumen) > 0.95 * np.count_nonzero(lumen)
    assert not (masks["airway"] & masks["lung"]).any()
    assert not (masks["airway"] & (phantom.masks["lung_left"] | phantom.masks["lung_right"])).any()
    # What is not trachea is the (unlabelled) main bronchi: mostly within the trachea mask.
    assert np.count_nonzero(masks["airway"] & phantom.masks["trachea"]) > 0.8 * np.count_nonzero(masks["airway"])


def test_phantom_bone(source):
    phantom, volume = phantom_volume(0)
    bone = source.get_mask(volume, "bone").mask
    skeleton = phantom.masks["vertebrae"] | phantom.masks["ribs"] | phantom.masks["sternum"]
    assert np.count_nonzero(bone & skeleton) > 0.99 * np.count_nonzero(bone)
    assert np.count_nonzero(bone & skeleton) > 0.5 * np.count_nonzero(skeleton)


def test_real_lung_bases_bone_and_no_airway(source, real_ct: Path):
    volume = load_volume(real_ct / CT_SM)
    masks = source.segment(volume)

    def fast(*names: str) -> np.ndarray:
        return np.logical_or.reduce([load_mask(real_ct / SEG_FAST / f"{name}.nii.gz", like=volume) for name in names])

    left = fast("lung_upper_lobe_left", "lung_lower_lobe_left")
    right = fast("lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right")
    assert dice(masks["lung"], left | right) > 0.93
    assert dice(masks["lung_left"], left) > 0.93 and dice(masks["lung_right"], right) > 0.93
    assert not masks["airway"].any()  # the crop holds no trachea; bowel gas and the table gap are not airway
    ribs_vertebrae = fast(
        *(p.name[:-7] for p in (real_ct / SEG_FAST).glob("*.nii.gz") if p.name.startswith(("rib_", "vertebrae_")))
    )
    overlap = np.count_nonzero(masks["bone"] & ribs_vertebrae)
    assert overlap > 0.9 * np.count_nonzero(masks["bone"])
    assert overlap > 0.2 * np.count_nonzero(ribs_vertebrae)
    assert not (masks["lung"] & ~masks["body"]).any()


@pytest.mark.parametrize(
    ("name", "resolved"),
    [
        ("left lung", "lung_left"),
        ("Lung_Right", "lung_right"),
        ("trachea", "airway"),
        ("Windpipe", "airway"),
        ("trachea and bronchie", "airway"),
        ("lung", "lung"),
        ("body", "body"),
    ],
)
def test_names(source, name, resolved):
    assert source.resolve_name(name) == resolved


def test_unknown_structure(source):
    _, volume = phantom_volume(0)
    with pytest.raises(UnknownStructureError, match="'liver'.*HU thresholds give only"):
        source.get_mask(volume, "liver")


def test_segment_rejects_names_it_does_not_compute(source):
    _, volume = phantom_volume(0)
    with pytest.raises(ValueError, match="heart"):
        source.segment(volume, {"lung", "heart"})


def test_air_only_volume_gives_empty_masks(source):
    volume = CTVolume.from_array(np.full((8, 16, 16), -1000.0, np.float32))
    for name, result in source.get_masks(volume, ["body", "lung_left", "airway", "bone"]).items():
        assert result.empty and result.mask.shape == (8, 16, 16), name


def test_raw_integers_of_a_header_scaled_file_are_segmented_in_hu(source, tmp_path):
    """A volume from ``load_volume(..., stored_integers=True)`` of a scaled file holds raw values; the thresholds
    apply to its HU (``CTVolume.to_hu``), so it segments exactly like the HU volume."""
    import nibabel as nib

    _, volume = phantom_volume(0)
    raw = (np.rint(volume.array) + 1024).astype(np.uint16)  # what a scanner stores, HU = raw - 1024
    image = nib.Nifti1Image(raw, volume.affine)  # the file is read back through its own affine either way
    image.header.set_slope_inter(1.0, -1024.0)
    nib.save(image, tmp_path / "scaled.nii.gz")
    stored = load_volume(tmp_path / "scaled.nii.gz", stored_integers=True)
    assert stored.meta["stored_scale"] == (1.0, -1024.0)
    hu = load_volume(tmp_path / "scaled.nii.gz")
    for name in ("body", "left lung"):
        np.testing.assert_array_equal(source.get_mask(stored, name).mask, source.get_mask(hu, name).mask)
