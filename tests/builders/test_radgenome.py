"""Tests for the RadGenome-ChestCT builder (med3dqwen.builders.radgenome and datasets_scripts/build_radgenome.py).

The fixture is a miniature RadGenome-ChestCT download built here with the real layout and column names: upstream
train volumes are a 32x64x64 phantom (masks renamed to RadGenome leaves), the upstream validation volume is the real
TotalSegmentator example CT with its per-structure masks renamed into ``seg_<volume>/``.
"""

import os
import shutil
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
from helpers import (
    QUIET,
    file_tree,
    killed_after,
    read_lines,
    read_records,
    rows_per_reason,
    run_script,
    script_help,
    write_csv,
)

from med3dqwen.builders.engine import BuildArguments, BuildError
from med3dqwen.builders.phantom import PhantomConfig, generate_phantom
from med3dqwen.builders.radgenome import (
    RadGenomeBuildConfig,
    RadGenomeBuilder,
    Row,
    build_radgenome_dataset,
    dedupe_anatomy_levels,
    parse_anatomy,
    parse_volume_name,
    split_probabilities,
)
from med3dqwen.data.rewrite import system_prompt
from med3dqwen.data.schema import message_texts, prompt_mask_path, record_media
from med3dqwen.data.splits import assign_split
from med3dqwen.io import UnsafePathError, save_nifti
from med3dqwen.processing.ct_io import load_mask, load_volume


TRAIN_PATIENTS = ("train_1", "train_2", "train_3", "train_4")
RATIOS = (0.5, 0.5, 0.0)
# A seed that puts the four usable train patients into both train and validation (dev).
SEED = next(
    s
    for s in range(100)
    if {assign_split(p, s, RATIOS[:2], ("train", "validation")) for p in TRAIN_PATIENTS} == {"train", "validation"}
)

