"""The training collator: labels on the answer only (token by token), answer-only truncation, closed targets, named
errors, DataLoader workers under fork and spawn, and a batch the model takes as it is."""

import json
import multiprocessing
import shutil

import datasets
import pytest
import torch
from tiny_models import tiny_config
from train_helpers import build_phantom, load_records, tiny_model, tiny_processor
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from med3dqwen.data.cache import CacheMismatchError, build_model_grid_cache
from med3dqwen.data.schema import CLOSED_LABEL_NAMES, resolve_media, to_format
from med3dqwen.processing.tokenization_med3d_qwen import CHAT_TEMPLATE
from med3dqwen.training.collator import (
    IGNORE_INDEX,
    Med3DQwenCollator,
    PromptTooLongError,
    SampleError,
    count_skipped,
)


IMAGE_ID, SLICE_ID, IM_START, IM_END, PAD = 151655, 151654, 151644, 151645, 151643


@pytest.fixture(scope="module")
def config():
    return tiny_config()


@pytest.fixture(scope="module")
def processor(config):
    return tiny_processor(config)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_phantom(tmp_path_factory.mktemp("training") / "phantom")


@pytest.fixture(scope="module")
def records(folder):
    rows = load_records(folder)
    closed = [r for r in rows if r["answer_type"] == "closed" and r["mask_path"] is not None]
    opened = [r for r in rows if r["answer_type"] == "open" and r["mask_path"] is not None]
    whole = [r for r in rows if r["mask_path"] is None]
    assert closed and opened and whole
    return {"closed": closed, "open": opened, "whole": whole}


def test_labels_cover_only_the_answer_and_its_im_end_token_by_token(processor, records, folder):
    closed, opened = records["closed"][0], records["open"][0]
    batch = Med3DQwenCollator(processor, dataset_root=folder)([closed, opened])
    assert set(batch) == {
        "input_ids",
        "attention_mask",
        "pixel_values",
        "labels",
        "closed_labels",
        "closed_label_mask",
    }
    tokenizer = processor.tokenizer
    for row, record in enumerate([closed, opened]):
        ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        length = int(batch["attention_mask"][row].sum())
        assert batch["attention_mask"][row, :length].all() and not batch["attention_mask"][row, length:].any()
        assert all(i == PAD for i in ids[length:])  # right padding
        # The conversation is [system turn][user turn with the image block][<|im_start|>assistant\n][answer]
        # [<|im_end|>][\n]: find the assistant header by its tokens, then check every position.
        header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        start = next(i for i in range(length) if ids[i : i + len(header)] == header) + len(header)
        end = ids.index(IM_END, start) + 1  # the answer's <|im_end|> is trained (the stop token)
        for i in range(len(ids)):
            expected = ids[i] if start <= i < end else IGNORE_INDEX
            assert labels[i] == expected, f"row {row} token {i} {tokenizer.decode([ids[i]])!r}: label {labels[i]}"
        answer = record["messages"][-1]["content"][0]["text"]
        assert tokenizer.decode(ids[start:end]) == answer + "<|im_end|>"
        assert ids[end:length] == tokenizer("\n", add_special_tokens=False)["input_ids"]  # after the stop: not learnt
        # every image and slice token is in the prompt, none is labelled
        volume = [i for i in range(length) if ids[i] in (IMAGE_ID, SLICE_ID)]
        assert len(volume) == processor.num_visual_tokens + processor.num_slice_tokens
        assert max(volume) < start
        system = record["messages"][0]["content"][0]["text"]
        assert system in tokenizer.decode(ids[:start])


def test_labels_equal_trls_assistant_only_loss(processor, records, folder):
    # TRL's collator, given the same volumes (no masks: it cannot pass them), labels exactly the same tokens.
    rows = records["whole"][:2]
    ours = Med3DQwenCollator(processor, dataset_root=folder)(rows)
    trl = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)(
        [{"messages": r["messages"], "images": [str(folder / r["volume_path"])]} for r in rows]
    )
    assert torch.equal(ours["input_ids"], trl["input_ids"])
    assert torch.equal(ours["labels"], trl["labels"])
    torch.testing.assert_close(ours["pixel_values"], trl["pixel_values"])


