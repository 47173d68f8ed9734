"""Build M3D-VQA closed (multiple choice) and open questions (JSONL + dataset card; images stay where they are).

Usage (from a clone, ``python datasets_scripts/build_m3d_vqa.py`` takes the same arguments):

    med3dqwen-build-m3d-vqa --data_root VQA --image_root CAP --output_dir build/m3d_vqa
    med3dqwen-build-m3d-vqa --data_root VQA --image_root CAP --output_dir OUT --mode closed \\
        --num_proc 16
    med3dqwen-build-m3d-vqa --data_root VQA --image_root CAP --output_dir OUT \\
        --test_csv M3D_VQA_test5k.csv

    # outline the structure a question names, from TotalSegmentator masks made for each image
    med3dqwen-build-m3d-vqa --data_root VQA --image_root CAP --output_dir OUT --prompt red \\
        --mask_source totalsegmentator_files --mask_dir TS_MASKS --write_png montage

Then:

    from datasets import load_dataset
    ds = load_dataset("build/m3d_vqa")      # train / validation / test

Expected upstream folders: VQA = the Hugging Face dataset GoodBaiBai88/M3D-VQA as downloaded, CAP = the folder the
CSVs' "Image Path" column is relative to (it holds M3D_Cap_npy/, the images of GoodBaiBai88/M3D-Cap):

    VQA/M3D_VQA_train.csv, VQA/M3D_VQA_val.csv, VQA/M3D_VQA_test.csv   (--train_csv / --val_csv / --test_csv)
        Image Path, Text, Question Type, Question, Choice A, Choice B, Choice C, Choice D, Answer, Answer Choice
        (the test CSV has an extra Note column: ignored)
    CAP/M3D_Cap_npy/<source>/<case>/<image>.npy       float32 (1, 32, 256, 256) in [0, 1]
    TS_MASKS/M3D_Cap_npy/<source>/<case>/<image>/<class>.nii.gz      --mask_source totalsegmentator_files
    TS_MASKS/M3D_Cap_npy/<source>/<case>/<image>.nii.gz              --mask_source totalsegmentator_multilabel

Question types 1-5 become plane, phase, organ, abnormality, location. --mode closed: question + "Choices: A. ... D.
...", answer "<letter>. <choice>", closed_answer = the letter (closed_label = its index); open: the question, answer =
Answer; both (default): one of each per row. The images are not HU: every record says intensity "unit" (no HU window).
M3D-VQA has no masks, so with --mask_source none (default) no question is outlined whatever --prompt says. Upstream
train / val / test are our train / validation / test; a Radiopaedia case (<source>/<case>) found in two splits is kept
only in the higher-priority one (test > validation > train; --case_overlap keep|error to warn or stop instead). Output:
data/*.jsonl (paths relative to OUT through the link OUT/source/images -> CAP), skipped.jsonl (bad rows and why),
filtered.jsonl (rows left out on purpose), README.md (card), masks/ and prompts/ with a mask source. A re-run with the
same arguments resumes where a killed build stopped. Licence: non-commercial (Radiopaedia); cite M3D (arXiv
2404.00578).
"""

from collections.abc import Sequence

from med3dqwen.builders.cli import DataclassArgumentParser, make_build_parser, print_summary, run_build_command
from med3dqwen.builders.engine import BuildArguments, BuildSummary
from med3dqwen.builders.m3d_vqa import M3DVQABuildConfig, build_m3d_vqa_dataset


__all__ = ["cli", "main", "make_parser"]


def main(config: M3DVQABuildConfig, build_args: BuildArguments) -> BuildSummary:
    """Build the dataset ``config`` describes and print what the run did."""
    summary = build_m3d_vqa_dataset(config, build_args)
    overlap = summary.counters.get("filtered", {}).get("case_overlap", 0)
    print_summary(
        summary,
        build_args,
        "{questions:8d} questions from {volumes:6d} images, {patients} cases",
        units="images",
        question_types=True,
        notes=[f"left out: {overlap} rows of cases shared between splits (filtered.jsonl)"] if overlap else [],
    )
    return summary


def make_parser() -> DataclassArgumentParser:
    """The command line: the options of :class:`M3DVQABuildConfig`, then those of :class:`BuildArguments`; ``--help``
    prints this module's docstring."""
    return make_build_parser(M3DVQABuildConfig, __doc__)


def cli(argv: Sequence[str] | None = None) -> None:
    """The console script ``med3dqwen-build-m3d-vqa``."""
    run_build_command(make_parser, main, argv)
