"""Smoke runs of the benchmark scripts, so they keep working (their numbers are recorded in BENCHMARKS.md)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_model_script_runs_on_cpu_with_a_tiny_preset(tmp_path):
    output = tmp_path / "gpu_model.json"
    cmd = [
        sys.executable, str(REPO / "bench" / "gpu_model.py"), "--device", "cpu", "--presets", "tiny",
        "--volume_size", "64", "64", "64", "--steps", "1", "--warmup", "0", "--new_tokens", "3", "--batch_size", "2",
        "--output", str(output),
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| tiny |" in result.stdout
    (row,) = json.loads(output.read_text())["results"]
    assert row["preset"] == "tiny" and row["train_step_s_median"] > 0 and row["trainable_params"] > 0
    # 2 volumes × 3 new tokens in the measured generate call.
    assert row["generate_tokens_per_s"] > 0


def test_hu_threshold_bench_runs_on_a_small_phantom():
    cmd = [
        sys.executable,
        str(REPO / "bench" / "bench_hu_threshold.py"),
        "--shape",
        "32",
        "64",
        "64",
        "--repeats",
        "1",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    row = result.stdout.strip().splitlines()[-1]
    assert row.startswith("| 32×64×64 | airway, body, bone, lung, lung_left, lung_right |"), row
    left, right = (float(v) for v in row.split("|")[-2].split("/"))
    assert left > 0.9 and right > 0.9  # the masks are right, not only produced


def test_io_bench_runs_on_a_small_case():
    cmd = [sys.executable, str(REPO / "bench" / "bench_io.py"), "--small", "--repeats", "1", "--crc_repeats", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| load_volume (gzip read + reorient) |" in result.stdout
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("| small |")]
    assert row.count("|") == 5 and "ms (" in row  # both medians and the paired difference


@pytest.mark.slow
def test_train_bench_runs_on_cpu_with_a_tiny_preset(tmp_path):
    # the GPU run's code path (children per configuration, both logits modes, the data path) at CPU size
    output = tmp_path / "train.json"
    cmd = [
        sys.executable, str(REPO / "bench" / "bench_train.py"), "--device", "cpu", "--presets", "tiny",
        "--batch_sizes", "2", "--steps", "1", "--warmup", "0", "--data_workers", "0", "--data_batches", "1",
        "--output", str(output),
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    (row,) = report["results"]
    assert "error" not in row, row
    assert row["preset"] == "tiny" and row["batch_size"] == 2 and row["trainable_params"] > 0
    assert 0 < row["labelled_positions"] < row["sequence_length"]
    labelled, full = row["modes"]["labelled"], row["modes"]["full"]
    assert labelled["step_s_median"] > 0 and full["step_s_median"] > 0 and labelled["peak_gib"] > 0
    assert labelled["first_loss"] == pytest.approx(full["first_loss"], rel=1e-5)  # the same loss either way
    (data,) = report["data"]
    assert data["workers"] == 0 and data["samples"] == 2 and data["samples_per_s"] > 0
    table = output.with_suffix(".md").read_text()
    assert "| tiny | 2 | 64×64×64 | float32 |" in table and "| 0 | 2 | 2 |" in table
    assert table in result.stdout


def test_data_bench_runs_on_a_small_case(tmp_path):
    output = tmp_path / "data.json"
    cmd = [sys.executable, str(REPO / "bench" / "bench_data.py"), "--small", "--repeats", "1", "--loader_repeats", "1",
           "--output", str(output)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| decompression floor (ISA-L one-shot, volume + mask) |" in result.stdout
    assert "online vs the former path: max |Δ| = " in result.stdout
    data = json.loads(output.read_text())
    assert data["online_max_abs_difference"] <= 1e-5 and data["cached_max_abs_difference"] <= 1e-5
    assert set(data["cached_samples_per_s"]) == {"0", "2"} and all(
        v > 0 for v in data["cached_samples_per_s"].values()
    )
    assert data["cached_max_abs_difference"] <= 1e-5 and data["online_over_floor"] > 0


def test_monai_bench_runs_and_both_pipelines_agree(tmp_path):
    """The side-by-side run checks before timing that MONAI's recipe and our processor give the same input."""
    output = tmp_path / "monai.json"
    script = REPO / "bench" / "bench_monai.py"
    cmd = [sys.executable, str(script), "--small", "--repeats", "1", "--output", str(output)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| MONAI pipeline (+ DrawBoundaryPromptd) |" in result.stdout
    data = json.loads(output.read_text())
    assert data["max_abs_difference"] <= 1e-5 and data["speedup_wall"] > 0
    assert all(value > 0 for value in data["median_s"].values())


@pytest.mark.slow
def test_evaluate_bench_runs_on_the_demo_recipes_tiny_model():
    cmd = [sys.executable, str(REPO / "bench" / "bench_evaluate.py"), "--samples", "4", "--batch_size", "2",
           "--max_new_tokens", "2", "--repeats", "1"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    row = result.stdout.strip().splitlines()[-1]
    assert row.startswith("| 4 | 2 | 2 |") and "MiB |" in row
