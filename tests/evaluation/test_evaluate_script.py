"""evaluate.py end to end on a tiny random Med3DQwen (real Qwen2.5 tokenizer ids) and a small phantom split.

Covers: the outputs (results.json, table.md, chart.png, predictions.jsonl), the command line and ``--compare`` with
paired bootstrap intervals, ``import evaluate`` from the repository root, resume after a kill, left padding (batch
size does not change the answers), and bad input.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_model

from med3dqwen.builders.engine import BuildArguments
from med3dqwen.builders.phantom.dataset import PhantomBuildConfig, build_phantom_dataset
from med3dqwen.evaluation import report
from med3dqwen.evaluation.runner import (
    EvaluationArguments,
    PredictionStore,
    evaluate_model,
    load_model,
    load_split,
    prompt_variant,
    run_comparison,
)
from med3dqwen.modeling.modeling_med3d_qwen import Med3DQwenForConditionalGeneration
from med3dqwen.training.collator import Med3DQwenCollator


ROOT = Path(__file__).resolve().parents[2]
SHARED_NLTK = ROOT.parent / "shared" / "nltk_data"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model folder, model without closed head, phantom dataset folder)."""
    if not SHARED_NLTK.is_dir() and not os.environ.get("NLTK_DATA"):
        pytest.skip(f"METEOR needs NLTK data: set NLTK_DATA or provide {SHARED_NLTK}")
    os.environ.setdefault("NLTK_DATA", str(SHARED_NLTK))
    base = tmp_path_factory.mktemp("evaluate")
    data = base / "phantom"
    build_phantom_dataset(
        PhantomBuildConfig(output_dir=str(data), num_volumes=2, seed=2, shape=(32, 64, 64)),
        BuildArguments(progress=False),
    )
    return save_tiny_model(base / "model"), save_tiny_model(base / "no_head", closed_label_names=[]), data


def arguments(model: Path, data: Path, out: Path, **kwargs) -> EvaluationArguments:
    values = {"split": "train", "max_samples": 10, "batch_size": 4, "max_new_tokens": 4, "progress": False, **kwargs}
    return EvaluationArguments(model_name_or_path=str(model), dataset_name=str(data), output_dir=str(out), **values)


def without_timing(samples: list[dict]) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "latency_s"} for s in samples]


def test_outputs_table_and_chart(setup, tmp_path):
    model, _, data = setup
    results = evaluate_model(arguments(model, data, tmp_path))
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["metrics"] == results["metrics"]
    assert [s["id"] for s in on_disk["samples"]] == [f"{i:06d}" for i in range(10)]
    assert {s["task"] for s in on_disk["samples"]} == {"closed", "open", "report"}
    overall = on_disk["metrics"]["overall"]
    assert set(overall) == {"closed", "open", "report"}
    assert set(overall["open"]) == {"bleu4", "rougeL", "meteor", "n"}
    assert 0.0 <= overall["closed"]["head_accuracy"] <= 1.0  # the model has a closed head
    assert sum(task["n"] for task in overall.values()) == 10
    for group in ("by_question_type", "by_roi"):
        assert sum(t["n"] for scores in on_disk["metrics"][group].values() for t in scores.values()) == 10
    assert "presence" in on_disk["metrics"]["by_question_type"] and "liver" in on_disk["metrics"]["by_roi"]
    assert on_disk["config"]["protocol"] == "paper" and on_disk["versions"]["torch"] == torch.__version__
    assert on_disk["resources"]["peak_rss_mib"] > 0 and on_disk["resources"]["latency_s_per_sample_median"] > 0
    table = (tmp_path / "table.md").read_text().splitlines()
    assert table[0].startswith("| Model | Closed Acc | Open BLEU-4 | Open ROUGE-L | Open METEOR | Report BLEU-4")
    closed = 100 * overall["closed"]["head_accuracy"]
    assert (
        table[2]
        == f"| {model} (prompt red) | {closed:.1f} | "
        + " | ".join(f"{100 * overall[t][m]:.1f}" for t in ("open", "report") for m in ("bleu4", "rougeL", "meteor"))
        + " |"
    )
    chart = (tmp_path / "chart.png").read_bytes()
    assert chart.startswith(PNG_SIGNATURE)
    from PIL import Image

    with Image.open(tmp_path / "chart.png") as image:
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
    assert len(PredictionStore(tmp_path / "predictions.jsonl").load()) == 10


