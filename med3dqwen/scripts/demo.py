"""The embedded demo (``make demo``): phantom data with and without boundary prompts → align → sft → evaluate → table.

Usage (from a clone of the repository: it runs ``train_sft.py`` and ``evaluate.py`` from the repository root):

    make demo                                           # = python -m med3dqwen.scripts.demo --output_dir build/demo
    med3dqwen-demo --output_dir build/demo              # the same, as the console script
    med3dqwen-demo --output_dir /tmp/smoke --num_volumes 6 --shape 32 64 64 --align_steps 1 --sft_steps 1 \
        --max_samples 4 --max_new_tokens 4             # a smoke run in about a minute

For each prompt variant (``--variants red none``) it runs, printing each command and its wall time:

1. ``datasets_scripts/build_phantom.py --prompt <variant>``: the synthetic chest-CT phantom VQA dataset
   (``<output_dir>/phantom_<variant>``; the ``none`` build keeps the questions' plain wording and system prompt);
2. ``train_sft.py --config configs/demo_cpu.yaml --stage align`` (``runs/align_<variant>``), then the sft stage on
   top of it (``runs/sft_<variant>``: the LoRA adapter, its base in ``base/``), each cut to ``--align_steps`` /
   ``--sft_steps`` optimiser steps so the whole demo takes minutes on two CPU cores;
3. ``evaluate.py`` of the adapter on the ``--split`` of its own build (``eval/<variant>``);

then ``evaluate.py --compare`` of the runs (the ``none`` run first, so the paired bootstrap intervals are prompt
minus no prompt) into ``eval/compare``, and a summary (``summary.md``) ending with the table and a disclaimer. Each
step's output goes to ``logs/<step>.log``; a failing step stops the demo with the end of its log. A rerun redoes every
step (``--overwrite`` for the builds: they take seconds), so its outputs never mix two configurations.

A newly initialised tiny model trained for a few dozen steps on CPU shows that the pipeline runs end to end; its
scores say nothing about the paper's effect (docs/evaluation.md, "make demo").
"""

from __future__ import annotations

import contextlib
import os
import resource
import runpy
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


__all__ = ["DISCLAIMER", "DemoArguments", "check_nltk_data", "cli", "main", "make_parser", "repository_root"]

VARIANTS = ("red", "blue", "none")
DISCLAIMER = (
    "This is an end-to-end run of the pipeline, not evidence for (or against) boundary prompting: a newly "
    "initialised tiny model trained for a few dozen CPU steps on synthetic phantoms, scored on a few test volumes; "
    "its generated text is noise and its closed accuracy is near chance. Differences between the rows are noise "
    "unless the paired bootstrap interval excludes 0, and even then they say nothing about real CT or real model "
    "sizes (the ablation proper is the same chain with a paper recipe on a GPU). The `none` variant sees the bare "
    "volume and the no-prompt wording; its rows still name their ROI (`mask_path`, with `boundary_prompt: none`)."
)


@dataclass
class DemoArguments:
    """The options of the demo (``--name`` on the command line)."""

    output_dir: str = field(default="build/demo", metadata={"help": "Folder for the datasets, runs and tables."})
    variants: list[str] = field(
        default_factory=lambda: ["red", "none"],
        metadata={"help": f"Prompt variants to build, train and evaluate (of {VARIANTS}).", "nargs": "+"},
    )
    num_volumes: int = field(
        default=20, metadata={"help": "Phantoms per build (0.7 / 0.1 / 0.2 of them train / validation / test)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the phantoms and their split."})
    shape: list[int] = field(
        default_factory=lambda: [64, 64, 64],
        metadata={"help": "Phantom grid D H W (the demo model's volume size: no resampling).", "nargs": 3},
    )
    config: str = field(default="configs/demo_cpu.yaml", metadata={"help": "Training recipe (repository-relative)."})
    align_steps: int = field(default=20, metadata={"help": "Optimiser steps of the align stage."})
    sft_steps: int = field(default=40, metadata={"help": "Optimiser steps of the sft stage."})
    split: str = field(default="test", metadata={"help": "Split to evaluate."})
    max_samples: int | None = field(default=None, metadata={"help": "Evaluate only the split's first N questions."})
    max_new_tokens: int = field(default=32, metadata={"help": "Longest generated answer, in tokens."})
    batch_size: int = field(default=8, metadata={"help": "Questions per generate call."})
    num_resamples: int = field(default=1000, metadata={"help": "Paired bootstrap resamples of the comparison."})
    in_process: bool = field(
        default=False,
        metadata={"help": "Run the steps in this process (faster: one import of torch; the tests use it)."},
    )

    def __post_init__(self):
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants or len(set(self.variants)) != len(self.variants):
            raise ValueError(f"--variants must be distinct values of {VARIANTS}, got {self.variants}")
        if len(self.shape) != 3:
            raise ValueError(f"--shape needs three numbers D H W, got {self.shape}")
        if min(self.num_volumes, self.align_steps, self.sft_steps, self.max_new_tokens, self.batch_size) < 1:
            raise ValueError(
                "--num_volumes, --align_steps, --sft_steps, --max_new_tokens and --batch_size must be >= 1"
            )


