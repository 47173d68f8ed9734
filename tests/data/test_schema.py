"""Tests for the record declaration (med3dqwen.data.schema): fields, layouts, features, media resolution, TRL."""

import json

import datasets
import numpy as np
import pytest
from PIL import Image
from trl.data_utils import is_conversational, prepare_multimodal_messages

from med3dqwen.data.rewrite import build_record, rewrite_qa
from med3dqwen.data.schema import (
    CLOSED_IGNORE_INDEX,
    CLOSED_LABEL_NAMES,
    RECORD_FIELDS,
    STRUCTURED_FIELDS,
    check_closed_fields,
    closed_targets,
    message_texts,
    record_features,
    record_fields,
    record_media,
    resolve_media,
    to_format,
    volume_settings,
)
from med3dqwen.io import save_nifti


def _record(**overrides):
    qa = rewrite_qa("Is there a nodule in the windpipe?", "Yes.", answer_type="closed")
    fields = dict(
        volume_path="volumes/v1.nii.gz",
        mask_path="masks/v1_trachea.nii.gz",
        mask_source="dataset",
        roi="trachea",
        question_type="presence",
        split="train",
        patient_id="p1",
        volume_id="v1",
        prompt_pngs=["prompts/v1/trachea_montage.png"],
        extra={"finding": "nodule"},
    )
    fields.update(overrides)
    return build_record(qa, **fields)


def test_one_declaration_gives_fields_features_and_order():
    record = _record()
    for layout in ("trl", "paper"):
        converted = to_format(record, layout)
        features = record_features({"finding": datasets.Value("string")}, layout)
        assert list(converted) == [*record_fields(layout), "finding"] == list(features)
        features.encode_example(converted)  # every value fits its declared type
    assert RECORD_FIELDS == tuple(STRUCTURED_FIELDS)
    assert record_features()["closed_label"] == datasets.Value("int64")
    assert record_features()["prompt_pngs"] == datasets.List(datasets.Value("string"))
    for layout in ("trl", "paper"):
        assert record_features(format=layout)["closed_answer"] == datasets.Value("string")
        assert record_features(format=layout)["closed_choices"] == datasets.List(datasets.Value("string"))
    with pytest.raises(ValueError, match="clash"):
        record_features({"prompt_pngs": datasets.Value("string")}, "paper")
    with pytest.raises(ValueError, match="format"):
        record_fields("chatml")


def test_paper_layout_is_the_old_record():
    record = _record()
    paper = to_format(record, "paper")
    assert [m["role"] for m in paper["messages"]] == ["system", "user", "vision", "assistant"]
    assert paper["messages"][2]["content"] == "nifti:volumes/v1.nii.gz; prompt_png:[prompts/v1/trachea_montage.png]"
    assert "prompt_pngs" not in paper and paper["finding"] == "nodule"
    assert message_texts(paper) == message_texts(record)
    assert record_media(paper) == record_media(record) == ("volumes/v1.nii.gz", ["prompts/v1/trachea_montage.png"])
    assert to_format(record, "trl") == record and json.loads(json.dumps(paper)) == paper
    with pytest.raises(ValueError, match="not a trl record"):
        to_format(paper, "paper")


def test_message_texts_rejects_other_layouts():
    with pytest.raises(ValueError, match="roles"):
        message_texts({"messages": [{"role": "user", "content": "hi"}]})
    record = _record()
    record["messages"][1]["content"].append({"type": "text", "text": "again"})
    with pytest.raises(ValueError, match="2 text parts"):
        message_texts(record)


def test_trl_reads_the_conversation_and_rejects_the_paper_layout():
    record = _record()
    volume = np.zeros((4, 4, 4), np.int16)
    assert is_conversational(record)
    filled = prepare_multimodal_messages(record["messages"], images=[volume])
    placeholders = [part for m in filled for part in m["content"] if part["type"] == "image"]
    assert len(placeholders) == 1 and placeholders[0]["image"] is volume
    with pytest.raises(ValueError, match="vision"):
        prepare_multimodal_messages(to_format(record, "paper")["messages"], images=[volume])


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "ds"
    save_nifti(root / "volumes" / "v1.nii.gz", np.zeros((4, 5, 6), np.int16), np.eye(4))
    save_nifti(root / "masks" / "v1_trachea.nii.gz", np.ones((4, 5, 6), np.uint8), np.eye(4))
    (root / "prompts" / "v1").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(root / "prompts" / "v1" / "trachea_montage.png")
    return root


def _dataset(*records):
    return datasets.Dataset.from_list(list(records), features=record_features({"finding": datasets.Value("string")}))


