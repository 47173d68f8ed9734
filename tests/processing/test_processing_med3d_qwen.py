"""Tests for Med3DQwenImageProcessor and Med3DQwenProcessor (and the processor + tiny model end to end)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from tiny_models import tiny_config
from transformers import AutoProcessor

import med3dqwen  # noqa: F401  (registers the Auto classes)
from med3dqwen import Med3DQwenForConditionalGeneration
from med3dqwen.io import save_nifti
from med3dqwen.processing.ct_io import CTInputError, standard_affine
from med3dqwen.processing.image_processing_med3d_qwen import Med3DQwenImageProcessor
from med3dqwen.processing.processing_med3d_qwen import IMAGE_BLOCK, Med3DQwenProcessor
from med3dqwen.processing.tokenization_med3d_qwen import load_qwen2_5_tokenizer


SIZE = (16, 32, 32)
IMAGE_ID, SLICE_ID = 151655, 151654


@pytest.fixture(scope="module")
def tokenizer():
    return load_qwen2_5_tokenizer()


@pytest.fixture(scope="module")
def processor(tokenizer):
    image_processor = Med3DQwenImageProcessor(volume_size=SIZE, contour_thickness=1)
    return Med3DQwenProcessor(image_processor, tokenizer, num_visual_tokens=6, num_slice_tokens=2)


@pytest.fixture
def case(tmp_path):
    """A (20, 40, 36) HU volume with a box ROI, saved as NIfTI."""
    hu = np.full((20, 40, 36), -1000.0, dtype=np.float32)
    hu[4:16, 8:32, 6:30] = 40.0
    mask = np.zeros(hu.shape, dtype=bool)
    mask[5:15, 10:30, 8:28] = True
    affine = standard_affine((2.0, 1.0, 1.0))
    save_nifti(tmp_path / "ct.nii.gz", hu.astype(np.int16), affine)
    save_nifti(tmp_path / "roi.nii.gz", mask, affine)
    return hu, mask, tmp_path / "ct.nii.gz", tmp_path / "roi.nii.gz"


def messages(question: str = "Is there a nodule?", answer: str | None = "Yes.") -> list[dict]:
    turns = [
        {"role": "system", "content": "You are a radiology assistant."},
        {"role": "user", "content": question},
        {"role": "vision", "content": "nifti:ct.nii.gz; prompt_png:[]"},
    ]
    return turns + ([{"role": "assistant", "content": answer}] if answer else [])


# ---------------------------------------------------------------------------------------------------------------
# Image processor
# ---------------------------------------------------------------------------------------------------------------


def test_image_processor_from_files_draws_the_prompt(case):
    hu, mask, ct_path, roi_path = case
    out = Med3DQwenImageProcessor(volume_size=SIZE, contour_thickness=1)(ct_path, roi_path, return_prompt_info=True)
    pixels = out["pixel_values"]
    assert pixels.shape == (1, 1, *SIZE) and pixels.dtype == torch.float32
    assert 0.0 <= float(pixels.min()) and float(pixels.max()) == 1.0
    assert 0.0 < float(out["covered_fraction"][0]) < 1.0 and not bool(out["roi_empty"][0])
    # Same thing from arrays: the contour is drawn after resizing, on the resized mask.
    same = Med3DQwenImageProcessor(volume_size=SIZE, contour_thickness=1)(hu, mask, layout="DHW")
    torch.testing.assert_close(same["pixel_values"], pixels)


def test_image_processor_without_mask_is_the_windowed_volume(case):
    hu, _, ct_path, _ = case
    out = Med3DQwenImageProcessor(volume_size=SIZE)(ct_path, return_prompt_info=True)
    assert bool(out["roi_empty"][0]) and float(out["covered_fraction"][0]) == 0.0
    assert float(out["pixel_values"].max()) == pytest.approx((40 + 1000) / 1200, abs=1e-4)


def test_image_processor_encodings(case):
    hu, mask, _, _ = case
    channel = Med3DQwenImageProcessor(volume_size=SIZE, prompt_encoding="channel")(hu, mask, layout="DHW")
    channel = channel["pixel_values"]
    assert channel.shape == (1, 2, *SIZE)
    assert set(torch.unique(channel[0, 1]).tolist()) == {0.0, 1.0}
    rgb = Med3DQwenImageProcessor(volume_size=SIZE, prompt_encoding="rgb", prompt_color="blue")(hu, mask, layout="DHW")
    band = rgb["pixel_values"][0, 2] == 1.0
    assert band.any() and bool((rgb["pixel_values"][0, 0][band] <= 1.0).all())


def test_image_processor_batch_and_numpy_output(case):
    hu, mask, ct_path, roi_path = case
    out = Med3DQwenImageProcessor(volume_size=SIZE)(
        [ct_path, hu], [roi_path, None], return_tensors="np", layout=[None, "DHW"], return_prompt_info=True
    )
    assert out["pixel_values"].shape == (2, 1, *SIZE) and isinstance(out["pixel_values"], np.ndarray)
    assert out["roi_empty"].tolist() == [False, True]


def test_image_processor_bad_input(case, tmp_path):
    hu, mask, ct_path, _ = case
    processor = Med3DQwenImageProcessor(volume_size=SIZE)
    with pytest.raises(ValueError, match="2 volumes but 1 masks"):
        processor([hu, hu], [mask], layout="DHW")
    with pytest.raises(CTInputError, match="differs"):
        processor(hu, mask[:, :10], layout="DHW")
    with pytest.raises(CTInputError, match="mask affine differs"):
        processor(hu, tmp_path / "roi.nii.gz", layout="DHW")  # the array's standard 1 mm grid is not the file's
    with pytest.raises(CTInputError, match="file not found"):
        processor(tmp_path / "missing.nii.gz")
    with pytest.raises(ValueError, match="prompt_encoding"):
        Med3DQwenImageProcessor(prompt_encoding="overlay")
    for window, match in (([200, -1000], "low < high"), ([float("-inf"), 200], "finite")):
        with pytest.raises(ValueError, match=match):
            Med3DQwenImageProcessor(window=window)


# ---------------------------------------------------------------------------------------------------------------
# Processor
# ---------------------------------------------------------------------------------------------------------------


def test_chat_template_puts_the_volume_before_the_question(processor):
    prompt = processor.apply_chat_template(messages(answer=None), add_generation_prompt=True, tokenize=False)
    assert prompt == (
        "<|im_start|>system\nYou are a radiology assistant.<|im_end|>\n"
        f"<|im_start|>user\n{IMAGE_BLOCK}Is there a nodule?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    full = processor.apply_chat_template(messages(), tokenize=False)
    assert full.endswith("<|im_start|>assistant\nYes.<|im_end|>\n") and "nifti:" not in full
    content_list = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where?"}]}]
    rendered = processor.apply_chat_template(content_list, tokenize=False)
    assert f"<|im_start|>user\n{IMAGE_BLOCK}Where?<|im_end|>" in rendered


def test_image_placeholder_expansion_and_batch_padding(processor, case):
    _, mask, ct_path, roi_path = case
    prompts = [
        processor.apply_chat_template(messages(q, None), add_generation_prompt=True, tokenize=False)
        for q in ("Is there a nodule?", "What abnormalities are seen in the left lung?")
    ]
    batch = processor(volumes=[ct_path, ct_path], masks=[roi_path, None], text=prompts, padding=True,
                      padding_side="left", return_prompt_info=True)  # fmt: skip
    ids = batch["input_ids"]
    assert batch["pixel_values"].shape == (2, 1, *SIZE)
    assert ((ids == IMAGE_ID).sum(dim=1) == 6).all() and ((ids == SLICE_ID).sum(dim=1) == 2).all()
    assert (batch["attention_mask"][:, -1] == 1).all() and batch["attention_mask"][0, 0] == 0  # left padded
    row = ids[1].tolist()
    start = row.index(151652)
    assert row[start + 1 : start + 9] == [IMAGE_ID] * 6 + [SLICE_ID] * 2 and row[start + 9] == 151653
    assert batch["roi_empty"].tolist() == [False, True]


def test_processor_counts_image_blocks_against_volumes(processor, case):
    _, _, ct_path, _ = case
    with pytest.raises(ValueError, match="1 image block.*2 volume"):
        processor(volumes=[ct_path, ct_path], text=f"{IMAGE_BLOCK}Question?")
    with pytest.raises(ValueError, match="0 volume"):
        processor(text=f"{IMAGE_BLOCK}Question?")
    with pytest.raises(ValueError, match="outside"):
        processor(text="<|image_pad|> stray")
    text_only = processor(text="Hello")
    assert "pixel_values" not in text_only and text_only["input_ids"].shape[0] == 1


def test_processor_save_and_reload(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(reloaded, Med3DQwenProcessor)
    assert isinstance(reloaded.image_processor, Med3DQwenImageProcessor)
    assert reloaded.num_visual_tokens == 6 and reloaded.num_slice_tokens == 2
    assert reloaded.image_processor.volume_size == list(SIZE)
    assert reloaded.image_processor.contour_thickness == 1
    text = f"{IMAGE_BLOCK}Is there a nodule?"
    assert (
        reloaded.tokenizer(reloaded.expand_image_tokens(text))["input_ids"]
        == processor.tokenizer(processor.expand_image_tokens(text))["input_ids"]
    )
    assert reloaded.chat_template == processor.chat_template


# ---------------------------------------------------------------------------------------------------------------
# Processor + model, end to end
# ---------------------------------------------------------------------------------------------------------------


def test_processor_and_tiny_model_generate(tokenizer, case):
    _, _, ct_path, roi_path = case
    config = tiny_config()
    processor = Med3DQwenProcessor.from_config(config, tokenizer=tokenizer)
    torch.manual_seed(0)
    model = Med3DQwenForConditionalGeneration(config).eval()
    prompt = processor.apply_chat_template(messages(answer=None), add_generation_prompt=True, tokenize=False)
    inputs = processor(volumes=[ct_path], masks=[roi_path], text=[prompt])
    assert inputs["pixel_values"].shape == (1, 1, 64, 64, 64)
    out = model.generate(**{k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")},
                         max_new_tokens=4, do_sample=False)  # fmt: skip
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)
    assert isinstance(processor.batch_decode(out[:, inputs["input_ids"].shape[1] :])[0], str)
    # The contour in the image reaches the model: a volume without it gives other visual features.
    without = processor(volumes=[ct_path], text=[prompt])
    assert not torch.equal(model.get_image_features(inputs["pixel_values"]).pooler_output,
                           model.get_image_features(without["pixel_values"]).pooler_output)  # fmt: skip


@pytest.mark.slow
def test_processor_remote_code_load_without_the_package(processor, tmp_path):
    processor.save_pretrained(tmp_path / "proc")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["med3dqwen"] = None  # any import of our package fails
        import numpy as np
        from transformers import AutoProcessor
        proc = AutoProcessor.from_pretrained({str(tmp_path / "proc")!r}, trust_remote_code=True)
        assert type(proc).__name__ == "Med3DQwenProcessor", type(proc)
        hu = np.full((8, 16, 16), -1000.0, dtype=np.float32)
        mask = np.zeros(hu.shape, bool)
        mask[2:6, 4:12, 4:12] = True
        out = proc(volumes=[hu], masks=[mask], layout="DHW",
                   text=["<|vision_start|><|image_pad|><|vision_end|>Is it there?"])
        assert tuple(out["pixel_values"].shape) == (1, 1, 16, 32, 32), out["pixel_values"].shape
        assert int((out["input_ids"] == 151655).sum()) == 6
        print("remote-processor OK")
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote-processor OK" in result.stdout


def test_unit_intensity_volumes_skip_the_hu_window(tmp_path):
    """M3D-VQA volumes ((1, D, H, W) .npy in [0, 1]) and PMC-VQA figures are not HU."""
    rng = np.random.default_rng(0)
    unit = rng.uniform(0.0, 1.0, size=(1, 8, 16, 16)).astype(np.float32)
    np.save(tmp_path / "m3d.npy", unit)
    processor = Med3DQwenImageProcessor(volume_size=(8, 16, 16))
    as_unit = processor(tmp_path / "m3d.npy", intensity="unit", return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(as_unit[0, 0], unit[0], atol=1e-6)  # no window: values kept
    with pytest.warns(UserWarning, match=r"m3d\.npy: values lie in \[0, 1\] but are windowed as HU"):
        as_hu = processor(tmp_path / "m3d.npy", return_tensors="np")["pixel_values"]
    assert as_hu.max() < 0.85  # [0, 1] read as HU lands in a narrow band of the chest window
    from PIL import Image

    figure = (rng.uniform(0, 255, size=(16, 16, 3))).astype(np.uint8)
    Image.fromarray(figure).save(tmp_path / "fig.png")
    with pytest.warns(UserWarning, match=r"fig\.png: a single slice"):
        out = processor(tmp_path / "fig.png", return_tensors="np")["pixel_values"]  # figures say "unit" themselves
    grey = np.asarray(Image.fromarray(figure).convert("L"), dtype=np.float32) / 255.0
    np.testing.assert_allclose(out[0, 0, 3], grey, atol=1e-6)  # one slice repeated along the depth
    with pytest.raises(ValueError, match="intensity"):
        processor(tmp_path / "m3d.npy", intensity="raw")


def test_rescale_is_applied_before_the_window(case):
    hu, _, _, _ = case
    raw = hu + 1024.0  # a CT-RATE volume without its header rescale
    processor = Med3DQwenImageProcessor(volume_size=SIZE)
    expected = processor(hu, return_tensors="np", layout="DHW")["pixel_values"]
    fixed = processor([raw, raw], rescale=[(1.0, -1024.0)] * 2, return_tensors="np", layout="DHW")["pixel_values"]
    np.testing.assert_allclose(fixed[0], expected[0], atol=1e-6)
    np.testing.assert_allclose(
        processor(raw, rescale=(1, -1024), return_tensors="np", layout="DHW")["pixel_values"], expected
    )
    with pytest.raises(ValueError, match="2 volumes but 3 rescale"):
        processor([raw, raw], rescale=[(1, 0)] * 3, layout="DHW")


def test_image_processor_takes_bfloat16_and_soft_masks_and_refuses_nan_rescale(case):
    """bf16 tensors used to crash in Tensor.numpy(); a 0.7 soft mask vanished after resizing."""
    hu, mask, _, _ = case
    processor = Med3DQwenImageProcessor(volume_size=SIZE)
    kwargs = {"return_tensors": "np", "layout": "DHW", "return_prompt_info": True}
    bf16 = torch.from_numpy(hu).to(torch.bfloat16)
    expected = processor(bf16.float().numpy(), mask, **kwargs)
    out = processor(bf16, torch.from_numpy(mask).to(torch.bfloat16), **kwargs)
    np.testing.assert_array_equal(out["pixel_values"], expected["pixel_values"])
    soft = processor(hu, mask * np.float32(0.7), **kwargs)
    np.testing.assert_array_equal(soft["pixel_values"], processor(hu, mask, **kwargs)["pixel_values"])
    assert not soft["roi_empty"][0]
    assert processor(hu, mask * np.float32(0.3), **kwargs)["roi_empty"][0]
    with pytest.raises(CTInputError, match="NaN or infinite"):
        processor(hu, rescale=(float("nan"), 0.0), layout="DHW")


# ---------------------------------------------------------------------------------------------------------------
# Files are read the fast way (stored integers, picked mask voxels) and give what the plain steps give
# ---------------------------------------------------------------------------------------------------------------


def _save_stored(path, canonical: np.ndarray, axes: tuple[int, int, int], flips: tuple[int, ...]) -> None:
    """Write canonical (D, H, W) data stored as ``canonical.transpose(axes)`` with ``flips`` of the stored axes,
    with the affine that says so (what a scanner's own storage order looks like to the loader)."""
    import nibabel as nib

    stored = canonical.transpose(axes)
    index_map = np.zeros((4, 4))  # stored index -> canonical index
    index_map[3, 3] = 1.0
    for axis, source in enumerate(axes):
        if axis in flips:
            index_map[source, axis], index_map[source, 3] = -1.0, stored.shape[axis] - 1
        else:
            index_map[source, axis] = 1.0
    stored = stored[tuple(slice(None, None, -1) if axis in flips else slice(None) for axis in range(3))]
    affine = standard_affine((2.0, 0.8, 0.8)) @ index_map
    nib.save(nib.Nifti1Image(np.ascontiguousarray(stored), affine), path)


@pytest.mark.parametrize(
    ("axes", "flips"),
    [((0, 1, 2), ()), ((2, 1, 0), (0, 1)), ((2, 1, 0), ()), ((1, 2, 0), (2,)), ((0, 2, 1), (0, 1, 2))],
)
def test_files_in_any_storage_order_give_the_plain_steps_result(tmp_path, axes, flips):
    """The processor windows the stored integers in place and picks only the mask's model-grid voxels; the result
    equals loading, windowing and resizing the canonical arrays (volume to float rounding, mask exactly)."""
    from med3dqwen.processing.ct_io import load_mask, load_volume
    from med3dqwen.processing.ct_transforms import resize_mask, resize_volume, window_hu

    rng = np.random.default_rng(4)
    hu = rng.integers(-1200, 600, size=(14, 24, 20)).astype(np.int16)
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[3:11, 5:19, 4:15] = 1
    labels[6:9, 9:14, 6:10] = 2
    _save_stored(tmp_path / "ct.nii.gz", hu, axes, flips)
    _save_stored(tmp_path / "roi.nii.gz", labels, axes, flips)
    volume = load_volume(tmp_path / "ct.nii.gz")
    np.testing.assert_array_equal(volume.array, hu)  # the storage order is undone by the loader
    processor = Med3DQwenImageProcessor(volume_size=(7, 12, 10), window="abdomen")
    for label in (1, 2):
        image, roi = processor.model_grid(tmp_path / "ct.nii.gz", tmp_path / "roi.nii.gz", label=label)
        expected_image = resize_volume(window_hu(volume.array, "abdomen"), (7, 12, 10))
        expected_roi = resize_mask(load_mask(tmp_path / "roi.nii.gz", like=volume, label=label), (7, 12, 10))
        np.testing.assert_allclose(image, expected_image, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(roi, expected_roi)
        np.testing.assert_array_equal(processor.model_grid_mask(tmp_path / "roi.nii.gz", volume, label=label), roi)


def test_a_multilabel_file_read_as_binary_is_refused_where_the_grid_never_samples(tmp_path):
    """Only the model grid's voxels of a mask are picked, but the whole map is checked: a second label in a voxel
    no output reads still makes ``label=None`` an error, not a silent binary mask."""
    from med3dqwen.processing.ct_io import UnknownLabelError

    hu = np.full((8, 16, 16), -1000, dtype=np.int16)
    mask = np.zeros(hu.shape, dtype=np.uint8)
    mask[2:6, 4:12, 4:12] = 1
    mask[0, 0, 0] = 2  # (8, 16, 16) -> (4, 8, 8) picks odd in-plane indices: never this voxel
    save_nifti(tmp_path / "ct.nii.gz", hu)
    save_nifti(tmp_path / "roi.nii.gz", mask)
    processor = Med3DQwenImageProcessor(volume_size=(4, 8, 8))
    with pytest.raises(UnknownLabelError, match=r"roi\.nii\.gz.*multilabel mask \(labels \[1, 2\]"):
        processor(tmp_path / "ct.nii.gz", tmp_path / "roi.nii.gz")
    _, roi = processor.model_grid(tmp_path / "ct.nii.gz", tmp_path / "roi.nii.gz", label=1)
    assert roi.sum() == 2 * 4 * 4
    for value in (255, True):  # 0/255 and bool masks are binary
        save_nifti(tmp_path / "binary.nii.gz", (mask == 1) * np.uint8(value) if value is not True else mask == 1)
        _, binary = processor.model_grid(tmp_path / "ct.nii.gz", tmp_path / "binary.nii.gz")
        np.testing.assert_array_equal(binary, roi)


@pytest.mark.parametrize("stored", ["uint16", "int16"])
def test_header_scaled_files_are_windowed_from_their_raw_integers(tmp_path, stored):
    """dcm2niix writes the scanner's raw values with scl_slope / scl_inter; they used to be expanded to float32 HU
    first. Now the raw integers are read in place and the scaling is folded into the window: the same input."""
    import nibabel as nib

    from med3dqwen.processing.ct_io import load_volume
    from med3dqwen.processing.ct_transforms import resize_volume, window_hu

    rng = np.random.default_rng(2)
    hu = rng.integers(-1024, 2500, size=(14, 24, 20)).astype(np.int16)
    slope, intercept = (1.0, -1024.0) if stored == "uint16" else (2.0, -1000.0)
    raw = ((hu.astype(np.float64) - intercept) / slope).round().astype(stored)
    image = nib.Nifti1Image(np.ascontiguousarray(raw.transpose(2, 1, 0)[::-1, ::-1]), np.diag([0.8, 0.8, 2.0, 1.0]))
    image.header.set_slope_inter(slope, intercept)
    nib.save(image, tmp_path / "scaled.nii.gz")
    as_hu = load_volume(tmp_path / "scaled.nii.gz")  # the default: float32 HU, as before
    stored_view = load_volume(tmp_path / "scaled.nii.gz", stored_integers=True)
    assert as_hu.array.dtype == np.float32 and stored_view.array.dtype == np.dtype(stored)
    assert stored_view.meta["stored_scale"] == (slope, intercept)
    np.testing.assert_array_equal(stored_view.array * np.float32(slope) + np.float32(intercept), as_hu.array)
    processor = Med3DQwenImageProcessor(volume_size=(7, 12, 10))
    for rescale in (None, (1.0, -24.0)):  # a record's rescale applies on top of the header's
        image_grid, _ = processor.model_grid(tmp_path / "scaled.nii.gz", rescale=rescale)
        values = as_hu.array if rescale is None else as_hu.array * np.float32(rescale[0]) + np.float32(rescale[1])
        expected = resize_volume(window_hu(values, "chest"), (7, 12, 10))
        np.testing.assert_allclose(image_grid, expected, rtol=0, atol=1e-5)


def test_file_backed_nibabel_images_are_read_from_their_file(tmp_path):
    """datasets' Nifti feature decodes to nibabel images loaded from files; they are now read from the file the fast
    way, so a damaged gzip trailer is caught (nibabel's stream stops before it) and the input equals the path's."""
    import nibabel as nib

    from med3dqwen.processing.ct_io import CorruptFileError

    hu = np.random.default_rng(6).integers(-1200, 800, size=(8, 16, 16)).astype(np.int16)
    mask = np.zeros(hu.shape, dtype=np.uint8)
    mask[2:6, 4:12, 4:12] = 1
    save_nifti(tmp_path / "ct.nii.gz", hu)
    save_nifti(tmp_path / "roi.nii.gz", mask)
    processor = Med3DQwenImageProcessor(volume_size=(4, 8, 8))
    from_paths = processor(tmp_path / "ct.nii.gz", tmp_path / "roi.nii.gz", return_tensors="np")["pixel_values"]
    images = nib.load(tmp_path / "ct.nii.gz"), nib.load(tmp_path / "roi.nii.gz")
    np.testing.assert_array_equal(processor(*images, return_tensors="np")["pixel_values"], from_paths)
    in_memory = nib.Nifti1Image(np.asarray(images[0].dataobj), images[0].affine)  # no file behind it: as given
    np.testing.assert_array_equal(processor(in_memory, images[1], return_tensors="np")["pixel_values"], from_paths)
    raw = (tmp_path / "ct.nii.gz").read_bytes()
    (tmp_path / "ct.nii.gz").write_bytes(raw[:-6] + bytes([raw[-6] ^ 1]) + raw[-5:])  # flip a bit of the CRC-32
    damaged = nib.load(tmp_path / "ct.nii.gz")  # nibabel reads the header happily
    with pytest.raises(CorruptFileError, match="CRC check failed"):
        processor(damaged, images[1])
