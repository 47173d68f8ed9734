"""The processor speaks the ecosystem's API (issue 8): images=, inputs with an affine, model inputs only,
apply_chat_template with volumes and masks, {% generation %} marks, TRL's collator, the image-text-to-text pipeline,
and warnings on inputs that are almost surely a mistake."""

import os
import subprocess
import sys
import textwrap
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from tiny_models import tiny_config
from transformers import pipeline
from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

import med3dqwen  # noqa: F401  (registers the Auto classes)
from med3dqwen import Med3DQwenForConditionalGeneration
from med3dqwen.io import save_nifti
from med3dqwen.processing.ct_io import CTInputError, standard_affine
from med3dqwen.processing.image_processing_med3d_qwen import Med3DQwenImageProcessor
from med3dqwen.processing.processing_med3d_qwen import IMAGE_BLOCK, Med3DQwenProcessor
from med3dqwen.processing.tokenization_med3d_qwen import CHAT_TEMPLATE, DEFAULT_SYSTEM_PROMPT, load_qwen2_5_tokenizer


SIZE = (16, 32, 32)
IMAGE_ID, SLICE_ID = 151655, 151654
PROMPT = f"<|im_start|>user\n{IMAGE_BLOCK}Is there a nodule?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tokenizer():
    return load_qwen2_5_tokenizer()


@pytest.fixture
def processor(tokenizer):
    image_processor = Med3DQwenImageProcessor(volume_size=SIZE, contour_thickness=1)
    return Med3DQwenProcessor(image_processor, tokenizer, num_visual_tokens=6, num_slice_tokens=2)


@pytest.fixture
def case(tmp_path):
    """A (20, 40, 36) HU volume, a box ROI and a multi-label map (1 = box, 2 = a smaller box), saved as NIfTI."""
    hu = np.full((20, 40, 36), -1000.0, dtype=np.float32)
    hu[4:16, 8:32, 6:30] = 40.0
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[5:15, 10:30, 8:28] = 1
    labels[8:12, 14:20, 12:18] = 2
    affine = standard_affine((2.0, 1.0, 1.0))
    save_nifti(tmp_path / "ct.nii.gz", hu.astype(np.int16), affine)
    save_nifti(tmp_path / "roi.nii.gz", labels > 0, affine)
    save_nifti(tmp_path / "labels.nii.gz", labels, affine)
    return hu, labels, tmp_path