def repository_root() -> Path:
    """The clone this package lives in (the folder holding ``train_sft.py`` and ``evaluate.py``).

    Raises:
        FileNotFoundError: the package is installed without its repository (``pip install`` of a wheel).
    """
    root = Path(__file__).resolve().parents[2]
    missing = [name for name in ("train_sft.py", "evaluate.py") if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the demo runs {missing} from the repository root, but {root} has none: run it from a clone "
            "(make demo), with the package installed in editable mode (pip install -e .)"
        )
    return root


@dataclass
class _Step:
    name: str
    command: list[str]
    seconds: float = 0.0
    cpu_seconds: float = 0.0


def _cpu_seconds(in_process: bool) -> float:
    """User + system CPU time of this process (in-process steps) or of its finished child processes."""
    usage = resource.getrusage(resource.RUSAGE_SELF if in_process else resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class _Runner:
    """Runs the steps one after the other, logging each to ``logs/<name>.log`` and timing it."""

    def __init__(self, root: Path, out: Path, in_process: bool = False):
        self.root, self.logs, self.in_process = root, out / "logs", in_process
        self.logs.mkdir(parents=True, exist_ok=True)
        self.steps: list[_Step] = []
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)
        self.env.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on the network

    def __call__(self, name: str, script: str, *args: str) -> None:
        step = _Step(name, [sys.executable, script, *args])
        print(f"[{len(self.steps) + 1}] {name}: python {' '.join(step.command[1:])}", flush=True)
        log = self.logs / f"{name}.log"
        begin, cpu = time.perf_counter(), _cpu_seconds(self.in_process)
        with open(log, "w", encoding="utf-8") as handle:
            if self.in_process:
                code = self._run_here(script, args, handle)
            else:
                code = subprocess.run(
                    step.command, cwd=self.root, env=self.env, stdout=handle, stderr=subprocess.STDOUT
                ).returncode
        step.seconds = time.perf_counter() - begin
        step.cpu_seconds = _cpu_seconds(self.in_process) - cpu
        self.steps.append(step)
        if code not in (0, None):
            tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-25:])
            raise SystemExit(f"{tail}\ndemo step {name!r} failed (exit {code}); full log: {log}")
        print(f"    done in {step.seconds:.1f} s, {step.cpu_seconds:.1f} s of CPU (log: {log})", flush=True)

    def _run_here(self, script: str, args: Sequence[str], handle) -> int | str | None:
        """Run ``script`` as ``__main__`` in this process (paths are absolute, so the working folder is not
        changed); its output goes to ``handle``; returns its exit code (1 and the traceback for an exception)."""
        argv = sys.argv
        sys.argv = [str(self.root / script), *args]
        try:
            with contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
                runpy.run_path(str(self.root / script), run_name="__main__")
        except SystemExit as stop:
            return stop.code
        except Exception:  # the step failed: its traceback goes to its log, as in a process of its own
            traceback.print_exc(file=handle)
            return 1
        finally:
            sys.argv = argv
        return 0


NLTK_RESOURCES = {"corpora/wordnet": "wordnet", "tokenizers/punkt_tab/english/": "punkt_tab"}
"""What METEOR reads (``med3dqwen.evaluation.metrics``), by NLTK path and downloader name."""


def check_nltk_data() -> None:
    """Make sure METEOR's NLTK data is there before minutes of training: found under ``NLTK_DATA`` or NLTK's own
    folders, else downloaded with ``nltk.download`` (the design's fallback), else a clear error.

    Raises:
        SystemExit: the data is missing and cannot be downloaded (the message says how to get it).
    """
    import nltk

    for folder in reversed(os.environ.get("NLTK_DATA", "").split(os.pathsep)):
        if folder and folder not in nltk.data.path:
            nltk.data.path.insert(0, folder)

    def missing() -> list[str]:
        gone = []
        for path, name in NLTK_RESOURCES.items():
            try:
                nltk.data.find(path)
            except LookupError:
                gone.append(name)
        return gone

    if not missing():
        return
    for name in missing():
        print(f"METEOR needs NLTK's {name}: downloading it (nltk.download)", flush=True)
        nltk.download(name, quiet=True)
    if missing():
        raise SystemExit(
            f"the demo's evaluation (METEOR) needs NLTK's {' and '.join(missing())}, which are not in "
            f"{nltk.data.path} and could not be downloaded: run `python -m nltk.downloader wordnet punkt_tab` "
            "or point NLTK_DATA at a folder holding them"
        )


