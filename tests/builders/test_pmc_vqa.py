"""Tests for the PMC-VQA builder (med3dqwen.builders.pmc_vqa and datasets_scripts/build_pmc_vqa.py).

The fixtures are miniature PMC-VQA downloads built here with the real layouts and column names: a v2 root
(``train_2.csv`` / ``test_2.csv`` with ``Caption``, letter answers, ``images_2/``) and a v1 root (``train.csv`` with
the ``Anwser`` spelling, ``test.csv``, ``Answer_label``, ``images/``), with tiny JPEG / PNG figures written with PIL.
"""

import os
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
from PIL import Image

from med3dqwen.builders.engine import BuildArguments, BuildError
from med3dqwen.builders.pmc_vqa import (
    PMCVQABuildConfig,
    PMCVQABuilder,
    build_pmc_vqa_dataset,
    ct_filter,
    pmcid,
    strip_choice_letter,
)
from med3dqwen.data.rewrite import system_prompt
from med3dqwen.data.schema import message_texts, record_media
from med3dqwen.data.splits import assign_split
from med3dqwen.processing.ct_io import load_volume


V2_HEADER = ["index", "Figure_path", "Caption", "Question", "Choice A", "Choice B", "Choice C", "Choice D", "Answer"]
V2_HEADER += ["split"]
CT = "Axial CT of the chest."
EXTRA_ARTICLES = [f"PMC3{i:02d}" for i in range(12)]
TRAIN_2 = [
    ["0", "PMC100_F1.jpg", CT, "What is seen in the right lung?", "A:Nodule", "B:Mass", "C:Cavity", "D:Normal", "A"],
    ["1", "PMC100_F1.jpg", CT, "Where is the lesion?", " A:Left lung", " B:Right lung", " C:Liver", " D:Windpipe"]
    + [" B"],
    ["2", "PMC100_F2.png", "Contrast-enhanced computed tomography of the abdomen.", "Which organ is enlarged?"]
    + ["A:Liver", "B:Spleen", "C:Kidney", "D:Pancreas", "C"],
    ["3", "PMC200_F1.jpg", "PET/CT shows FDG uptake.", "Where is the uptake?", "A:Lung", "B:Liver", "C:Bone"]
    + ["D:None", "A"],
    ["4", "PMC201_F1.jpg", "CBCT of the mandible.", "What is shown?", "A:Cyst", "B:Tooth", "C:Nerve", "D:None", "A"],
    ["5", "PMC202_F1.jpg", "Brain MRI, T2-weighted.", "What is shown?", "A:Tumor", "B:Edema", "C:Bleed", "D:None"]
    + ["A"],
    ["6", "PMC203_F1.jpg", "CT (a) and MRI (b) of the liver.", "What is shown?", "A:Cyst", "B:Mass", "C:Abscess"]
    + ["D:None", "B"],
    ["7", "PMC204_F1.jpg", "", "What does this CT scan show?", "A:Effusion", "B:Mass", "C:Nodule", "D:None", "B"],
    ["8", "PMC205_F1.jpg", "Chest X-ray.", "Which imaging modality is used?", "A:CT", "B:MRI", "C:X-ray"]
    + ["D:Ultrasound", "C"],  # the distractor "CT" does not count: not_ct
    ["9", "PMC206_F1.jpg", CT, "What is shown?", "A:Cyst", "B:Mass", "C:Abscess", "D:None", "A"],  # missing
    ["10", "PMC207_F1.jpg", CT, "What is shown?", "A:Cyst", "B:Mass", "C:Abscess", "D:None", "A"],  # unreadable
    ["11", "../../etc/PMC1_F1.jpg", CT, "What is shown?", "A:Cyst", "B:Mass", "C:Abscess", "D:None", "A"],
    ["12", "/data/PMC1_F1.jpg", CT, "What is shown?", "A:Cyst", "B:Mass", "C:Abscess", "D:None", "A"],
    ["13", "PMC100_F1.jpg", CT, "What is shown?", "A:Cyst", "B:Mass", "C:Abscess", "D:None", "E"],  # bad letter
    ["14", "PMC100_F1.jpg", CT, "What is shown?"],  # 4 fields
    ["15", "PMC100_F1.pdf", CT, "What is shown?", "A:Cyst", "B:Mass", "C:Abscess", "D:None", "A"],  # not an image
    ["16", "PMC100_F1.jpg", CT, "", "A:Cyst", "B:Mass", "C:Abscess", "D:None", "A"],  # empty question
    ["17", "PMC100_F1.jpg", CT, "What is shown?", "A:Cyst", "B:Mass", "C:Abscess", "D:", "D"],  # empty choice
]
TRAIN_2 = [row + ["train"] if len(row) == 9 else row for row in TRAIN_2]
TRAIN_2 += [
    [str(20 + i), f"{a}_F1.jpg", CT, "Is there a nodule?", "A:Yes", "B:No", "C:Maybe", "D:Unknown", "A", "train"]
    for i, a in enumerate(EXTRA_ARTICLES)
]
TEST_2 = [
    ["0", "PMC100_F1.jpg", CT, "What is seen in the right lung?", "A:Nodule", "B:Mass", "C:Cavity", "D:Normal", "A"]
    + ["test"],  # repeated from train_2.csv: kept once
    ["1", "PMC400_F1.jpg", CT, "Is the liver enlarged?", "A:Yes", "B:No", "C:Maybe", "D:Unknown", "B", "test"],
]
KEPT_ROWS = 3 + 1 + len(EXTRA_ARTICLES) + 1  # rows giving records: PMC100 (3), PMC204, PMC3xx, PMC400
KEPT_ARTICLES = ["PMC100", "PMC204", *EXTRA_ARTICLES, "PMC400"]
EXPECTED_SKIPPED = {"unsafe_path": 2, "malformed_row": 5, "missing_volume": 1, "unreadable_volume": 1}
EXPECTED_FILTERED = {
    "PMC200_F1": "pet_spect_ct",
    "PMC201_F1": "cbct_or_micro_ct",
    "PMC202_F1": "not_ct",
    "PMC203_F1": "mixed_modality",
    "PMC205_F1": "not_ct",
}
RATIOS = (0.8, 0.1, 0.1)
SEED = next(
    s for s in range(200) if {assign_split(a, s, RATIOS) for a in KEPT_ARTICLES} == {"train", "validation", "test"}
)