def tiny_model_and_processor(tokenizer):
    config = tiny_config()
    torch.manual_seed(0)
    model = Med3DQwenForConditionalGeneration(config).eval()
    return model, Med3DQwenProcessor.from_config(config, tokenizer=tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# processor(images=..., text=...): names, inputs, labels
# ---------------------------------------------------------------------------------------------------------------


def test_images_is_the_volumes_argument_and_ignored_names_are_errors(processor, case):
    _, _, folder = case
    ct = folder / "ct.nii.gz"
    by_images = processor(images=[ct], text=PROMPT, masks=[folder / "roi.nii.gz"])
    by_volumes = processor(volumes=[ct], text=PROMPT, masks=[folder / "roi.nii.gz"])
    torch.testing.assert_close(by_images["pixel_values"], by_volumes["pixel_values"])
    assert by_images["input_ids"].tolist() == by_volumes["input_ids"].tolist()
    roi = folder / "roi.nii.gz"
    nested = processor(images=[[ct], [ct]], masks=[[roi], [None]], text=[PROMPT, PROMPT])  # one list per sample
    assert nested["pixel_values"].shape == (2, 1, *SIZE)
    torch.testing.assert_close(nested["pixel_values"][:1], by_images["pixel_values"])
    with pytest.raises(TypeError, match=r"\['image'\].*images="):
        processor(image=[ct], text="Hello")  # used to be dropped silently: a text-only batch came back
    with pytest.raises(TypeError, match="pixel_values"):
        processor(text="Hello", pixel_values=torch.zeros(1, 1, *SIZE))
    with pytest.raises(ValueError, match="not both"):
        processor(images=[ct], volumes=[ct], text=PROMPT)
    with pytest.raises(ValueError, match="videos"):
        processor(videos=[ct], text="Hello")


def test_label_picks_one_structure_of_a_multilabel_mask_file(processor, case):
    _, labels, folder = case
    ct, label_file = folder / "ct.nii.gz", folder / "labels.nii.gz"
    with pytest.raises(CTInputError, match="multilabel mask"):
        processor(images=[ct], masks=[label_file], text=PROMPT)
    out = processor(images=[ct, ct], masks=[label_file, label_file], label=[1, 2], text=[PROMPT, PROMPT])
    binary = processor(images=[ct], masks=[folder / "roi.nii.gz"], text=PROMPT)
    # label 1 alone is the outer box minus the inner one: not the binary mask's drawing; label 2 is the inner box
    assert not torch.equal(out["pixel_values"][0], binary["pixel_values"][0])
    small = labels == 2
    inner = processor(images=[ct], masks=[small.astype(np.uint8)], layout="DHW", text=PROMPT)
    torch.testing.assert_close(out["pixel_values"][1], inner["pixel_values"][0])
    one_for_all = processor(images=[ct, ct], masks=[label_file, label_file], label=2, text=[PROMPT, PROMPT])
    torch.testing.assert_close(one_for_all["pixel_values"][0], out["pixel_values"][1])


def test_nibabel_images_and_metatensors_are_oriented_from_their_affine(processor, case, tmp_path):
    monai_transforms = pytest.importorskip("monai.transforms")
    _, _, folder = case
    expected = processor(images=[folder / "ct.nii.gz"], masks=[folder / "roi.nii.gz"], text=PROMPT)["pixel_values"]
    # The same scan stored in another orientation (RAS voxel order, float32): the drawing must not change.
    ras = nib.as_closest_canonical(nib.load(folder / "ct.nii.gz"))
    ras_roi = nib.as_closest_canonical(nib.load(folder / "roi.nii.gz"))
    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")
    out = processor(images=[ras], masks=[ras_roi], text=PROMPT)
    torch.testing.assert_close(out["pixel_values"], expected)
    nib.save(ras, tmp_path / "ras.nii.gz")
    nib.save(ras_roi, tmp_path / "ras_roi.nii.gz")
    load = monai_transforms.Compose(
        [
            monai_transforms.LoadImaged(keys=["image", "roi"]),
            monai_transforms.EnsureChannelFirstd(keys=["image", "roi"]),
        ]
    )
    sample = load({"image": str(tmp_path / "ras.nii.gz"), "roi": str(tmp_path / "ras_roi.nii.gz")})
    out = processor(images=[sample["image"]], masks=[sample["roi"]], text=PROMPT)
    torch.testing.assert_close(out["pixel_values"], expected)
    # LPS metadata (ITK's convention) is converted, not mistaken for RAS
    lps = sample["image"].clone()
    lps.affine = torch.as_tensor(np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps.affine.numpy())
    lps.meta["space"] = "LPS"
    torch.testing.assert_close(processor(images=[lps], text=PROMPT)["pixel_values"],
                               processor(images=[sample["image"]], text=PROMPT)["pixel_values"])  # fmt: skip
    channel_last = sample["image"].permute(1, 2, 3, 0)
    with pytest.raises(CTInputError, match="channel-first"):
        processor(images=[channel_last], text=PROMPT)


def test_a_bare_array_is_refused_unless_its_layout_is_stated(processor, case):
    hu, labels, folder = case
    with pytest.raises(ValueError, match=r"volumes\[0\] \(ndarray\).*no affine.*layout='DHW'"):
        processor(images=[hu], text=PROMPT)
    with pytest.raises(ValueError, match=r"masks\[0\].*no affine"):
        processor(images=[folder / "ct.nii.gz"], masks=[labels > 0], text=PROMPT)
    with pytest.raises(ValueError, match="layout must be one of"):
        processor(images=[hu], layout="XYZ", text=PROMPT)
    stated = processor(images=[hu], masks=[labels > 0], layout="DHW", text=PROMPT)["pixel_values"]
    from_files = processor(images=[folder / "ct.nii.gz"], masks=[folder / "roi.nii.gz"], text=PROMPT)
    torch.testing.assert_close(stated, from_files["pixel_values"])


# ---------------------------------------------------------------------------------------------------------------
# Model inputs only; the prompt report on request
# ---------------------------------------------------------------------------------------------------------------


def test_processor_returns_model_inputs_only_so_generate_takes_them(tokenizer, case):
    _, _, folder = case
    model, processor = tiny_model_and_processor(tokenizer)
    inputs = processor(images=[folder / "ct.nii.gz"], masks=[folder / "roi.nii.gz"], text=PROMPT)
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values"}
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 3)
    info = processor(images=[folder / "ct.nii.gz"], masks=[folder / "roi.nii.gz"], text=PROMPT,
                     return_prompt_info=True)  # fmt: skip
    assert set(info) == {"input_ids", "attention_mask", "pixel_values", "covered_fraction", "roi_empty"}
    assert 0.0 < float(info["covered_fraction"][0]) < 1.0 and info["roi_empty"].tolist() == [False]
    torch.testing.assert_close(info["pixel_values"], inputs["pixel_values"])


