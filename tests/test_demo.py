"""make demo's orchestration (med3dqwen/scripts/demo.py): the whole chain on a reduced size, its failure report, and
``python -m med3dqwen.scripts.demo`` (the Makefile's command)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from med3dqwen.scripts.demo import DISCLAIMER, DemoArguments, main


ROOT = Path(__file__).resolve().parents[1]
SHARED_NLTK = ROOT.parent / "shared" / "nltk_data"


@pytest.fixture
def nltk_data(monkeypatch):
    if not SHARED_NLTK.is_dir() and not os.environ.get("NLTK_DATA"):
        pytest.skip(f"METEOR needs NLTK data: set NLTK_DATA or provide {SHARED_NLTK}")
    monkeypatch.setenv("NLTK_DATA", os.environ.get("NLTK_DATA", str(SHARED_NLTK)))


def reduced(out: Path, **kwargs) -> DemoArguments:
    values = {"num_volumes": 4, "shape": [32, 64, 64], "align_steps": 1, "sft_steps": 1, "split": "train"}
    values.update(max_samples=4, max_new_tokens=4, num_resamples=50, in_process=True)
    return DemoArguments(output_dir=str(out), **{**values, **kwargs})


@pytest.mark.slow
def test_demo_chain_on_a_reduced_size(tmp_path, nltk_data, capsys):
    """Both variants are built, trained (align then sft), evaluated and compared; the summary ends with the table
    (rows named by adapter and prompt variant, the no-prompt baseline first) and the disclaimer."""
    out = tmp_path / "demo"
    summary = main(reduced(out))
    assert summary == (out / "summary.md").read_text() and summary in capsys.readouterr().out
    assert summary.rstrip("\n").endswith(DISCLAIMER)
    steps = [line.split(" | ")[0][2:] for line in summary.splitlines() if line.startswith("| ") and " s |" not in line]
    expected = [f"{step}_{v}" for v in ("red", "none") for step in ("build", "align", "sft", "evaluate")]
    assert steps[: len(expected) + 2] == [*expected, "compare", "total"]
    table = (out / "eval" / "compare" / "comparison.md").read_text()
    assert table.rstrip("\n") in summary
    rows = table.splitlines()
    assert rows[2].startswith(f"| {out / 'runs' / 'sft_none'} (prompt none) | ")
    assert rows[3].startswith(f"| {out / 'runs' / 'sft_red'} (prompt red) | ")
    assert "Paired bootstrap 95 %" in table  # the questions of the two builds were paired
    for variant in ("red", "none"):
        assert (out / "runs" / f"sft_{variant}" / "adapter_config.json").is_file()
        assert (out / "runs" / f"sft_{variant}" / "base" / "config.json").is_file()
        assert len((out / "eval" / variant / "predictions.jsonl").read_text().splitlines()) == 4


def test_a_failing_step_stops_the_demo_with_its_log(tmp_path):
    out = tmp_path / "demo"
    with pytest.raises(SystemExit, match=r"demo step 'align_red' failed .*logs/align_red.log"):
        main(reduced(out, config="configs/no_such_recipe.yaml"))
    assert (out / "phantom_red" / "README.md").is_file()  # the build before it ran
    assert "no_such_recipe.yaml" in (out / "logs" / "align_red.log").read_text()
    with pytest.raises(ValueError, match="--variants must be distinct values"):
        reduced(out, variants=["red", "green"])


def test_missing_nltk_data_stops_the_demo_before_any_step(tmp_path, monkeypatch):
    import nltk

    downloads = []
    monkeypatch.setenv("NLTK_DATA", str(tmp_path / "empty"))
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "empty")])
    monkeypatch.setattr(nltk, "download", lambda name, quiet: downloads.append(name) or False)  # offline
    with pytest.raises(SystemExit, match=r"needs NLTK's wordnet and punkt_tab.*python -m nltk.downloader"):
        main(reduced(tmp_path / "demo"))
    assert downloads == ["wordnet", "punkt_tab"]  # it tried the design's fallback first
    assert not (tmp_path / "demo").exists()  # nothing was built or trained


def test_python_dash_m_runs_the_demo_module():
    """`python -m med3dqwen.scripts.demo` (the Makefile's command): importing med3dqwen installs an import watcher
    whose loader must still give runpy the module's code."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "med3dqwen.scripts.demo", "--help"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--sft_steps" in done.stdout and "--variants" in done.stdout
