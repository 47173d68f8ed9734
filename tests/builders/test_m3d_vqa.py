"""Tests for the M3D-VQA builder (med3dqwen.builders.m3d_vqa and datasets_scripts/build_m3d_vqa.py).

The fixture is a miniature M3D-VQA + M3D-Cap download built here with the real layout and column names: the three
CSVs (the test one with its extra ``Note`` column), small (1, 8, 32, 32) ``.npy`` images in [0, 1] under
``M3D_Cap_npy/<source>/<case>/``, and TotalSegmentator-style per-class masks for one image.
"""

from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
from helpers import (
    QUIET,
    file_tree,
    find_record,
    killed_after,
    read_lines,
    read_records,
    rows_per_reason,
    run_script,
    script_help,
    write_csv,
)

from med3dqwen.builders.engine import BuildArguments, BuildError
from med3dqwen.builders.m3d_vqa import M3DVQABuildConfig, M3DVQABuilder, build_m3d_vqa_dataset, case_id, find_structure
from med3dqwen.data.rewrite import system_prompt
from med3dqwen.data.schema import message_texts, record_media
from med3dqwen.io import save_nifti
from med3dqwen.processing.ct_io import load_mask


HEADER = [
    "Image Path",
    "Text",
    "Question Type",
    "Question",
    "Choice A",
    "Choice B",
    "Choice C",
    "Choice D",
    "Answer",
    "Answer Choice",
]
REPORT = "A well-defined hypodense lesion is seen in the liver."
IMG1 = "M3D_Cap_npy/ct_case/000001/Axial_C__portal_venous_phase.npy"
IMG2 = "M3D_Cap_npy/ct_case/000002/Axial_non_contrast.npy"
IMG3 = "M3D_Cap_npy/ct_quizze/000010/Coronal_bone_window.npy"
SHARED_TRAIN = "M3D_Cap_npy/ct_case/000100/Axial.npy"  # case 000100 is in test too
TRAIN = [
    [
        IMG1,
        REPORT,
        "1",
        "Which plane is the image viewed in?",
        "Axial",
        "Sagittal",
        "Coronal",
        "Oblique",
        "Axial",
        "A",
    ],
    [IMG1, REPORT, "4", "What abnormality is seen in the liver?", "Cyst", "Mass", "Abscess", "NA", "Mass", "B"],
    [IMG1, REPORT, "5", "Where is the lesion in the right kidney?", "Lower pole", "Hilum", "Upper pole", "Cortex"]
    + ["Upper pole", "C"],
    [IMG1, REPORT, "3", "Which organ is enlarged?", "Spleen", "Liver", "Kidney", "Pancreas", "spleen.", "A"],
    [IMG2, REPORT, "1", "In which plane is this image?", "Sagittal", "Axial", "Coronal", "Oblique", "Axial", "B"],
    [IMG2, REPORT, "2", "What is the phase of this CT?", "Arterial", "Non-contrast", "Venous", "Delayed"]
    + ["Non-contrast", "B"],
    [IMG3, REPORT, "2", "Which window is used?", "Lung", "Soft tissue", "Bone", "Brain", "Bone window", "C"],
    ["M3D_Cap_npy/ct_case/000003/Axial.npy", REPORT, "1", "Which plane?", "Axial", "B", "C", "D", "Axial", "A"],
    ["M3D_Cap_npy/ct_case/000004/bad.npy", REPORT, "1", "Which plane?", "Axial", "B", "C", "D", "Axial", "A"],
    ["M3D_Cap_npy/ct_case/000005/shape.npy", REPORT, "1", "Which plane?", "Axial", "B", "C", "D", "Axial", "A"],
    ["../../etc/passwd.npy", REPORT, "1", "Which plane?", "Axial", "B", "C", "D", "Axial", "A"],  # unsafe_path
    ["/data/M3D_Cap_npy/x/1/a.npy", REPORT, "1", "Which plane?", "Axial", "B", "C", "D", "Axial", "A"],  # unsafe_path
    [IMG2, REPORT, "7", "Which plane?", "Axial", "B", "C", "D", "Axial", "A"],  # malformed: type 7
    [IMG2, REPORT, "1", "Which plane?", "Axial", "B", "C", "D", "Axial", "E"],  # malformed: letter E
    [IMG2, REPORT, "4", "What is seen?", "Cyst", "Mass", "Abscess", "NA", "Nothing", "D"],  # malformed: NA choice
    [IMG2, REPORT, "1", "Which plane?", "Axial"],  # malformed: 5 fields
    ["M3D_Cap_npy/ct_case/000001/a.png", REPORT, "1", "Which plane?", "Axial", "B", "C", "D", "Axial", "A"],
    [SHARED_TRAIN, REPORT, "1", "Which plane?", "Axial", "Sagittal", "Coronal", "Oblique", "Axial", "A"],
    [SHARED_TRAIN, REPORT, "3", "Which organ?", "Liver", "Spleen", "Kidney", "Lung", "Liver", "A"],
]
VAL = [
    ["M3D_Cap_npy/ct_case/000050/Axial.npy", REPORT, "1", "Which plane?", "Axial", "Sagittal", "Coronal", "Oblique"]
    + ["Axial", "A"],
    ["M3D_Cap_npy/ct_case/000050/Axial.npy", REPORT, "5", "Where is the mass in the lungs?", "Left", "Right", "Both"]
    + ["NA", "Right", "B"],
]
TEST = [  # extra Note column
    ["M3D_Cap_npy/ct_case/000100/Coronal.npy", REPORT, "1", "Which plane?", "Axial", "Sagittal", "Coronal"]
    + ["Oblique", "Coronal", "C", "1"],
    ["M3D_Cap_npy/ct_quizze/005749/Axial_non_contrast.npy", REPORT, "1", "Which plane is the image viewed in?"]
    + ["Axial", "Sagittal", "Coronal", "Oblique", "Axial", "A", ""],
]
GOOD_ROWS = {"train": 7, "validation": 2, "test": 2}  # rows that give records
EXPECTED_SKIPPED = {"unsafe_path": 2, "malformed_row": 5, "missing_volume": 1, "unreadable_volume": 2}
SHAPE = (1, 8, 32, 32)