# ---------------------------------------------------------------------------------------------------------------
# Chat template: one for tokenizer and processor, volumes from content lists, generation marks
# ---------------------------------------------------------------------------------------------------------------


def test_processor_and_tokenizer_share_the_chat_template_and_system_prompt(processor, tokenizer):
    assert processor.chat_template == tokenizer.chat_template == CHAT_TEMPLATE
    question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where?"}]}]
    rendered = processor.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    assert rendered == tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n")
    assert f"user\n{IMAGE_BLOCK}Where?" in rendered


def conversation(image_block: dict, answer: str | None = "Yes.") -> list[dict]:
    turns = [
        {"role": "system", "content": [{"type": "text", "text": "You are a radiology assistant."}]},
        {"role": "user", "content": [image_block, {"type": "text", "text": "Is there a nodule?"}]},
    ]
    return turns + ([{"role": "assistant", "content": [{"type": "text", "text": answer}]}] if answer else [])


def test_apply_chat_template_loads_volumes_and_masks_from_the_content_list(processor, case):
    hu, labels, folder = case
    messages = conversation({"type": "image", "path": str(folder / "ct.nii.gz"), "mask": str(folder / "roi.nii.gz")})
    out = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=True, return_tensors="pt"
    )
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    direct = processor(images=[folder / "ct.nii.gz"], masks=[folder / "roi.nii.gz"], text=prompt)
    assert set(out) == {"input_ids", "attention_mask", "pixel_values"}
    torch.testing.assert_close(out["pixel_values"], direct["pixel_values"])
    assert out["input_ids"].tolist() == direct["input_ids"].tolist()
    assert int((out["input_ids"] == IMAGE_ID).sum()) == 6 and int((out["input_ids"] == SLICE_ID).sum()) == 2
    # An array with its layout, a multi-label file with a label, in one batch of two conversations.
    array = conversation({"type": "image", "image": hu, "mask": labels > 0, "layout": "DHW"})
    multi = conversation({"type": "image", "path": str(folder / "ct.nii.gz"),
                          "mask": str(folder / "labels.nii.gz"), "label": 2})  # fmt: skip
    batch = processor.apply_chat_template(
        [array, multi], tokenize=True, return_dict=True, return_tensors="pt", processor_kwargs={"padding": True}
    )
    assert batch["pixel_values"].shape == (2, 1, *SIZE)
    torch.testing.assert_close(batch["pixel_values"][0], direct["pixel_values"][0])
    inner = processor(images=[hu], masks=[labels == 2], layout="DHW", text=prompt)["pixel_values"][0]
    torch.testing.assert_close(batch["pixel_values"][1], inner)
    with pytest.raises(ValueError, match="no volume"):
        processor.apply_chat_template(conversation({"type": "image", "mask": "roi.nii.gz"}), tokenize=True)


def test_generation_marks_give_the_assistant_mask_after_image_expansion(processor, tokenizer, case):
    _, _, folder = case
    assert has_generation_markers(processor.chat_template) and has_generation_markers(tokenizer.chat_template)
    assert is_chat_template_stop_token_trained(tokenizer) and is_chat_template_stop_token_trained(processor)
    messages = conversation({"type": "image", "path": str(folder / "ct.nii.gz")}, answer="A small nodule.")
    out = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = out["input_ids"][0]  # lists without return_tensors, as the tokenizer's apply_chat_template
    masked = [token for token, keep in zip(ids, out["assistant_masks"][0], strict=True) if keep]
    assert tokenizer.decode(masked) == "A small nodule.<|im_end|>"  # the answer and its end-of-turn token only
    text_only = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    kept = [t for t, keep in zip(text_only["input_ids"], text_only["assistant_masks"], strict=True) if keep]
    assert kept == masked


def test_trl_collator_trains_on_the_answer_only(processor, case):
    """TRL's VLM collator: records' {"type": "image"} placeholders + nibabel volumes, assistant_only_loss."""
    _, _, folder = case
    volume = nib.load(folder / "ct.nii.gz")  # what a datasets Nifti column gives
    examples = [
        {"messages": conversation({"type": "image"}, answer=answer), "images": [volume]}
        for answer in ("Yes.", "No, the lungs are clear.")
    ]
    collator = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)
    batch = collator(examples)
    assert batch["pixel_values"].shape == (2, 1, *SIZE)
    answers = [processor.tokenizer.decode(row[row != -100]) for row in batch["labels"]]
    assert answers == ["Yes.<|im_end|>", "No, the lungs are clear.<|im_end|>"]


