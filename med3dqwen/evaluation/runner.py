"""What ``python evaluate.py`` runs: one evaluation (resumable) or a comparison of several runs.

An evaluation writes into ``output_dir``:

- ``predictions.jsonl``: one line per scored sample (``generation.SampleResult``), appended and fsynced after each
  batch. A killed run leaves whole lines (a torn last line is dropped on restart); rerunning the same command skips
  the ids already there, so it continues where it stopped. Once every sample is scored it is rewritten (atomically)
  in split order.
- ``predictions.part-<rank>.jsonl``: under ``accelerate launch --num_processes N`` (N > 1) each process appends its
  shard's lines to its own file (no two processes write one file); the main process merges them into
  ``predictions.jsonl`` at the end and deletes them. Every process reads all of these files on start, so a killed
  sharded run continues with any number of processes.
- ``run_config.json``: what the predictions depend on (model, adapter, dataset, split, max_new_tokens); a rerun
  with other values into the same folder is refused rather than mixing two runs.
- ``results.json`` (metrics overall / per question type / per ROI, per-sample predictions, config, versions,
  peak memory, latency), ``table.md`` and ``chart.png``, written atomically by the main process once every sample
  is scored.

Sharding (``accelerate``'s ``PartialState``; one process without a launcher): the samples still to score are dealt
out round-robin over the processes, each generates its share on its own device, and the main process scores the
merged predictions in split order. Answers do not depend on the batch a sample lands in (left padding), so the
results equal an unsharded run's (tested with two CPU processes), except timings and ``resources``.

See docs/evaluation.md.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from ..io import atomic_output
from .report import compare_runs, load_results, markdown_table, save_chart, score_samples


__all__ = [
    "PART_PATTERN",
    "EvaluationArguments",
    "PredictionStore",
    "default_run_name",
    "evaluate_model",
    "library_versions",
    "load_stored_predictions",
    "prompt_variant",
    "run_comparison",
]

PART_PATTERN = "predictions.part-*.jsonl"
"""The per-process prediction files of a sharded run (``predictions.part-00001.jsonl``)."""
_GENERATION_KEYS = ("model_name_or_path", "adapter", "dataset_name", "split", "max_new_tokens", "max_samples")
_VERSIONED = ("med3dqwen", "torch", "transformers", "datasets", "peft", "accelerate", "trl", "evaluate", "nltk")


@dataclass
class EvaluationArguments:
    """The options of ``evaluate.py`` (one per field; ``HfArgumentParser`` turns them into ``--name``)."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "Model folder or Hub id (Med3DQwen)."})
    adapter: str | None = field(default=None, metadata={"help": "PEFT adapter folder or Hub id to load on top."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "Built dataset folder (load_dataset + resolve_media) or Hub dataset id."}
    )
    split: str = field(default="test", metadata={"help": "Dataset split to evaluate."})
    output_dir: str | None = field(default=None, metadata={"help": "Folder for results.json, table.md, chart.png."})
    max_samples: int | None = field(default=None, metadata={"help": "Evaluate only the first N samples."})
    protocol: str = field(
        default="paper", metadata={"help": "Metric protocol: paper or m3d.", "choices": ["paper", "m3d"]}
    )
    batch_size: int = field(default=4, metadata={"help": "Samples per generate call."})
    max_new_tokens: int = field(default=64, metadata={"help": "Longest generated answer, in tokens."})
    run_name: str | None = field(
        default=None,
        metadata={"help": "Row name in the table (default: the adapter, else the model, and the prompt variant)."},
    )
    compare: list[str] | None = field(
        default=None, metadata={"help": "Results files or run folders to render in one table and chart.", "nargs": "+"}
    )
    num_resamples: int = field(default=1000, metadata={"help": "Paired bootstrap resamples for --compare."})
    bertscore_model: str | None = field(
        default=None,
        metadata={
            "help": "Local model folder for BERTScore of open answers and reports (m3d protocol; M3D uses "
            "roberta-large). Needs bert_score (pip install bert-score)."
        },
    )
    bertscore_num_layers: int | None = field(
        default=None, metadata={"help": "Hidden layer BERTScore reads (default: bert_score's for the folder name)."}
    )
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda if available, else cpu)."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})

    def __post_init__(self) -> None:
        if self.compare is not None:
            if not self.output_dir:
                raise ValueError("--compare needs --output_dir for the table and chart")
            return
        missing = [f"--{n}" for n in ("model_name_or_path", "dataset_name", "output_dir") if not getattr(self, n)]
        if missing:
            raise ValueError(f"an evaluation needs {', '.join(missing)} (or use --compare RUN1 RUN2 ...)")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"--max_samples must be >= 1, got {self.max_samples}")
        if self.bertscore_model and self.protocol != "m3d":
            raise ValueError("--bertscore_model is part of the m3d protocol: add --protocol m3d")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(f"--batch_size and --max_new_tokens must be >= 1, got {self.batch_size}, "
                             f"{self.max_new_tokens}")  # fmt: skip