def test_resolve_media_types_the_columns(folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # paths resolve against the folder, not the working directory
    whole = _record(mask_path=None, mask_source=None, roi=None, prompt_pngs=[])
    ds = resolve_media(_dataset(_record(), whole), folder)
    assert ds.features["volume_path"] == datasets.Nifti() and ds.features["mask_path"] == datasets.Nifti()
    assert ds.features["prompt_pngs"] == datasets.List(datasets.Image())
    row = ds[0]
    assert row["volume_path"].shape == (6, 5, 4)  # nibabel's (x, y, z) of the (D, H, W) = (4, 5, 6) array
    assert np.asarray(row["mask_path"].dataobj).all()
    assert row["prompt_pngs"][0].size == (8, 8)
    assert ds[1]["mask_path"] is None and ds[1]["prompt_pngs"] == []


def test_resolve_media_keeps_other_kinds_as_absolute_paths(folder):
    np.save(folder / "volumes" / "v1.npy", np.zeros((1, 2, 2)))
    ds = resolve_media(_dataset(_record(volume_path="volumes/v1.npy")), folder)
    assert ds.features["volume_path"] == datasets.Value("string")
    assert ds[0]["volume_path"] == (folder / "volumes" / "v1.npy").resolve().as_posix()


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"volume_path": "volumes/missing.nii.gz"}, FileNotFoundError, "volume_path 'volumes/missing.nii.gz'"),
        ({"mask_path": "../outside.nii.gz"}, ValueError, "not relative"),
        ({"mask_path": "/abs/mask.nii.gz"}, ValueError, "not relative"),
        ({"mask_path": "prompts/v1/trachea_montage.png"}, None, None),
    ],
)
def test_resolve_media_bad_paths(folder, overrides, error, match):
    ds = _dataset(_record(), _record(**overrides))
    if error is None:  # one column holding NIfTI and PNG files cannot have one type
        error, match = ValueError, "mask_path mixes file kinds"
    with pytest.raises(error, match=match):
        resolve_media(ds, folder)


def test_resolve_media_needs_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_media(_dataset(_record()), tmp_path / "nowhere")


def test_resolve_media_gives_every_split_the_same_types(folder):
    whole = _record(mask_path=None, mask_source=None, roi=None, prompt_pngs=[])
    ds = resolve_media(datasets.DatasetDict({"train": _dataset(_record()), "test": _dataset(whole)}), folder)
    assert ds["test"].features == ds["train"].features and ds["test"].features["mask_path"] == datasets.Nifti()
    assert ds["test"][0]["mask_path"] is None and ds["train"][0]["prompt_pngs"][0].size == (8, 8)


# ---------------------------------------------------------------------------------------------------------------
# The closed-label space
# ---------------------------------------------------------------------------------------------------------------


def _closed_records():
    yes_no = _record()
    choice = build_record(
        rewrite_qa(
            "What is seen? Choices: A. cyst B. mass D. abscess",
            "B. mass",
            answer_type="closed",
            choices=["A. cyst", "B. mass", "C. NA", "D. abscess"],
            offered=["A", "B", "D"],
        ),
        **_record_fields(),
    )
    opened = build_record(rewrite_qa("What is seen?", "A mass.", answer_type="open"), **_record_fields())
    return yes_no, choice, opened


def _record_fields():
    return dict(
        volume_path="volumes/v1.nii.gz",
        mask_path=None,
        mask_source=None,
        roi=None,
        question_type="presence",
        split="train",
        patient_id="p1",
        volume_id="v1",
        extra={"finding": "nodule"},
    )


def test_records_store_closed_answers_by_name_in_both_layouts():
    yes_no, choice, opened = _closed_records()
    assert (yes_no["closed_label"], yes_no["closed_answer"], yes_no["closed_choices"]) == (1, "yes", ["no", "yes"])
    assert (choice["closed_label"], choice["closed_answer"], choice["closed_choices"]) == (1, "B", ["A", "B", "D"])
    assert (opened["closed_label"], opened["closed_answer"], opened["closed_choices"]) == (-1, None, [])
    for layout in ("trl", "paper"):
        rows = [to_format(r, layout) for r in (yes_no, choice, opened)]
        features = record_features({"finding": datasets.Value("string")}, layout)
        loaded = datasets.Dataset.from_list(rows, features=features)  # one table holds mixed label sets
        assert loaded["closed_answer"] == ["yes", "B", None]
        assert loaded["closed_choices"] == [["no", "yes"], ["A", "B", "D"], []]


def test_closed_targets_index_one_vocabulary_with_an_allowed_mask():
    yes_no, choice, opened = _closed_records()
    assert CLOSED_LABEL_NAMES == ("no", "yes", "A", "B", "C", "D")
    assert closed_targets(yes_no) == (1, [True, True, False, False, False, False])
    assert closed_targets(choice) == (3, [False, False, True, True, False, True])
    assert closed_targets(opened) == (CLOSED_IGNORE_INDEX, [False] * 6)
    assert closed_targets(to_format(yes_no, "paper")) == closed_targets(yes_no)
    wider = ["A", "B", "C", "D", "E", "no", "yes"]  # a head with another order: indices follow label_names
    assert closed_targets(yes_no, wider) == (6, [False, False, False, False, False, True, True])