def _figure(path: Path, size=(24, 20), mode="RGB") -> None:
    rng = np.random.default_rng(len(path.name))
    array = rng.integers(0, 256, (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0]), dtype=np.uint8)
    Image.fromarray(array, mode).save(path)


def _make_v2(root: Path) -> Path:
    images = root / "images_2"
    images.mkdir(parents=True)
    write_csv(root / "train_2.csv", V2_HEADER, TRAIN_2)
    write_csv(root / "test_2.csv", V2_HEADER, TEST_2)
    names = {row[1] for row in TRAIN_2 + TEST_2 if "/" not in row[1] and row[1].endswith((".jpg", ".png"))}
    for name in names - {"PMC206_F1.jpg"}:
        _figure(images / name)
    (images / "PMC207_F1.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


def _make_v1(root: Path) -> Path:
    images = root / "images"
    images.mkdir(parents=True)
    header = ["Figure_path", "Question", "Anwser", "Choice A", "Choice B", "Choice C", "Choice D", "Answer_label"]
    write_csv(
        root / "train.csv",
        header,
        [
            ["PMC1064097_F1.jpg", "What is the uptake pattern in the breast?", "Focal uptake pattern"]
            + ["A:Diffuse uptake pattern", "B:Focal uptake pattern", "C:No uptake pattern", "D:Cannot determine", "B"],
            ["PMC500_F1.jpg", "What does the CT image show?", "Pleural effusion", "A:Pneumothorax"]
            + ["B:Pleural effusion", "C:Nodule", "D:Normal", "B"],
        ],
    )
    write_csv(
        root / "test.csv",
        [h if h != "Anwser" else "Answer" for h in header],
        [
            ["PMC501_F2.png", "Which structure is outlined on CT?", "Trachea", "A:Aorta", "B:Esophagus", "C:Windpipe"]
            + ["D:Spine", "C"]
        ],
    )
    for name in ("PMC1064097_F1.jpg", "PMC500_F1.jpg", "PMC501_F2.png"):
        _figure(images / name, mode="L")
    return root


@pytest.fixture(scope="module")
def v2_root(tmp_path_factory) -> Path:
    return _make_v2(tmp_path_factory.mktemp("pmc_v2"))


@pytest.fixture(scope="module")
def v1_root(tmp_path_factory) -> Path:
    return _make_v1(tmp_path_factory.mktemp("pmc_v1"))


def _config(root: Path, out: Path, **kwargs) -> PMCVQABuildConfig:
    kwargs.setdefault("seed", SEED)
    return PMCVQABuildConfig(data_root=str(root), output_dir=str(out), **kwargs)


@pytest.fixture(scope="module")
def build(v2_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("pmc_out") / "out"
    return out, build_pmc_vqa_dataset(_config(v2_root, out, prompt="red"), QUIET)


def test_filter_rule_and_parsing_helpers():
    assert ct_filter("Axial CT of the chest.") == (None, "CT")
    assert ct_filter("Contrast-enhanced computed tomography.") == (None, "computed tomography")
    assert ct_filter("HRCT shows ground-glass opacities.")[0] is None
    for text, reason in (
        ("PET/CT shows uptake.", "pet_spect_ct"),
        ("PET-CT", "pet_spect_ct"),
        ("SPECT/CT of the spine", "pet_spect_ct"),
        ("Cone-beam CT of the jaw", "cbct_or_micro_ct"),
        ("micro-CT of a mouse femur", "cbct_or_micro_ct"),
        ("Brain MRI", "not_ct"),
        ("The October issue", "not_ct"),  # "Oct" is not CT, nor OCT
        ("CT and ultrasound of the liver", "mixed_modality"),
        ("Chest CT; chest X-ray in (b)", "mixed_modality"),
    ):
        assert ct_filter(text)[0] == reason, text
    assert strip_choice_letter("A:Diffuse uptake pattern", "A") == "Diffuse uptake pattern"
    assert strip_choice_letter(" A:", "A") == ""
    assert (
        strip_choice_letter("(C) Liver", "C") == "Liver" and strip_choice_letter("A large mass", "A") == "A large mass"
    )
    assert pmcid("PMC1064097_F1.jpg") == "PMC1064097"


def test_load_dataset_and_counts(build):
    out, summary = build
    ds = datasets.load_dataset(str(out))
    assert set(ds) == {"train", "validation", "test"}
    assert sum(len(s) for s in ds.values()) == 2 * KEPT_ROWS  # a closed and an open record per row
    assert summary.question_types == {"figure_vqa": 2 * KEPT_ROWS}
    assert summary.counters["rows"]["repeated"] == 1
    assert ds["train"].features["choices"].feature.dtype == "string"


def test_closed_and_open_records(build):
    out, _ = build
    records = read_records(out)
    closed = find_record(records, "train_2.csv:1", "closed")
    system, question, answer = (message_texts(closed)[role] for role in ("system", "user", "assistant"))
    assert system == system_prompt(prompt=False)  # --prompt red, but no masks
    assert question == "What is seen in the right lung? Choices: A. Nodule B. Mass C. Cavity D. Normal"
    assert (answer, closed["closed_label"], closed["question_type"]) == ("A. Nodule", 0, "figure_vqa")
    assert (closed["closed_answer"], closed["closed_choices"]) == ("A", ["A", "B", "C", "D"])
    assert closed["image_path"] == closed["volume_path"] == "source/images/PMC100_F1.jpg"
    assert record_media(closed) == ("source/images/PMC100_F1.jpg", [])
    assert (closed["intensity"], closed["ct_evidence"], closed["upstream_split"]) == ("unit", "CT", "train")
    where = find_record(records, "train_2.csv:2", "closed")  # choices with " A:" prefixes; "Windpipe" normalised
    assert where["choices"][3] == "Trachea" and where["closed_label"] == 1
    assert message_texts(where)["assistant"] == f"B. {where['choices'][1]}"
    # v2: the open answer is the choice text
    assert message_texts(find_record(records, "train_2.csv:2", "open"))["assistant"] == where["choices"][1]
    assert find_record(records, "train_2.csv:3", "closed")["closed_label"] == 2
    assert find_record(records, "train_2.csv:3", "closed")["closed_answer"] == "C"
    opened = find_record(records, "train_2.csv:2", "open")
    assert (opened["closed_label"], opened["closed_answer"], opened["closed_choices"]) == (-1, None, [])
    assert find_record(records, "train_2.csv:8", "open")["ct_evidence"] == "CT"  # found in the question, no caption


def test_splits_are_disjoint_by_article(build):
    out, _ = build
    split_of: dict[str, set] = {}
    for r in read_records(out):
        assert r["patient_id"] == pmcid(r["image_path"])
        split_of.setdefault(r["patient_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of.values())
    assert sorted(split_of) == sorted(KEPT_ARTICLES)
    for article, (split,) in split_of.items():
        assert split == assign_split(article, SEED, RATIOS)
    assert {s for (s,) in split_of.values()} == {"train", "validation", "test"}
    assert len({r["volume_id"] for r in read_records(out) if r["patient_id"] == "PMC100"}) == 2  # two figures


def test_filtered_and_skipped_are_counted(build):
    out, summary = build
    filtered = read_lines(out / "filtered.jsonl")
    assert {e["unit_id"]: e["reason"] for e in filtered} == EXPECTED_FILTERED
    assert summary.counters["filtered"] == {"pet_spect_ct": 1, "cbct_or_micro_ct": 1, "not_ct": 2, "mixed_modality": 1}
    entries = read_lines(out / "skipped.jsonl")
    counts = rows_per_reason(entries)
    assert counts == Counter(EXPECTED_SKIPPED) and summary.skipped == EXPECTED_SKIPPED
    by_source = {e["source"]: e for e in entries if e["source"]}
    assert by_source["train_2.csv:12"]["reason"] == by_source["train_2.csv:13"]["reason"] == "unsafe_path"
    assert "empty choice" in by_source["train_2.csv:18"]["detail"]
    assert {e["reason"] for e in entries if e["unit_id"] == "PMC207_F1"} == {"unreadable_volume"}
    card = (out / "README.md").read_text()
    for reason, n in EXPECTED_SKIPPED.items():
        assert f"| {reason} | {n} |" in card
    assert "not_ct: 2 rows (2 figures)" in card and "pet_spect_ct: 1 rows (1 figures)" in card
    assert "arXiv:2305.10415" in card and "license: other" in card and "`test_2.csv: index`" in card


def test_paths_stay_in_the_image_folder(build, v2_root):
    out, _ = build
    root = os.path.realpath(v2_root / "images_2")
    for r in read_records(out):
        for path in (r["image_path"], r["volume_path"]):
            assert not Path(path).is_absolute() and ".." not in Path(path).parts
            assert os.path.realpath(out / path).startswith(root + os.sep) and (out / path).is_file()


def test_v1_schema_and_converted_images(v1_root, tmp_path):
    out = tmp_path / "v1"
    summary = build_pmc_vqa_dataset(
        _config(v1_root, out, version="v1", convert_images=True, split_ratios=(1.0, 0.0, 0.0)),
        BuildArguments(progress=False, strict=True),  # the not-CT figure is filtered, not a bad row
    )
    assert summary.skipped == {} and summary.counters["filtered"] == {"not_ct": 1}
    assert summary.counters["schemas"] == {"train.csv: v1": 2, "test.csv: v1": 1}
    records = read_records(out)
    open_ = find_record(records, "train.csv:2", "open")
    assert message_texts(open_)["assistant"] == "Pleural effusion"  # the "Anwser" column
    closed = find_record(records, "train.csv:2", "closed")
    assert (message_texts(closed)["assistant"], closed["closed_label"]) == ("B. Pleural effusion", 1)
    trachea = find_record(records, "test.csv:1", "closed")
    assert (message_texts(trachea)["assistant"], trachea["closed_label"], trachea["upstream_split"]) == (
        "C. Trachea",
        2,
        "test",
    )
    assert closed["volume_path"] == "volumes/PMC500_F1/PMC500_F1.npy"
    array = np.load(out / closed["volume_path"])
    assert array.shape == (1, 20, 24) and array.dtype == np.float32 and 0 <= array.min() <= array.max() <= 1
    original = np.asarray(Image.open(v1_root / "images" / "PMC500_F1.jpg").convert("L"), np.float32) / 255
    np.testing.assert_allclose(array[0], original)
    assert load_volume(out / closed["volume_path"]).shape == (1, 20, 24)  # a single-slice volume


def test_modes_and_no_filter(v2_root, tmp_path):
    build_pmc_vqa_dataset(_config(v2_root, tmp_path / "c", mode="closed"), QUIET)
    assert {r["answer_type"] for r in read_records(tmp_path / "c")} == {"closed"}
    summary = build_pmc_vqa_dataset(_config(v2_root, tmp_path / "all", mode="open", ct_filter=False), QUIET)
    assert sum(summary.questions.values()) == KEPT_ROWS + 5  # every figure's rows
    assert (tmp_path / "all" / "filtered.jsonl").read_text() == ""


def test_strict_stops_at_the_first_bad_row(v2_root, tmp_path):
    with pytest.raises(BuildError, match="--strict: "):
        build_pmc_vqa_dataset(_config(v2_root, tmp_path / "out"), BuildArguments(progress=False, strict=True))


def test_interrupted_build_resumes_to_identical_output(v2_root, tmp_path, monkeypatch):
    out, ref = tmp_path / "out", tmp_path / "ref"
    build_pmc_vqa_dataset(_config(v2_root, out, convert_images=True), QUIET)
    out.rename(ref)
    with killed_after(monkeypatch, PMCVQABuilder, 4), pytest.raises(KeyboardInterrupt):
        build_pmc_vqa_dataset(_config(v2_root, out, convert_images=True), QUIET)
    summary = build_pmc_vqa_dataset(_config(v2_root, out, convert_images=True), QUIET)
    assert (summary.units_reused, summary.units_processed) == (4, summary.units_total - 4)
    assert file_tree(out) == file_tree(ref)


def test_missing_inputs(v2_root, tmp_path):
    with pytest.raises(BuildError, match="test_clean.csv not found"):
        build_pmc_vqa_dataset(_config(v2_root, tmp_path / "a", csv_files=("test_clean.csv",)), QUIET)
    with pytest.raises(BuildError, match="image folder .* not found"):
        build_pmc_vqa_dataset(_config(v2_root, tmp_path / "b", image_dir=str(tmp_path / "nowhere")), QUIET)


def test_script_command_line(v1_root, tmp_path):
    out = tmp_path / "cli"
    result = run_script(
        "build_pmc_vqa.py",
        *["--data_root", str(v1_root), "--output_dir", str(out), "--version", "v1"],
        *["--no_progress", "--split_ratios", "1", "0", "0", "--mode", "closed"],
    )
    assert result.returncode == 0, result.stderr
    assert "load it with" in result.stdout and "CT filter left out: not_ct 1 rows" in result.stdout
    assert len(datasets.load_dataset(str(out))["train"]) == 2
    help_text = script_help("build_pmc_vqa.py")
    assert "Expected upstream folder ROOT" in help_text and "--no_ct_filter" in help_text