def test_truncation_cuts_only_the_answer(processor, records, folder, config):
    record = records["open"][0]
    full = Med3DQwenCollator(processor, dataset_root=folder)([record])
    labels = full["labels"][0]
    prompt_length = int((labels != IGNORE_INDEX).nonzero()[0])
    answer_tokens = int((labels != IGNORE_INDEX).sum())
    assert answer_tokens > 3
    cut = Med3DQwenCollator(processor, dataset_root=folder, max_length=prompt_length + 2)([record])
    assert cut["input_ids"].shape == (1, prompt_length + 2)
    assert torch.equal(cut["input_ids"][0], full["input_ids"][0, : prompt_length + 2])
    assert torch.equal(cut["labels"][0, prompt_length:], full["input_ids"][0, prompt_length : prompt_length + 2])
    assert (cut["input_ids"] == IMAGE_ID).sum() == processor.num_visual_tokens
    assert (cut["input_ids"] == SLICE_ID).sum() == processor.num_slice_tokens
    out = tiny_model(config)(**cut)  # the splice finds every image token
    assert torch.isfinite(out.loss)
    # a max_length the prompt alone reaches cannot keep the image tokens and an answer: skipped and counted by
    # default (the batch keeps the others; a batch of only such rows trains nothing), or a named error on request
    short = Med3DQwenCollator(processor, dataset_root=folder, max_length=prompt_length)
    fits = min(
        records["closed"], key=lambda r: len(Med3DQwenCollator(processor, dataset_root=folder)([r])["input_ids"][0])
    )
    assert len(Med3DQwenCollator(processor, dataset_root=folder)([fits])["input_ids"][0]) < prompt_length
    batch = short([record, fits])  # the row that fits is kept, the other left out
    assert short.num_skipped == 1 and batch["input_ids"].shape[0] == 1
    assert torch.equal(batch["input_ids"], Med3DQwenCollator(processor, dataset_root=folder)([fits])["input_ids"])
    lone = short([record])
    assert bool((lone["labels"] == IGNORE_INDEX).all()) and short.num_skipped >= 1
    with pytest.raises(
        PromptTooLongError, match=rf"sample 0 \(volume_id '{record['volume_id']}'\).*max_length={prompt_length}"
    ):
        Med3DQwenCollator(processor, dataset_root=folder, max_length=prompt_length, skip_long_prompts=False)([record])


def test_closed_targets_follow_the_records(processor, records, folder, config):
    rows = [records["closed"][0], records["open"][0], records["closed"][1]]
    batch = Med3DQwenCollator(processor, closed_label_names=config.closed_label_names, dataset_root=folder)(rows)
    names = list(CLOSED_LABEL_NAMES)
    expected = [names.index(rows[0]["closed_answer"]), IGNORE_INDEX, names.index(rows[2]["closed_answer"])]
    assert batch["closed_labels"].tolist() == expected
    yes_no = [name in ("no", "yes") for name in names]
    assert batch["closed_label_mask"].tolist() == [yes_no, [False] * len(names), yes_no]
    assert batch["closed_label_mask"].dtype == torch.bool
    # a model without a closed head gets no closed inputs
    plain = Med3DQwenCollator(processor, closed_label_names=(), dataset_root=folder)(rows)
    assert "closed_labels" not in plain and "closed_label_mask" not in plain


def test_the_model_takes_the_batch_as_it_is(processor, records, folder, config):
    rows = [records["closed"][0], records["open"][0], records["whole"][0]]
    batch = Med3DQwenCollator(processor, closed_label_names=config.closed_label_names, dataset_root=folder)(rows)
    out = tiny_model(config)(**batch)
    assert out.lm_loss is not None and out.closed_loss is not None and torch.isfinite(out.loss)
    assert out.closed_logits.shape == (3, len(config.closed_label_names))


def test_resolved_media_and_relative_paths_give_the_same_batch(processor, folder):
    resolved = list(resolve_media(datasets.load_dataset(str(folder), split="train"), folder).select(range(3)))
    relative = load_records(folder)[:3]
    a = Med3DQwenCollator(processor)(resolved)  # nibabel images from the Nifti columns
    b = Med3DQwenCollator(processor, dataset_root=folder)(relative)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_the_paper_layout_gives_the_same_batch(processor, records, folder):
    rows = [records["closed"][0], records["open"][0]]
    paper = [{**to_format(r, "paper"), "volume_path": r["volume_path"], "mask_path": r["mask_path"]} for r in rows]
    a = Med3DQwenCollator(processor, dataset_root=folder)(rows)
    b = Med3DQwenCollator(processor, dataset_root=folder)(paper)
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["closed_labels"], b["closed_labels"])


