"""Build RadGenome-ChestCT grounded VQA for boundary prompting (JSONL + dataset card; volumes stay where they are).

Usage (from a clone, ``python datasets_scripts/build_radgenome.py`` takes the same arguments):

    med3dqwen-build-radgenome --data_root ROOT --output_dir build/radgenome_red --prompt red
    med3dqwen-build-radgenome --data_root ROOT --output_dir build/radgenome_none --prompt none
    med3dqwen-build-radgenome --data_root ROOT --output_dir OUT --num_proc 16 --write_png montage

    # a cluster job array: every task builds one shard, then one merge with the same arguments
    med3dqwen-build-radgenome --data_root ROOT --output_dir OUT --num_shards 32 --shard_index $I
    med3dqwen-build-radgenome --data_root ROOT --output_dir OUT --num_shards 32 --merge_only

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

from collections.abc import Sequence

from med3dqwen.builders.cli import DataclassArgumentParser, make_build_parser, print_summary, run_build_command
from med3dqwen.builders.engine import BuildArguments, BuildSummary
from med3dqwen.builders.radgenome import RadGenomeBuildConfig, build_radgenome_dataset


__all__ = ["cli", "main", "make_parser"]


def main(config: RadGenomeBuildConfig, build_args: BuildArguments) -> BuildSummary:
    """Build the dataset ``config`` describes and print what the run did."""
    summary = build_radgenome_dataset(config, build_args)
    print_summary(summary, build_args, "{questions:8d} questions from {volumes:6d} volumes", question_types=True)
    return summary


def make_parser() -> DataclassArgumentParser:
    """The command line: the options of :class:`RadGenomeBuildConfig`, then those of :class:`BuildArguments`;
    ``--help`` prints this module's docstring."""
    return make_build_parser(RadGenomeBuildConfig, __doc__)


def cli(argv: Sequence[str] | None = None) -> None:
    """The console script ``med3dqwen-build-radgenome``."""
    run_build_command(make_parser, main, argv)
