"""One-call inference (``med3dqwen.predict`` and ``med3dqwen-predict``) on a tiny saved model and phantom volumes.

Covers: the answer and both files (answer.json, overlay_montage.png), the model cache, a region segmented by name, an
empty ROI (warning + no-prompt variant), adapters, the command line, the real CT fixtures, and the bad-input matrix
(one line naming the input, exit status 2).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import save_tiny_model, tiny_config

import med3dqwen.inference as inference
from med3dqwen.builders.phantom import PhantomConfig, generate_phantom
from med3dqwen.inference import PredictError, Prediction, predict
from med3dqwen.modeling.modeling_med3d_qwen import Med3DQwenForConditionalGeneration
from med3dqwen.scripts.predict import cli


ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RED, BLUE = (255, 0, 0), (0, 0, 255)


def save_image(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A tiny saved model and a phantom CT with a liver mask, an empty mask and a multi-label map."""
    base = tmp_path_factory.mktemp("predict")
    phantom = generate_phantom(0, PhantomConfig(shape=(32, 64, 64)))
    affine = phantom.affine
    labels = np.zeros(phantom.volume.shape, dtype=np.uint8)
    labels[phantom.masks["liver"]] = 5  # TotalSegmentator's id of the liver
    labels[phantom.masks["spleen"]] = 1
    files = {
        "model": save_tiny_model(base / "model"),
        "ct": save_image(base / "ct.nii.gz", phantom.volume, affine),
        "liver": save_image(base / "liver.nii.gz", phantom.masks["liver"].astype(np.uint8), affine),
        "empty": save_image(base / "empty.nii.gz", np.zeros(phantom.volume.shape, np.uint8), affine),
        "labels": save_image(base / "labels.nii.gz", labels, affine),
    }
    yield files
    inference.clear_model_cache()


def colour_pixels(path: Path, colour: tuple[int, int, int]) -> int:
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"))
    return int(np.all(rgb == colour, axis=-1).sum())


def test_answer_and_both_files(case, tmp_path):
    out = tmp_path / "out"
    result = predict(case["model"], case["ct"], "Is there a lesion in the liver?", mask=case["liver"], output_dir=out,
                     max_new_tokens=4)  # fmt: skip
    assert isinstance(result, Prediction)
    assert result.rewritten_question == "Inside the red boundary, is there a lesion in the liver?"
    assert result.answer_type == "closed" and result.mask_source == "file" and result.prompt == "red"
    assert set(result.probabilities) == {"no", "yes"} and sum(result.probabilities.values()) == pytest.approx(1.0)
    assert result.closed_answer == max(result.probabilities, key=result.probabilities.get)
    assert 0.0 < result.covered_fraction <= 1.0 and result.num_slices == 64
    assert result.contour_slices and all(0 <= d < 64 for d in result.contour_slices)
    assert {"load_model", "load_volume", "mask", "generate", "overlay", "total"} <= set(result.timings)
    assert result.model == str(case["model"]) and result.adapter is None and result.warnings == []
    on_disk = json.loads((out / "answer.json").read_text())
    assert on_disk == json.loads(json.dumps(result.to_dict()))
    montage = out / "overlay_montage.png"
    assert result.overlay_montage == str(montage) and montage.read_bytes().startswith(PNG_SIGNATURE)
    assert colour_pixels(montage, RED) > 50  # the contour the model saw, in its colour
    assert sorted(p.name for p in out.iterdir()) == ["answer.json", "overlay_montage.png"]  # no temporary files left


def test_the_model_loads_once_per_process(case, monkeypatch):
    inference.clear_model_cache()
    calls = []
    load = Med3DQwenForConditionalGeneration.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        calls.append(args[0])
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(Med3DQwenForConditionalGeneration, "from_pretrained", classmethod(counting))
    first = predict(case["model"], case["ct"], "What is this?", max_new_tokens=2)
    second = predict(str(case["model"]) + "/", case["ct"], "What is this?", max_new_tokens=2)  # the same folder
    assert len(calls) == 1 and len(inference._MODEL_CACHE) == 1
    assert first.answer == second.answer and first.answer_type == "open" and first.probabilities is None
    assert first.prompt == "none" and first.mask_source == "none" and first.covered_fraction is None


