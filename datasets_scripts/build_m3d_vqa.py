"""Build M3D-VQA closed (multiple choice) and open questions (JSONL + dataset card; images stay where they are).

Usage:

    python datasets_scripts/build_m3d_vqa.py --data_root VQA --image_root CAP --output_dir build/m3d_vqa
    python datasets_scripts/build_m3d_vqa.py --data_root VQA --image_root CAP --output_dir OUT --mode closed \\
        --num_proc 16
    python datasets_scripts/build_m3d_vqa.py --data_root VQA --image_root CAP --output_dir OUT \\
        --test_csv M3D_VQA_test5k.csv

    # outline the structure a question names, from TotalSegmentator masks made for each image
    python datasets_scripts/build_m3d_vqa.py --data_root VQA --image_root CAP --output_dir OUT --prompt red \\
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
...", answer "<letter>. <choice>", closed_label = letter index; open: the question, answer = Answer; both (default):
one of each per row. The images are not HU: every record says intensity "unit" (no HU window). M3D-VQA has no masks,
so with --mask_source none (default) no question is outlined whatever --prompt says. Upstream train / val / test are
our train / validation / test; a Radiopaedia case (<source>/<case>) found in two splits is kept only in the
higher-priority one (test > validation > train; --case_overlap keep|error to warn or stop instead). Output:
data/*.jsonl (paths relative to OUT through the link OUT/source/images -> CAP), skipped.jsonl (bad rows and why),
filtered.jsonl (rows left out on purpose), README.md (card), masks/ and prompts/ with a mask source. A re-run with
the same arguments resumes where a killed build stopped. Licence: non-commercial (Radiopaedia); cite M3D
(arXiv 2404.00578).
"""

import logging
from dataclasses import dataclass, field

from med3dqwen.builders.cli import parse_script_args, print_summary
from med3dqwen.builders.engine import BuildArguments
from med3dqwen.builders.m3d_vqa import DEFAULT_CSVS, QUESTION_TYPES, M3DVQABuildConfig, build_m3d_vqa_dataset


@dataclass
class ScriptArguments:
    """Options of :class:`M3DVQABuildConfig`, with its field names."""

    data_root: str = field(metadata={"help": "Folder with the M3D-VQA CSVs (the downloaded GoodBaiBai88/M3D-VQA)."})
    output_dir: str = field(metadata={"help": "Folder to write the dataset to (created)."})
    image_root: str | None = field(
        default=None,
        metadata={"help": "Folder the 'Image Path' column is relative to (holds M3D_Cap_npy/); default data_root."},
    )
    mode: str = field(default="both", metadata={"help": "closed (multiple choice) | open | both."})
    prompt: str = field(
        default="red",
        metadata={"help": "Contour colour (red | blue) or none; only questions with a mask (see mask_source)."},
    )
    write_png: str = field(
        default="none", metadata={"help": "Prompt PNGs of outlined questions: none | montage | stack."}
    )
    thickness: int = field(default=3, metadata={"help": "Contour thickness in pixels for the PNGs."})
    mask_source: str = field(
        default="none",
        metadata={
            "help": "none | totalsegmentator_files | totalsegmentator_multilabel | hu_threshold (rough: the [0, 1] "
            "image read as chest-windowed HU)."
        },
    )
    mask_dir: str | None = field(
        default=None,
        metadata={"help": "Masks mirroring the image paths (TotalSegmentator output per image, on the .npy grid)."},
    )
    case_overlap: str = field(
        default="drop",
        metadata={"help": "A case in two splits: drop (keep it in test > validation > train) | keep (warn) | error."},
    )
    question_types: list[str] = field(
        default_factory=lambda: list(QUESTION_TYPES.values()), metadata={"help": "Question types to build."}
    )
    validate_files: bool = field(
        default=True, metadata={"help": "Open every image (skip unreadable ones); False: existence only."}
    )
    normalize_anatomy: bool = field(
        default=True, metadata={"help": "RadLex-normalise anatomy terms in questions, choices and answers."}
    )
    train_csv: str = field(default=DEFAULT_CSVS["train"], metadata={"help": "Train CSV file name in data_root."})
    val_csv: str = field(default=DEFAULT_CSVS["validation"], metadata={"help": "Validation CSV file name."})
    test_csv: str = field(
        default=DEFAULT_CSVS["test"], metadata={"help": "Test CSV file name (or M3D_VQA_test5k.csv)."}
    )


def main(script_args: ScriptArguments, build_args: BuildArguments) -> None:
    summary = build_m3d_vqa_dataset(M3DVQABuildConfig(**vars(script_args)), build_args)
    overlap = summary.counters.get("filtered", {}).get("case_overlap", 0)
    print_summary(
        summary,
        build_args,
        "{questions:8d} questions from {volumes:6d} images, {patients} cases",
        units="images",
        question_types=True,
        notes=[f"left out: {overlap} rows of cases shared between splits (filtered.jsonl)"] if overlap else [],
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(*parse_script_args(ScriptArguments, __doc__))
