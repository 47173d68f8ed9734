"""Command-line plumbing of the build scripts (``datasets_scripts/build_<name>.py``)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any

from med3dqwen.builders.engine import BuildArguments, BuildSummary


__all__ = [
    "parse_script_args",
    "print_summary",
]


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The script's docstring as written, and every option's default."""


def parse_script_args(script_arguments: type, description: str | None) -> tuple[Any, BuildArguments]:
    """Parse a build script's command line into its ``ScriptArguments`` (the dataset's options, an
    ``HfArgumentParser`` dataclass) and :class:`BuildArguments` (how to run); ``--help`` shows ``description`` (the
    script's docstring) as written and every default.

    Returns:
        ``(script_args, build_args)``.
    """
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        (script_arguments, BuildArguments), description=description, formatter_class=_HelpFormatter
    )
    script_args, build_args = parser.parse_args_into_dataclasses()
    return script_args, build_args


def print_summary(
    summary: BuildSummary,
    args: BuildArguments,
    split_line: str,
    *,
    units: str = "volumes",
    rate_units: str | None = None,
    question_types: bool = False,
    notes: Iterable[str] = (),
) -> None:
    """Print what a build script's run did: how many units it built and how fast; then, if it merged, the output
    folder, one line per split, the question types, ``notes``, the skipped rows per reason and how to load it.

    Args:
        summary: what :func:`run_build` returned. args: the run's :class:`BuildArguments`.
        split_line: the line of a split after its name, a format string with the fields ``questions``, ``volumes``
            and ``patients`` (the split's counts), e.g. ``"{questions:8d} questions from {volumes:6d} volumes"``.
        units: what a unit is called (``volumes``, ``images``, ...). rate_units: the same in the rate (default
            ``units``).
        question_types: print the number of questions per type.
        notes: builder-specific lines (e.g. what was left out on purpose), printed after the question types.
    """
    if summary.units_processed:
        print(
            f"built {summary.units_processed} {units} in {summary.seconds:.1f} s "
            f"({summary.volumes_per_minute:.1f} {rate_units or units}/min, {args.num_proc} processes)"
        )
    if not summary.merged:
        print(f"shard {args.shard_index}/{args.num_shards} done; merge with --merge_only when all are")
        return
    print(f"wrote {summary.output_dir}")
    for split, n in summary.questions.items():
        counts = {"questions": n, "volumes": summary.volumes[split], "patients": summary.patients[split]}
        print(f"  {split:<10} " + split_line.format(**counts))
    if question_types:
        print("  question types: " + ", ".join(f"{k} {v}" for k, v in sorted(summary.question_types.items())))
    for note in notes:
        print(f"  {note}")
    if summary.skipped:
        print("  skipped rows: " + ", ".join(f"{k} {v}" for k, v in summary.skipped.items()) + " (skipped.jsonl)")
    print(f'load it with: datasets.load_dataset("{summary.output_dir}")')