def test_threads_get_their_own_answers(case, monkeypatch):
    """Two threads (a web app's requests) on the one cached model: generation runs one at a time, so each closed
    head reading comes from its own prefill, and the answers are those of sequential calls."""
    import threading
    import time

    questions = [("Is the liver normal?", case["liver"]), ("Is the spleen normal?", case["empty"])]
    sequential = [predict(case["model"], case["ct"], q, mask=m, max_new_tokens=2) for q, m in questions]
    model, _ = inference.load_model(str(case["model"]))
    generate, inside, most = model.generate, [0], [0]

    def slow_generate(*args, **kwargs):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.2)  # long enough for the other thread to arrive
        try:
            return generate(*args, **kwargs)
        finally:
            inside[0] -= 1

    monkeypatch.setattr(model, "generate", slow_generate)
    results = [None, None]

    def ask(i):
        results[i] = predict(case["model"], case["ct"], questions[i][0], mask=questions[i][1], max_new_tokens=2)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1
    assert [r.probabilities for r in results] == [r.probabilities for r in sequential]


def test_region_by_name_is_segmented(case, tmp_path):
    result = predict(case["model"], case["ct"], "What is seen in the left lung?", roi="left lung", prompt="blue",
                     output_dir=tmp_path, max_new_tokens=2)  # fmt: skip
    assert result.mask_source == "threshold" and result.roi == "left lung" and result.prompt == "blue"
    assert (
        result.rewritten_question == "Within the blue-outlined area of the CT volume, what is seen in the left lung?"
    )
    assert result.contour_slices and colour_pixels(tmp_path / "overlay_montage.png", BLUE) > 50
    assert colour_pixels(tmp_path / "overlay_montage.png", RED) == 0


def test_a_mask_source_object_with_its_own_names(case):
    """A MaskSource passed as the segmenter serves names outside the vocabulary (a site's own structure names)."""
    from med3dqwen.processing.ct_io import load_mask
    from med3dqwen.segmentation import MaskResult, MaskSource

    class SiteMasks(MaskSource):
        source_name = "site_atlas"

        def get_mask(self, volume, structure, *, volume_id=None):
            mask = load_mask(case["liver"], like=volume)
            return MaskResult(mask=mask, structure=structure, resolved_name="liver", source=self.source_name)

    result = predict(case["model"], case["ct"], "Is it normal?", roi="hepatic zone 7", segmenter=SiteMasks(),
                     max_new_tokens=2)  # fmt: skip
    reference = predict(case["model"], case["ct"], "Is it normal?", mask=case["liver"], max_new_tokens=2)
    assert result.mask_source == "site_atlas" and result.roi == "hepatic zone 7"
    assert result.contour_slices == reference.contour_slices


def test_rgb_encoding_gets_the_prompts_colour(case, tmp_path, monkeypatch):
    """With the rgb encoding the colour reaches the model: a blue prompt is drawn blue into its input."""
    from med3dqwen.evaluation import generation

    save_tiny_model(tmp_path / "rgb", prompt_encoding="rgb")
    seen = []
    generate_batch = generation.generate_batch

    def keep_inputs(*args, **kwargs):
        batch = generate_batch(*args, **kwargs)
        seen.append(batch.pixel_values[0].clone())  # (3, D, H, W)
        return batch

    monkeypatch.setattr(generation, "generate_batch", keep_inputs)
    for colour in ("blue", "red"):
        predict(tmp_path / "rgb", case["ct"], "Is the liver normal?", mask=case["liver"], prompt=colour,
                max_new_tokens=1)  # fmt: skip
    for pixels, channel in zip(seen, (2, 0), strict=True):
        others = [c for c in range(3) if c != channel]
        band = (pixels[channel] == 1) & (pixels[others] == 0).all(dim=0)  # pure colour voxels: the contour
        assert int(band.sum()) > 100
    assert inference.load_model(str(tmp_path / "rgb"))[1].image_processor.prompt_color == "red"  # cached one as it was


def test_label_of_a_multilabel_mask(case):
    by_name = predict(case["model"], case["ct"], "Is the liver normal?", mask=case["labels"], label="liver",
                      max_new_tokens=2)  # fmt: skip
    by_id = predict(
        case["model"], case["ct"], "Is the liver normal?", mask=case["labels"], label="5", max_new_tokens=2
    )
    alone = predict(case["model"], case["ct"], "Is the liver normal?", mask=case["liver"], max_new_tokens=2)
    assert by_name.roi == "liver" and by_name.contour_slices == by_id.contour_slices == alone.contour_slices
    assert by_name.probabilities == pytest.approx(alone.probabilities)