def test_bad_records_are_named(processor, records, folder, tmp_path):
    record = records["closed"][0]
    name = f"volume_id '{record['volume_id']}'"
    first = records["open"][0]
    absolute = {
        **first,
        "volume_path": str(folder / first["volume_path"]),
        "mask_path": str(folder / first["mask_path"]),
    }
    with pytest.raises(SampleError, match=rf"sample 1 \({name}\).*relative.*dataset_root"):
        Med3DQwenCollator(processor)([absolute, record])
    missing = {**record, "volume_path": "volumes/nowhere.nii.gz"}
    with pytest.raises(SampleError, match=rf"sample 0 \({name}\): volume_path 'volumes/nowhere.nii.gz' does not"):
        Med3DQwenCollator(processor, dataset_root=folder)([missing])
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"not a nifti file")
    with pytest.raises(SampleError, match=rf"sample 0 \({name}\): cannot load its volume"):
        Med3DQwenCollator(processor, dataset_root=folder)([{**record, "volume_path": str(corrupt)}])
    unanswered = {**record, "messages": record["messages"][:-1]}
    with pytest.raises(SampleError, match="ends with the assistant's answer"):
        Med3DQwenCollator(processor, dataset_root=folder)([unanswered])
    no_image = [dict(m) for m in record["messages"]]
    no_image[1] = {"role": "user", "content": [c for c in no_image[1]["content"] if c["type"] == "text"]}
    with pytest.raises(SampleError, match="one image placeholder, its prompt has 0"):
        Med3DQwenCollator(processor, dataset_root=folder)([{**record, "messages": no_image}])
    wrong_closed = {**record, "closed_answer": "maybe"}
    with pytest.raises(SampleError, match=rf"sample 0 \({name}\).*maybe"):
        Med3DQwenCollator(processor, dataset_root=folder)([wrong_closed])
    with pytest.raises(ValueError, match="max_length"):
        Med3DQwenCollator(processor, max_length=0)


def test_a_prompt_that_is_not_a_prefix_of_the_conversation_is_named(processor, records, folder):
    # A template whose generation prompt differs from how it renders the assistant turn: the labels would be
    # misaligned, so the collator refuses the row.
    odd = processor.__class__(
        processor.image_processor,
        processor.tokenizer,
        chat_template=CHAT_TEMPLATE.replace('"<|im_start|>assistant\\n" }}\n{%- endif %}', '"<|im_start|>bot\\n" }}\n'
                                            "{%- endif %}"),
        num_visual_tokens=processor.num_visual_tokens,
        num_slice_tokens=processor.num_slice_tokens,
    )  # fmt: skip
    assert odd.chat_template != processor.chat_template
    record = records["closed"][0]
    with pytest.raises(SampleError, match=rf"sample 0 \(volume_id '{record['volume_id']}'\).*not a token prefix"):
        Med3DQwenCollator(odd, dataset_root=folder)([record])


def _assert_workers_give_the_in_process_batches(collator, rows, start_method):
    """Two batches of ``rows`` through a one-worker DataLoader equal the collator's batches in this process."""
    loader = torch.utils.data.DataLoader(
        rows,
        batch_size=2,
        collate_fn=collator,
        num_workers=1,
        multiprocessing_context=multiprocessing.get_context(start_method),
    )
    batches = list(loader)
    assert len(batches) == 2
    for batch, expected in zip(batches, (collator(rows[:2]), collator(rows[2:])), strict=True):
        assert batch.keys() == expected.keys()
        for key in batch:
            assert torch.equal(batch[key], expected[key]), key


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_dataloader_workers_under_fork_and_spawn(processor, records, folder, config, start_method):
    rows = [records["closed"][0], records["open"][0], records["whole"][0], records["closed"][1]]
    collator = Med3DQwenCollator(processor, closed_label_names=config.closed_label_names, dataset_root=str(folder))
    _assert_workers_give_the_in_process_batches(collator, rows, start_method)


