"""Build the synthetic chest-CT phantom VQA dataset (the embedded default: no download, no GPU).

Usage (from a clone, ``python datasets_scripts/build_phantom.py`` takes the same arguments):

    med3dqwen-build-phantom --output_dir build/phantom --num_volumes 20 --seed 0 --prompt red
    med3dqwen-build-phantom --output_dir build/phantom_none --num_volumes 20 --prompt none
    med3dqwen-build-phantom --output_dir build/small --shape 32 64 64 --write_png stack
    med3dqwen-build-phantom --output_dir build/big --num_volumes 5000 --num_proc 16

    # a cluster job array: every task builds one shard, then one merge
    med3dqwen-build-phantom --output_dir OUT --num_volumes 5000 --num_shards 8 --shard_index $I
    med3dqwen-build-phantom --output_dir OUT --num_volumes 5000 --num_shards 8 --merge_only

Then:

    from datasets import load_dataset
    ds = load_dataset("build/phantom")      # train / validation / test

There is no upstream folder: every volume is generated from the seed. Each volume is written once (NIfTI volume,
structure masks, lesions, findings.json); each question is one JSONL line in the paper's message layout; prompt PNGs
are written once per (volume, ROI) and shared by its questions. A re-run with the same arguments resumes: finished
volumes (OUT/.work/units/) are skipped, and the output is byte-identical to an uninterrupted build.
"""

from collections.abc import Sequence

from med3dqwen.builders.cli import DataclassArgumentParser, make_build_parser, print_summary, run_build_command
from med3dqwen.builders.engine import BuildArguments, BuildSummary
from med3dqwen.builders.phantom.dataset import PhantomBuildConfig, build_phantom_dataset


__all__ = ["cli", "main", "make_parser"]


def main(config: PhantomBuildConfig, build_args: BuildArguments) -> BuildSummary:
    """Build the dataset ``config`` describes and print what the run did."""
    summary = build_phantom_dataset(config, build_args)
    unknown = summary.counters.get("unknown_anatomy_terms")
    print_summary(
        summary,
        build_args,
        "{questions:6d} questions from {volumes:4d} volumes",
        question_types=True,
        notes=[f"anatomy terms without a RadLex entry (kept as is): {unknown}"] if unknown else [],
    )
    return summary


def make_parser() -> DataclassArgumentParser:
    """The command line: the options of :class:`PhantomBuildConfig`, then those of :class:`BuildArguments`; ``--help``
    prints this module's docstring."""
    return make_build_parser(PhantomBuildConfig, __doc__)


def cli(argv: Sequence[str] | None = None) -> None:
    """The console script ``med3dqwen-build-phantom``."""
    run_build_command(make_parser, main, argv)