V = "train_1_a_1.nii.gz"
CSVS = {
    # name: (header, rows)
    "vqa_presence": (
        ["Volumename", "Anatomy", "Finding", "Presence"],
        {
            "train": [
                [V, "lung", "nodule, effusion", "Yes."],  # ancestor of the next row, same finding: dropped
                [V, "lung/lung", "nodule, effusion", "Yes."],
                [V, "lung/lung/right lung", "nodule", "Yes."],  # ancestor: dropped
                [V, "lung/lung/right lung/right lung upper lobe", "nodule", "Yes."],  # same leaf as row 6: dropped
                [V, "lung/lung/lung upper lobe", "nodule", "Yes."],  # ancestor: dropped
                [V, "lung/lung/lung upper lobe/right lung upper lobe", "nodule", "Yes."],
                [V, "heart/heart", "pericardial effusion", "No."],  # no anatomy mask "heart": region fallback
                [V, "others/thoracic cavity", "respiratory artifacts", "Yes."],  # whole volume
                [V, "spine/vertebrae", "fracture", "Yes."],  # unknown_anatomy
                ["../../etc/passwd.nii.gz", "lung", "nodule", "Yes."],  # unsafe_path
                [V, "lung/../../secret", "nodule", "Yes."],  # unsafe_path
                [V, "lung", "nodule"],  # malformed_row (3 fields)
                [V, "lung/lung/left lung/left lung lower lobe", "mass", "Maybe"],  # malformed_row
                ["valid_1_a_1.nii.gz", "lung", "nodule", "Yes."],  # malformed_row: other split
                [V, "abdomen/abdomen/liver", "cyst", "Yes."],
                ["train_2_a_1.nii.gz", "lung/lung/left lung/left lung lower lobe", "mass", "No."],
                ["train_3_a_1.nii.gz", "lung/lung/left lung/left lung lower lobe", "mass", "No."],
                ["train_4_a_1.nii.gz", "lung/lung/left lung/left lung lower lobe", "mass", "No."],
                ["train_5_a_1.nii.gz", "lung/lung/left lung/left lung lower lobe", "mass", "No."],  # unreadable
            ],
            "validation": [
                ["valid_1_a_1.nii.gz", "lung/lung/left lung/left lung lower lobe", "atelectasis", "Yes."],
                ["valid_1_a_1.nii.gz", "lung/lung/right lung/right lung lower lobe", "atelectasis", "No."],
                ["valid_1_a_1.nii.gz", "heart/heart/heart tissue", "pericardial effusion", "No."],  # empty_roi
                ["valid_1_a_1.nii.gz", "esophagus/esophagus", "hiatal hernia", "Yes."],  # mask_mismatch
                ["valid_2_a_1.nii.gz", "lung/lung/right lung/right lung upper lobe", "nodule", "Yes."],
                ["valid_2_a_1.nii.gz", "abdomen/abdomen/spleen", "cyst", "No."],  # region fallback
            ],
        },
    ),
    "vqa_abnormality": (
        ["Volumename", "Anatomy", "Abnormality"],
        {
            "train": [
                [V, "lung/lung", "nodule, effusion"],
                [V, "lung/lung/right lung/right lung upper lobe", "nodule"],
                [V, "heart", "no findings"],  # ancestor: dropped
                [V, "heart/heart", "no findings"],
                ["train_1_b_1.nii.gz", "lung/lung/left lung/left lung lower lobe", "mass"],
            ],
            "validation": [],
        },
    ),
    "vqa_location": (
        ["Volumename", "Anatomy", "Abnormality"],
        {
            "train": [
                [V, "lung", "nodule"],  # ancestor: dropped
                [V, "lung/lung/right lung/right lung upper lobe", "nodule"],
                [V, "lung/lung/left lung/left lung lower lobe", "nodule"],
            ],
            "validation": [],
        },
    ),
    "vqa_size": (
        ["Volumename", "Anatomy", "Abnormality", "Size"],
        {
            "train": [
                [V, "lung/lung", "nodule", "6x4 mm"],  # ancestor: dropped
                [V, "lung/lung/right lung/right lung upper lobe", "nodule", "6x4 mm"],
                [V, "abdomen/abdomen/liver", "cyst", "2 cm"],
                [V, "pleura/pleura", "effusion", "170 in"],  # missing_mask (no pleura mask anywhere)
            ],
            "validation": [],
        },
    ),
    "case_disorders": (
        ["Volumename", "Disorders"],
        {
            "train": [
                [V, "pulmonary nodule, pericardial effusion"],
                ["train_1_b_1.nii.gz", "no findings"],
                ["train_2_a_1.nii.gz", "emphysema"],
                ["train_3_a_1.nii.gz", "no findings"],
                ["train_4_a_1.nii.gz", "hiatal hernia"],
                ["train_5_a_1.nii.gz", "no findings"],  # unreadable_volume
                ["train_6_a_1.nii.gz", "no findings"],  # missing_volume
            ],
            "validation": [["valid_1_a_1.nii.gz", "atelectasis"], ["valid_2_a_1.nii.gz", "lung nodule"]],
        },
    ),
    "region_report": (
        ["Volumename", "Anatomy", "Sentence"],
        {
            "train": [
                [V, "", "Whole report of the scan."],  # NaN anatomy: whole-report row
                [V, "lung", "A nodule is seen in the right upper lobe."],  # ancestor: dropped
                [V, "lung/lung/right lung/right lung upper lobe", "A nodule is seen in the right upper lobe."],
                [V, "trachea and bronchie", "Trachea and both main bronchi are open."],
            ],
            "validation": [["valid_1_a_1.nii.gz", "", "Atelectasis in the left lower lobe."]],
        },
    ),
}
EXPECTED_RECORDS = {
    "train_1_a_1": {
        "presence": 5,
        "abnormality": 3,
        "location": 1,
        "size": 2,
        "case_disorders": 1,
        "region_report": 3,
    },
    "train_1_b_1": {"abnormality": 1, "case_disorders": 1},
    "train_2_a_1": {"presence": 1, "case_disorders": 1},
    "train_3_a_1": {"presence": 1, "case_disorders": 1},
    "train_4_a_1": {"presence": 1, "case_disorders": 1},
    "valid_1_a_1": {"presence": 2, "case_disorders": 1, "region_report": 1},
    "valid_2_a_1": {"presence": 2, "case_disorders": 1},
}
EXPECTED_SKIPPED = {
    "unknown_anatomy": 1,
    "unsafe_path": 2,
    "malformed_row": 3,
    "missing_mask": 1,
    "unreadable_volume": 2,
    "missing_volume": 1,
    "empty_roi": 1,
    "mask_mismatch": 1,
}
# Phantom structure → RadGenome anatomy-mask leaf (for the upstream-train volumes).
PHANTOM_ANATOMY = {
    "lung_upper_lobe_right": "right lung upper lobe",
    "lung_lower_lobe_left": "left lung lower lobe",
    "liver": "liver",
}