def test_a_moved_dataset_folder_needs_only_a_new_root(processor, records, folder, tmp_path):
    copy = tmp_path / "moved"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns(".work"))
    record = records["closed"][0]
    a = Med3DQwenCollator(processor, dataset_root=folder)([record])
    b = Med3DQwenCollator(processor, dataset_root=copy)([record])
    assert torch.equal(a["pixel_values"], b["pixel_values"])


# -- the model-grid cache as the source ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(processor, records, folder, tmp_path_factory):
    rows = records["closed"] + records["open"] + records["whole"]
    return build_model_grid_cache(rows, processor.image_processor, tmp_path_factory.mktemp("cache") / "c", folder)


def test_the_cache_and_the_online_path_give_the_same_batch(processor, records, folder, config, cache):
    rows = [records["closed"][0], records["open"][0], records["whole"][0], records["closed"][1]]
    online = Med3DQwenCollator(processor, config.closed_label_names, dataset_root=folder)(rows)
    cached = Med3DQwenCollator(processor, config.closed_label_names, dataset_root=folder, cache=cache.cache_dir)(rows)
    assert online.keys() == cached.keys()
    for key in online:
        if key != "pixel_values":
            assert torch.equal(online[key], cached[key]), key
    difference = (online["pixel_values"] - cached["pixel_values"]).abs().max()
    assert 0 < difference <= 1e-5  # the uint16 quantisation of the windowed volume, nothing more
    # resolved datasets (absolute paths, nibabel images) find the same entries, without a dataset_root
    resolved = resolve_media(datasets.load_dataset(str(folder), split="train"), folder)
    by_conversation = {(r["volume_id"], json.dumps(r["messages"])): r for r in resolved}
    resolved_rows = [by_conversation[row["volume_id"], json.dumps(row["messages"])] for row in rows]
    again = Med3DQwenCollator(processor, config.closed_label_names, cache=cache)(resolved_rows)
    assert torch.equal(again["pixel_values"], cached["pixel_values"])


def test_the_cache_leaves_the_prompt_settings_free_and_draws_the_identical_contour(records, folder, cache):
    # A processor with another encoding, colour and width than the one the cache was built with: the contour channel
    # is drawn online from the cached mask, identical to the online path's.
    channel = tiny_processor(tiny_config(prompt_encoding="channel"))
    channel.image_processor.contour_thickness = 1
    rows = [records["closed"][0], records["open"][0]]
    online = Med3DQwenCollator(channel, dataset_root=folder)(rows)["pixel_values"]
    cached = Med3DQwenCollator(channel, dataset_root=folder, cache=cache)(rows)["pixel_values"]
    assert online.shape[1] == 2 and online[:, 1].sum() > 0
    assert torch.equal(online[:, 1], cached[:, 1])  # (B, D, H, W) contour channel
    assert (online[:, 0] - cached[:, 0]).abs().max() <= 1e-5
    channel.image_processor.volume_size = [32, 64, 64]
    with pytest.raises(CacheMismatchError, match="holds volumes for"):
        Med3DQwenCollator(channel, cache=cache)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_the_cached_collator_works_in_dataloader_workers(processor, records, folder, config, cache, start_method):
    rows = [records["closed"][0], records["open"][0], records["whole"][0], records["closed"][1]]
    collator = Med3DQwenCollator(processor, config.closed_label_names, dataset_root=str(folder), cache=cache)
    _assert_workers_give_the_in_process_batches(collator, rows, start_method)


# -- bad samples ----------------------------------------------------------------------------------------------------


def test_bad_samples_are_skipped_logged_and_counted(processor, records, folder, config, tmp_path, caplog):
    good, other = records["closed"][0], records["open"][0]
    missing = {**other, "volume_path": "volumes/nowhere.nii.gz"}
    log = tmp_path / "skipped.jsonl"
    collator = Med3DQwenCollator(
        processor, config.closed_label_names, dataset_root=folder, skip_bad_samples=True, skip_log=log
    )
    with caplog.at_level("WARNING", logger="med3dqwen.training.collator"):
        batch = collator([missing, good])
    expected = Med3DQwenCollator(processor, config.closed_label_names, dataset_root=folder)([good])
    for key in expected:
        assert torch.equal(batch[key], expected[key]), key
    assert collator.num_skipped == 1 and count_skipped(log) == 1
    line = json.loads(log.read_text())
    assert line["name"] == f"volume_id '{other['volume_id']}'" and "nowhere.nii.gz' does not exist" in line["reason"]
    assert "skipped a bad training sample (volume_id" in caplog.text
    # a prompt that leaves no room for the answer within max_length is skipped too, never cut inside the image block
    both = Med3DQwenCollator(processor, dataset_root=folder)([good, other])
    shorter, longer = sorted(int((labels != IGNORE_INDEX).nonzero()[0]) for labels in both["labels"])
    assert shorter < longer
    cut = Med3DQwenCollator(processor, dataset_root=folder, max_length=longer, skip_bad_samples=True)
    kept = cut([good, other])
    assert cut.num_skipped == 1 and kept["input_ids"].shape[0] == 1 and kept["input_ids"].shape[1] <= longer
    assert (kept["input_ids"] == IMAGE_ID).sum() == processor.num_visual_tokens


