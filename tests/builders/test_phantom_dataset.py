"""Tests for the phantom dataset builder (med3dqwen.builders.phantom.dataset and datasets_scripts/build_phantom.py)."""

from pathlib import Path

import datasets
import numpy as np
import pytest
from helpers import read_records, run_script
from PIL import Image

from med3dqwen.builders.engine import BuildArguments
from med3dqwen.builders.phantom.dataset import PhantomBuildConfig, build_phantom_dataset, volume_seed
from med3dqwen.data.rewrite import system_prompt
from med3dqwen.data.schema import message_texts, prompt_mask_path, record_media
from med3dqwen.processing.ct_io import load_mask, load_volume


SMALL = (32, 64, 64)


@pytest.fixture(scope="module")
def red_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom_red")
    summary = build_phantom_dataset(PhantomBuildConfig(output_dir=str(out), num_volumes=6, seed=1, shape=SMALL))
    return out, summary


def test_load_dataset_gives_the_splits(red_build):
    out, summary = red_build
    ds = datasets.load_dataset(str(out))
    assert set(ds) == {name for name, n in summary.questions.items() if n}
    assert sum(len(split) for split in ds.values()) == sum(summary.questions.values())
    row = ds[next(iter(ds))][0]
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
    assert [part["type"] for part in row["messages"][1]["content"]] == ["image", "text"]
    assert row["answer_type"] in ("closed", "open")


def test_records_are_consistent_with_files_and_rewriting(red_build):
    out, _ = red_build
    records = read_records(out)
    assert records
    by_patient = {}
    for r in records:
        assert r["split"] == by_patient.setdefault(r["patient_id"], r["split"])  # no patient crosses splits
        volume_path, pngs = record_media(r)
        assert volume_path == r["volume_path"] and not Path(volume_path).is_absolute()
        assert (out / volume_path).is_file()
        question, answer = message_texts(r)["user"], message_texts(r)["assistant"]
        if r["roi"] is None:  # whole-volume question: no contour, so no prompt wording
            assert r["mask_path"] is None and pngs == []
            assert message_texts(r)["system"] == system_prompt(prompt=False)
            assert "red" not in question
        else:
            assert (out / r["mask_path"]).is_file() and not r["roi_empty"]
            assert message_texts(r)["system"] == system_prompt("red")
            assert question.startswith(("Within the red-outlined area of the CT volume,", "Inside the red boundary,"))
            assert pngs == [f"prompts/{r['volume_id']}/{r['roi']}_montage.png"]
            assert (out / pngs[0]).is_file()
        if r["answer_type"] == "closed":
            assert answer in ("Yes.", "No.") and r["closed_label"] == ("No.", "Yes.").index(answer)
            assert (r["closed_answer"], r["closed_choices"]) == (answer.lower().rstrip("."), ["no", "yes"])
        else:
            assert (r["closed_label"], r["closed_answer"], r["closed_choices"]) == (-1, None, [])
            assert answer.startswith("Within the red boundary,") or r["roi"] is None


def test_saved_volume_and_masks_load_on_one_grid(red_build):
    out, _ = red_build
    record = next(r for r in read_records(out) if r["mask_path"])
    volume = load_volume(out / record["volume_path"])
    mask = load_mask(out / record["mask_path"], like=volume)
    assert volume.shape == SMALL and mask.any()


def test_png_once_per_volume_and_roi(red_build):
    out, _ = red_build
    records = read_records(out)
    expected = {(r["volume_id"], r["roi"]) for r in records if r["roi"]}
    written = {(p.parent.name, p.name.removesuffix("_montage.png")) for p in (out / "prompts").glob("*/*.png")}
    assert written == expected
    montage = np.asarray(Image.open(next((out / "prompts").glob("*/*.png"))).convert("RGB"))
    assert ((montage[..., 0] == 255) & (montage[..., 1] == 0)).any()  # the red contour is visible


def test_card_has_configs_and_counts(red_build):
    out, summary = red_build
    card = (out / "README.md").read_text()
    assert "configs:" in card and "data/train.jsonl" in card or "data/test.jsonl" in card
    for split, n in summary.questions.items():
        if n:
            assert f"| {split} | {n} |" in card