def _make_root(root: Path, real_ct: Path) -> Path:
    """A RadGenome-ChestCT download in miniature (see the module docstring)."""
    dataset = root / "dataset"
    files = dataset / "radgenome_files"
    files.mkdir(parents=True)
    for stem, (header, by_split) in CSVS.items():
        for split, rows in by_split.items():
            write_csv(files / f"{split}_{stem}.csv", header, rows)

    # Upstream train: one phantom, saved once and copied per volume.
    phantom = generate_phantom(7, PhantomConfig(shape=(32, 64, 64)))
    staged = root / "staged"
    save_nifti(staged / "volume.nii.gz", np.rint(phantom.volume).astype(np.int16), phantom.affine, np.int16)
    for name, leaf in PHANTOM_ANATOMY.items():
        save_nifti(staged / "anatomy" / f"{leaf}.nii.gz", phantom.masks[name], phantom.affine, np.uint8)
    regions = {
        "lung": phantom.masks["lung_left"] | phantom.masks["lung_right"],
        "heart": phantom.masks["heart"],
        "abdomen": phantom.masks["liver"] | phantom.masks["spleen"] | phantom.masks["stomach"],
        "trachea and bronchie": phantom.masks["trachea"],
    }
    for name, mask in regions.items():
        save_nifti(staged / "region" / f"{name}.nii.gz", mask, phantom.affine, np.uint8)
    save_nifti(staged / "esophagus.nii.gz", phantom.masks["esophagus"], phantom.affine, np.uint8)

    layout = {  # volume → folder inside train_preprocessed (train_4 uses CT-RATE's "train_4_a" spelling)
        "train_1_a_1": "train_1/train_1a",
        "train_1_b_1": "train_1/train_1b",
        "train_2_a_1": "train_2/train_2a",
        "train_3_a_1": "train_3/train_3a",
        "train_4_a_1": "train_4/train_4_a",
        "train_5_a_1": "train_5/train_5a",
        "valid_2_a_1": "valid_2/valid_2a",
    }
    for volume, folder in layout.items():
        prefix = volume.split("_")[0]
        target = dataset / f"{prefix}_preprocessed" / folder / f"{volume}.nii.gz"
        target.parent.mkdir(parents=True)
        shutil.copy(staged / "volume.nii.gz", target)
        shutil.copytree(staged / "anatomy", dataset / f"{prefix}_anatomy_mask" / f"seg_{volume}")
        shutil.copytree(staged / "region", dataset / f"{prefix}_region_mask" / f"seg_{volume}")
    (dataset / "train_preprocessed" / "train_5/train_5a/train_5_a_1.nii.gz").write_bytes(b"\x1f\x8b not a nifti")
    (dataset / "valid_anatomy_mask" / "seg_valid_2_a_1" / "spleen.nii.gz").unlink(missing_ok=True)

    # Upstream validation: the real TotalSegmentator example CT, its per-structure masks renamed.
    ts = real_ct / "totalseg_example_ct_sm"
    target = dataset / "valid_preprocessed" / "valid_1" / "valid_1a" / "valid_1_a_1.nii.gz"
    target.parent.mkdir(parents=True)
    shutil.copy(ts / "example_ct_sm.nii.gz", target)
    anatomy = dataset / "valid_anatomy_mask" / "seg_valid_1_a_1"
    anatomy.mkdir(parents=True)
    for ts_name, leaf in {
        "lung_lower_lobe_left": "left lung lower lobe",
        "lung_lower_lobe_right": "right lung lower lobe",
        "liver": "liver",
        "heart": "heart tissue",  # empty in this crop
    }.items():
        shutil.copy(ts / "example_seg_fast" / f"{ts_name}.nii.gz", anatomy / f"{leaf}.nii.gz")
    shutil.copy(staged / "esophagus.nii.gz", anatomy / "esophagus.nii.gz")  # a phantom mask: wrong grid
    volume = load_volume(target)
    region = dataset / "valid_region_mask" / "seg_valid_1_a_1"

    def ts_mask(*names: str) -> np.ndarray:
        return np.any([load_mask(ts / "example_seg_fast" / f"{n}.nii.gz", like=volume) for n in names], axis=0)

    save_nifti(region / "lung.nii.gz", ts_mask("lung_lower_lobe_left", "lung_lower_lobe_right"), volume.affine)
    save_nifti(region / "heart.nii.gz", ts_mask("heart"), volume.affine)
    save_nifti(region / "abdomen.nii.gz", ts_mask("liver", "spleen"), volume.affine)
    shutil.rmtree(staged)
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, real_ct) -> Path:
    return _make_root(tmp_path_factory.mktemp("radgenome_root"), real_ct)