def test_a_batch_of_only_bad_samples_becomes_one_row_that_trains_nothing(processor, records, folder, config, cache):
    bad = [{**r, "volume_path": "volumes/nowhere.nii.gz"} for r in records["closed"][:2]]
    collator = Med3DQwenCollator(processor, config.closed_label_names, dataset_root=folder, skip_bad_samples=True)
    batch = collator(bad)
    assert collator.num_skipped == 2
    assert batch["input_ids"].shape[0] == 1 and (batch["labels"] == IGNORE_INDEX).all()
    assert batch["closed_labels"].tolist() == [IGNORE_INDEX] and not batch["closed_label_mask"].any()
    assert (batch["input_ids"] == IMAGE_ID).sum() == processor.num_visual_tokens
    assert (batch["input_ids"] == SLICE_ID).sum() == processor.num_slice_tokens
    assert batch["pixel_values"].shape == (1, 1, 64, 64, 64) and not batch["pixel_values"].any()
    out = tiny_model(config)(**{k: v for k, v in batch.items() if k != "labels"})  # the splice takes it
    assert out.logits.shape[:2] == batch["input_ids"].shape
    # without skipping, the first bad row is the error it always was
    with pytest.raises(SampleError, match=r"sample 0 .*nowhere.nii.gz' does not exist"):
        Med3DQwenCollator(processor, config.closed_label_names, dataset_root=folder)(bad)


def test_entries_the_cache_build_could_not_make_are_errors_or_skipped(processor, records, folder, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns(".work"))
    record = records["closed"][0]
    (copy / record["volume_path"]).write_bytes(b"not a nifti file")
    broken = build_model_grid_cache([record], processor.image_processor, tmp_path / "c", copy)
    with pytest.raises(
        SampleError, match=r"sample 0 .*cannot load its volume or mask: .*cannot read NIfTI.*cache build"
    ):
        Med3DQwenCollator(processor, dataset_root=copy, cache=broken)([record])
    skipping = Med3DQwenCollator(processor, dataset_root=copy, cache=broken, skip_bad_samples=True)
    assert skipping([record])["input_ids"].shape[0] == 1 and skipping.num_skipped == 1
    with pytest.raises(SampleError, match="is not in the model-grid cache"):
        elsewhere = next(r for rows in records.values() for r in rows if r["volume_path"] != record["volume_path"])
        Med3DQwenCollator(processor, dataset_root=copy, cache=broken)([elsewhere])


def test_no_prompt_rows_keep_their_mask_undrawn_online_and_cached(processor, records, folder, config, cache):
    prompted = records["closed"][0]
    assert prompted["boundary_prompt"] == "red"
    unprompted = {**prompted, "boundary_prompt": "none"}  # a --prompt none build: the ROI named, not drawn
    whole = {**prompted, "mask_path": None}
    for source in (None, cache.cache_dir):
        collate = Med3DQwenCollator(processor, config.closed_label_names, dataset_root=folder, cache=source)
        drawn, undrawn, maskless = (collate([row])["pixel_values"] for row in (prompted, unprompted, whole))
        assert torch.equal(undrawn, maskless) and not torch.equal(undrawn, drawn)
    bad = {**prompted, "boundary_prompt": ""}
    with pytest.raises(SampleError, match="boundary_prompt"):
        Med3DQwenCollator(processor, config.closed_label_names, dataset_root=folder)([bad])


