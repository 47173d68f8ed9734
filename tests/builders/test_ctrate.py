"""Tests for the CT-RATE report builder (med3dqwen.builders.ctrate and datasets_scripts/build_ctrate_reports.py).

The fixture is a miniature CT-RATE download built here with the real layout and column names: tiny NIfTI volumes with
blank headers (raw values = HU + 1024, as the originals: the slope / intercept and spacing live in the metadata CSV),
one volume whose header carries the scaling and the geometry, reports and metadata CSVs, and the no-chest lists.
"""

import os
import shutil
from collections import Counter
from pathlib import Path

import datasets
import nibabel as nib
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

from med3dqwen.builders.ctrate import (
    TEMPLATES,
    CTRateBuildConfig,
    CTRateBuilder,
    build_ctrate_dataset,
    format_report,
    parse_spacing,
    read_name_list,
)
from med3dqwen.builders.engine import BuildArguments, BuildError
from med3dqwen.data.rewrite import system_prompt
from med3dqwen.data.schema import message_texts, record_media
from med3dqwen.data.splits import assign_split
from med3dqwen.processing.ct_io import load_volume


RATIOS = (0.5, 0.5, 0.0)
USABLE_TRAIN = ("train_1", "train_2", "train_4", "train_10", "train_11")
SEED = next(
    s
    for s in range(100)
    if {assign_split(p, s, RATIOS[:2], ("train", "validation")) for p in USABLE_TRAIN} == {"train", "validation"}
)
REPORT_HEADER = ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]
METADATA_HEADER = (
    "VolumeName,Manufacturer,SeriesDescription,ManufacturerModelName,PatientSex,PatientAge,ReconstructionDiameter,"
    "DistanceSourceToDetector,DistanceSourceToPatient,GantryDetectorTilt,TableHeight,RotationDirection,ExposureTime,"
    "XRayTubeCurrent,Exposure,FilterType,GeneratorPower,FocalSpots,ConvolutionKernel,PatientPosition,RevolutionTime,"
    "SingleCollimationWidth,TotalCollimationWidth,TableSpeed,TableFeedPerRotation,SpiralPitchFactor,"
    "DataCollectionCenterPatient,ReconstructionTargetCenterPatient,ExposureModulationType,CTDIvol,"
    "ImagePositionPatient,ImageOrientationPatient,SliceLocation,SamplesPerPixel,PhotometricInterpretation,Rows,"
    "Columns,XYSpacing,RescaleIntercept,RescaleSlope,RescaleType,NumberofSlices,ZSpacing,StudyDate"
).split(",")
FINDINGS = "The windpipe is patent. No pleural effusion."
TRAIN_REPORTS = [
    ["train_1_a_1.nii.gz", "Cough.", "Non-contrast.", FINDINGS, "Normal chest CT."],
    ["train_1_a_2.nii.gz", "Cough.", "Non-contrast.", FINDINGS, "Normal chest CT."],  # 2nd reconstruction
    ["train_2_a_1.nii.gz", "", "", "Emphysema in both lungs.", "Not given."],  # no impression
    ["train_3_a_1.nii.gz", "", "", "Nodule.", "Nodule."],  # missing_volume
    ["train_4_a_1.nii.gz", "", "", "Atelectasis.", "Atelectasis."],  # file missing: falls back to _2
    ["train_4_a_2.nii.gz", "", "", "Atelectasis.", "Atelectasis."],
    ["train_5_a_1.nii.gz", "", "", "Mass.", "Mass."],  # unreadable_volume
    ["train_6_a_1.nii.gz", "", "", "Knee.", "Knee."],  # listed in no_chest_train.txt
    ["train_7_a_1.nii.gz", "", "", "Nodule.", "Nodule."],  # missing_metadata
    ["train_8_a_1.nii.gz", "", "", "Nodule.", "Nodule."],  # malformed_metadata
    ["../../etc/passwd.nii.gz", "", "", "Nodule.", "Nodule."],  # unsafe_path
    ["valid_9_a_1.nii.gz", "", "", "Nodule.", "Nodule."],  # malformed_row: other split
    ["train_9_a_1.nii.gz", "", "", "Not given.", "Nodule."],  # empty_report
    ["train_12_a_1.nii.gz", "", "Nodule."],  # malformed_row: 3 fields
    ["train_1_a_1.nii.gz", "Cough.", "Non-contrast.", FINDINGS, "Normal chest CT."],  # repeated row
    ["train_10_a_1.nii.gz", "", "", "Cardiomegaly.", "Cardiomegaly."],  # stored in HU already: implausible_hu
    ["train_11_a_1.nii.gz", "", "", "Hiatal hernia.", "Hiatal hernia."],
]
VALID_REPORTS = [
    ["valid_1_a_1.nii.gz", "", "", "Consolidation in the left lower lobe.", "Pneumonia."],
    ["valid_1_b_1.nii.gz", "", "", "Consolidation in the left lower lobe.", "Pneumonia."],  # 2nd scan, same patient
    ["valid_2_a_1.nii.gz", "", "", "Bronchiectasis.", "Bronchiectasis."],  # header scaled, with geometry
    ["valid_2_b_1.nii.gz", "", "", "Abdomen.", "Abdomen."],  # scan listed in no_chest_valid.txt
]
# Files on disk: volume → "blank" (raw HU+1024, blank header), "hu" (blank header, values already HU),
# "scaled" (raw with scl_slope/scl_inter and a real affine), "garbage".
FILES = {
    "train_1_a_1": "blank",
    "train_1_a_2": "blank",
    "train_2_a_1": "blank",
    "train_4_a_2": "blank",
    "train_5_a_1": "garbage",
    "train_6_a_1": "blank",
    "train_7_a_1": "blank",
    "train_8_a_1": "blank",
    "train_10_a_1": "hu",
    "train_11_a_1": "blank",
    "valid_1_a_1": "blank",
    "valid_1_b_1": "blank",
    "valid_2_a_1": "scaled",
    "valid_2_b_1": "blank",
}
EXPECTED_VOLUMES = {
    "train_1_a_1",
    "train_2_a_1",
    "train_4_a_2",
    "train_10_a_1",
    "train_11_a_1",
    "valid_1_a_1",
    "valid_1_b_1",
    "valid_2_a_1",
}
EXPECTED_SKIPPED = {
    "unsafe_path": 1,
    "malformed_row": 2,
    "empty_report": 1,
    "missing_volume": 1,
    "unreadable_volume": 1,
    "missing_metadata": 1,
    "malformed_metadata": 1,
}
SHAPE = (12, 10, 6)  # NIfTI (i, j, k); k = slices


