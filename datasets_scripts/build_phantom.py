"""Build the synthetic chest-CT phantom VQA dataset (the embedded default: no download, no GPU).

Usage:

    python datasets_scripts/build_phantom.py --output_dir build/phantom --num_volumes 20 --seed 0 --prompt red
    python datasets_scripts/build_phantom.py --output_dir build/phantom_none --num_volumes 20 --prompt none
    python datasets_scripts/build_phantom.py --output_dir build/small --shape 32 64 64 --write_png stack
    python datasets_scripts/build_phantom.py --output_dir build/big --num_volumes 5000 --num_proc 16

    # a cluster job array: every task builds one shard, then one merge
    python datasets_scripts/build_phantom.py --output_dir OUT --num_volumes 5000 --num_shards 8 --shard_index $I
    python datasets_scripts/build_phantom.py --output_dir OUT --num_volumes 5000 --num_shards 8 --merge_only

Then:

    from datasets import load_dataset
    ds = load_dataset("build/phantom")      # train / validation / test

There is no upstream folder: every volume is generated from the seed. Each volume is written once (NIfTI volume,
structure masks, lesions, findings.json); each question is one JSONL line in the paper's message layout; prompt PNGs
are written once per (volume, ROI) and shared by its questions. A re-run with the same arguments resumes: finished
volumes (OUT/.work/units/) are skipped, and the output is byte-identical to an uninterrupted build.
"""

import logging
from dataclasses import dataclass, field

from med3dqwen.builders.cli import parse_script_args, print_summary
from med3dqwen.builders.engine import BuildArguments
from med3dqwen.builders.phantom.dataset import PhantomBuildConfig, build_phantom_dataset


@dataclass
class ScriptArguments:
    """Options of :class:`PhantomBuildConfig`, with its field names."""

    output_dir: str = field(metadata={"help": "Folder to write the dataset to (created)."})
    num_volumes: int = field(default=20, metadata={"help": "Number of phantoms (one synthetic patient each)."})
    seed: int = field(default=0, metadata={"help": "Master seed of phantoms, templates and the patient split."})
    prompt: str = field(
        default="red", metadata={"help": "Contour colour (red | blue) or 'none' for the no-prompt variant."}
    )
    write_png: str = field(
        default="montage", metadata={"help": "Prompt PNGs: none | montage (one per volume and ROI) | stack."}
    )
    shape: list[int] = field(default_factory=lambda: [128, 256, 256], metadata={"help": "Phantom grid D H W."})
    thickness: int = field(default=3, metadata={"help": "Contour thickness in pixels for the PNGs."})
    split_ratios: list[float] = field(
        default_factory=lambda: [0.7, 0.1, 0.2], metadata={"help": "Train / validation / test patient fractions."}
    )


def main(script_args: ScriptArguments, build_args: BuildArguments) -> None:
    summary = build_phantom_dataset(PhantomBuildConfig(**vars(script_args)), build_args)
    unknown = summary.counters.get("unknown_anatomy_terms")
    print_summary(
        summary,
        build_args,
        "{questions:6d} questions from {volumes:4d} volumes",
        question_types=True,
        notes=[f"anatomy terms without a RadLex entry (kept as is): {unknown}"] if unknown else [],
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(*parse_script_args(ScriptArguments, __doc__))
