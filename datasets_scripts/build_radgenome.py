"""Build RadGenome-ChestCT grounded VQA for boundary prompting (JSONL + dataset card; volumes stay where they are).

Usage:

    python datasets_scripts/build_radgenome.py --data_root ROOT --output_dir build/radgenome_red --prompt red
    python datasets_scripts/build_radgenome.py --data_root ROOT --output_dir build/radgenome_none --prompt none
    python datasets_scripts/build_radgenome.py --data_root ROOT --output_dir OUT --num_proc 16 --write_png montage

    # a cluster job array: every task builds one shard, then one merge with the same arguments
    python datasets_scripts/build_radgenome.py --data_root ROOT --output_dir OUT --num_shards 32 --shard_index $I
    python datasets_scripts/build_radgenome.py --data_root ROOT --output_dir OUT --num_shards 32 --merge_only

Then:

    from datasets import load_dataset
    ds = load_dataset("build/radgenome_red")      # train / validation / test

Expected upstream folder ROOT: the Hugging Face dataset repository RadGenome/RadGenome-ChestCT as downloaded (gated:
accept its terms first), with the mask archives extracted in place (the train anatomy masks are one byte-split
.tar.gz: cat train_anatomy_mask_a? | tar xz):

    ROOT/dataset/radgenome_files/{train,validation}_{vqa_presence,vqa_abnormality,vqa_location,vqa_size,
                                                     case_disorders,region_report}.csv
    ROOT/dataset/train_preprocessed/train_<pid>/train_<pid><scan>/train_<pid>_<scan>_<recon>.nii.gz
    ROOT/dataset/valid_preprocessed/valid_<pid>/valid_<pid><scan>/valid_<pid>_<scan>_<recon>.nii.gz
    ROOT/dataset/{train,valid}_anatomy_mask/seg_<volume>/<structure>.nii.gz   e.g. "right lung upper lobe.nii.gz"
    ROOT/dataset/{train,valid}_region_mask/seg_<volume>/<region>.nii.gz       e.g. "trachea and bronchie.nii.gz"

Each folder can be overridden (--csv_dir, --train_volume_dir, --valid_anatomy_mask_dir, ...). Output: data/*.jsonl
(paths relative to OUT, through the links OUT/source/<folder> -> the upstream folders; nothing is copied),
skipped.jsonl (rows skipped and why), README.md (card), prompts/ with --write_png. Upstream validation becomes our
test split; our validation split is carved from upstream train by patient. A re-run with the same arguments
resumes where a killed build stopped. The licence (CC BY-NC-SA 4.0, CT-RATE terms) forbids redistribution:
--push_to_hub uploads only the JSONL and the card, to a private repo by default.
"""

import logging
from dataclasses import dataclass, field

from med3dqwen.builders.cli import parse_script_args, print_summary
from med3dqwen.builders.engine import BuildArguments
from med3dqwen.builders.radgenome import QUESTION_TYPES, RadGenomeBuildConfig, build_radgenome_dataset


@dataclass
class ScriptArguments:
    """Options of :class:`RadGenomeBuildConfig`, with its field names."""

    data_root: str = field(metadata={"help": "The downloaded RadGenome-ChestCT repository (holds dataset/)."})
    output_dir: str = field(metadata={"help": "Folder to write the dataset to (created)."})
    prompt: str = field(
        default="red", metadata={"help": "Contour colour (red | blue) or 'none' for the no-prompt variant."}
    )
    write_png: str = field(
        default="none", metadata={"help": "Prompt PNGs: none | montage (one per volume and ROI) | stack."}
    )
    thickness: int = field(default=3, metadata={"help": "Contour thickness in pixels for the PNGs."})
    seed: int = field(default=0, metadata={"help": "Seed of the template choice and of the dev split."})
    split_ratios: list[float] = field(
        default_factory=lambda: [0.7, 0.1, 0.2],
        metadata={
            "help": "Target train / validation / test patient fractions. split_mode=upstream: test = upstream "
            "validation and upstream train is split train:validation = ratio[0]:ratio[1]; overall: the fractions "
            "hold over all patients (test topped up from upstream train)."
        },
    )
    split_mode: str = field(default="upstream", metadata={"help": "upstream | overall (see split_ratios)."})
    question_types: list[str] = field(
        default_factory=lambda: list(QUESTION_TYPES), metadata={"help": "Question types to build."}
    )
    validate_files: bool = field(
        default=True,
        metadata={"help": "Open every volume and mask (skip unreadable, mismatched, empty); False: existence only."},
    )
    csv_dir: str | None = field(default=None, metadata={"help": "Default ROOT/dataset/radgenome_files."})
    train_volume_dir: str | None = field(default=None, metadata={"help": "Default ROOT/dataset/train_preprocessed."})
    valid_volume_dir: str | None = field(default=None, metadata={"help": "Default ROOT/dataset/valid_preprocessed."})
    train_anatomy_mask_dir: str | None = field(
        default=None, metadata={"help": "Default ROOT/dataset/train_anatomy_mask."}
    )
    valid_anatomy_mask_dir: str | None = field(
        default=None, metadata={"help": "Default ROOT/dataset/valid_anatomy_mask."}
    )
    train_region_mask_dir: str | None = field(
        default=None, metadata={"help": "Default ROOT/dataset/train_region_mask."}
    )
    valid_region_mask_dir: str | None = field(
        default=None, metadata={"help": "Default ROOT/dataset/valid_region_mask."}
    )


def main(script_args: ScriptArguments, build_args: BuildArguments) -> None:
    summary = build_radgenome_dataset(RadGenomeBuildConfig(**vars(script_args)), build_args)
    print_summary(summary, build_args, "{questions:8d} questions from {volumes:6d} volumes", question_types=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(*parse_script_args(ScriptArguments, __doc__))