def test_command_line_and_compare(setup, tmp_path):
    """Two identical runs (one from the command line); --compare gives one table, one chart and intervals holding 0."""
    model, _, data = setup
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    common = ["--model_name_or_path", str(model), "--dataset_name", str(data), "--split", "train"]
    common += ["--max_samples", "10", "--batch_size", "5", "--max_new_tokens", "3", "--progress", "false"]
    done = subprocess.run(
        [sys.executable, "evaluate.py", *common, "--output_dir", str(tmp_path / "a"), "--run_name", "a"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| a | " in done.stdout
    again = arguments(model, data, tmp_path / "b", max_samples=10, batch_size=5, max_new_tokens=3, run_name="b")
    evaluate_model(again)  # the same run in this process
    done = subprocess.run(
        [sys.executable, "evaluate.py", "--compare", str(tmp_path / "a"), str(tmp_path / "b" / "results.json"),
         "--output_dir", str(tmp_path / "cmp"), "--num_resamples", "200"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| a | " in done.stdout and "| b | " in done.stdout and "Paired bootstrap 95 %" in done.stdout
    intervals = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["intervals"]["b"]
    assert set(intervals) >= {"Closed Acc", "Open BLEU-4", "Open METEOR", "Report ROUGE-L"}
    for difference, low, high in intervals.values():
        assert low <= 0.0 <= high and difference == 0.0
    assert (tmp_path / "cmp" / "comparison.png").read_bytes().startswith(PNG_SIGNATURE)
    assert (tmp_path / "cmp" / "comparison.md").read_text() in done.stdout


def test_import_evaluate_from_the_root_gives_the_library():
    """From the repository root (where evaluate.py sits first on sys.path) `import evaluate` is the library."""
    check = (
        "import evaluate; import evaluate as again; assert again is evaluate; print(evaluate.__file__);"
        "assert callable(evaluate.load), evaluate.__file__"
    )
    done = subprocess.run(
        [sys.executable, "-c", check], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    path = Path(done.stdout.strip().splitlines()[-1])
    assert path.name == "__init__.py" and path.parent.name == "evaluate" and path.parent.parent != ROOT


def test_script_imports_nothing_at_module_level():
    """evaluate.py run under another name defines its functions and loads no library (no import side effects)."""
    check = (
        "import importlib.util, sys; spec = importlib.util.spec_from_file_location('evaluate_script', 'evaluate.py');"
        "m = importlib.util.module_from_spec(spec); before = set(sys.modules); spec.loader.exec_module(m);"
        "new = set(sys.modules) - before; assert not {n for n in new if n.split('.')[0] in "
        "('torch', 'transformers', 'med3dqwen', 'evaluate')}, new; assert callable(m.main) and callable(m.make_parser)"
    )
    done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def test_resume_after_kill_equals_an_uninterrupted_run(setup, tmp_path, monkeypatch):
    model, _, data = setup
    settings = {"max_samples": 4, "batch_size": 2}
    whole = evaluate_model(arguments(model, data, tmp_path / "whole", **settings))

    calls = []
    append = PredictionStore.append

    def killed_after_first_batch(self, samples):
        if calls:  # the second batch: a kill while writing leaves half a line
            with open(self.path, "a") as handle:
                handle.write(json.dumps(samples[0])[:25])
            raise KeyboardInterrupt
        calls.append(len(samples))
        append(self, samples)

    monkeypatch.setattr(PredictionStore, "append", killed_after_first_batch)
    with pytest.raises(KeyboardInterrupt):
        evaluate_model(arguments(model, data, tmp_path / "killed", **settings))
    assert not (tmp_path / "killed" / "results.json").exists()
    monkeypatch.setattr(PredictionStore, "append", append)
    resumed = evaluate_model(arguments(model, data, tmp_path / "killed", **settings))
    assert resumed["resources"]["resumed_from_previous"] == 2
    assert resumed["resources"]["generated_this_process"] == 2
    assert without_timing(resumed["samples"]) == without_timing(whole["samples"])
    assert resumed["metrics"] == whole["metrics"]
    lines = (tmp_path / "killed" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line) for line in lines)  # the torn line is gone


@pytest.mark.slow
def test_accelerate_launch_two_processes_equals_one(setup, tmp_path):
    """Two CPU processes (`accelerate launch --multi_gpu --num_processes 2 evaluate.py --device cpu`: accelerate's
    `--cpu` launcher starts one process unless MPI is set up): each generates half of the samples, and results.json
    (metrics, samples, run name) and predictions.jsonl equal a one-process run's."""
    model, _, data = setup
    options = {"max_samples": 6, "batch_size": 2, "max_new_tokens": 3}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", str(free_port())]
    cmd += [str(ROOT / "evaluate.py"), "--model_name_or_path", str(model), "--dataset_name", str(data), "--split"]
    cmd += ["train", "--output_dir", str(tmp_path / "sharded"), "--progress", "false", "--device", "cpu"]
    cmd += [item for key, value in options.items() for item in (f"--{key}", str(value))]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    single = evaluate_model(arguments(model, data, tmp_path / "single", **options))
    sharded = json.loads((tmp_path / "sharded" / "results.json").read_text())
    assert sharded["resources"]["num_processes"] == 2
    assert sharded["resources"]["generated_this_process"] == 3 and sharded["resources"]["generated_this_run"] == 6
    assert sharded["metrics"] == single["metrics"]
    assert without_timing(sharded["samples"]) == without_timing(single["samples"])
    assert sharded["config"]["run_name"] == single["config"]["run_name"]
    lines = [PredictionStore(tmp_path / run / "predictions.jsonl").load() for run in ("sharded", "single")]
    assert [without_timing(found) for found in lines] == [without_timing(single["samples"])] * 2
    assert not list((tmp_path / "sharded").glob("predictions.part-*.jsonl"))  # merged, then deleted


def test_resume_of_a_killed_sharded_run_in_one_process(setup, tmp_path):
    """Part files of a killed two-process run (one with a torn last line) are read back by a one-process rerun:
    only the missing samples are generated, and everything equals an uninterrupted run, in split order."""
    model, _, data = setup
    settings = {"max_samples": 6, "batch_size": 2}
    whole = evaluate_model(arguments(model, data, tmp_path / "whole", **settings))
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "run_config.json").write_text((tmp_path / "whole" / "run_config.json").read_text())
    samples = whole["samples"]
    PredictionStore(killed / "predictions.part-00000.jsonl").append([samples[0], samples[2]])
    PredictionStore(killed / "predictions.part-00001.jsonl").append([samples[1]])
    with open(killed / "predictions.part-00001.jsonl", "a") as handle:
        handle.write(json.dumps(samples[3])[:30])  # killed while writing
    resumed = evaluate_model(arguments(model, data, killed, **settings))
    assert resumed["resources"]["resumed_from_previous"] == 3 and resumed["resources"]["generated_this_run"] == 3
    assert without_timing(resumed["samples"]) == without_timing(samples)
    assert resumed["metrics"] == whole["metrics"]
    stored = PredictionStore(killed / "predictions.jsonl").load()
    assert [s["id"] for s in stored] == [s["id"] for s in samples]
    assert not list(killed.glob("predictions.part-*.jsonl"))


def test_rerun_with_other_settings_is_refused(setup, tmp_path):
    model, _, data = setup
    evaluate_model(arguments(model, data, tmp_path, max_samples=2))
    with pytest.raises(ValueError, match="holds predictions of another run"):
        evaluate_model(arguments(model, data, tmp_path, max_samples=2, max_new_tokens=5))
    rescored = evaluate_model(arguments(model, data, tmp_path, max_samples=2, protocol="m3d"))  # scoring only
    assert rescored["resources"]["generated_this_process"] == 0
    assert set(rescored["metrics"]["overall"]["closed"]) >= {"accuracy", "head_accuracy"}


def test_batch_size_does_not_change_answers(setup, tmp_path):
    """Left padding: one sample per batch and five per batch give the same text and closed-head labels, and the
    labels are those of a plain forward on the collator's right-padded conversations (head at the prompt's end)."""
    model_dir, _, data = setup
    one = evaluate_model(arguments(model_dir, data, tmp_path / "one", batch_size=1, max_samples=5))
    five = evaluate_model(arguments(model_dir, data, tmp_path / "five", batch_size=5, max_samples=5))
    assert without_timing(one["samples"]) == without_timing(five["samples"])

    model, processor = load_model(str(model_dir), None, "cpu")
    records = list(load_split(str(data), "train", 5))
    names = model.config.closed_label_names
    batch = Med3DQwenCollator(processor, closed_label_names=names)(records)
    with torch.inference_mode():
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            closed_label_mask=batch["closed_label_mask"],
        ).closed_logits  # (5, K)
    expected = [
        names[k] if r["answer_type"] == "closed" else None for k, r in zip(logits.argmax(-1), records, strict=True)
    ]
    assert [s["closed_prediction"] for s in five["samples"]] == expected
    assert expected[:4] != [None] * 4 and expected[4] is None


def test_model_without_closed_head_falls_back_to_text(setup, tmp_path):
    _, no_head, data = setup
    results = evaluate_model(arguments(no_head, data, tmp_path, max_samples=5, batch_size=5))
    closed = results["metrics"]["overall"]["closed"]
    assert "head_accuracy" not in closed
    assert all(s["closed_prediction"] is None for s in results["samples"])
    assert report.table_row(results)["Closed Acc"] == closed["accuracy"]


def test_bad_input(setup, tmp_path):
    model, _, data = setup
    with pytest.raises(ValueError, match="no split 'test'"):
        evaluate_model(arguments(model, data, tmp_path / "a", split="test"))
    fixed = evaluate_model(arguments(model, data, tmp_path / "a", max_samples=1))  # same folder, right split
    assert len(fixed["samples"]) == 1
    with pytest.raises(ValueError, match="needs --model_name_or_path"):
        EvaluationArguments(dataset_name=str(data), output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="max_samples must be >= 1"):
        arguments(model, data, tmp_path, max_samples=0)
    with pytest.raises(ValueError, match="no scored samples"):
        report.score_samples([])
    bad = tmp_path / "bad.json"
    bad.write_text('{"metrics": {}}')
    with pytest.raises(ValueError, match=r"bad.json is not a results file of evaluate.py"):
        report.load_results(bad)
    torn = tmp_path / "torn" / "predictions.jsonl"
    torn.parent.mkdir()
    torn.write_text('{"id": "1"}\nnot json\n{"id": "2"}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        PredictionStore(torn).load()


def _sample(id_, task, prediction, reference, closed=None, answer=None):
    return {
        "id": id_, "task": task, "question_type": "q", "roi": None, "question": f"q{id_}", "reference": reference,
        "prediction": prediction, "closed_answer": answer, "closed_prediction": closed, "latency_s": 0.0,
    }  # fmt: skip


def _run(samples, protocol="paper"):
    return {"config": {"protocol": protocol}, "metrics": report.score_samples(samples, protocol), "samples": samples}


def test_split_without_closed_questions_has_no_closed_column():
    samples = [_sample(str(i), "open", "a small nodule", "a small nodule in the liver") for i in range(3)]
    results = _run(samples)
    assert "closed" not in results["metrics"]["overall"]
    row = report.markdown_table([results], ["open only"]).splitlines()[2]
    assert row.startswith("| open only | — | ") and row.endswith("| — | — | — |")


def test_bootstrap_separates_a_real_gap_from_noise():
    references = ["the liver is enlarged", "no nodule", "a nodule in the right lung", "normal heart size"] * 5
    right = [_sample(str(i), "open", r, r) for i, r in enumerate(references)]
    wrong = [_sample(str(i), "open", "kidney stone", r) for i, r in enumerate(references)]
    yes = [_sample(f"c{i}", "closed", "Yes.", "Yes.", closed="yes", answer="yes") for i in range(10)]
    no = [_sample(f"c{i}", "closed", "No.", "Yes.", closed="no", answer="yes") for i in range(10)]
    base, other = _run(wrong + no), _run(right + yes)
    intervals = report.compare_runs([base, other], ["wrong", "right"], num_resamples=200)["right"]
    for column in ("Closed Acc", "Open BLEU-4", "Open ROUGE-L", "Open METEOR"):
        difference, low, high = intervals[column]
        assert 0.0 < low <= difference <= high, (column, intervals[column])
    assert intervals["Closed Acc"] == (1.0, 1.0, 1.0)
    same = report.compare_runs([base, base], ["wrong", "again"], num_resamples=50)["again"]
    assert all(value == (0.0, 0.0, 0.0) for value in same.values())
    mixed = report.bootstrap_difference(
        right[:4] + wrong[4:8], wrong[:4] + right[4:8], report._column_scorer("open", "rougeL", "paper"),
        mean_of_samples=True, num_resamples=500,
    )  # fmt: skip
    assert mixed[1] < 0.0 < mixed[2]  # half better, half worse: the interval straddles 0
    with pytest.raises(ValueError, match="share no question"):
        report.compare_runs([base, _run([_sample("zz", "open", "a", "b")])], ["a", "b"])
    with pytest.raises(ValueError, match="different protocols"):
        report.compare_runs([base, _run(right, "m3d")], ["a", "b"])


def save_yes_adapter(model_dir: Path, folder: Path) -> Path:
    """A LoRA adapter on ``model_dir`` whose closed head always prefers "yes" over "no"."""
    import peft

    base = Med3DQwenForConditionalGeneration.from_pretrained(model_dir)
    lora = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["closed_head"])
    adapted = peft.get_peft_model(base, lora)
    with torch.no_grad():
        head = adapted.base_model.model.closed_head.modules_to_save["default"].classifier
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 5.0, 0.0, 0.0, 0.0, 0.0]))
    adapted.save_pretrained(folder)
    return folder


