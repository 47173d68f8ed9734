"""Scores of a run per task, question type and ROI; the Table-1 markdown table; the bar chart; paired bootstrap.

A run's per-sample results (``generation.SampleResult`` dicts) are grouped into the paper's three tasks:

- ``closed``: ``accuracy`` of the generated text (``compute_metrics(task="closed")``: normalised exact match with
  the answer for ``paper``, M3D's ``"<letter>."`` substring rule against ``closed_answer`` for ``m3d``) and, on a
  model with a closed head, ``head_accuracy`` (the head's label equals ``closed_answer``). The table's closed column
  shows the head when there is one, else the generated text (the documented fallback).
- ``open`` (open VQA) and ``report`` (region reports): BLEU / ROUGE / METEOR of the protocol.

Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..data.rewrite import RewriteConfig, rewrite_question
from .metrics import PROTOCOLS, bleu, closed_accuracy, compute_metrics, meteor, rouge


__all__ = [
    "TASKS",
    "bootstrap_difference",
    "compare_runs",
    "has_bertscore",
    "load_results",
    "markdown_table",
    "question_key",
    "save_chart",
    "score_samples",
    "table_columns",
    "table_row",
]

TASKS = ("closed", "open", "report")
_OPEN_METRICS = {"paper": ("bleu4", "rougeL", "meteor"), "m3d": ("bleu1", "rouge1", "meteor")}
_METRIC_TITLES = {
    "bleu4": "BLEU-4",
    "bleu1": "BLEU-1",
    "rougeL": "ROUGE-L",
    "rouge1": "ROUGE-1",
    "meteor": "METEOR",
    "bertscore_f1": "BERTScore",
}
_TASK_TITLES = {"open": "Open", "report": "Report"}
_NO_PROMPT = RewriteConfig(prompt=False, normalize_anatomy=False)


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")


def _closed_reference(sample: Mapping[str, Any], protocol: str) -> str:
    """What a closed prediction is compared with: the answer text (paper) or the closed label (m3d's letter)."""
    return sample["reference"] if protocol == "paper" else (sample["closed_answer"] or sample["reference"])


def score_task(samples: Sequence[Mapping[str, Any]], task: str, protocol: str) -> dict[str, float]:
    """The metrics of one task over ``samples`` (all of that task), with their count ``n``.

    Raises:
        ValueError: no samples (the metrics refuse an empty list), unknown task or protocol.
    """
    _check_protocol(protocol)
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    predictions = [s["prediction"] for s in samples]
    if task == "closed":
        references = [_closed_reference(s, protocol) for s in samples]
        scores = compute_metrics(predictions, references, protocol=protocol, task="closed")
        heads = [s for s in samples if s.get("closed_prediction") is not None]
        if heads and len(heads) == len(samples):
            scores["head_accuracy"] = closed_accuracy(
                [s["closed_prediction"] for s in heads], [s["closed_answer"] for s in heads]
            )
    else:
        scores = compute_metrics(predictions, [s["reference"] for s in samples], protocol=protocol, task="open")
        if all(s.get("bertscore_f1") is not None for s in samples):  # evaluate.py --bertscore_model (m3d)
            scores["bertscore_f1"] = math.fsum(s["bertscore_f1"] for s in samples) / len(samples)
    return {**scores, "n": len(samples)}


def score_samples(samples: Sequence[Mapping[str, Any]], protocol: str = "paper") -> dict[str, Any]:
    """Scores of a run: ``overall``, ``by_question_type`` and ``by_roi``, each ``{task: {metric: value, "n": n}}``.

    Whole-volume questions (``roi`` None) are grouped under ``"whole_volume"``. A task without samples in a group
    is left out of it (a split with no closed questions has no ``closed`` entry).

    Raises:
        ValueError: ``samples`` is empty, or ``protocol`` unknown.
    """
    _check_protocol(protocol)
    if not samples:
        raise ValueError("there are no scored samples: the split is empty or --max_samples is 0")

    def by_task(group: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return {
            task: score_task(chosen, task, protocol)
            for task in TASKS
            if (chosen := [s for s in group if s["task"] == task])
        }

    def grouped(key: Callable[[Mapping[str, Any]], str]) -> dict[str, Any]:
        groups: dict[str, list] = {}
        for sample in samples:
            groups.setdefault(key(sample), []).append(sample)
        return {name: by_task(groups[name]) for name in sorted(groups)}

    return {
        "overall": by_task(samples),
        "by_question_type": grouped(lambda s: s["question_type"] or "none"),
        "by_roi": grouped(lambda s: s["roi"] or "whole_volume"),
    }


# ---------------------------------------------------------------------------------------------------------------
# Table 1
# ---------------------------------------------------------------------------------------------------------------


def table_columns(protocol: str, bertscore: bool = False) -> list[tuple[str, str, str]]:
    """``(title, task, metric)`` of each Table-1 column: closed accuracy, then open VQA and report generation (with a
    BERTScore column each when ``bertscore``: runs of ``evaluate.py --bertscore_model``)."""
    _check_protocol(protocol)
    metrics = (*_OPEN_METRICS[protocol], "bertscore_f1") if bertscore else _OPEN_METRICS[protocol]
    columns = [("Closed Acc", "closed", "closed")]
    for task in ("open", "report"):
        columns += [(f"{_TASK_TITLES[task]} {_METRIC_TITLES[m]}", task, m) for m in metrics]
    return columns


def has_bertscore(results: Mapping[str, Any]) -> bool:
    """Whether a run's scores hold BERTScore (it was evaluated with ``--bertscore_model``)."""
    overall = results["metrics"]["overall"]
    return any("bertscore_f1" in overall.get(task, {}) for task in ("open", "report"))


def _closed_value(scores: Mapping[str, Any]) -> float | None:
    """The closed column: the head's accuracy when the model has one, else the generated text's."""
    closed = scores.get("closed")
    if not closed:
        return None
    return closed.get("head_accuracy", closed["accuracy"])


def table_row(results: Mapping[str, Any], bertscore: bool | None = None) -> dict[str, float | None]:
    """``{column title: score in [0, 1] or None}`` of one run's ``results.json`` (BERTScore columns when
    ``bertscore``; default: when the run has them)."""
    overall = results["metrics"]["overall"]
    bertscore = has_bertscore(results) if bertscore is None else bertscore
    row = {}
    for title, task, metric in table_columns(results["config"]["protocol"], bertscore):
        row[title] = _closed_value(overall) if task == "closed" else overall.get(task, {}).get(metric)
    return row


def markdown_table(
    runs: Sequence[Mapping[str, Any]],
    names: Sequence[str],
    intervals: Mapping[str, Mapping[str, tuple[float, float, float]]] | None = None,
) -> str:
    """A Table-1-style markdown table: one row per run (model / prompt variant), scores ×100 with one decimal.

    Args:
        runs: ``results.json`` contents, all of one protocol.
        names: the row names.
        intervals: optional ``{run name: {column: (difference, low, high)}}`` from :func:`compare_runs`; printed
            under the table, one line per run compared with the first.

    Raises:
        ValueError: no runs, names not one per run, or runs of different protocols.
    """
    if not runs or len(runs) != len(names):
        raise ValueError(f"{len(runs)} runs and {len(names)} names: give one name per run, at least one run")
    protocols = {run["config"]["protocol"] for run in runs}
    if len(protocols) != 1:
        raise ValueError(f"the runs were scored with different protocols {sorted(protocols)}; compare like with like")
    bertscore = any(has_bertscore(run) for run in runs)
    columns = [title for title, _, _ in table_columns(protocols.pop(), bertscore)]
    lines = ["| Model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, run in zip(names, runs, strict=True):
        row = table_row(run, bertscore)
        cells = ["—" if row[c] is None else f"{100 * row[c]:.1f}" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if intervals:
        lines += ["", f"Paired bootstrap 95 % intervals of the difference from {names[0]} (×100, same questions):", ""]
        for name, per_column in intervals.items():
            parts = [f"{c} {100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]" for c, (d, lo, hi) in per_column.items()]
            lines.append(f"- {name}: " + "; ".join(parts))
    return "\n".join(lines) + "\n"


def save_chart(runs: Sequence[Mapping[str, Any]], names: Sequence[str], path: str | Path) -> Path:
    """A grouped bar chart of the table's columns (×100), one bar colour per run, written as PNG via a temp file.

    Raises:
        ImportError: matplotlib is not installed (the message says how to get it).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("the chart needs matplotlib: pip install matplotlib") from err
    from ..io import atomic_output

    bertscore = any(has_bertscore(run) for run in runs)
    rows = [table_row(run, bertscore) for run in runs]
    columns = list(rows[0])
    width = 0.8 / len(rows)
    figure, axes = plt.subplots(figsize=(max(6.0, 1.2 * len(columns)), 4.0))
    for k, (name, row) in enumerate(zip(names, rows, strict=True)):
        xs = [i + (k - (len(rows) - 1) / 2) * width for i in range(len(columns))]
        axes.bar(xs, [100 * (row[c] or 0.0) for c in columns], width=width, label=name)
    axes.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    axes.set_ylabel("score (×100)")
    axes.set_ylim(0, 100)
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Paired bootstrap
# ---------------------------------------------------------------------------------------------------------------


def _column_scorer(task: str, metric: str, protocol: str) -> Callable[[list[Mapping[str, Any]]], float]:
    """The function computing one table column from a list of samples (resampled ones included)."""
    if task == "closed":

        def closed(samples):
            if all(s.get("closed_prediction") is not None for s in samples):
                return closed_accuracy(
                    [s["closed_prediction"] for s in samples], [s["closed_answer"] for s in samples]
                )
            return score_task(samples, "closed", protocol)["accuracy"]

        return closed
    if metric == "bertscore_f1":
        return lambda samples: math.fsum(s["bertscore_f1"] for s in samples) / len(samples)
    if metric == "bleu4":
        return lambda samples: bleu([s["prediction"] for s in samples], [s["reference"] for s in samples], 4)
    if metric == "bleu1":  # m3d: mean of per-sample BLEU-1 on stripped texts
        return lambda samples: (
            math.fsum(bleu([s["prediction"].strip()], [s["reference"].strip()], 1) for s in samples) / len(samples)
        )
    rouge_type = {"rougeL": "rougeL", "rouge1": "rouge1"}.get(metric)
    if rouge_type:
        strip = protocol == "m3d"
        return lambda samples: rouge(
            [s["prediction"].strip() if strip else s["prediction"] for s in samples],
            [s["reference"].strip() if strip else s["reference"] for s in samples],
            rouge_type,
        )
    return lambda samples: meteor([s["prediction"] for s in samples], [s["reference"] for s in samples])


def _per_sample(scorer, samples) -> list[float]:
    """Per-sample scores when the column is a plain mean of them (then resampling needs no rescoring)."""
    return [scorer([s]) for s in samples]


def bootstrap_difference(
    base: Sequence[Mapping[str, Any]],
    other: Sequence[Mapping[str, Any]],
    scorer: Callable[[list[Mapping[str, Any]]], float],
    *,
    mean_of_samples: bool,
    num_resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Paired bootstrap: ``(score(other) - score(base), 2.5 %, 97.5 % percentile)`` over resampled questions.

    Both lists hold the same questions in the same order; each resample draws question indices with replacement
    and scores both runs on those same questions, so the interval reflects the question sample, not the pairing.

    Args:
        base, other: the two runs' samples of one task, paired by position.
        scorer: computes the column from a list of samples.
        mean_of_samples: the column is a mean of per-sample scores (accuracy, ROUGE, METEOR, m3d BLEU-1): score
            each sample once and resample the scores (same numbers, far faster). False for corpus BLEU-4.
        num_resamples: bootstrap resamples.
        seed: the resampling seed (the interval is reproducible).

    Raises:
        ValueError: the lists differ in length or are empty, or ``num_resamples`` < 1.
    """
    if len(base) != len(other) or not base:
        raise ValueError(f"paired bootstrap needs the same non-empty questions, got {len(base)} and {len(other)}")
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
    rng = random.Random(seed)
    n = len(base)
    difference = scorer(list(other)) - scorer(list(base))
    if mean_of_samples:
        per_base, per_other = _per_sample(scorer, base), _per_sample(scorer, other)
        deltas = [b - a for a, b in zip(per_base, per_other, strict=True)]
    draws = []
    for _ in range(num_resamples):
        picks = [rng.randrange(n) for _ in range(n)]
        if mean_of_samples:
            draws.append(math.fsum(deltas[i] for i in picks) / n)
        else:
            draws.append(scorer([other[i] for i in picks]) - scorer([base[i] for i in picks]))
    draws.sort()
    low = draws[max(0, math.floor(0.025 * num_resamples))]
    high = draws[min(num_resamples - 1, math.ceil(0.975 * num_resamples) - 1)]
    return difference, low, high


def question_key(question: str) -> str:
    """A question as the no-prompt variant asks it: the rewriting prefix of any colour removed ("Inside the red
    boundary, does ..." → "Does ..."), anatomy terms as they are (``med3dqwen.data.rewrite.rewrite_question``)."""
    try:
        return rewrite_question(question, _NO_PROMPT)
    except ValueError:  # empty, or only a prefix: compared as it is
        return question


def compare_runs(
    runs: Sequence[Mapping[str, Any]], names: Sequence[str], num_resamples: int = 1000, seed: int = 0
) -> dict[str, dict[str, tuple[float, float, float]]]:
    """Bootstrap intervals of every table column's difference between each run and the first.

    Samples are paired by id; only ids present in both runs with the same question count (a question asked
    differently is not the same question), the question compared without its boundary-prompt prefix
    (:func:`question_key`), so that a prompt build and a no-prompt build of the same data pair question by question.

    Returns:
        ``{name: {column: (difference, low, high)}}`` for ``names[1:]``; a column neither run can score is left out.

    Raises:
        ValueError: fewer than two runs, different protocols, or two runs sharing no question.
    """
    if len(runs) < 2:
        raise ValueError("--compare needs at least two results files")
    protocols = {run["config"]["protocol"] for run in runs}
    if len(protocols) != 1:
        raise ValueError(f"the runs were scored with different protocols {sorted(protocols)}; compare like with like")
    protocol = protocols.pop()
    base = {s["id"]: s for s in runs[0]["samples"]}
    out = {}
    for name, run in zip(names[1:], runs[1:], strict=True):
        pairs = [(base[s["id"]], s) for s in run["samples"] if s["id"] in base]
        pairs = [(a, b) for a, b in pairs if question_key(a["question"]) == question_key(b["question"])]
        if not pairs:
            raise ValueError(f"{name} and {names[0]} share no question (ids and question texts): nothing to pair")
        per_column = {}
        for title, task, metric in table_columns(protocol, bertscore=True):
            chosen = [(a, b) for a, b in pairs if a["task"] == task]
            if not chosen or (
                metric == "bertscore_f1" and any(s.get(metric) is None for pair in chosen for s in pair)
            ):
                continue  # no such questions, or BERTScore missing in one of the runs
            scorer = _column_scorer(task, metric, protocol)
            per_column[title] = bootstrap_difference(
                [a for a, _ in chosen],
                [b for _, b in chosen],
                scorer,
                mean_of_samples=metric != "bleu4",
                num_resamples=num_resamples,
                seed=seed,
            )
        out[name] = per_column
    return out


def load_results(path: str | Path) -> dict[str, Any]:
    """A run's ``results.json`` (or the folder holding it), checked to have what a comparison reads.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, or not a results file of ``evaluate.py`` (the message names the file).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"results file {path} does not exist")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    missing = [key for key in ("config", "metrics", "samples") if key not in results]
    if missing:
        raise ValueError(f"{path} is not a results file of evaluate.py: it has no {missing}")
    return results