# ---------------------------------------------------------------------------------------------------------------
# The records' intensity and HU rescale reach the pixels, online and through the cache
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def intensity_rows(processor, records, folder, tmp_path_factory):
    """One question on the same volume three ways: as built (HU), stored raw (+1024, CT-RATE's blank header, with
    the recorded rescale) and as a [0, 1] array (M3D-VQA's kind, intensity "unit")."""
    import numpy as np

    from med3dqwen.io import save_nifti
    from med3dqwen.processing.ct_io import load_volume
    from med3dqwen.processing.ct_transforms import window_hu

    out = tmp_path_factory.mktemp("intensity")
    base = {**records["closed"][0]}
    volume = load_volume(folder / base["volume_path"])
    save_nifti(out / "raw.nii.gz", (volume.array + 1024).astype(np.int16), volume.affine)
    np.save(out / "unit.npy", window_hu(volume.array, processor.image_processor.window))
    shared = {**base, "mask_path": str(folder / base["mask_path"])}
    return {
        "hu": {**shared, "volume_path": str(folder / base["volume_path"])},
        "raw": {**shared, "volume_path": str(out / "raw.nii.gz"), "rescale_slope": 1.0, "rescale_intercept": -1024.0},
        "unit": {**shared, "volume_path": str(out / "unit.npy"), "mask_path": None, "intensity": "unit"},
        "hu_whole": {**shared, "volume_path": str(folder / base["volume_path"]), "mask_path": None},
    }


def test_rescale_and_unit_intensity_fields_reach_the_pixels(processor, intensity_rows):
    """They used to be ignored: CT-RATE's raw values and M3D's [0, 1] arrays were windowed as if they were HU."""
    rows = intensity_rows
    collate = Med3DQwenCollator(processor)
    hu, raw = collate([rows["hu"]])["pixel_values"], collate([rows["raw"]])["pixel_values"]
    torch.testing.assert_close(raw, hu, rtol=0, atol=1e-6)
    ignored = collate([{k: v for k, v in rows["raw"].items() if not k.startswith("rescale_")}])["pixel_values"]
    assert (ignored - hu).abs().max() > 0.5  # what ignoring the fields gave
    unit, whole = collate([rows["unit"]])["pixel_values"], collate([rows["hu_whole"]])["pixel_values"]
    torch.testing.assert_close(unit, whole, rtol=0, atol=1e-5)
    with pytest.warns(UserWarning, match=r"values lie in \[0, 1\] but are windowed as HU"):
        as_hu = Med3DQwenCollator(processor)([{**rows["unit"], "intensity": None}])["pixel_values"]
    assert (as_hu - whole).abs().max() > 0.5
    with pytest.raises(SampleError, match=r"training sample 0 .*intensity must be 'hu' or 'unit', got 'HU'"):
        collate([{**rows["hu"], "intensity": "HU"}])


def test_the_cache_makes_each_volume_with_its_records_settings(processor, intensity_rows, tmp_path):
    rows = intensity_rows
    cache = build_model_grid_cache([rows["hu"], rows["raw"], rows["unit"]], processor.image_processor, tmp_path / "c")
    online, cached = Med3DQwenCollator(processor), Med3DQwenCollator(processor, cache=cache)
    for name in ("hu", "raw", "unit"):
        difference = (online([rows[name]])["pixel_values"] - cached([rows[name]])["pixel_values"]).abs().max()
        assert difference <= 1e-5, name
    # A record that reads a cached volume another way is refused, not served the other reading.
    with pytest.raises(SampleError, match="is cached as .* but its record asks for"):
        cached([{**rows["raw"], "rescale_slope": None, "rescale_intercept": None}])
    # A record that says "hu" and one that says nothing read a NIfTI the same way: one entry serves both.
    stated = build_model_grid_cache([rows["hu"], {**rows["hu"], "intensity": "hu"}], processor.image_processor,
                                    tmp_path / "e")  # fmt: skip
    for record in (rows["hu"], {**rows["hu"], "intensity": "hu"}):
        Med3DQwenCollator(processor, cache=stated)([record])
    # Records of one volume must agree on how to read it.
    with pytest.raises(ValueError, match="its records disagree on how to read it"):
        build_model_grid_cache([rows["raw"], {**rows["raw"], "rescale_intercept": 0.0}], processor.image_processor,
                               tmp_path / "d")  # fmt: skip
