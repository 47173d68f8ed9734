"""Build the CT figures of PMC-VQA as closed (multiple choice) and open questions (JSONL + dataset card).

Usage:

    python datasets_scripts/build_pmc_vqa.py --data_root ROOT --output_dir build/pmc_vqa_ct            # v2 CSVs
    python datasets_scripts/build_pmc_vqa.py --data_root ROOT --output_dir OUT --version v1 --mode closed
    python datasets_scripts/build_pmc_vqa.py --data_root ROOT --output_dir OUT --convert_images --num_proc 8

Then:

    from datasets import load_dataset
    ds = load_dataset("build/pmc_vqa_ct")      # train / validation / test

Expected upstream folder ROOT: the Hugging Face dataset repository xmcmic/PMC-VQA as downloaded, with the image
archive of the version extracted so that the files named in Figure_path are in one folder:

    ROOT/train_2.csv, ROOT/test_2.csv      v2 (default): index, Figure_path, Caption, Question, Choice A, Choice B,
                                           Choice C, Choice D, Answer (the letter), split
    ROOT/images_2/PMC1064097_F1.jpg ...    v2 figures (images_2.zip); --image_dir if they are elsewhere
    ROOT/train.csv, ROOT/test.csv          v1 (--version v1): Figure_path, Question, Answer (or "Anwser"), Choice A,
                                           Choice B, Choice C, Choice D, Answer_label
    ROOT/images/PMC1064097_F1.jpg ...      v1 figures (images.zip)

--csv_files picks other CSVs (e.g. test_clean.csv); the schema is recognised from each header. Choices lose their
letter prefixes ("A:Diffuse ..."). Only CT figures are kept, by a keyword rule on each figure's caption, questions
and correct answers (PET/CT, SPECT/CT, cone-beam / micro-CT and figures that also name another modality are left
out; --no_ct_filter keeps everything); what was left out and why is counted in the card and listed in
filtered.jsonl. Splits are by article (PMCID = Figure_path.split('_')[0], 8:1:1 by default). The figures are 2D:
each is a single-slice volume (grey, [0, 1], intensity "unit", repeated to the model's depth by the processor);
records point at the upstream figure through the link OUT/source/images (--convert_images also writes the (1, H, W)
array as .npy under OUT/volumes/). There are no masks, so no question is outlined whatever --prompt says. Output:
data/*.jsonl, skipped.jsonl (bad rows and why), filtered.jsonl, README.md (card). A re-run with the same arguments
resumes where a killed build stopped. Licence: per article (PubMed Central Open Access); cite PMC-VQA (arXiv
2305.10415).
"""

import logging
from dataclasses import dataclass, field

from med3dqwen.builders.cli import parse_script_args, print_summary
from med3dqwen.builders.engine import BuildArguments
from med3dqwen.builders.pmc_vqa import PMCVQABuildConfig, build_pmc_vqa_dataset


@dataclass
class ScriptArguments:
    """Options of :class:`PMCVQABuildConfig`, with its field names."""

    data_root: str = field(metadata={"help": "The downloaded PMC-VQA repository (holds the CSVs)."})
    output_dir: str = field(metadata={"help": "Folder to write the dataset to (created)."})
    version: str = field(
        default="v2", metadata={"help": "v2 (train_2.csv, test_2.csv, images_2/) | v1 (train.csv, test.csv, images/)."}
    )
    csv_files: list[str] | None = field(
        default=None, metadata={"help": "CSV file names in data_root (default: the version's train and test CSVs)."}
    )
    image_dir: str | None = field(
        default=None, metadata={"help": "Folder with the figures named in Figure_path (default ROOT/images[_2])."}
    )
    mode: str = field(default="both", metadata={"help": "closed (multiple choice) | open | both."})
    prompt: str = field(
        default="none", metadata={"help": "red | blue | none. Recorded only: PMC-VQA has no masks to outline."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the article split."})
    split_ratios: list[float] = field(
        default_factory=lambda: [0.8, 0.1, 0.1], metadata={"help": "Train / validation / test fractions of articles."}
    )
    ct_filter: bool = field(default=True, metadata={"help": "Keep only CT figures (documented keyword rule)."})
    convert_images: bool = field(
        default=False, metadata={"help": "Also write each kept figure as a grey (1, H, W) float32 .npy volume."}
    )
    validate_files: bool = field(
        default=True, metadata={"help": "Decode every figure (skip unreadable ones); False: existence only."}
    )
    normalize_anatomy: bool = field(
        default=True, metadata={"help": "RadLex-normalise anatomy terms in questions, choices and answers."}
    )


def main(script_args: ScriptArguments, build_args: BuildArguments) -> None:
    summary = build_pmc_vqa_dataset(PMCVQABuildConfig(**vars(script_args)), build_args)
    left_out = ", ".join(f"{k} {v}" for k, v in summary.counters.get("filtered", {}).items())
    print_summary(
        summary,
        build_args,
        "{questions:8d} questions from {volumes:6d} figures, {patients} articles",
        units="figures",
        notes=[f"CT filter left out: {left_out} rows (filtered.jsonl)"] if left_out else [],
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(*parse_script_args(ScriptArguments, __doc__))
