"""The fast ``.nii.gz`` path: one-shot decompression (ISA-L or the standard library, the same result and the same
errors), the stored integers as a reoriented view, and windowing straight from them — identical to the float32 path."""

import gzip
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from med3dqwen.processing import ct_io
from med3dqwen.processing.ct_io import CorruptFileError, load_label_map, load_volume, to_canonical
from med3dqwen.processing.ct_transforms import window_hu
from med3dqwen.processing.image_processing_med3d_qwen import Med3DQwenImageProcessor


CT_SM = "totalseg_example_ct_sm/example_ct_sm.nii.gz"
LIVER = "totalseg_example_ct_sm/example_seg_roi_subset.nii.gz"
LABELS = "totalseg_example_ct_sm/example_seg.nii.gz"
DICOM_SEG = "totalseg_example_ct_dicom/example_seg_dicom.nii.gz"  # uint8, LAS on disk


def _ras_int16(path: Path, shape=(21, 18, 13), slope=None, inter=None, dtype=np.int16) -> Path:
    data = np.random.default_rng(3).integers(-1024, 2000, size=shape).astype(dtype)
    image = nib.Nifti1Image(data, np.diag([-0.8, 0.7, 1.5, 1.0]))  # L, A, S: flipped and transposed to canonical
    if slope is not None:
        image.header.set_slope_inter(slope, inter)
    nib.save(image, path)
    return path


def _old_read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """How volumes were read before: nibabel's proxy scaled to float32, reoriented to a contiguous array."""
    image = nib.load(path)
    return to_canonical(np.asarray(image.dataobj, dtype=np.float32), image.affine.astype(np.float64))


@pytest.fixture(params=["isal", "stdlib"])
def decompressor(request, monkeypatch):
    if request.param == "stdlib":
        monkeypatch.setattr(ct_io, "_isal_gzip", None)
    else:
        assert ct_io._isal_gzip is not None, "isal is in install_requires"
    return request.param


@pytest.mark.parametrize("name", [CT_SM, LIVER, LABELS, DICOM_SEG])
def test_real_files_read_as_before_with_either_decompressor(real_ct, name, decompressor):
    path = real_ct / name
    array, affine = _old_read(path)
    volume = load_volume(path)
    assert volume.array.dtype == np.float32 and volume.array.flags.c_contiguous
    assert np.array_equal(volume.array, array) and np.array_equal(volume.affine, affine)
    labels = load_label_map(path)
    assert labels.array.flags.writeable and np.array_equal(labels.array, array.astype(labels.array.dtype))


@pytest.mark.parametrize(("slope", "inter"), [(None, None), (2.0, -1024.0)])
def test_synthetic_files_scaled_or_not_read_as_before(tmp_path, decompressor, slope, inter):
    path = _ras_int16(tmp_path / "v.nii.gz", slope=slope, inter=inter)
    array, affine = _old_read(path)
    assert np.array_equal(load_volume(path).array, array)
    stored = load_volume(path, stored_integers=True)
    assert np.array_equal(stored.affine, affine)
    # the stored int16, a read-only reoriented view: no float32 copy, no contiguous copy
    assert stored.array.dtype == np.int16 and not stored.array.flags.writeable
    assert not stored.array.flags.c_contiguous
    if slope is None:  # the HU themselves
        assert "stored_scale" not in stored.meta
        assert np.array_equal(stored.array.astype(np.float32), array)
    else:  # the raw values; HU after the header's scaling, which the reader applies (the processor: in its window)
        assert stored.meta["stored_scale"] == (slope, inter)
        assert np.array_equal(stored.array * np.float32(slope) + np.float32(inter), array)
    as_hu = stored.to_hu()  # HU for readers that need values, not a window (segmenters)
    assert np.array_equal(as_hu.array, array) and "stored_scale" not in as_hu.meta
    assert (as_hu is stored) is (slope is None)  # nothing to apply: the same volume, no copy
    big_endian = _ras_int16(tmp_path / "be.nii.gz", dtype=np.dtype(">i2"))
    assert np.array_equal(load_volume(big_endian, stored_integers=True).array, _old_read(big_endian)[0])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: raw[: len(raw) // 2], "EOFError"),
        (lambda raw: raw[:-6] + bytes([raw[-6] ^ 1]) + raw[-5:], "CRC check failed"),  # CRC-32 trailer
        (lambda raw: raw[:-3] + bytes([raw[-3] ^ 1]) + raw[-2:], "Incorrect length"),  # ISIZE trailer
        (lambda raw: b"\x1f\x8b" + bytes(64), "cannot read NIfTI"),
    ],
)
def test_damaged_files_are_the_same_named_error_with_either_decompressor(tmp_path, decompressor, damage, message):
    path = _ras_int16(tmp_path / "v.nii.gz")
    path.write_bytes(damage(path.read_bytes()))
    for load in (load_volume, load_label_map):
        with pytest.raises(CorruptFileError, match=message) as caught:
            load(path)
        assert str(path) in str(caught.value)


def test_gunzip_reads_every_member(tmp_path, decompressor):
    path = tmp_path / "two.gz"
    path.write_bytes(gzip.compress(b"abc") + gzip.compress(b"def"))
    assert ct_io.gunzip(path) == b"abcdef"


def test_window_hu_reads_a_strided_integer_view_in_place_with_the_same_values():
    stored = np.random.default_rng(0).integers(-2000, 3000, size=(13, 30, 41)).astype(np.int16)
    view = stored.transpose(2, 1, 0)[:, ::-1, ::-1]  # a reoriented view, as load_volume(stored_integers=True) gives
    expected = window_hu(np.ascontiguousarray(view).astype(np.float32), "chest")
    assert np.array_equal(window_hu(view, "chest"), expected)
    # read in place: the peak of new memory is the float32 output, no contiguous copy of the int16 view besides it
    big = np.zeros((256, 128, 64), dtype=np.int16).transpose(2, 1, 0)[:, ::-1, ::-1]
    tracemalloc.start()
    try:
        window_hu(big, "chest")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < big.size * 4 + big.size * 2 // 4, peak  # output (4 B/voxel) + far less than a 2 B/voxel copy
    floats = view.astype(np.float32)[::-1]
    floats[3, 2, 1] = np.inf
    with pytest.raises(ValueError, match="1 of .* NaN or infinite"):
        window_hu(floats)


def test_the_image_processor_gives_the_same_pixels_from_the_stored_integers(real_ct, decompressor):
    # The path input now windows the stored int16 view; a float32 CTVolume goes the former way.
    processor = Med3DQwenImageProcessor(volume_size=(24, 64, 80))
    volume, mask = real_ct / CT_SM, real_ct / LIVER
    former = load_volume(volume)
    assert former.array.dtype == np.float32
    fast = processor([volume], [mask], return_tensors="np", return_prompt_info=True)
    slow = processor([former], [load_volume(mask).array.astype(bool)], layout="DHW", return_tensors="np")
    assert np.array_equal(fast["pixel_values"], slow["pixel_values"])
    assert fast["covered_fraction"][0] > 0
    image, roi = processor.model_grid(volume, mask)
    assert np.array_equal(processor.draw_prompt(image, roi).pixel_values, fast["pixel_values"][0])
    assert np.array_equal(processor.model_grid_mask(mask, former), roi)