class PredictionStore:
    """``predictions.jsonl`` of a run: append-only, one fsynced line per sample, readable after a kill."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def load(self) -> list[dict[str, Any]]:
        """The samples already scored; a torn last line (a kill mid-write) is cut off the file.

        Raises:
            ValueError: a line other than the last is not JSON (the file was edited or corrupted).
        """
        if not self.path.exists():
            return []
        lines = self.path.read_bytes().split(b"\n")
        samples, good_bytes = [], 0
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                good_bytes += len(line) + 1
                continue
            try:
                samples.append(json.loads(line))
            except json.JSONDecodeError as err:
                if number < len(lines) - 1 or any(rest.strip() for rest in lines[number:]):
                    raise ValueError(
                        f"{self.path} line {number} is not JSON ({err}); delete the file to start over"
                    ) from err
                with open(self.path, "r+b") as handle:  # torn last line: keep the whole ones
                    handle.truncate(good_bytes)
                break
            good_bytes += len(line) + 1
        return samples

    def append(self, samples: list[dict[str, Any]]) -> None:
        """Append ``samples`` as whole lines and fsync, so a kill after this call loses none of them."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
            handle.flush()
            os.fsync(handle.fileno())


def library_versions() -> dict[str, str | None]:
    """Python and the versions of the libraries the numbers depend on (None: not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _write_json(path: Path, value: Any) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def load_stored_predictions(output_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{id: sample}`` of every prediction stored in ``output_dir``: ``predictions.jsonl`` and the per-process files
    of a sharded run (:data:`PART_PATTERN`), torn last lines cut off (see :meth:`PredictionStore.load`)."""
    output_dir = Path(output_dir)
    paths = [output_dir / "predictions.jsonl", *sorted(output_dir.glob(PART_PATTERN))]
    return {sample["id"]: sample for path in paths for sample in PredictionStore(path).load()}


def _part_path(output_dir: Path, process_index: int, num_processes: int) -> Path:
    """Where a process appends its predictions: ``predictions.jsonl`` alone, its own part file when sharded."""
    if num_processes == 1:
        return output_dir / "predictions.jsonl"
    return output_dir / PART_PATTERN.replace("*", f"{process_index:05d}")


def _check_run_config(output_dir: Path, args: EvaluationArguments, has_predictions: bool, write: bool = True) -> None:
    """Record what the predictions depend on, or refuse a rerun with other values into a folder holding predictions.

    Without stored predictions (a run that failed before its first batch) the folder is simply taken over (by the
    main process: ``write``).
    """
    wanted = {key: getattr(args, key) for key in _GENERATION_KEYS}
    path = output_dir / "run_config.json"
    if has_predictions:
        if not path.exists():
            raise ValueError(f"{output_dir} holds predictions.jsonl without run_config.json; use a new --output_dir")
        found = json.loads(path.read_text())
        changed = {k: (found.get(k), v) for k, v in wanted.items() if found.get(k) != v}
        if changed:
            raise ValueError(
                f"{output_dir} holds predictions of another run ({changed}, as (stored, given)); use a new "
                "--output_dir or delete it"
            )
        return
    if write:
        _write_json(path, wanted)


def load_split(dataset_name: str, split: str, max_samples: int | None):
    """A split of a built dataset, media resolved: a local folder, or a Hub dataset id (its snapshot folder).

    Raises:
        ValueError: the split does not exist (the message lists the splits).
    """
    from ..data import resolve_media
    from ..data.loading import load_local_dataset

    folder = Path(dataset_name).expanduser()
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(dataset_name, repo_type="dataset"))
    loaded = load_local_dataset(folder)  # a cache of its own: never another folder's rows (data/loading.py)
    if split not in loaded:
        raise ValueError(f"dataset {dataset_name} has no split {split!r}; it has {sorted(loaded)}")
    dataset = loaded[split]
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    return resolve_media(dataset, folder)


def load_model(model_name_or_path: str, adapter: str | None, device: str):
    """The model (with its adapter merged in place for inference, when given) and its processor, in eval mode."""
    from ..modeling.modeling_med3d_qwen import Med3DQwenForConditionalGeneration
    from ..processing.processing_med3d_qwen import Med3DQwenProcessor

    model = Med3DQwenForConditionalGeneration.from_pretrained(model_name_or_path)
    if adapter:
        import peft

        model = peft.PeftModel.from_pretrained(model, adapter)
    processor = Med3DQwenProcessor.from_pretrained(model_name_or_path)
    return model.to(device).eval(), processor