def test_card_declares_features_and_nothing_skipped(red_build):
    out, summary = red_build
    card = (out / "README.md").read_text()
    assert "dataset_info:" in card and "- name: anatomy" in card and "- name: closed_label\n    dtype: int64" in card
    assert "- name: closed_answer\n    dtype: string" in card and "- name: closed_choices\n    list: string" in card
    assert "| `closed_answer` | the label of a closed answer by name, one of `no`, `yes`, `A`, `B`, `C`, `D` (" in card
    assert "license: apache-2.0" in card and "Skipped while building: nothing" in card
    assert (out / "skipped.jsonl").read_text() == "" and summary.skipped == {}
    assert summary.units_total == 6 and sorted(p.name for p in (out / "volumes").iterdir()) == [
        f"phantom_{i:05d}" for i in range(6)
    ]


def test_shards_merge_to_the_same_dataset(tmp_path, red_build):
    out, _ = red_build
    sharded = tmp_path / "sharded"
    config = PhantomBuildConfig(output_dir=str(sharded), num_volumes=6, seed=1, shape=SMALL)
    for index in range(2):
        build_phantom_dataset(config, BuildArguments(progress=False, num_shards=2, shard_index=index))
    assert not (sharded / "data").exists()
    build_phantom_dataset(config, BuildArguments(progress=False, num_shards=2, merge_only=True))
    for path in sorted((out / "data").glob("*.jsonl")):
        assert (sharded / "data" / path.name).read_bytes() == path.read_bytes()
    assert (sharded / "volumes" / "phantom_00003" / "volume.nii.gz").read_bytes() == (
        out / "volumes" / "phantom_00003" / "volume.nii.gz"
    ).read_bytes()


def test_build_is_deterministic(tmp_path, red_build):
    out, _ = red_build
    again = tmp_path / "again"
    build_phantom_dataset(PhantomBuildConfig(output_dir=str(again), num_volumes=6, seed=1, shape=SMALL))
    for path in sorted((out / "data").glob("*.jsonl")):
        assert (again / "data" / path.name).read_text() == path.read_text()


def _small_red_build(tmp_path):
    out = tmp_path / "red"
    build_phantom_dataset(PhantomBuildConfig(output_dir=str(out), num_volumes=1, seed=1, shape=SMALL))
    return out


def test_no_prompt_variant(tmp_path):
    out = tmp_path / "none"
    build_phantom_dataset(PhantomBuildConfig(output_dir=str(out), num_volumes=2, seed=1, shape=SMALL, prompt="none"))
    records = read_records(out)
    assert not (out / "prompts").exists()
    for r in records:
        assert message_texts(r)["system"] == system_prompt(prompt=False)
        assert "boundary" not in message_texts(r)["user"] and "outlined" not in message_texts(r)["user"]
        assert record_media(r)[1] == []
        assert r["boundary_prompt"] == "none" and prompt_mask_path(r) is None  # the mask names the ROI, undrawn
    assert any(r["mask_path"] for r in records)
    red = read_records(_small_red_build(tmp_path))  # per row: the ROI rows are drawn, whole-volume rows are not
    assert {r["boundary_prompt"] for r in red if r["mask_path"]} == {"red"}
    assert {r["boundary_prompt"] for r in red if not r["mask_path"]} == {"none"}


def test_volume_seeds_are_distinct():
    seeds = {volume_seed(0, i) for i in range(1000)}
    assert len(seeds) == 1000 and volume_seed(0, 5) == volume_seed(0, 5) != volume_seed(1, 5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"prompt": "green"}, "prompt"), ({"write_png": "all"}, "write_png"), ({"num_volumes": 0}, "num_volumes")],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PhantomBuildConfig(output_dir="x", **kwargs)


def test_script_command_line(tmp_path):
    out = tmp_path / "cli"
    result = run_script(
        "build_phantom.py",
        *["--output_dir", str(out), "--num_volumes", "2", "--seed", "0", "--prompt", "blue"],
        *["--shape", "32", "64", "64"],
    )
    assert result.returncode == 0, result.stderr
    assert "load it with" in result.stdout
    records = read_records(out)
    assert any(message_texts(r)["user"].startswith("Within the blue-outlined area") for r in records)