def test_empty_roi_warns_and_asks_without_a_prompt(case, tmp_path):
    with pytest.warns(UserWarning, match="is empty: asked without a boundary prompt"):
        result = predict(case["model"], case["ct"], "Is there a nodule?", mask=case["empty"], output_dir=tmp_path,
                         max_new_tokens=2)  # fmt: skip
    assert result.prompt == "none" and result.rewritten_question == "Is there a nodule?"
    assert result.covered_fraction is None and result.contour_slices == [] and len(result.warnings) == 1
    assert (tmp_path / "answer.json").is_file() and colour_pixels(tmp_path / "overlay_montage.png", RED) == 0


def test_prompt_none_ignores_the_contour(case):
    result = predict(case["model"], case["ct"], "Where is the lesion?", mask=case["liver"], prompt="none",
                     max_new_tokens=2)  # fmt: skip
    assert result.prompt == "none" and result.rewritten_question == "Where is the lesion?" and result.warnings == []


def test_multiple_choice_probabilities(case):
    question = "Which lobe holds the nodule? A. upper B. lower"
    result = predict(case["model"], case["ct"], question, mask=case["liver"], choices=["A. upper", "B. lower"],
                     max_new_tokens=2)  # fmt: skip
    assert set(result.probabilities) == {"A", "B"} and sum(result.probabilities.values()) == pytest.approx(1.0)


def test_adapter_on_its_base(case, tmp_path):
    import peft

    base = Med3DQwenForConditionalGeneration.from_pretrained(case["model"])
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(base, lora).save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(case["model"])
    plain = predict(case["model"], case["ct"], "Is the liver normal?", mask=case["liver"], max_new_tokens=2)
    adapted = predict(case["model"], case["ct"], "Is the liver normal?", mask=case["liver"], max_new_tokens=2,
                      adapter=str(tmp_path / "adapter"))  # fmt: skip
    assert adapted.adapter == str(tmp_path / "adapter")
    assert adapted.probabilities != pytest.approx(plain.probabilities)  # the random LoRA weights change the answer
    on_its_base = predict(None, case["ct"], "Is the liver normal?", mask=case["liver"], max_new_tokens=2,
                          adapter=str(tmp_path / "adapter"))  # fmt: skip
    assert on_its_base.model == str(case["model"]) and on_its_base.probabilities == adapted.probabilities
    with pytest.raises(PredictError, match=r"^model '\(none\)': give a model"):
        predict(None, case["ct"], "Is the liver normal?")