_OUTLINE_COLOR = re.compile(r"\(2\) an? (.+?), one-pixel-wide boundary")


def prompt_variant(records) -> str | None:
    """The boundary-prompt variant of a split: its contour colour (``"red"``), ``"none"``, or None when unknown.

    Read from the system prompt of the rows that have an ROI (whole-volume rows keep the no-prompt wording in every
    build): the no-outline system prompt means ``"none"``, the outline one names its colour
    (``med3dqwen.data.rewrite.system_prompt``). None: no ROI rows, rows that disagree, or a system prompt of
    another builder.
    """
    from ..data.rewrite import system_prompt
    from ..data.schema import message_texts

    systems = {message_texts(r).get("system", "") for r in records if r.get("roi")}
    if len(systems) != 1:
        return None
    (system,) = systems
    if system == system_prompt(prompt=False):
        return "none"
    found = _OUTLINE_COLOR.search(system)
    return found.group(1) if found and system == system_prompt(found.group(1)) else None


def default_run_name(args: EvaluationArguments, records=()) -> str:
    """The table row of a run without ``--run_name``: the adapter when there is one (else the model), followed by
    the prompt variant of the evaluated split when it can be read (:func:`prompt_variant`), e.g.
    ``runs/sft_red (prompt red)``. The base path would name every adapter of one base alike."""
    name = str(args.adapter or args.model_name_or_path)
    name = name.rstrip("/") or name
    variant = prompt_variant(records)
    return name if variant is None else f"{name} (prompt {variant})"