def _hu_phantom() -> np.ndarray:
    """Air around a soft-tissue box with two lungs: a chest in miniature, (i, j, k) HU."""
    hu = np.full(SHAPE, -1000, dtype=np.int16)
    hu[2:10, 2:8, :] = 40
    hu[3:6, 3:7, 1:5] = -850
    hu[7:9, 3:7, 1:5] = -850
    return hu


def _metadata_row(volume: str, xy: str = "[0.75, 0.75]", z: str = "1.5") -> list[str]:
    values = dict.fromkeys(METADATA_HEADER, "")
    values.update(
        VolumeName=f"{volume}.nii.gz",
        Manufacturer="Philips",
        XYSpacing=xy,
        RescaleIntercept="-1024",
        RescaleSlope="1",
        NumberofSlices=str(SHAPE[2]),
        ZSpacing=z,
    )
    return [values[c] for c in METADATA_HEADER]


def _make_root(root: Path, bad: bool = True) -> Path:
    dataset = root / "dataset"
    reports = (
        TRAIN_REPORTS if bad else [r for r in TRAIN_REPORTS if r[0] in ("train_1_a_1.nii.gz", "train_6_a_1.nii.gz")]
    )
    write_csv(dataset / "radiology_text_reports" / "train_reports.csv", REPORT_HEADER, reports)
    write_csv(dataset / "radiology_text_reports" / "validation_reports.csv", REPORT_HEADER, VALID_REPORTS)
    train_meta = [_metadata_row(v) for v in FILES if v.startswith("train") and v not in ("train_7_a_1", "train_8_a_1")]
    train_meta.append(_metadata_row("train_8_a_1", xy="[0.75; 0.75; 1]"))  # malformed XYSpacing
    write_csv(dataset / "metadata" / "train_metadata.csv", METADATA_HEADER, train_meta)
    write_csv(
        dataset / "metadata" / "validation_metadata.csv",
        METADATA_HEADER,
        [_metadata_row(v, z="2.0") for v in FILES if v.startswith("valid")],
    )
    (dataset / "metadata" / "no_chest_train.txt").write_text("train_6_a_1.nii.gz\n\n")
    (dataset / "metadata" / "no_chest_valid.txt").write_text("valid_2_b\nnot a volume\n")

    hu = _hu_phantom()
    for volume, kind in FILES.items():
        prefix, pid, scan, _ = volume.split("_")
        folder = dataset / prefix / f"{prefix}_{pid}" / f"{prefix}_{pid}_{scan}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{volume}.nii.gz"
        if kind == "garbage":
            path.write_bytes(b"\x1f\x8b not a nifti")
        elif kind == "scaled":
            image = nib.Nifti1Image((hu + 1024).astype(np.int16), np.diag([-0.8, -0.8, 2.5, 1.0]))
            image.header.set_slope_inter(1.0, -1024.0)
            nib.save(image, path)
        else:
            data = hu if kind == "hu" else hu + 1024
            nib.save(nib.Nifti1Image(data.astype(np.int16), None), path)  # blank header: no affine, no scaling
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return _make_root(tmp_path_factory.mktemp("ctrate_root"))