def test_adapter_is_loaded_and_its_closed_head_used(setup, tmp_path):
    """--adapter: a LoRA adapter whose trained closed head differs from the base's changes the closed labels."""
    model_dir, _, data = setup
    adapter = save_yes_adapter(model_dir, tmp_path / "adapter")
    results = evaluate_model(arguments(model_dir, data, tmp_path / "out", adapter=str(adapter), max_samples=4))
    assert [s["closed_prediction"] for s in results["samples"]] == ["yes"] * 4
    assert results["config"]["adapter"] == str(adapter)


def test_runs_are_labelled_by_adapter_and_prompt_variant(setup, tmp_path):
    """Without --run_name an adapter run is named after the adapter and its split's prompt variant, not after the
    base model (which every adapter of one base shares); --compare shows those names and pairs the questions of a
    prompt and a no-prompt build of the same phantoms although their wording differs."""
    model_dir, _, red = setup
    none = tmp_path / "phantom_none"
    build_phantom_dataset(
        PhantomBuildConfig(output_dir=str(none), num_volumes=2, seed=2, shape=(32, 64, 64), prompt="none"),
        BuildArguments(progress=False),
    )
    adapters = {v: save_yes_adapter(model_dir, tmp_path / f"sft_{v}") for v in ("red", "none")}
    runs = {
        v: evaluate_model(arguments(model_dir, d, tmp_path / v, adapter=str(adapters[v]) + "/", max_samples=3))
        for v, d in (("red", red), ("none", none))
    }
    for variant, run in runs.items():
        assert run["config"]["run_name"] == f"{adapters[variant]} (prompt {variant})"
        row = (tmp_path / variant / "table.md").read_text().splitlines()[2]
        assert row.startswith(f"| {run['config']['run_name']} |")
    assert runs["red"]["samples"][0]["question"].startswith("Inside the red boundary, ")
    assert runs["none"]["samples"][0]["question"] == report.question_key(runs["red"]["samples"][0]["question"])

    table = run_comparison(
        EvaluationArguments(compare=[str(tmp_path / "none"), str(tmp_path / "red")], output_dir=str(tmp_path / "cmp"))
    )
    rows = table.splitlines()
    assert rows[2].startswith(f"| {adapters['none']} (prompt none) |") and rows[3].startswith(
        f"| {adapters['red']} (prompt red) |"
    )
    assert str(model_dir) not in table
    intervals = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["intervals"]
    assert intervals[f"{adapters['red']} (prompt red)"]["Closed Acc"] == [0.0, 0.0, 0.0]  # paired, same head
    assert prompt_variant([]) is None  # no ROI rows: the variant is unknown, the name is the adapter alone