def _peak_memory_mib(device: str) -> dict[str, Any]:
    import torch

    if device.startswith("cuda"):
        return {"device": device, "peak_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"device": device, "peak_rss_mib": rss / (2**20 if sys.platform == "darwin" else 2**10)}


def evaluate_model(args: EvaluationArguments, model=None, processor=None) -> dict[str, Any] | None:
    """Run (or continue) one evaluation, sharded over the processes of an ``accelerate launch``; write its outputs.

    Args:
        args: the options.
        model, processor: already loaded ones (tests, notebooks); default: loaded from ``args``.

    Returns:
        The results on the main process; None on the others (the main process writes every file).

    Raises:
        ValueError: an empty split, repeated ids, a folder holding another run's predictions.
        RuntimeError: samples are missing after every process finished (a process wrote elsewhere).
    """
    import torch
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from .generation import generate_batches, sample_id

    state = PartialState(cpu=_on_cpu(args.device))
    rank, world = state.process_index, state.num_processes
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # the main process first: it cuts torn lines off and fills the dataset cache; the others then read both as they are
    with state.main_process_first():
        done = load_stored_predictions(output_dir)
        _check_run_config(output_dir, args, has_predictions=bool(done), write=state.is_main_process)
        dataset = load_split(args.dataset_name, args.split, args.max_samples)
    if len(dataset) == 0:
        raise ValueError(f"split {args.split!r} of {args.dataset_name} is empty: there is nothing to evaluate")
    device = str(args.device or state.device)
    if model is None:
        model, processor = load_model(args.model_name_or_path, args.adapter, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    ids = [sample_id(record, i) for i, record in enumerate(dataset)]
    if len(set(ids)) != len(ids):
        raise ValueError(f"dataset {args.dataset_name} split {args.split!r} has repeated ids; resume needs unique ids")
    todo = [i for i, id_ in enumerate(ids) if id_ not in done]
    mine = todo[rank::world]  # round-robin: every process gets an equal share of what is left
    state.wait_for_everyone()  # nobody appends before every process has read the stored predictions
    store = PredictionStore(_part_path(output_dir, rank, world))
    bar = {"total": len(ids), "initial": len(ids) - len(todo), "desc": "evaluating"}
    if world > 1:
        bar = {"total": len(mine), "initial": 0, "desc": f"evaluating (process {rank} of {world})"}
    begin = time.perf_counter()
    with tqdm(**bar, disable=not (args.progress and state.is_main_process)) as progress:
        for results in generate_batches(
            model,
            processor,
            [dataset[i] for i in mine],
            [ids[i] for i in mine],
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
        ):
            store.append([r.to_dict() for r in results])
            progress.update(len(results))
    elapsed_mine = time.perf_counter() - begin
    state.wait_for_everyone()
    elapsed = time.perf_counter() - begin
    if not state.is_main_process:
        return None
    done = load_stored_predictions(output_dir)
    missing = [id_ for id_ in ids if id_ not in done]
    if missing:
        raise RuntimeError(
            f"{len(missing)} of {len(ids)} samples have no prediction in {output_dir} after every process finished "
            f"(first: {missing[:3]}); do all processes see the same --output_dir?"
        )
    samples = [done[id_] for id_ in ids]
    _merge_predictions(output_dir, samples)
    if args.bertscore_model:  # scoring only: kept out of predictions.jsonl, so a rescore without it drops it
        samples = _with_bertscore(samples, args, device)
    latencies = [s["latency_s"] for s in samples]
    name = args.run_name or default_run_name(args, _text_columns(dataset))
    results = {
        "config": {**asdict(args), "compare": None, "run_name": name},
        "versions": library_versions(),
        "metrics": score_samples(samples, args.protocol),
        "resources": {
            **_peak_memory_mib(device),
            "latency_s_per_sample_median": statistics.median(latencies),
            "latency_s_per_sample_mean": statistics.fmean(latencies),
            "num_processes": world,
            "generated_this_run": len(todo),
            "generated_this_process": len(mine),
            "resumed_from_previous": len(ids) - len(todo),
            "samples_per_s_this_process": (len(mine) / elapsed_mine) if mine and elapsed_mine > 0 else None,
            "samples_per_s_all_processes": (len(todo) / elapsed) if todo and elapsed > 0 else None,
        },
        "samples": samples,
    }
    _write_json(output_dir / "results.json", results)
    with atomic_output(output_dir / "table.md") as tmp:
        tmp.write_text(markdown_table([results], [name]))
    save_chart([results], [name], output_dir / "chart.png")
    return results


def _with_bertscore(samples: list[dict[str, Any]], args: EvaluationArguments, device: str) -> list[dict[str, Any]]:
    """``samples`` with ``bertscore_f1`` on the open and report ones (``evaluation.bertscore``)."""
    from .bertscore import bertscore_f1

    chosen = [i for i, s in enumerate(samples) if s["task"] != "closed"]
    if not chosen:
        return samples
    scores = bertscore_f1(
        [samples[i]["prediction"] for i in chosen],
        [samples[i]["reference"] for i in chosen],
        args.bertscore_model,
        num_layers=args.bertscore_num_layers,
        device=device,
    )
    samples = [dict(s) for s in samples]
    for i, score in zip(chosen, scores, strict=True):
        samples[i]["bertscore_f1"] = score
    return samples


def _text_columns(dataset):
    """The split without its media columns, so that reading rows decodes no volume."""
    keep = [name for name in ("messages", "roi") if name in dataset.column_names]
    return dataset.select_columns(keep) if keep else []


def _on_cpu(device: str | None) -> bool:
    """Whether the processes run on CPU: ``--device cpu``, ``ACCELERATE_USE_CPU``, or no CUDA. ``PartialState`` forms
    a multi-process CPU group (gloo) only when told so; otherwise each process of a launch would run alone."""
    import torch

    if device:
        return str(device).startswith("cpu")
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()


def _merge_predictions(output_dir: Path, samples: list[dict[str, Any]]) -> None:
    """Rewrite ``predictions.jsonl`` with ``samples`` in split order (atomically), then delete the part files.

    A kill between the two steps leaves parts whose lines are also in ``predictions.jsonl``: harmless, they are read
    by id.
    """
    with atomic_output(output_dir / "predictions.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    for part in output_dir.glob(PART_PATTERN):
        part.unlink()


def run_comparison(args: EvaluationArguments) -> str:
    """Render one table (with paired bootstrap intervals against the first run) and one chart from several runs.

    Returns:
        The markdown table (also written to ``output_dir/comparison.md``; the chart to ``comparison.png``).
    """
    runs = [load_results(path) for path in args.compare]
    names = [run["config"].get("run_name") or str(path) for run, path in zip(runs, args.compare, strict=True)]
    if len(set(names)) != len(names):
        names = [f"{name} ({path})" for name, path in zip(names, args.compare, strict=True)]
    intervals = compare_runs(runs, names, num_resamples=args.num_resamples)
    table = markdown_table(runs, names, intervals)
    output_dir = Path(args.output_dir)
    with atomic_output(output_dir / "comparison.md") as tmp:
        tmp.write_text(table)
    _write_json(
        output_dir / "comparison.json",
        {"runs": list(args.compare), "names": names, "intervals": intervals, "num_resamples": args.num_resamples},
    )
    save_chart(runs, names, output_dir / "comparison.png")
    return table