def test_image_text_to_text_pipeline_answers_about_a_volume(tokenizer, case):
    _, _, folder = case
    model, processor = tiny_model_and_processor(tokenizer)
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "path": str(folder / "ct.nii.gz"), "mask": str(folder / "roi.nii.gz")},
                {"type": "text", "text": "Is there a nodule?"},
            ],
        }
    ]
    result = pipe(text=messages, max_new_tokens=3, generate_kwargs={"do_sample": False})
    assert len(result) == 1 and isinstance(result[0]["generated_text"], list)
    answer = result[0]["generated_text"][-1]
    assert answer["role"] == "assistant" and isinstance(answer["content"], str)


# ---------------------------------------------------------------------------------------------------------------
# Warnings on inputs that are almost surely a mistake
# ---------------------------------------------------------------------------------------------------------------


def test_warns_once_naming_the_input_on_a_single_slice_and_on_unit_values_given_as_hu(case, tmp_path):
    hu, _, folder = case
    processor = Med3DQwenImageProcessor(volume_size=SIZE)
    one_slice = hu[8:9]
    with pytest.warns(UserWarning, match=r"volumes\[0\] \(ndarray\): a single slice .* depth of 16"):
        processor(one_slice, layout="DHW")
    unit = np.clip((hu + 1000.0) / 1200.0, 0, 1)
    np.save(tmp_path / "unit.npy", unit)
    with pytest.warns(UserWarning, match=r"unit\.npy: values lie in \[0, 1\] but are windowed as HU"):
        processor(tmp_path / "unit.npy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the same mistakes again stay quiet, and correct input never warns
        processor([one_slice, tmp_path / "unit.npy"], layout="DHW")
        Med3DQwenImageProcessor(volume_size=SIZE)(tmp_path / "unit.npy", intensity="unit")
        Med3DQwenImageProcessor(volume_size=SIZE)(folder / "ct.nii.gz")


def test_the_processor_works_without_monai_and_the_transform_module_says_what_it_needs(tmp_path):
    script = textwrap.dedent(
        """
        import sys
        sys.modules["monai"] = None  # MONAI not installed
        import numpy as np
        import med3dqwen
        from med3dqwen.processing.image_processing_med3d_qwen import Med3DQwenImageProcessor
        out = Med3DQwenImageProcessor(volume_size=(4, 8, 8))(np.zeros((4, 8, 8)) - 1000, layout="DHW")
        assert tuple(out["pixel_values"].shape) == (1, 1, 4, 8, 8)
        try:
            import med3dqwen.processing.monai_transforms
        except ImportError as err:
            assert "pip install monai" in str(err), err
            print("no-monai OK")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no-monai OK" in result.stdout


def test_mm_token_type_ids_on_request(processor, case):
    """transformers' return_mm_token_type_ids used to reach the tokenizer, which ignores unknown flags."""
    _, _, folder = case
    out = processor(images=[folder / "ct.nii.gz"], text=PROMPT, return_mm_token_type_ids=True)
    ids, types = out["input_ids"][0], out["mm_token_type_ids"][0]
    assert types.tolist() == ((ids == IMAGE_ID) | (ids == SLICE_ID)).long().tolist() and int(types.sum()) == 8


def test_per_modality_kwargs_as_transformers_passes_them(processor, case):
    _, _, folder = case
    ct, roi = folder / "ct.nii.gz", folder / "roi.nii.gz"
    flat = processor(images=[ct, ct], masks=[roi, None], text=[PROMPT, PROMPT + " more"], padding=True)
    nested = processor(
        images=[ct, ct],
        text=[PROMPT, PROMPT + " more"],
        text_kwargs={"padding": True},
        images_kwargs={"masks": [roi, None]},
        common_kwargs={"return_tensors": "pt"},
    )
    assert set(nested) == set(flat)
    for key in flat:
        torch.testing.assert_close(nested[key], flat[key])
    as_numpy = processor(images=[ct], text=PROMPT, common_kwargs={"return_tensors": "np"})
    assert isinstance(as_numpy["pixel_values"], np.ndarray)
    info = processor(images=[ct], text=PROMPT, images_kwargs={"masks": [roi], "return_prompt_info": True})
    assert "covered_fraction" in info and info["covered_fraction"].shape == (1,)
    unprompted = processor(images=[ct], text=PROMPT, masks=[None], images_kwargs={"masks": [roi]})
    assert not torch.equal(unprompted["pixel_values"], info["pixel_values"])  # masks=[None] is not "unset"
    with pytest.raises(TypeError, match=r"images_kwargs .* \['crop'\]"):
        processor(images=[ct], text=PROMPT, images_kwargs={"crop": 1})
    with pytest.raises(TypeError, match="videos_kwargs"):
        processor(images=[ct], text=PROMPT, videos_kwargs={"fps": 1})
    assert processor.valid_processor_kwargs.__name__ == "Med3DQwenProcessorKwargs"