def save_tiny_bert(folder: Path, words) -> Path:
    """A randomly initialised 2-layer BERT with a WordPiece vocabulary of ``words`` plus single characters."""
    from transformers import BertConfig, BertModel, BertTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(words)), *letters, *(f"##{c}" for c in letters)]
    vocab += list(".,?-()")
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(dict.fromkeys(vocab)), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=128,
    )  # fmt: skip
    BertModel(config).save_pretrained(folder)
    BertTokenizer(str(folder / "vocab.txt"), model_max_length=128).save_pretrained(folder)
    return folder


def test_bertscore_of_the_m3d_protocol_equals_bert_scores_own_per_sample_calls(setup, tmp_path):
    """--bertscore_model: each open and report answer's F1 is what M3D's scripts compute (bert_score.score on one
    stripped sample at a time, here on a tiny random BERT saved locally), and the task score is their mean."""
    bert_score = pytest.importorskip("bert_score")
    from med3dqwen.evaluation.bertscore import bertscore_f1

    model_dir, _, data = setup
    texts = [r["messages"][-1]["content"][0]["text"] for r in load_split(str(data), "train", 10)]
    bert = save_tiny_bert(tmp_path / "tiny_bert", " ".join(texts).lower().replace(".", " ").split())
    args = arguments(model_dir, data, tmp_path / "out", protocol="m3d", bertscore_model=str(bert))
    args.bertscore_num_layers = 2
    results = evaluate_model(args)
    by_task = {}
    for sample in results["samples"]:
        if sample["task"] == "closed":
            assert "bertscore_f1" not in sample
            continue
        expected = 0.0  # bert_score's F1 of an empty candidate (which it cannot encode under transformers 5)
        if sample["prediction"].strip():
            _, _, f1 = bert_score.score(
                [sample["prediction"].strip()], [[sample["reference"].strip()]], model_type=str(bert), num_layers=2,
                lang="en",
            )  # fmt: skip
            expected = f1.item()
        assert sample["bertscore_f1"] == pytest.approx(expected, abs=1e-6)
        by_task.setdefault(sample["task"], []).append(expected)
    assert set(by_task) == {"open", "report"}
    for task, scores in by_task.items():
        mean = sum(scores) / len(scores)
        assert results["metrics"]["overall"][task]["bertscore_f1"] == pytest.approx(mean, abs=1e-6)
    header = (tmp_path / "out" / "table.md").read_text().splitlines()[0]
    assert header.endswith("| Open BERTScore | Report BLEU-1 | Report ROUGE-1 | Report METEOR | Report BERTScore |")
    assert all("bertscore_f1" not in s for s in PredictionStore(tmp_path / "out" / "predictions.jsonl").load())
    same = report.compare_runs([results, results], ["a", "b"], num_resamples=20)["b"]
    assert same["Open BERTScore"] == (0.0, 0.0, 0.0) and same["Report BERTScore"] == (0.0, 0.0, 0.0)

    # the tiny decoder's answers are empty after 4 tokens: check non-empty texts, several references, one call
    predictions = [" the liver is enlarged. ", "no nodule", "", "a small nodule in the right lung"]
    references = ["the liver is normal.", ["a nodule", "no nodule"], "no nodule", "no nodule in the lung "]
    f1 = bertscore_f1(predictions, references, bert, num_layers=2)
    for value, prediction, refs in zip(f1, predictions, references, strict=True):
        refs = [refs.strip()] if isinstance(refs, str) else refs
        expected = 0.0 if not prediction.strip() else bert_score.score(
            [prediction.strip()], [refs], model_type=str(bert), num_layers=2, lang="en"
        )[2].item()  # fmt: skip
        assert value == pytest.approx(expected, abs=1e-6)
    assert f1[1] == pytest.approx(1.0, abs=1e-5) and 0.0 < f1[0] < 1.0 and f1[2] == 0.0

    with pytest.raises(ValueError, match="part of the m3d protocol"):
        arguments(model_dir, data, tmp_path / "x", bertscore_model=str(bert))
    with pytest.raises(ValueError, match="no default layer for a model folder named 'tiny_bert'"):
        bertscore_f1(["a"], ["a"], bert)
    with pytest.raises(FileNotFoundError, match="not a local model folder"):
        bertscore_f1(["a"], ["a"], tmp_path / "roberta-large", num_layers=17)