def _make_root(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_csv(root / "M3D_VQA_train.csv", HEADER, TRAIN)
    write_csv(root / "M3D_VQA_val.csv", HEADER, VAL)
    write_csv(root / "M3D_VQA_test.csv", [*HEADER, "Note"], TEST)
    rng = np.random.default_rng(0)
    paths = {r[0] for r in TRAIN + VAL + TEST if r[0].endswith(".npy") and not r[0].startswith(("..", "/"))}
    for rel in sorted(paths):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if "000003" in rel:
            continue  # missing
        if "bad.npy" in rel:
            path.write_bytes(b"\x93NUMPY garbage")
        elif "shape.npy" in rel:
            np.save(path, np.zeros((2, 8, 32, 32), np.float32))
        else:
            np.save(path, rng.random(SHAPE, dtype=np.float32))
    # TotalSegmentator per-class output for IMG1, on the .npy grid (saved with the 1-mm standard affine).
    masks = root / "ts_masks" / IMG1[: -len(".npy")]
    liver = np.zeros(SHAPE[1:], bool)
    liver[2:6, 8:20, 10:24] = True
    save_nifti(masks / "liver.nii.gz", liver, dtype=np.uint8)
    save_nifti(masks / "spleen.nii.gz", np.zeros(SHAPE[1:], np.uint8))  # empty in this image
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return _make_root(tmp_path_factory.mktemp("m3d_root"))


def _config(root: Path, out: Path, **kwargs) -> M3DVQABuildConfig:
    return M3DVQABuildConfig(data_root=str(root), output_dir=str(out), **kwargs)


@pytest.fixture(scope="module")
def plain(data_root, tmp_path_factory):
    """A --prompt red build without a mask source (so nothing is outlined)."""
    out = tmp_path_factory.mktemp("m3d_plain") / "out"
    return out, build_m3d_vqa_dataset(_config(data_root, out), QUIET)


MASKED = {"prompt": "red", "mask_source": "totalsegmentator_files", "write_png": "montage", "thickness": 1}


@pytest.fixture(scope="module")
def masked(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("m3d_masked") / "out"
    return out, build_m3d_vqa_dataset(_config(data_root, out, mask_dir=str(data_root / "ts_masks"), **MASKED), QUIET)


def test_case_ids_and_structure_names():
    assert case_id("M3D_Cap_npy/ct_quizze/005749/Axial_non_contrast.npy") == "ct_quizze/005749"
    assert case_id("005749/a.npy") == "005749"
    assert find_structure("Where is the lesion in the left kidney?") == "left kidney"
    assert find_structure("What abnormality is seen in the lungs?") == "lung"
    assert find_structure("Which organ is enlarged?") is None


def test_load_dataset_and_counts(plain):
    out, summary = plain
    ds = datasets.load_dataset(str(out))
    assert set(ds) == {"train", "validation", "test"}
    assert {name: len(split) for name, split in ds.items()} == {k: 2 * v for k, v in GOOD_ROWS.items()}  # both modes
    assert ds["train"].features["choices"].feature.dtype == "string"
    assert summary.question_types == {"abnormality": 2, "location": 4, "organ": 2, "phase": 4, "plane": 10}
    for r in read_records(out):
        assert r["intensity"] == "unit" and r["mask_path"] is None and len(r["choices"]) == 4


def test_closed_and_open_records(plain):
    out, _ = plain
    records = read_records(out)
    closed = find_record(records, "M3D_VQA_train.csv:2", "closed")
    system, question, answer = (message_texts(closed)[role] for role in ("system", "user", "assistant"))
    assert system == system_prompt(prompt=False)  # --prompt red, but no mask source: never outlined
    assert question == "What abnormality is seen in the liver? Choices: A. Cyst B. Mass C. Abscess"  # NA left out
    assert (answer, closed["closed_label"], closed["question_type"]) == ("B. Mass", 1, "abnormality")
    assert (closed["closed_answer"], closed["closed_choices"]) == ("B", ["A", "B", "C"])  # D is NA: not offered
    assert closed["choices"] == ["Cyst", "Mass", "Abscess", ""]
    assert record_media(closed) == (closed["volume_path"], [])
    assert closed["volume_path"] == f"source/images/{IMG1}"
    open_ = find_record(records, "M3D_VQA_train.csv:2", "open")
    assert message_texts(open_)["user"] == "What abnormality is seen in the liver?"
    assert (message_texts(open_)["assistant"], open_["closed_label"]) == ("Mass", -1)
    assert (open_["closed_answer"], open_["closed_choices"]) == (None, [])
    assert find_record(records, "M3D_VQA_train.csv:1", "closed")["closed_label"] == 0
    assert message_texts(find_record(records, "M3D_VQA_train.csv:3", "closed"))["assistant"] == "C. Upper pole"
    organ = find_record(records, "M3D_VQA_train.csv:4", "closed")
    assert (message_texts(organ)["assistant"], organ["closed_label"]) == ("A. Spleen", 0)  # the choice text
    window = find_record(records, "M3D_VQA_train.csv:7", "open")
    assert message_texts(window)["assistant"] == "Bone window"  # open: the Answer text
    assert message_texts(find_record(records, "M3D_VQA_train.csv:7", "closed"))["assistant"] == "C. Bone"


def test_modes(data_root, tmp_path):
    build_m3d_vqa_dataset(_config(data_root, tmp_path / "closed", mode="closed"), QUIET)
    build_m3d_vqa_dataset(_config(data_root, tmp_path / "open", mode="open"), QUIET)
    assert {r["answer_type"] for r in read_records(tmp_path / "closed")} == {"closed"}
    assert {r["answer_type"] for r in read_records(tmp_path / "open")} == {"open"}
    assert len(read_records(tmp_path / "closed")) == sum(GOOD_ROWS.values())


def test_splits_follow_upstream_and_cases_are_disjoint(plain):
    out, summary = plain
    split_of: dict[str, set] = {}
    for r in read_records(out):
        split_of.setdefault(r["patient_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of.values())
    assert split_of["ct_case/000100"] == {"test"}  # shared with train: kept in test only
    assert split_of["ct_case/000050"] == {"validation"} and split_of["ct_case/000001"] == {"train"}
    filtered = read_lines(out / "filtered.jsonl")
    assert [(e["reason"], e["rows"]) for e in filtered] == [("case_overlap", 2)]
    assert summary.counters["case_overlap"] == {"cases": 1}


def test_case_overlap_keep_and_error(data_root, tmp_path):
    with pytest.raises(BuildError, match="1 cases appear in more than one split"):
        build_m3d_vqa_dataset(_config(data_root, tmp_path / "e", case_overlap="error"), QUIET)
    build_m3d_vqa_dataset(_config(data_root, tmp_path / "k", case_overlap="keep", mode="closed"), QUIET)
    splits = {r["split"] for r in read_records(tmp_path / "k") if r["patient_id"] == "ct_case/000100"}
    assert splits == {"train", "test"}


def test_skipped_rows_and_card(plain):
    out, summary = plain
    entries = read_lines(out / "skipped.jsonl")
    counts = rows_per_reason(entries)
    assert counts == Counter(EXPECTED_SKIPPED) and summary.skipped == EXPECTED_SKIPPED
    by_source = {e["source"]: e for e in entries if e["source"]}
    assert by_source["M3D_VQA_train.csv:11"]["reason"] == "unsafe_path"
    assert by_source["M3D_VQA_train.csv:12"]["reason"] == "unsafe_path"
    assert "not 1-5" in by_source["M3D_VQA_train.csv:13"]["detail"]
    assert "NA" in by_source["M3D_VQA_train.csv:15"]["detail"]
    assert "not a .npy" in by_source["M3D_VQA_train.csv:17"]["detail"]
    unreadable = sorted(e["detail"] for e in entries if e["reason"] == "unreadable_volume")
    assert "cannot read .npy" in unreadable[0] and "(2, 8, 32, 32)" in unreadable[1]
    card = (out / "README.md").read_text()
    for reason, n in EXPECTED_SKIPPED.items():
        assert f"| {reason} | {n} |" in card
    assert "arXiv:2404.00578" in card and "Radiopaedia" in card and "license: other" in card
    assert "`M3D_VQA_test.csv: Note`" in card  # the extra column is named
    assert "| plane | closed |" in card and "| plane | open |" in card
    assert "1 rows have an `Answer` that differs" in card


def test_mask_source_outlines_named_structures(masked):
    out, summary = masked
    records = read_records(out)
    liver = find_record(records, "M3D_VQA_train.csv:2", "closed")
    question = message_texts(liver)["user"]
    assert question.startswith("Within the red-outlined area of the CT volume, what abnormality is seen in the liver?")
    assert message_texts(liver)["system"] == system_prompt("red")
    assert (message_texts(liver)["assistant"], liver["closed_label"], liver["closed_answer"]) == ("B. Mass", 1, "B")
    assert (liver["roi"], liver["mask_source"]) == ("liver", "totalsegmentator")
    mask = load_mask(out / liver["mask_path"])
    assert mask.shape == SHAPE[1:] and mask.sum() == 4 * 12 * 14
    _, pngs = record_media(liver)
    assert len(pngs) == 1 and (out / pngs[0]).is_file()
    open_ = find_record(records, "M3D_VQA_train.csv:2", "open")
    assert message_texts(open_)["assistant"] == "Within the red boundary, mass"
    for source in ("M3D_VQA_train.csv:1", "M3D_VQA_train.csv:3", "M3D_VQA_train.csv:4"):
        record = find_record(records, source, "closed")  # plane; right kidney (no file); no structure named
        assert record["mask_path"] is None and message_texts(record)["system"] == system_prompt(prompt=False)
    assert summary.counters["prompted"] == {"abnormality": 1}
    unprompted = summary.counters["unprompted"]
    assert unprompted["structure not available"] == 1 and unprompted["no structure named"] == 1
    assert "Masks from `totalsegmentator_files`: 1 rows" in (out / "README.md").read_text()


def test_hu_threshold_source_runs(data_root, tmp_path):
    summary = build_m3d_vqa_dataset(
        _config(data_root, tmp_path / "hu", mode="closed", mask_source="hu_threshold", prompt="blue"), QUIET
    )
    rows = sum(GOOD_ROWS.values())
    assert sum(summary.counters.get("prompted", {}).values()) + sum(summary.counters["unprompted"].values()) == rows


def test_strict_stops_at_the_first_bad_row(data_root, tmp_path):
    with pytest.raises(BuildError, match="--strict: unsafe_path"):
        build_m3d_vqa_dataset(_config(data_root, tmp_path / "out"), BuildArguments(progress=False, strict=True))


def test_interrupted_build_resumes_to_identical_output(data_root, tmp_path, monkeypatch):
    out, ref = tmp_path / "out", tmp_path / "ref"
    config = {"mask_dir": str(data_root / "ts_masks"), **MASKED}
    build_m3d_vqa_dataset(_config(data_root, out, **config), QUIET)
    out.rename(ref)
    with killed_after(monkeypatch, M3DVQABuilder, 2), pytest.raises(KeyboardInterrupt):
        build_m3d_vqa_dataset(_config(data_root, out, **config), QUIET)
    summary = build_m3d_vqa_dataset(_config(data_root, out, **config), QUIET)
    assert (summary.units_reused, summary.units_processed) == (2, summary.units_total - 2)
    assert file_tree(out) == file_tree(ref)


def test_missing_csv_and_bad_options(data_root, tmp_path):
    with pytest.raises(BuildError, match="M3D_VQA_test5k.csv not found"):
        build_m3d_vqa_dataset(_config(data_root, tmp_path / "o", test_csv="M3D_VQA_test5k.csv"), QUIET)
    with pytest.raises(ValueError, match="needs mask_dir"):
        _config(data_root, tmp_path / "o", mask_source="totalsegmentator_files")
    with pytest.raises(ValueError, match="mode"):
        _config(data_root, tmp_path / "o", mode="yesno")


def test_script_command_line(data_root, tmp_path):
    out = tmp_path / "cli"
    result = run_script(
        "build_m3d_vqa.py",
        *["--data_root", str(data_root), "--output_dir", str(out), "--no_progress"],
        *["--mode", "closed"],
    )
    assert result.returncode == 0, result.stderr
    assert "load it with" in result.stdout and "skipped rows" in result.stdout and "left out: 2 rows" in result.stdout
    assert set(datasets.load_dataset(str(out))) == {"train", "validation", "test"}
    help_text = script_help("build_m3d_vqa.py")
    assert "Expected upstream folders" in help_text and "--mask_source" in help_text