def _config(root: Path, out: Path, **kwargs) -> RadGenomeBuildConfig:
    kwargs.setdefault("seed", SEED)
    kwargs.setdefault("split_ratios", RATIOS)
    return RadGenomeBuildConfig(data_root=str(root), output_dir=str(out), **kwargs)


# PNG builds use 1-px contours: boundary_mask(thickness=3) raises on ROIs 2-3 px thin in-plane (the phantom trachea
# on this 64x64 grid), a ct_transforms bug reported to its owner.
PNG = {"write_png": "montage", "thickness": 1}


@pytest.fixture(scope="module")
def red_build(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("radgenome_red") / "out"
    summary = build_radgenome_dataset(_config(data_root, out), QUIET)
    return out, summary


# ---------------------------------------------------------------------------------------------------------------
# Parsing units
# ---------------------------------------------------------------------------------------------------------------


def test_volume_names_and_the_folder_quirk():
    name = parse_volume_name("train_362_a_1.nii.gz")
    assert (name.volume_id, name.patient_id) == ("train_362_a_1", "train_362")
    assert name.relpaths()[0] == "train_362/train_362a/train_362_a_1.nii.gz"  # no "_" before the scan letter
    assert name.relpaths()[1] == "train_362/train_362_a/train_362_a_1.nii.gz"  # CT-RATE's spelling, fallback
    assert parse_volume_name("valid_7_b_2.nii.gz").patient_id == "valid_7" != "train_7"
    for bad in ("train_362_a_1.nii", "test_1_a_1.nii.gz", "train_x_a_1.nii.gz", ""):
        with pytest.raises(ValueError, match="does not match"):
            parse_volume_name(bad)
    for unsafe in ("../train_1_a_1.nii.gz", "/data/train_1_a_1.nii.gz", "a\\train_1_a_1.nii.gz"):
        with pytest.raises(UnsafePathError):
            parse_volume_name(unsafe)


def test_anatomy_paths():
    assert parse_anatomy("lung/lung/right lung") == ("lung", "lung", "right lung")
    assert parse_anatomy(" trachea and bronchie/trachea ") == ("trachea and bronchie", "trachea")
    assert parse_anatomy("others/thoracic cavity")[-1] == "thoracic cavity"
    with pytest.raises(ValueError, match="unknown anatomy"):
        parse_anatomy("spine/t7")
    with pytest.raises(ValueError, match="empty component"):
        parse_anatomy("lung//right lung")
    for unsafe in ("/etc/passwd", "lung/../x", "lung/./x", "lung\\x"):
        with pytest.raises(UnsafePathError):
            parse_anatomy(unsafe)


def test_dedupe_keeps_the_deepest_level():
    # Rows as in the upstream subset: the same finding repeated down the tree, plus a second path to one leaf.
    rows = [
        Row("presence", 1, "p:1", ("lung",), "ggo, nodule", "Yes."),
        Row("presence", 2, "p:2", ("lung", "lung"), "ggo, nodule", "Yes."),
        Row("presence", 3, "p:3", ("lung", "lung", "right lung"), "ggo", "Yes."),
        Row("presence", 4, "p:4", ("lung", "lung", "right lung", "right lung upper lobe"), "ggo", "Yes."),
        Row("presence", 5, "p:5", ("lung", "lung", "lung upper lobe", "right lung upper lobe"), "ggo", "Yes."),
        Row("presence", 6, "p:6", ("lung", "lung", "lung lower lobe"), "ggo", "Yes."),
        Row("presence", 7, "p:7", ("lung", "lung", "right lung"), "ggo", "No."),  # other answer: kept
        Row("abnormality", 8, "a:1", ("heart",), "no findings"),
        Row("abnormality", 9, "a:2", ("heart", "heart"), "no findings"),
        Row("abnormality", 10, "a:3", ("lung", "lung"), "no findings"),  # not related to heart: kept
    ]
    kept, removed = dedupe_anatomy_levels(rows)
    assert [r.number for r in kept] == [2, 5, 6, 7, 9, 10]
    assert removed == Counter({"presence": 3, "abnormality": 1})


def test_split_probabilities():
    assert split_probabilities(100, 10, (0.7, 0.1, 0.2), "upstream") == pytest.approx((0.875, 0.125, 0.0))
    # Full RadGenome: 20,000 train / 1,304 validation patients; "overall" reaches 70/10/20 of all 21,304.
    p_train, p_val, p_test = split_probabilities(20000, 1304, (0.7, 0.1, 0.2), "overall")
    assert p_val * 20000 == pytest.approx(0.1 * 21304)
    assert p_test * 20000 + 1304 == pytest.approx(0.2 * 21304)
    assert p_train * 20000 == pytest.approx(0.7 * 21304)
    assert split_probabilities(100, 50, (0.7, 0.1, 0.2), "overall")[2] == 0.0  # validation already > 20 %
    with pytest.raises(ValueError, match="split_ratios"):
        split_probabilities(10, 1, (0.5, 0.6, -0.1), "upstream")
    with pytest.raises(ValueError, match="split_mode"):
        split_probabilities(10, 1, (0.7, 0.1, 0.2), "random")


# ---------------------------------------------------------------------------------------------------------------
# A full build on the fixture
# ---------------------------------------------------------------------------------------------------------------


def test_load_dataset_gives_train_validation_test(red_build):
    out, summary = red_build
    ds = datasets.load_dataset(str(out))
    assert set(ds) == {"train", "validation", "test"}
    assert sum(len(split) for split in ds.values()) == sum(sum(v.values()) for v in EXPECTED_RECORDS.values())
    assert set(ds["test"]["volume_id"]) == {"valid_1_a_1", "valid_2_a_1"}  # upstream validation = our test
    assert ds["train"].features["closed_label"].dtype == "int64"
    assert ds["train"].features["closed_choices"] == datasets.List(datasets.Value("string"))
    closed = ds["train"].filter(lambda row: row["answer_type"] == "closed")
    assert len(closed) and set(closed["closed_answer"]) <= {"no", "yes"}
    assert all(choices == ["no", "yes"] for choices in closed["closed_choices"])
    assert ds["test"].features["mask_path"].dtype == "string"
    assert summary.questions == {name: len(ds[name]) for name in ("train", "validation", "test")}


def test_row_counts_per_volume_and_type(red_build):
    out, summary = red_build
    counts: dict[str, Counter] = {}
    for r in read_records(out):
        counts.setdefault(r["volume_id"], Counter())[r["question_type"]] += 1
    assert counts == {k: Counter(v) for k, v in EXPECTED_RECORDS.items()}
    assert summary.counters["deduplicated"] == {
        "abnormality": 1,
        "location": 1,
        "presence": 4,
        "region_report": 1,
        "size": 1,
    }
    assert summary.counters["location_rows_merged"] == {"questions": 1, "rows": 2}


def test_splits_are_disjoint_by_patient(red_build):
    out, _ = red_build
    split_of: dict[str, set] = {}
    for r in read_records(out):
        split_of.setdefault(r["patient_id"], set()).add(r["split"])
        assert r["patient_id"] == "_".join(r["volume_id"].split("_")[:2])
    assert all(len(s) == 1 for s in split_of.values())
    for patient in TRAIN_PATIENTS:
        assert split_of[patient] == {assign_split(patient, SEED, RATIOS)}
    assert {p for p, s in split_of.items() if s == {"test"}} == {"valid_1", "valid_2"}
    assert {s for p, (s,) in split_of.items() if p.startswith("train")} == {"train", "validation"}


def test_rewritten_text_labels_and_masks(red_build):
    out, _ = red_build
    records = {(r["volume_id"], r["source_row"]): r for r in read_records(out)}
    red = system_prompt("red")

    deepest = records[("train_1_a_1", "train_vqa_presence.csv:6")]
    question, answer = message_texts(deepest)["user"], message_texts(deepest)["assistant"]
    assert question.startswith("Inside the red boundary, ")
    assert "upper lobe of right lung" in question and "nodule" in question  # RadLex-normalised region
    assert (answer, deepest["closed_label"], deepest["answer_type"]) == ("Yes.", 1, "closed")
    assert (deepest["closed_answer"], deepest["closed_choices"]) == ("yes", ["no", "yes"])
    assert deepest["mask_path"] == "source/train_anatomy_mask/seg_train_1_a_1/right lung upper lobe.nii.gz"
    assert (deepest["mask_source"], deepest["roi"]) == ("radgenome_anatomy_mask", "right lung upper lobe")
    assert deepest["volume_path"] == "source/train_preprocessed/train_1/train_1a/train_1_a_1.nii.gz"
    assert message_texts(deepest)["system"] == red

    heart = records[("train_1_a_1", "train_vqa_presence.csv:7")]
    assert (message_texts(heart)["assistant"], heart["closed_label"], heart["closed_answer"]) == ("No.", 0, "no")
    assert heart["mask_path"] == "source/train_region_mask/seg_train_1_a_1/heart.nii.gz"  # fallback to region
    assert heart["mask_source"] == "radgenome_region_mask"

    others = records[("train_1_a_1", "train_vqa_presence.csv:8")]
    assert others["mask_path"] is None and others["roi"] is None  # whole volume: no contour
    assert message_texts(others)["system"] == system_prompt(prompt=False)
    assert "thoracic cavity" in message_texts(others)["user"] and "red" not in message_texts(others)["user"]

    size = records[("train_1_a_1", "train_vqa_size.csv:2")]
    assert message_texts(size)["assistant"] == "Within the red boundary, 6x4 mm"  # noisy size kept as text
    assert message_texts(records[("train_1_a_1", "train_vqa_size.csv:3")])["assistant"].endswith("2 cm")

    location = records[("train_1_a_1", "train_vqa_location.csv:2;train_vqa_location.csv:3")]
    assert message_texts(location)["assistant"] == "In the upper lobe of right lung and the lower lobe of left lung."
    assert location["mask_path"] is None and location["anatomy"] == "whole scan"

    trachea = records[("train_1_a_1", "train_region_report.csv:4")]
    assert trachea["mask_path"] == "source/train_region_mask/seg_train_1_a_1/trachea and bronchie.nii.gz"
    assert "trachea and bronchi" in message_texts(trachea)["user"]
    whole = records[("train_1_a_1", "train_region_report.csv:1")]
    assert whole["mask_path"] is None and message_texts(whole)["assistant"] == "Whole report of the scan."

    case = records[("train_1_a_1", "train_case_disorders.csv:1")]
    assert case["mask_path"] is None and message_texts(case)["assistant"] == "pulmonary nodule, pericardial effusion"

    ct_rate_layout = records[("train_4_a_1", "train_vqa_presence.csv:18")]
    assert ct_rate_layout["volume_path"] == "source/train_preprocessed/train_4/train_4_a/train_4_a_1.nii.gz"

    real = records[("valid_1_a_1", "validation_vqa_presence.csv:1")]
    assert real["mask_path"] == "source/valid_anatomy_mask/seg_valid_1_a_1/left lung lower lobe.nii.gz"
    assert real["split"] == "test"
    assert records[("valid_2_a_1", "validation_vqa_presence.csv:6")]["mask_source"] == "radgenome_region_mask"


def test_paths_are_relative_and_stay_in_the_data_root(red_build, data_root):
    out, _ = red_build
    root = os.path.realpath(data_root)
    for r in read_records(out):
        volume, pngs = record_media(r)
        assert volume == r["volume_path"] and pngs == []
        for path in filter(None, (r["volume_path"], r["mask_path"])):
            assert not Path(path).is_absolute() and ".." not in Path(path).parts
            assert os.path.realpath(out / path).startswith(root + os.sep) and (out / path).is_file()
    record = next(r for r in read_records(out) if r["volume_id"] == "valid_1_a_1" and r["mask_path"])
    volume = load_volume(out / record["volume_path"])
    assert load_mask(out / record["mask_path"], like=volume).any()


def test_skipped_rows_are_counted_with_reasons(red_build):
    out, summary = red_build
    entries = read_lines(out / "skipped.jsonl")
    counts = rows_per_reason(entries)
    assert counts == Counter(EXPECTED_SKIPPED) and summary.skipped == EXPECTED_SKIPPED
    by_source = {e["source"]: e for e in entries}
    assert by_source["train_vqa_presence.csv:10"]["reason"] == "unsafe_path"
    assert by_source["train_vqa_presence.csv:12"]["detail"] == "expected 4 fields, got 3"
    assert by_source["validation_vqa_presence.csv:3"]["reason"] == "empty_roi"
    assert by_source["validation_vqa_presence.csv:4"]["reason"] == "mask_mismatch"
    missing = next(e for e in entries if e["reason"] == "missing_volume")
    assert missing["unit_id"] == "train_6_a_1" and "train_6/train_6a/train_6_a_1.nii.gz" in missing["detail"]
    card = (out / "README.md").read_text()
    for reason, n in EXPECTED_SKIPPED.items():
        assert f"| {reason} | {n} |" in card


def test_card(red_build):
    out, summary = red_build
    card = (out / "README.md").read_text()
    assert "license: cc-by-nc-sa-4.0" in card and "arXiv:2404.16754" in card and "configs:" in card
    for split in ("train", "validation", "test"):
        assert f"path: data/{split}.jsonl" in card
        assert f"| {split} | {summary.questions[split]} |" in card
    assert "| presence | closed |" in card and "| case_disorders | open |" in card
    assert "- name: source_row" in card
    assert "8 rows dropped as the same finding" in card


def test_strict_stops_at_the_first_bad_row(data_root, tmp_path):
    with pytest.raises(BuildError, match="--strict: unknown_anatomy"):
        build_radgenome_dataset(_config(data_root, tmp_path / "out"), BuildArguments(progress=False, strict=True))


def test_no_prompt_variant(data_root, tmp_path):
    out = tmp_path / "none"
    build_radgenome_dataset(_config(data_root, out, prompt="none", question_types=("presence", "size")), QUIET)
    records = read_records(out)
    assert {r["question_type"] for r in records} == {"presence", "size"}
    for r in records:
        assert message_texts(r)["system"] == system_prompt(prompt=False)
        assert "boundary" not in message_texts(r)["user"] + message_texts(r)["assistant"]
    assert any(r["mask_path"] for r in records)  # masks are still listed, but not drawn
    assert {r["boundary_prompt"] for r in records} == {"none"}
    assert all(prompt_mask_path(r) is None for r in records)


def test_pngs_once_per_volume_and_roi(data_root, tmp_path):
    out = tmp_path / "png"
    build_radgenome_dataset(_config(data_root, out, prompt="blue", **PNG), QUIET)
    records = read_records(out)
    rois = {(r["volume_id"], r["mask_path"]) for r in records if r["mask_path"]}
    written = sorted((out / "prompts").glob("*/*.png"))
    assert len(written) == len(rois)
    for r in records:
        _, pngs = record_media(r)
        assert len(pngs) == (1 if r["mask_path"] else 0)
        assert all((out / p).is_file() and p.startswith(f"prompts/{r['volume_id']}/") for p in pngs)


def test_interrupted_build_resumes_to_identical_output(data_root, tmp_path, monkeypatch):
    out, ref = tmp_path / "out", tmp_path / "ref"
    build_radgenome_dataset(_config(data_root, out, **PNG), QUIET)
    out.rename(ref)
    with killed_after(monkeypatch, RadGenomeBuilder, 4), pytest.raises(KeyboardInterrupt):
        build_radgenome_dataset(_config(data_root, out, **PNG), QUIET)
    assert not (out / "data").exists() and len(list((out / ".work" / "units").iterdir())) == 4
    summary = build_radgenome_dataset(_config(data_root, out, **PNG), QUIET)
    assert (summary.units_reused, summary.units_processed) == (4, summary.units_total - 4)
    assert file_tree(out) == file_tree(ref)


def test_shards_merge_to_the_same_dataset(data_root, red_build, tmp_path):
    ref, _ = red_build
    out = tmp_path / "out"
    with pytest.raises(BuildError, match="not built yet"):
        build_radgenome_dataset(_config(data_root, out), BuildArguments(progress=False, merge_only=True))
    for index in range(3):
        summary = build_radgenome_dataset(
            _config(data_root, out), BuildArguments(progress=False, num_shards=3, shard_index=index)
        )
        assert not summary.merged and not (out / "data").exists()
    build_radgenome_dataset(_config(data_root, out), BuildArguments(progress=False, merge_only=True, num_shards=3))
    for name in ("data/train.jsonl", "data/validation.jsonl", "data/test.jsonl", "skipped.jsonl"):
        assert (out / name).read_bytes() == (ref / name).read_bytes()


def test_moved_data_root_reuses_finished_volumes(data_root, red_build, tmp_path):
    ref, _ = red_build
    out = tmp_path / "out"
    build_radgenome_dataset(_config(data_root, out), QUIET)
    moved = tmp_path / "moved"
    shutil.copytree(data_root, moved)
    summary = build_radgenome_dataset(_config(moved, out), QUIET)
    assert summary.units_processed == 0 and summary.units_reused == summary.units_total
    assert Path(os.readlink(out / "source" / "valid_preprocessed")) == (moved / "dataset" / "valid_preprocessed")
    assert (out / "data" / "test.jsonl").read_bytes() == (ref / "data" / "test.jsonl").read_bytes()


def test_changed_configuration_is_refused(data_root, red_build):
    out, _ = red_build
    with pytest.raises(BuildError, match="another configuration.*prompt"):
        build_radgenome_dataset(_config(data_root, out, prompt="blue"), QUIET)


def test_missing_csv_is_an_error(data_root, tmp_path):
    csv_dir = tmp_path / "csv"
    shutil.copytree(data_root / "dataset" / "radgenome_files", csv_dir)
    (csv_dir / "validation_vqa_size.csv").unlink()
    with pytest.raises(BuildError, match="validation_vqa_size.csv not found"):
        build_radgenome_dataset(_config(data_root, tmp_path / "out", csv_dir=str(csv_dir)), QUIET)
    # The folder overrides work, and leaving the type out builds.
    summary = build_radgenome_dataset(
        _config(data_root, tmp_path / "out2", csv_dir=str(csv_dir), question_types=("presence", "location")), QUIET
    )
    assert set(summary.question_types) == {"presence", "location"}


def test_script_command_line(data_root, tmp_path):
    out = tmp_path / "cli"
    result = run_script(
        "build_radgenome.py",
        *["--data_root", str(data_root), "--output_dir", str(out), "--prompt", "blue"],
        *["--no_progress", "--seed", str(SEED), "--split_ratios", *map(str, RATIOS)],
    )
    assert result.returncode == 0, result.stderr
    assert "load it with" in result.stdout and "skipped rows" in result.stdout
    ds = datasets.load_dataset(str(out))
    assert set(ds) == {"train", "validation", "test"}
    questions = [message_texts(row)["user"] for split in ds.values() for row in split]
    assert any(q.startswith("Within the blue-outlined area") for q in questions)
    assert "Expected upstream folder ROOT" in script_help("build_radgenome.py")


def test_broken_leaf_mask_is_skipped_not_outlined_by_its_region(data_root, tmp_path):
    # The builder once fell back to the region mask for an unreadable leaf file while the mask source raised; both
    # now share the source's rule: a broken file is reported (unreadable_mask), an empty one falls back like a
    # missing one.
    from med3dqwen.builders.radgenome import _Masks

    root = tmp_path / "root"
    for kind in ("anatomy", "region"):
        shutil.copytree(
            data_root / "dataset" / f"train_{kind}_mask" / "seg_train_1_a_1", root / kind / "seg_train_1_a_1"
        )
    leaves = root / "anatomy" / "seg_train_1_a_1"
    (leaves / "liver.nii.gz").write_bytes(b"\x1f\x8b not a nifti")
    image = load_volume(data_root / "dataset" / "train_preprocessed" / "train_1" / "train_1a" / "train_1_a_1.nii.gz")
    empty = load_mask(leaves / "left lung lower lobe.nii.gz", like=image) & False
    save_nifti(leaves / "left lung lower lobe.nii.gz", empty, image.affine, np.uint8)
    config = _config(
        data_root,
        tmp_path / "out",
        train_anatomy_mask_dir=str(root / "anatomy"),
        train_region_mask_dir=str(root / "region"),
    )
    masks = _Masks(RadGenomeBuilder(config), parse_volume_name(V), image, tmp_path / "out")

    mask, reason, detail = masks.lookup("abdomen", "liver")
    assert mask is None and reason == "unreadable_mask" and "liver.nii.gz" in detail
    mask, reason, _ = masks.lookup("lung", "left lung lower lobe")
    assert reason == "empty" and mask[:3] == (
        "source/train_region_mask/seg_train_1_a_1/lung.nii.gz",
        "radgenome_region_mask",
        "lung",
    )
    mask, reason, detail = masks.lookup("lung", "left lung..upper lobe")  # passes parse_anatomy, not the source
    assert mask is None and reason == "unsafe_path" and "contains '..'" in detail
    mask, reason, _ = masks.lookup("lung", "right lung upper lobe")
    assert reason == "" and mask[1:3] == ("radgenome_anatomy_mask", "right lung upper lobe")
