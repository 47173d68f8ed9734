"""The local ``evaluate`` metric modules (med3dqwen/evaluation/modules/<name>/<name>.py) load offline and give the
same numbers as the functions they wrap, and as evaluate's own documented examples.

Each check runs ``evaluate.load("<module folder>")`` in a fresh interpreter with ``HF_HUB_OFFLINE=1`` and a module
cache under the test's temporary folder (``evaluate.load("bleu")`` itself needs the Hub and fails offline).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from med3dqwen.evaluation import bleu_statistics, closed_accuracy, meteor, rouge


REPO = Path(__file__).resolve().parents[2]
MODULES = REPO / "med3dqwen" / "evaluation" / "modules"
NLTK_DATA = REPO.parent / "shared" / "nltk_data"
TOL = 1e-9

PREDICTIONS = ["hello there general kenobi", "foo bar foobar", "There is no pleural effusion."]
REFERENCES = [["hello there general kenobi", "hello there!"], ["foo bar foobar"], ["No pleural effusion is seen."]]


def load_and_compute(tmp_path: Path, calls: dict[str, dict], nltk_data: Path | None = None) -> dict:
    """``{label: evaluate.load(module).compute(**kwargs)}`` for ``calls = {label: {"module": name, **kwargs}}``."""
    code = textwrap.dedent("""
        import json, sys
        import evaluate
        calls = json.loads(sys.argv[1])
        out = {}
        for label, call in calls.items():
            module = evaluate.load(call.pop("path"))
            out[label] = {k: (v if isinstance(v, list) else float(v)) for k, v in module.compute(**call).items()}
        print(json.dumps(out))
    """)
    calls = {label: {"path": str(MODULES / call.pop("module")), **call} for label, call in calls.items()}
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
    }
    if nltk_data is not None:
        env["NLTK_DATA"] = str(nltk_data)
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps(calls)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_bleu_rouge_and_accuracy_modules_load_offline(tmp_path):
    out = load_and_compute(
        tmp_path,
        {
            "bleu": {"module": "bleu", "predictions": PREDICTIONS, "references": REFERENCES},
            "bleu1": {"module": "bleu", "predictions": PREDICTIONS, "references": REFERENCES, "max_order": 1},
            "bleu_readme": {  # evaluate metrics/bleu/README.md, two references for the first prediction
                "module": "bleu",
                "predictions": PREDICTIONS[:2],
                "references": REFERENCES[:2],
            },
            "rouge": {"module": "rouge", "predictions": PREDICTIONS, "references": REFERENCES},
            "rouge_single": {  # evaluate metrics/rouge/README.md, one string reference each
                "module": "rouge",
                "predictions": ["hello there", "general kenobi"],
                "references": ["hello there", "general kenobi"],
            },
            "accuracy": {
                "module": "closed_accuracy",
                "predictions": ["B. Axial", "Left lung."],
                "references": ["B", "left lung"],
            },
            "m3d_accuracy": {
                "module": "closed_accuracy",
                "predictions": ["B. Axial", "Left lung."],
                "references": ["B", "left lung"],
                "rule": "m3d_substring",
            },
        },
    )
    for label, order in (("bleu", 4), ("bleu1", 1)):
        expected = bleu_statistics(PREDICTIONS, REFERENCES, max_order=order)
        assert out[label].keys() == expected.keys()
        assert out[label]["bleu"] == pytest.approx(expected["bleu"], abs=TOL)
        assert out[label]["precisions"] == pytest.approx(expected["precisions"], abs=TOL)
    assert out["bleu_readme"] == {
        "bleu": 1.0,
        "precisions": [1.0, 1.0, 1.0, 1.0],
        "brevity_penalty": 1.0,
        "length_ratio": pytest.approx(1.1666666666666667, abs=TOL),
        "translation_length": 7.0,
        "reference_length": 6.0,
    }
    for rouge_type in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert out["rouge"][rouge_type] == pytest.approx(rouge(PREDICTIONS, REFERENCES, rouge_type), abs=TOL)
        assert out["rouge_single"][rouge_type] == 1.0
    assert out["accuracy"] == {"accuracy": 0.5}  # "B. Axial" is not the answer "B" once normalised
    assert out["m3d_accuracy"] == {"accuracy": 0.5}  # case-sensitive: "Left lung." does not hold "left lung."
    assert closed_accuracy(["B. Axial", "Left lung."], ["B", "left lung"], rule="m3d_substring") == 0.5


def test_meteor_module_loads_offline(tmp_path, monkeypatch):
    if not (NLTK_DATA / "corpora" / "wordnet").is_dir():
        pytest.skip(f"NLTK data (wordnet, punkt_tab) not found at {NLTK_DATA}")
    guide = "It is a guide to action which ensures that the military always obeys the commands of the party"
    guide_ref = "It is a guide to action that ensures that the military will forever heed Party commands"
    out = load_and_compute(
        tmp_path,
        {
            "meteor": {"module": "meteor", "predictions": PREDICTIONS, "references": REFERENCES},
            "docstring": {"module": "meteor", "predictions": [guide], "references": [guide_ref]},
        },
        nltk_data=NLTK_DATA,
    )
    assert round(out["docstring"]["meteor"], 4) == 0.6944  # evaluate metrics/meteor/meteor.py docstring
    monkeypatch.setenv("NLTK_DATA", str(NLTK_DATA))
    assert out["meteor"]["meteor"] == pytest.approx(meteor(PREDICTIONS, REFERENCES), abs=TOL)


def test_meteor_module_without_nltk_data_says_how_to_get_it(tmp_path):
    code = textwrap.dedent(f"""
        import evaluate, nltk
        nltk.data.path[:] = [{str(tmp_path)!r}]
        try:
            evaluate.load({str(MODULES / "meteor")!r}).compute(predictions=["a"], references=["a"])
        except LookupError as error:
            print(error)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "NLTK_DATA": str(tmp_path)}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "python -m nltk.downloader wordnet punkt_tab" in result.stdout, result.stdout + result.stderr[-2000:]