@pytest.mark.parametrize(
    ("change", "label_names", "message"),
    [
        ({"closed_answer": "C"}, CLOSED_LABEL_NAMES, "closed_answer 'C' is not one of its closed_choices"),
        ({"closed_choices": ["no", "yes", "maybe"]}, CLOSED_LABEL_NAMES, r"\['maybe'\] are not"),
        ({"closed_answer": None}, CLOSED_LABEL_NAMES, "closed_answer None"),
        ({"closed_choices": None}, CLOSED_LABEL_NAMES, r"closed_choices \[\] must be distinct names"),
        ({"answer_type": "open"}, CLOSED_LABEL_NAMES, "an open answer has no closed_answer"),
        ({}, ("A", "B", "C", "D"), r"closed_choices \['no', 'yes'\] are not in the head's label names"),
    ],
)
def test_closed_targets_refuse_inconsistent_records(change, label_names, message):
    record = {**_closed_records()[0], **change}
    with pytest.raises(ValueError, match=f"record of volume 'v1': .*{message}"):
        closed_targets(record, label_names)


def test_closed_targets_name_records_built_before_the_fields():
    old = {k: v for k, v in _record().items() if k not in ("closed_answer", "closed_choices")}
    with pytest.raises(ValueError, match=r"volume 'v1' has no \['closed_answer', 'closed_choices'\].*rebuild"):
        closed_targets(old)


def test_check_closed_fields_accepts_consistent_fields():
    check_closed_fields("closed", "D", ["A", "D"])
    check_closed_fields("open", None, [])
    with pytest.raises(ValueError, match="answer_type must be"):
        check_closed_fields("binary", "yes", ["no", "yes"])


def test_model_config_default_label_names_equal_the_data_vocabulary():
    from med3dqwen.modeling.configuration_med3d_qwen import Med3DQwenConfig

    config = Med3DQwenConfig()
    if not hasattr(config, "closed_label_names"):
        pytest.skip("Med3DQwenConfig has no closed_label_names yet (issue #8, model side): nothing to compare")
    assert tuple(config.closed_label_names) == CLOSED_LABEL_NAMES


def test_prompt_mask_path_draws_only_prompted_records():
    from med3dqwen.data.schema import prompt_mask_path

    roi = {"mask_path": "m.nii.gz"}
    assert prompt_mask_path({**roi, "boundary_prompt": "red"}) == "m.nii.gz"
    assert prompt_mask_path({**roi, "boundary_prompt": "blue"}) == "m.nii.gz"
    assert prompt_mask_path({**roi, "boundary_prompt": "none"}) is None  # the ROI is known, no contour is drawn
    assert prompt_mask_path({"mask_path": None, "boundary_prompt": "red"}) is None  # whole-volume question
    assert prompt_mask_path(roi) == "m.nii.gz"  # built before the field existed: drawn, as then
    with pytest.raises(ValueError, match="boundary_prompt"):
        prompt_mask_path({**roi, "boundary_prompt": ""})


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, {"intensity": None, "rescale": None}),  # older datasets: the file decides
        ({"intensity": "hu"}, {"intensity": "hu", "rescale": None}),
        ({"intensity": "unit"}, {"intensity": "unit", "rescale": None}),  # M3D-VQA's [0, 1] arrays
        ({"rescale_slope": 1.0, "rescale_intercept": -1024.0}, {"intensity": None, "rescale": (1.0, -1024.0)}),
        ({"rescale_slope": 1, "rescale_intercept": 0, "intensity": "hu"}, {"intensity": "hu", "rescale": None}),
        ({"rescale_slope": None, "rescale_intercept": None}, {"intensity": None, "rescale": None}),
    ],
)
def test_volume_settings_read_what_the_builders_record(fields, expected):
    assert volume_settings({"volume_path": "v.nii.gz", **fields}) == expected


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"intensity": "HU"}, "intensity must be 'hu' or 'unit'"),
        ({"rescale_slope": 1.0}, "come together"),
        ({"rescale_slope": "one", "rescale_intercept": 0.0}, "must be numbers"),
        ({"rescale_slope": float("nan"), "rescale_intercept": 0.0}, "non-zero finite"),
        ({"rescale_slope": 0.0, "rescale_intercept": -1024.0}, "non-zero finite"),
    ],
)
def test_volume_settings_refuse_malformed_fields(fields, match):
    with pytest.raises(ValueError, match=match):
        volume_settings({"volume_path": "v.nii.gz", **fields})
