"""Tests for the shared builder machinery (med3dqwen.builders.engine): plan order, skips, resume, shards, processes."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import datasets
import pytest
from helpers import QUIET, REPO, file_tree, read_lines

from med3dqwen.builders import choices, cli, engine, hub, upstream
from med3dqwen.builders.engine import (
    BuildArguments,
    BuildError,
    DatasetBuilder,
    Plan,
    UnitResult,
    WorkUnit,
    link_folder,
    run_build,
    shard_of,
    skip_entry,
    stable_index,
)
from med3dqwen.builders.phantom.dataset import PhantomBuildConfig, build_phantom_dataset
from med3dqwen.data.rewrite import build_record, rewrite_qa
from med3dqwen.io import UnsafePathError, safe_relpath


SMALL = (32, 64, 64)


class ToyBuilder(DatasetBuilder):
    """Five volumes, two questions each; unit ``toy_3`` skips one row, ``fail_at`` raises, ``bad_record`` breaks
    the schema."""

    name = "toy"
    script = "tests/data/test_builder.py"

    def __init__(self, fail_at: str | None = None, bad_record: bool = False, tag: str = "a"):
        self.fail_at, self.bad_record, self.tag, self.calls = fail_at, bad_record, tag, []

    def config(self):
        return {"tag": self.tag}

    def plan(self):
        splits = ["train", "train", "test", "train", "test"]
        units = [WorkUnit(f"toy_{i}", f"patient_{i}", split, payload=i) for i, split in enumerate(splits)]
        return Plan(units=units, skipped=[skip_entry("malformed_row", "bad CSV row", source="toy.csv:9")])

    def process(self, unit, out_dir):
        if unit.unit_id == self.fail_at:
            raise RuntimeError("boom")
        self.calls.append(unit.unit_id)
        (out_dir / "prompts" / unit.unit_id).mkdir(parents=True, exist_ok=True)
        (out_dir / "prompts" / unit.unit_id / "montage.txt").write_text(unit.unit_id)
        (out_dir / "volumes").mkdir(exist_ok=True)
        (out_dir / "volumes" / f"{unit.unit_id}.nii.gz").write_bytes(b"")  # the merge checks that it exists
        records = []
        for k, answer in enumerate(("Yes.", "No.")):
            qa = rewrite_qa(f"Is there a nodule {k} in the lung?", answer, answer_type="closed")
            record = build_record(
                qa,
                volume_path=f"volumes/{unit.unit_id}.nii.gz",
                mask_path=None,
                mask_source=None,
                roi=None,
                question_type="presence",
                split=unit.split,
                patient_id=unit.patient_id,
                volume_id=unit.unit_id,
            )
            if self.bad_record:
                record["surprise"] = 1
            records.append(record)
        skipped = (
            [skip_entry("missing_mask", "lung.nii.gz", unit_id=unit.unit_id, rows=2)] if unit.payload == 3 else []
        )
        return UnitResult(records=records, skipped=skipped, counters={"seen": {"volumes": 1}})

    def card(self, summary):
        return {
            "pretty_name": "toy",
            "summary": "Toy dataset.",
            "prompt_description": "Red.",
            "source": "Nowhere.",
            "license": "apache-2.0",
            "notes": [f"{summary.counters['seen']['volumes']} volumes seen."],
        }


def test_safe_relpath():
    assert (
        safe_relpath("seg_train_1_a_1", "right lung upper lobe.nii.gz")
        == "seg_train_1_a_1/right lung upper lobe.nii.gz"
    )
    assert safe_relpath("train_1/train_1a", "x.nii.gz") == "train_1/train_1a/x.nii.gz"
    for bad in (("..", "x"), ("a/../b",), ("/etc/passwd",), ("a//b",), ("C:evil",), ("a\\b",), ("",), ("a/./b",)):
        with pytest.raises(UnsafePathError):
            safe_relpath(*bad)


def test_shards_and_stable_choices():
    ids = [f"train_{i}_a_1" for i in range(3000)]
    shards = Counter(shard_of(i, 4) for i in ids)
    assert set(shards) == {0, 1, 2, 3} and min(shards.values()) > 600  # roughly balanced
    assert [shard_of(i, 4) for i in ids] == [shard_of(i, 4) for i in ids]
    assert {shard_of(i, 1) for i in ids} == {0}
    assert stable_index(0, "key", 5) == stable_index(0, "key", 5)
    assert len({stable_index(s, "key", 1000) for s in range(50)}) > 40
    with pytest.raises(ValueError):
        stable_index(0, "key", 0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_proc": 0}, "num_proc"),
        ({"num_shards": 2, "shard_index": 2}, "shard_index"),
        ({"push_to_hub": True}, "hub_repo_id"),
        ({"push_to_hub": True, "hub_repo_id": "me/x", "num_shards": 2}, "merge_only"),
        ({"start_method": "threads"}, "start_method"),
    ],
)
def test_bad_build_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BuildArguments(**kwargs)


def test_build_writes_splits_in_plan_order_with_skips_and_card(tmp_path):
    out = tmp_path / "toy"
    summary = run_build(ToyBuilder(), out, QUIET)
    train = read_lines(out / "data" / "train.jsonl")
    assert [r["volume_id"] for r in train] == ["toy_0", "toy_0", "toy_1", "toy_1", "toy_3", "toy_3"]
    assert [r["closed_label"] for r in train[:2]] == [1, 0]
    assert [(r["closed_answer"], r["closed_choices"]) for r in train[:2]] == [
        ("yes", ["no", "yes"]),
        ("no", ["no", "yes"]),
    ]
    assert not (out / "data" / "validation.jsonl").exists()  # empty split: no file, no config
    skipped = read_lines(out / "skipped.jsonl")
    assert [(s["reason"], s["rows"]) for s in skipped] == [("malformed_row", 1), ("missing_mask", 2)]
    assert summary.skipped == {"malformed_row": 1, "missing_mask": 2}
    assert summary.counters == {"seen": {"volumes": 5}}
    assert summary.questions == {"train": 6, "validation": 0, "test": 4}
    assert (summary.units_processed, summary.units_reused) == (5, 0)
    card = (out / "README.md").read_text()
    assert "data/validation.jsonl" not in card and "| missing_mask | 2 |" in card and "5 volumes seen." in card
    ds = datasets.load_dataset(str(out))
    assert set(ds) == {"train", "test"} and ds["test"]["volume_id"] == ["toy_2", "toy_2", "toy_4", "toy_4"]


def test_records_must_match_the_declared_features(tmp_path):
    with pytest.raises(BuildError, match="unexpected \\['surprise'\\]"):
        run_build(ToyBuilder(bad_record=True), tmp_path / "toy", QUIET)


def test_merge_refuses_records_naming_missing_media_and_keeps_the_old_output(tmp_path):
    out = tmp_path / "toy"
    run_build(ToyBuilder(), out, QUIET)
    before = (out / "data" / "train.jsonl").read_bytes()
    (out / "volumes" / "toy_1.nii.gz").unlink()
    with pytest.raises(BuildError, match=r"toy_1: 1 media file\(s\) .* \(e\.g\. volumes/toy_1\.nii\.gz\)"):
        engine.merge_build(ToyBuilder(), out)
    assert (out / "data" / "train.jsonl").read_bytes() == before  # the failed merge replaced nothing


def test_strict_turns_skips_into_errors(tmp_path):
    with pytest.raises(BuildError, match="--strict: malformed_row"):
        run_build(ToyBuilder(), tmp_path / "a", BuildArguments(progress=False, strict=True))

    class CleanPlan(ToyBuilder):
        def plan(self):
            return Plan(units=super().plan().units)

    with pytest.raises(BuildError, match="--strict: missing_mask in toy_3"):
        run_build(CleanPlan(), tmp_path / "b", BuildArguments(progress=False, strict=True))
    assert not (tmp_path / "b" / ".work" / "units" / "toy_3.json").exists()


def test_resume_processes_only_missing_units_and_gives_identical_output(tmp_path):
    out, ref = tmp_path / "out", tmp_path / "ref"
    run_build(ToyBuilder(), out, QUIET)
    out.rename(ref)
    with pytest.raises(RuntimeError, match="boom"):
        run_build(ToyBuilder(fail_at="toy_3"), out, QUIET)
    assert sorted(p.name for p in (out / ".work" / "units").iterdir()) == ["toy_0.json", "toy_1.json", "toy_2.json"]
    assert not (out / "data").exists()
    # What a SIGKILL in the middle of toy_3 (and of a merge) leaves behind: partial unit files and temporaries.
    (out / "prompts" / "toy_3").mkdir(parents=True)
    (out / "prompts" / "toy_3" / "half.png").write_bytes(b"half")
    (out / ".work" / "units" / ".toy_3.json.k1l2.tmp.json").write_text("{")
    (out / "data").mkdir()
    (out / "data" / ".train.jsonl.x9.tmp.jsonl").write_text("{")
    again = ToyBuilder()
    summary = run_build(again, out, QUIET)
    assert again.calls == ["toy_3", "toy_4"] and summary.units_reused == 3
    assert file_tree(out) == file_tree(ref)
    # A finished build re-run only re-merges.
    assert run_build(ToyBuilder(), out, QUIET).units_processed == 0 and file_tree(out) == file_tree(ref)


def test_configuration_change_and_overwrite(tmp_path):
    out = tmp_path / "toy"
    run_build(ToyBuilder(tag="a"), out, QUIET)
    with pytest.raises(BuildError, match="changed: tag"):
        run_build(ToyBuilder(tag="b"), out, QUIET)
    (out / "data" / "stale.jsonl").write_text("{}\n")
    run_build(ToyBuilder(tag="b"), out, BuildArguments(progress=False, overwrite=True))
    assert not (out / "data" / "stale.jsonl").exists()
    assert json.loads((out / ".work" / "config.json").read_text())["config"] == {"tag": "b"}


def test_work_of_an_older_record_format_is_not_resumed(tmp_path):
    out = tmp_path / "toy"
    run_build(ToyBuilder(), out, QUIET)
    marker = out / ".work" / "config.json"
    marker.write_text(marker.read_text().replace('"format": 2', '"format": 1'))  # units without closed_answer
    with pytest.raises(BuildError, match=r"changed: work format 1 -> 2, from another med3dqwen.*--overwrite"):
        run_build(ToyBuilder(), out, QUIET)


def test_link_folder(tmp_path):
    target = tmp_path / "upstream"
    target.mkdir()
    (target / "x.nii.gz").write_bytes(b"x")
    link = link_folder(tmp_path / "out", "source/train_preprocessed", target)
    assert link.is_symlink() and (link / "x.nii.gz").read_bytes() == b"x"
    assert link_folder(tmp_path / "out", "source/train_preprocessed", target) == link  # idempotent
    other = tmp_path / "moved"
    other.mkdir()
    assert Path(os.readlink(link_folder(tmp_path / "out", "source/train_preprocessed", other))) == other.resolve()
    (tmp_path / "out" / "source" / "real").mkdir()
    with pytest.raises(FileExistsError):
        link_folder(tmp_path / "out", "source/real", target)


def test_push_to_hub_plumbing(tmp_path, monkeypatch):
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, **kwargs):
            calls["create"] = (repo_id, kwargs)

        def upload_folder(self, **kwargs):
            calls["upload"] = kwargs
            return "https://hub/commit/1"

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)

    class Linked(ToyBuilder):
        hub_ignore_patterns = ("source", "source/*")

    run_build(Linked(), tmp_path / "toy", BuildArguments(progress=False, push_to_hub=True, hub_repo_id="me/toy"))
    assert calls["create"] == ("me/toy", {"repo_type": "dataset", "private": True, "exist_ok": True})
    assert calls["upload"]["folder_path"] == str(tmp_path / "toy") and calls["upload"]["repo_type"] == "dataset"
    assert {".work", ".work/*", "source", "source/*"} <= set(calls["upload"]["ignore_patterns"])


@pytest.mark.slow  # 5-10 s: two spawned workers import torch/transformers through the package
def test_worker_pool_gives_the_same_bytes(tmp_path):
    config = {"num_volumes": 4, "seed": 2, "shape": SMALL}
    build_phantom_dataset(PhantomBuildConfig(output_dir=str(tmp_path / "serial"), **config), QUIET)
    build_phantom_dataset(
        PhantomBuildConfig(output_dir=str(tmp_path / "pool"), **config), BuildArguments(progress=False, num_proc=2)
    )
    serial, pool = file_tree(tmp_path / "serial"), file_tree(tmp_path / "pool")
    serial.pop("README.md"), pool.pop("README.md")  # the card names its own folder
    assert serial == pool


@pytest.mark.slow
def test_killed_build_resumes_to_identical_output(tmp_path):
    """SIGKILL a real build process after a few volumes, run it again, compare with an uninterrupted build."""
    script = str(REPO / "datasets_scripts" / "build_phantom.py")
    out = tmp_path / "out"
    cmd = [sys.executable, script, "--output_dir", str(out), "--num_volumes", "24", "--seed", "5", "--no_progress"]
    cmd += ["--shape", "32", "64", "64"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    out.rename(tmp_path / "ref")

    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    units = out / ".work" / "units"

    def finished() -> int:  # unit files; ".<name>.*.tmp.json" files are writes in progress
        return len([p for p in units.glob("*.json") if not p.name.startswith(".")]) if units.is_dir() else 0

    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if finished() >= 3:
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    done = finished()
    assert 3 <= done < 24 and not (out / "data").exists()

    result = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    assert f"built {24 - done} volumes" in result.stdout
    # README included (same folder name); no temporary file of the killed unit survives.
    assert file_tree(out) == file_tree(tmp_path / "ref")


def test_module_exports_are_documented():
    for module in (choices, cli, engine, hub, upstream):
        for name in module.__all__:
            assert getattr(module, name).__doc__, f"{module.__name__}.{name}"


def test_upstream_csv_reads_by_name_and_skips_malformed_rows(tmp_path):
    from med3dqwen.builders.engine import BuildError
    from med3dqwen.builders.upstream import UpstreamCSV

    path = tmp_path / "table.csv"
    # A BOM, padded header names, an extra column, a blank line and a row with a missing field.
    path.write_text('\ufeff Volumename ,Anatomy,Note\nv1, lung ,x\n\nv2,heart\nv3,"liver, left",y\n', encoding="utf-8")
    skipped: list[dict] = []
    with UpstreamCSV(path, ["Volumename", "Anatomy"]) as table:
        rows = list(table.rows(["Volumename", "Anatomy"], skipped))
        assert table.ignored_columns(["Volumename", "Anatomy"]) == ["Note"]
    assert [(n, s, v) for n, s, v in rows] == [
        (1, "table.csv:1", {"Volumename": "v1", "Anatomy": "lung"}),
        (4, "table.csv:4", {"Volumename": "v3", "Anatomy": "liver, left"}),
    ]
    assert [(e["reason"], e["source"]) for e in skipped] == [("malformed_row", "table.csv:3")]
    with pytest.raises(BuildError, match=r"missing columns \['Finding'\]"):
        UpstreamCSV(path, ["Volumename", "Finding"])
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(BuildError, match="empty file"):
        UpstreamCSV(tmp_path / "empty.csv", ["Volumename"])