def main(args: DemoArguments) -> str:
    """Run the demo; returns the summary (also printed and written to ``<output_dir>/summary.md``).

    Raises:
        SystemExit: METEOR's NLTK data is missing (before any step runs), or a step failed (with its log's end).
    """
    root = repository_root()
    check_nltk_data()
    out = Path(args.output_dir).expanduser().resolve()
    run = _Runner(root, out, in_process=args.in_process)
    begin = time.perf_counter()
    evals = {}
    for variant in args.variants:
        data, align, sft = (
            out / f"phantom_{variant}",
            out / "runs" / f"align_{variant}",
            out / "runs" / f"sft_{variant}",
        )
        evals[variant] = out / "eval" / variant
        for stale in (align, sft, evals[variant]):  # retrained below: earlier predictions would be another model's
            shutil.rmtree(stale, ignore_errors=True)
        run(
            f"build_{variant}", "datasets_scripts/build_phantom.py", "--output_dir", str(data),
            "--num_volumes", str(args.num_volumes), "--seed", str(args.seed), "--prompt", variant,
            "--shape", *map(str, args.shape), "--overwrite", "--no_progress",
        )  # fmt: skip
        common = ["--config", str(root / args.config), "--dataset_name", str(data), "--save_strategy", "no"]
        run(
            f"align_{variant}", "train_sft.py", *common, "--stage", "align", "--max_steps", str(args.align_steps),
            "--output_dir", str(align),
        )  # fmt: skip
        run(
            f"sft_{variant}", "train_sft.py", *common, "--stage", "sft", "--model_name_or_path", str(align),
            "--max_steps", str(args.sft_steps), "--output_dir", str(sft),
        )  # fmt: skip
        limit = [] if args.max_samples is None else ["--max_samples", str(args.max_samples)]
        run(
            f"evaluate_{variant}", "evaluate.py", "--model_name_or_path", str(sft / "base"), "--adapter", str(sft),
            "--dataset_name", str(data), "--split", args.split, "--output_dir", str(evals[variant]),
            "--max_new_tokens", str(args.max_new_tokens), "--batch_size", str(args.batch_size), *limit,
            "--progress", "false",
        )  # fmt: skip
    order = sorted(args.variants, key=lambda v: v != "none")  # the no-prompt baseline first: intervals vs it
    compare = out / "eval" / "compare"
    if len(order) > 1:
        run(
            "compare", "evaluate.py", "--compare", *(str(evals[v]) for v in order), "--output_dir", str(compare),
            "--num_resamples", str(args.num_resamples),
        )  # fmt: skip
        table = (compare / "comparison.md").read_text(encoding="utf-8")
    else:
        table = (evals[order[0]] / "table.md").read_text(encoding="utf-8")
    summary = _summary(args, run.steps, time.perf_counter() - begin, table, out)
    (out / "summary.md").write_text(summary, encoding="utf-8")
    print("\n" + summary, flush=True)
    return summary


def _summary(args: DemoArguments, steps: Sequence[_Step], total: float, table: str, out: Path) -> str:
    lines = [
        "# Med3DQwen demo",
        "",
        f"Prompt variants {', '.join(args.variants)}; {args.num_volumes} phantoms of {'x'.join(map(str, args.shape))}"
        f" voxels each; align {args.align_steps} and sft {args.sft_steps} steps of {args.config}; evaluated on the "
        f"{args.split} split. Outputs under {out}.",
        "",
        "Wall time depends on what else the machine runs; CPU time (user + system, all threads) much less so.",
        "",
        "| step | wall s | CPU s |",
        "|---|---:|---:|",
        *(f"| {step.name} | {step.seconds:.1f} | {step.cpu_seconds:.1f} |" for step in steps),
        f"| total | {total:.1f} | {sum(step.cpu_seconds for step in steps):.1f} |",
        "",
        "## Evaluation (scores ×100)",
        "",
        table.rstrip("\n"),
        "",
        DISCLAIMER,
    ]
    return "\n".join(lines) + "\n"


def make_parser():
    """The command line: :class:`DemoArguments`' fields as ``--name`` options."""
    from transformers import HfArgumentParser

    return HfArgumentParser(DemoArguments, description=__doc__.split("\n\n")[0])


def cli(argv: Sequence[str] | None = None) -> None:
    """The console script ``med3dqwen-demo`` (and ``python -m med3dqwen.scripts.demo``)."""
    (args,) = make_parser().parse_args_into_dataclasses(args=argv)
    main(args)


if __name__ == "__main__":
    cli()