def _config(root: Path, out: Path, **kwargs) -> CTRateBuildConfig:
    kwargs.setdefault("seed", SEED)
    kwargs.setdefault("split_ratios", RATIOS)
    return CTRateBuildConfig(data_root=str(root), output_dir=str(out), **kwargs)


@pytest.fixture(scope="module")
def build(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ctrate_out") / "out"
    summary = build_ctrate_dataset(_config(data_root, out, prompt="red"), QUIET)
    return out, summary


# ---------------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------------


def test_spacing_report_and_name_list(tmp_path):
    assert parse_spacing("[0.341796875, 0.341796875]", "1.5") == (1.5, 0.341796875, 0.341796875)
    assert parse_spacing("[0.7, 0.8]", "2") == (2.0, 0.7, 0.8)  # (D, H, W): row spacing, then column spacing
    assert parse_spacing("0.5", "1") == (1.0, 0.5, 0.5)
    for xy, z in (("[0.7, 0.8, 0.9]", "1"), ("[]", "1"), ("[0.7, 0.7]", "nan"), ("[0, 0.7]", "1")):
        with pytest.raises(ValueError):
            parse_spacing(xy, z)
    assert format_report(" No  effusion. ", "Normal.") == "Findings: No effusion.\nImpression: Normal."
    assert format_report("No effusion.", "") == "Findings: No effusion."
    assert format_report("No effusion.", "Normal.", "findings") == "No effusion."
    with pytest.raises(ValueError, match="empty findings"):
        format_report(" ", "Normal.")
    names = tmp_path / "no_chest_train.txt"
    names.write_text("train_6_a_1.nii.gz\ntrain_7_b\n  valid_1_a_2  \nfoo\n")
    assert read_name_list(names) == ({"train_6_a_1", "train_7_b", "valid_1_a_2"}, ["foo"])


# ---------------------------------------------------------------------------------------------------------------
# A full build on the fixture
# ---------------------------------------------------------------------------------------------------------------


def test_load_dataset_and_one_record_per_scan(build):
    out, summary = build
    ds = datasets.load_dataset(str(out))
    assert set(ds) == {"train", "validation", "test"}
    records = read_records(out)
    assert {r["volume_id"] for r in records} == EXPECTED_VOLUMES and len(records) == len(EXPECTED_VOLUMES)
    assert set(ds["test"]["volume_id"]) == {"valid_1_a_1", "valid_1_b_1", "valid_2_a_1"}
    assert ds["train"].features["spacing"].feature.dtype == "float64"
    assert summary.question_types == {"report": len(EXPECTED_VOLUMES)}
    by_volume = {r["volume_id"]: r for r in records}
    assert by_volume["train_4_a_2"]["reconstruction"] == 2  # _1 has no file: the next reconstruction
    assert summary.counters["reconstructions"]["fallback_to_later_reconstruction"] == 1
    assert summary.counters["reconstructions"]["repeated_report_rows"] == 1


def test_question_answer_and_no_prompt_wording(build):
    out, _ = build
    by_volume = {r["volume_id"]: r for r in read_records(out)}
    record = by_volume["train_1_a_1"]
    system, question, answer = (message_texts(record)[role] for role in ("system", "user", "assistant"))
    assert system == system_prompt(prompt=False)  # a --prompt red build, but a whole-volume question
    assert question in TEMPLATES["findings_impressions"] and "red" not in question
    assert answer == "Findings: The trachea is patent. No pleural effusion.\nImpression: Normal chest CT."
    assert (record["answer_type"], record["closed_label"], record["question_type"]) == ("open", -1, "report")
    assert (record["closed_answer"], record["closed_choices"]) == (None, [])
    assert record["mask_path"] is None and record["roi"] is None and record["mask_source"] is None
    assert record_media(record) == (record["volume_path"], [])
    assert message_texts(by_volume["train_2_a_1"])["assistant"] == "Findings: Emphysema in both lungs."  # "Not given."
    assert record["source_row"] == "train_reports.csv:1"


def test_rescale_and_spacing_are_recorded(build):
    out, summary = build
    by_volume = {r["volume_id"]: r for r in read_records(out)}
    blank = by_volume["train_1_a_1"]
    assert (blank["rescale_slope"], blank["rescale_intercept"], blank["intensity"]) == (1.0, -1024.0, "hu")
    assert blank["spacing"] == [1.5, 0.75, 0.75]
    volume = load_volume(out / blank["volume_path"])
    hu = volume.array * blank["rescale_slope"] + blank["rescale_intercept"]
    assert hu.min() == -1000 and hu.max() == 40
    scaled = by_volume["valid_2_a_1"]  # the header scales (nibabel applies it) and has geometry
    assert (scaled["rescale_slope"], scaled["rescale_intercept"]) == (1.0, 0.0)
    assert scaled["spacing"] == pytest.approx([2.5, 0.8, 0.8])
    assert load_volume(out / scaled["volume_path"]).array.min() == -1000
    volumes = summary.counters["volumes"]
    assert volumes["rescale: metadata"] == 7 and volumes["rescale: header"] == 1
    assert volumes["spacing: header"] == 1 and volumes["spacing: header differs from metadata"] == 1
    assert volumes["implausible_hu"] == 1  # train_10 is stored in HU: -1024 again puts air at -2024
    assert volumes["no impression"] == 1


def test_splits_are_disjoint_by_patient(build):
    out, _ = build
    split_of: dict[str, set] = {}
    for r in read_records(out):
        split_of.setdefault(r["patient_id"], set()).add(r["split"])
        assert r["patient_id"] == "_".join(r["volume_id"].split("_")[:2])
    assert all(len(s) == 1 for s in split_of.values())
    assert {p for p, s in split_of.items() if s == {"test"}} == {"valid_1", "valid_2"}
    for patient in USABLE_TRAIN:
        assert split_of[patient] == {assign_split(patient, SEED, RATIOS)}
    assert {s for p, (s,) in split_of.items() if p.startswith("train")} == {"train", "validation"}


def test_paths_are_relative_and_stay_in_the_data_root(build, data_root):
    out, _ = build
    root = os.path.realpath(data_root)
    for r in read_records(out):
        path = r["volume_path"]
        assert path.startswith("source/") and not Path(path).is_absolute() and ".." not in Path(path).parts
        assert os.path.realpath(out / path).startswith(root + os.sep) and (out / path).is_file()
    assert by_path(out, "train_1_a_1") == "source/train/train_1/train_1_a/train_1_a_1.nii.gz"


def by_path(out: Path, volume_id: str) -> str:
    return next(r["volume_path"] for r in read_records(out) if r["volume_id"] == volume_id)


def test_skipped_and_filtered_rows_are_counted(build):
    out, summary = build
    entries = read_lines(out / "skipped.jsonl")
    counts = rows_per_reason(entries)
    assert counts == Counter(EXPECTED_SKIPPED) and summary.skipped == EXPECTED_SKIPPED
    by_source = {e["source"]: e for e in entries if e["source"]}
    assert by_source["train_reports.csv:11"]["reason"] == "unsafe_path"
    assert by_source["train_reports.csv:14"]["detail"] == "expected 5 fields, got 3"
    by_unit = {e["unit_id"]: e for e in entries if e["unit_id"]}
    assert by_unit["train_3_a"]["reason"] == "missing_volume"
    assert by_unit["train_8_a"]["reason"] == "malformed_metadata" and "XYSpacing" in by_unit["train_8_a"]["detail"]
    filtered = read_lines(out / "filtered.jsonl")
    assert {(e["reason"], e["unit_id"]) for e in filtered} == {
        ("no_chest", "train_6_a_1"),
        ("no_chest", "valid_2_b_1"),
    }
    card = (out / "README.md").read_text()
    for reason, n in EXPECTED_SKIPPED.items():
        assert f"| {reason} | {n} |" in card
    assert "2 volumes listed in `no_chest_{train,valid}.txt`" in card
    assert "license: cc-by-nc-sa-4.0" in card and "arXiv:2403.17834" in card and "| report | open |" in card
    for split in ("train", "validation", "test"):
        assert f"| {split} | {summary.questions[split]} |" in card


def test_all_reconstructions(data_root, tmp_path):
    out = tmp_path / "all"
    summary = build_ctrate_dataset(_config(data_root, out, reconstructions="all", report_sections="findings"), QUIET)
    volumes = {r["volume_id"] for r in read_records(out)}
    assert volumes == EXPECTED_VOLUMES | {"train_1_a_2"}
    assert summary.skipped["missing_volume"] == 2  # train_3_a_1 and now train_4_a_1 on its own
    for r in read_records(out):
        assert message_texts(r)["user"] in TEMPLATES["findings"]
        assert not message_texts(r)["assistant"].startswith("Findings:")


def test_convert_volumes_writes_hu_copies(data_root, tmp_path):
    out = tmp_path / "convert"
    build_ctrate_dataset(_config(data_root, out, convert_volumes=True), QUIET)
    by_volume = {r["volume_id"]: r for r in read_records(out)}
    record = by_volume["train_1_a_1"]
    assert record["volume_path"] == "volumes/train_1_a/train_1_a_1.nii.gz"
    assert (record["rescale_slope"], record["rescale_intercept"]) == (1.0, 0.0)
    volume = load_volume(out / record["volume_path"])
    assert volume.spacing == pytest.approx((1.5, 0.75, 0.75))
    assert volume.array.min() == -1000 and volume.array.max() == 40
    assert load_volume(out / by_volume["valid_2_a_1"]["volume_path"]).spacing == pytest.approx((2.5, 0.8, 0.8))


def test_strict_stops_at_bad_rows_but_not_at_filtered_ones(data_root, tmp_path):
    with pytest.raises(BuildError, match="--strict: "):
        build_ctrate_dataset(_config(data_root, tmp_path / "out"), BuildArguments(progress=False, strict=True))
    clean = _make_root(tmp_path / "clean", bad=False)
    summary = build_ctrate_dataset(_config(clean, tmp_path / "clean_out"), BuildArguments(progress=False, strict=True))
    assert summary.skipped == {} and summary.counters["filtered"]["no_chest"] == 2


def test_interrupted_build_resumes_to_identical_output(data_root, tmp_path, monkeypatch):
    out, ref = tmp_path / "out", tmp_path / "ref"
    build_ctrate_dataset(_config(data_root, out, convert_volumes=True), QUIET)
    out.rename(ref)
    with killed_after(monkeypatch, CTRateBuilder, 3), pytest.raises(KeyboardInterrupt):
        build_ctrate_dataset(_config(data_root, out, convert_volumes=True), QUIET)
    assert not (out / "data").exists() and len(list((out / ".work" / "units").iterdir())) == 3
    summary = build_ctrate_dataset(_config(data_root, out, convert_volumes=True), QUIET)
    assert (summary.units_reused, summary.units_processed) == (3, summary.units_total - 3)
    assert file_tree(out) == file_tree(ref)


def test_missing_csv_and_fixed_folders(data_root, tmp_path):
    with pytest.raises(BuildError, match="train_metadata.csv not found"):
        build_ctrate_dataset(_config(data_root, tmp_path / "a", metadata_dir=str(tmp_path)), QUIET)
    fixed = tmp_path / "fixed_root"
    shutil.copytree(data_root, fixed)
    (fixed / "dataset" / "train").rename(fixed / "dataset" / "train_fixed")
    (fixed / "dataset" / "valid").rename(fixed / "dataset" / "valid_fixed")
    out = tmp_path / "fixed_out"
    build_ctrate_dataset(_config(fixed, out, volume_folders="fixed", validate_files=False), QUIET)
    paths = {r["volume_path"] for r in read_records(out)}
    assert "source/train_fixed/train_1/train_1_a/train_1_a_1.nii.gz" in paths
    assert all((out / p).is_file() for p in paths)


def test_script_command_line(data_root, tmp_path):
    out = tmp_path / "cli"
    result = run_script(
        "build_ctrate_reports.py",
        *["--data_root", str(data_root), "--output_dir", str(out), "--no_progress"],
        *["--seed", str(SEED), "--split_ratios", *map(str, RATIOS), "--report_sections", "findings"],
    )
    assert result.returncode == 0, result.stderr
    assert "load it with" in result.stdout and "not chest: 2 volumes" in result.stdout
    ds = datasets.load_dataset(str(out))
    assert set(ds) == {"train", "validation", "test"}
    help_text = script_help("build_ctrate_reports.py")
    assert "Expected upstream folder ROOT" in help_text and "--convert_volumes" in help_text