@pytest.mark.slow  # a fresh Python process importing torch and transformers: ~10-20 s
def test_command_line_prints_the_answer_and_writes_both_files(case, tmp_path):
    """The "done when" of the feature: a fresh process, a phantom volume, a tiny saved model."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "med3dqwen.scripts.predict", "--model", str(case["model"]), "--volume", str(case["ct"]),
         "--question", "Is there a lesion in the left lung?", "--roi", "left lung", "--segmenter", "threshold",
         "--output_dir", str(tmp_path / "out"), "--max_new_tokens", "3"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads((tmp_path / "out" / "answer.json").read_text())
    assert f"answer: {answer['answer']}" in done.stdout
    shown = ", ".join(f"{name} {p:.3f}" for name, p in answer["probabilities"].items())
    assert f"closed head: {answer['closed_answer']} ({shown})" in done.stdout
    assert "ROI: left lung from threshold" in done.stdout
    assert (tmp_path / "out" / "overlay_montage.png").read_bytes().startswith(PNG_SIGNATURE)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the input, exit status 2
# ---------------------------------------------------------------------------------------------------------------


def run_cli(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def bad_files(case, tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    other = generate_phantom(1, PhantomConfig(shape=(32, 48, 48)))
    shifted = case["ct"].parent / "ct.nii.gz"
    image = nib.load(shifted)
    moved = image.affine.copy()
    moved[:3, 3] += 25.0
    text = base / "notes.txt"
    text.write_text("not a CT")
    png = base / "figure.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png)
    qwen = base / "qwen"
    qwen.mkdir()
    (qwen / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    adapter = base / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "someone/other-model"}))
    return {
        "text": text,
        "png": png,
        "other_scan": save_image(base / "other.nii.gz", other.masks["liver"].astype(np.uint8), other.affine),
        "moved": save_image(base / "moved.nii.gz", np.asarray(nib.load(case["liver"]).dataobj), moved),
        "adapter": adapter,
        "not_model": base,
        "qwen": qwen,
    }


@pytest.mark.parametrize(
    "args, expected",
    [
        (lambda c, b: ["--volume", str(b["text"])], "volume '{text}': unknown format"),
        (lambda c, b: ["--volume", str(b["png"])], "volume '{png}': is a 2D image"),
        (lambda c, b: ["--volume", "missing.nii.gz"], "volume 'missing.nii.gz': no such file"),
        (lambda c, b: ["--mask", str(b["other_scan"])], "(is the mask from another scan?)"),
        (lambda c, b: ["--mask", str(b["moved"])], "(is the mask from another scan?)"),
        (lambda c, b: ["--mask", str(b["text"])], "mask '{text}': is not a mask file"),
        (lambda c, b: ["--mask", str(c["labels"]), "--label", "pancraes"], "label 'pancraes': not found in mask"),
        (lambda c, b: ["--mask", str(c["labels"])], "mask '{labels}': multilabel mask"),
        (lambda c, b: ["--roi", "left lugn"], "did you mean ['left lung'"),
        (lambda c, b: ["--roi", "liver"], "roi 'liver': unknown structure 'liver' (HU thresholds give only"),
        (lambda c, b: ["--roi", "liver", "--mask", str(c["liver"])], "give either --mask"),
        (lambda c, b: ["--model", "someone/not-downloaded"], "model 'someone/not-downloaded': not a local folder"),
        (lambda c, b: ["--model", str(b["not_model"])], "holds no config.json"),
        (lambda c, b: ["--model", str(b["qwen"])], "is a 'qwen2' model, not a Med3DQwen"),
        (lambda c, b: ["--adapter", str(b["adapter"])], "was trained on base model 'someone/other-model'"),
    ],
    ids=["txt-volume", "png-volume", "missing-volume", "mask-other-shape", "mask-other-affine", "txt-mask",
         "unknown-label", "multilabel-without-label", "roi-typo", "roi-not-segmentable", "mask-and-roi",
         "hub-id-offline", "folder-not-a-model", "qwen2-folder", "adapter-of-another-base"],
)  # fmt: skip
def test_bad_input_is_one_line_naming_it(case, bad_files, capsys, monkeypatch, args, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    given = {"--model": str(case["model"]), "--volume": str(case["ct"]), "--question": "Is it normal?"}
    extra = args(case, bad_files)
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        given[flag] = value
    err = run_cli([part for pair in given.items() for part in pair], capsys)
    names = {k: str(v) for k, v in {**case, **bad_files}.items()}
    assert err.startswith("med3dqwen-predict: error: ") and expected.format(**names) in err
    if "another scan" in expected:
        assert f"mask {extra[1]!r}: " in err


def test_an_adapter_that_does_not_fit_is_refused(case, tmp_path):
    """An adapter trained on a model of another size (its base folder named like ours) fails on its weights."""
    import peft

    config = tiny_config()
    config.text_config.hidden_size = 48  # another width: the LoRA matrices cannot fit our q_proj / v_proj
    config.text_config.num_attention_heads = 4
    torch.manual_seed(0)
    wide = Med3DQwenForConditionalGeneration(config)
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(wide, lora)
    model.peft_config["default"].base_model_name_or_path = str(case["model"])
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(PredictError, match=r"^adapter '.*adapter': does not fit --model"):
        predict(case["model"], case["ct"], "Is it normal?", adapter=str(tmp_path / "adapter"), max_new_tokens=2)


def test_missing_segmenter_package_is_a_clear_error(case):
    import importlib.util

    if importlib.util.find_spec("totalsegmentator") is not None:
        pytest.skip("TotalSegmentator is installed here; this checks the message shown without it")
    with pytest.raises(PredictError, match="TotalSegmentator package is not installed"):
        predict(case["model"], case["ct"], "Is it normal?", roi="liver", segmenter="totalsegmentator")
    with pytest.raises(PredictError, match="segmenter 'magic': unknown"):
        predict(case["model"], case["ct"], "Is it normal?", roi="liver", segmenter="magic")


def test_totalsegmentator_segmenter_reads_its_output(case, monkeypatch):
    """The TotalSegmentator wrapper asks for the region's classes and reads the label map it writes (a stand-in for
    the package, which needs weights from the internet, writes the phantom's liver as TotalSegmentator's id 5)."""
    import importlib.machinery
    import types

    calls = []

    def fake_totalsegmentator(input, output, ml=False, roi_subset=None, device="gpu", fast=False, quiet=False):
        calls.append({"input": str(input), "ml": ml, "roi_subset": roi_subset, "device": device})
        image = nib.load(case["labels"])
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj), image.affine), output)

    package = types.ModuleType("totalsegmentator")
    package.__spec__ = importlib.machinery.ModuleSpec("totalsegmentator", None)
    api = types.ModuleType("totalsegmentator.python_api")
    api.totalsegmentator = fake_totalsegmentator
    monkeypatch.setitem(sys.modules, "totalsegmentator", package)
    monkeypatch.setitem(sys.modules, "totalsegmentator.python_api", api)
    result = predict(case["model"], case["ct"], "Is the liver normal?", roi="liver", segmenter="totalsegmentator",
                     device="cpu", max_new_tokens=2)  # fmt: skip
    reference = predict(case["model"], case["ct"], "Is the liver normal?", mask=case["liver"], max_new_tokens=2)
    assert calls == [{"input": str(case["ct"]), "ml": True, "roi_subset": ["liver"], "device": "cpu"}]
    assert result.mask_source == "totalsegmentator" and result.contour_slices == reference.contour_slices

    def failing(*args, **kwargs):
        raise RuntimeError("weights for task 291 cannot be downloaded")

    api.totalsegmentator = failing
    with pytest.raises(PredictError, match="^segmenter 'totalsegmentator': TotalSegmentator failed: .*task 291"):
        predict(case["model"], case["ct"], "Is the liver normal?", roi="liver", segmenter="totalsegmentator")


def test_vista3d_without_its_bundle_says_how_to_get_it(case, monkeypatch):
    pytest.importorskip("monai")
    monkeypatch.delenv("MED3DQWEN_VISTA3D_BUNDLE", raising=False)
    with pytest.raises(PredictError, match="^segmenter 'vista3d': .*bundle_dir"):
        predict(case["model"], case["ct"], "Is the liver normal?", roi="liver", segmenter="vista3d")


def test_loaded_volume_and_mask_array(case):
    """What a web app holds: a loaded CTVolume and a mask array on its grid (no files read again)."""
    from med3dqwen.processing.ct_io import load_mask, load_volume

    ct = load_volume(case["ct"])
    liver = load_mask(case["liver"], like=ct)
    from_arrays = predict(case["model"], ct, "Is the liver normal?", mask=liver, max_new_tokens=2)
    from_files = predict(case["model"], case["ct"], "Is the liver normal?", mask=case["liver"], max_new_tokens=2)
    assert from_arrays.contour_slices == from_files.contour_slices
    assert from_arrays.probabilities == pytest.approx(from_files.probabilities)
    with pytest.raises(PredictError, match=r"^mask '<array \(32, 64, 63\)>': differs from the volume's shape"):
        predict(case["model"], ct, "Is the liver normal?", mask=liver[:, :, :63])
    soft = liver.astype(np.float32) * 0.9  # a probability mask: > 0.5 is inside, as the processor binarises it
    assert predict(case["model"], ct, "Is the liver normal?", mask=soft, max_new_tokens=2).contour_slices == (
        from_arrays.contour_slices
    )
    soft[0, 0, 0] = np.nan
    with pytest.raises(PredictError, match=r"^mask '<array \(32, 64, 64\)>': .*NaN"):
        predict(case["model"], ct, "Is the liver normal?", mask=soft)


def test_predict_is_a_lazy_package_name():
    check = "import sys, med3dqwen; f = med3dqwen.predict; assert f.__module__ == 'med3dqwen.inference'; "
    check += "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    done = subprocess.run([sys.executable, "-c", check], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------------
# Real CT fixtures (skipped without them)
# ---------------------------------------------------------------------------------------------------------------


def test_real_ct_with_a_totalsegmentator_label(case, real_ct, tmp_path):
    folder = real_ct / "totalseg_example_ct_sm"
    ct, seg = folder / "example_ct_sm.nii.gz", folder / "example_seg.nii.gz"
    result = predict(case["model"], ct, "Is the liver enlarged?", mask=seg, label="liver", output_dir=tmp_path,
                     max_new_tokens=2)  # fmt: skip
    assert result.prompt == "red" and result.contour_slices and 0.0 < result.covered_fraction <= 1.0
    assert colour_pixels(tmp_path / "overlay_montage.png", RED) > 50
    # the DICOM scan's segmentation is from another scan
    with pytest.raises(PredictError, match="another scan"):
        predict(case["model"], folder / "example_ct_sm.nii.gz", "Is the liver enlarged?", max_new_tokens=2,
                mask=real_ct / "totalseg_example_ct_dicom" / "example_seg_dicom.nii.gz", label="liver")  # fmt: skip


def test_real_dicom_folder_with_a_segmented_region(case, real_ct):
    folder = real_ct / "totalseg_example_ct_dicom" / "example_ct_dicom"
    result = predict(case["model"], folder, "Is there an abnormality in the body?", roi="body", max_new_tokens=2)
    assert result.mask_source == "threshold" and result.prompt == "red" and result.contour_slices


def test_rescale_and_intensity_read_raw_and_unit_volumes_as_their_hu_originals(case, tmp_path, capsys):
    """A CT-RATE original (raw values, HU = value - 1024) with --rescale, and M3D's [0, 1] arrays with intensity
    "unit", give what the HU file gives; before, there was no way to say either."""
    from med3dqwen.processing.ct_io import load_volume
    from med3dqwen.processing.ct_transforms import window_hu

    volume = load_volume(case["ct"])
    from med3dqwen.io import save_nifti

    raw = save_nifti(tmp_path / "raw.nii.gz", (volume.array + 1024).astype(np.int16), volume.affine)
    question = "Describe the findings."
    expected = predict(case["model"], case["ct"], question, max_new_tokens=4, output_dir=tmp_path / "hu")
    image = np.asarray(Image.open(tmp_path / "hu" / "overlay_montage.png")).astype(int)
    for name, kwargs in {
        "raw": {"volume": raw, "rescale": (1, -1024)},
        "unit": {"volume": tmp_path / "unit.npy", "intensity": "unit"},
    }.items():
        if name == "unit":
            np.save(tmp_path / "unit.npy", window_hu(volume.array, "chest"))
        got = predict(case["model"], question=question, max_new_tokens=4, output_dir=tmp_path / name, **kwargs)
        assert got.answer == expected.answer, name
        montage = np.asarray(Image.open(tmp_path / name / "overlay_montage.png")).astype(int)
        assert np.abs(montage - image).max() <= 1, name  # 8-bit grey of the same values (rounding at most)
    capsys.readouterr()
    cli(["--model", str(case["model"]), "--volume", str(raw), "--rescale", "1", "-1024", "--question", question,
         "--max_new_tokens", "4"])  # fmt: skip
    assert f"answer: {expected.answer}" in capsys.readouterr().out
    with pytest.raises(PredictError, match=r"^rescale '\(0, 5\)': .*non-zero finite"):
        predict(case["model"], raw, question, rescale=(0, 5))
    with pytest.raises(PredictError, match=r"^intensity 'HU': intensity must be 'hu' or 'unit'"):
        predict(case["model"], raw, question, intensity="HU")


def test_a_ctvolume_of_raw_scaled_integers_is_turned_into_hu_before_the_rescale(tmp_path):
    """A CTVolume from load_volume(stored_integers=True) holds a header-scaled file's raw integers; predict applies
    the header scaling first, then the given rescale, so segmenters and the processor see HU (review finding)."""
    from med3dqwen.processing.ct_io import load_volume

    image = nib.Nifti1Image((np.arange(256).reshape(8, 8, 4) * 5).astype(np.int16), np.eye(4))
    image.header.set_slope_inter(2.0, 0.0)
    nib.save(image, tmp_path / "scaled.nii.gz")
    raw = load_volume(tmp_path / "scaled.nii.gz", stored_integers=True)
    assert raw.meta["stored_scale"] == (2.0, 0.0)
    got = inference._read_as(raw, None, (1, -1024))
    expected = inference._read_as(load_volume(tmp_path / "scaled.nii.gz"), None, (1, -1024))
    assert "stored_scale" not in got.meta
    np.testing.assert_array_equal(got.array, expected.array)
