"""Build the CT figures of PMC-VQA as closed (multiple choice) and open questions (JSONL + dataset card).

Usage (from a clone, ``python datasets_scripts/build_pmc_vqa.py`` takes the same arguments):

    med3dqwen-build-pmc-vqa --data_root ROOT --output_dir build/pmc_vqa_ct            # v2 CSVs
    med3dqwen-build-pmc-vqa --data_root ROOT --output_dir OUT --version v1 --mode closed
    med3dqwen-build-pmc-vqa --data_root ROOT --output_dir OUT --convert_images --num_proc 8

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

from collections.abc import Sequence

from med3dqwen.builders.cli import DataclassArgumentParser, make_build_parser, print_summary, run_build_command
from med3dqwen.builders.engine import BuildArguments, BuildSummary
from med3dqwen.builders.pmc_vqa import PMCVQABuildConfig, build_pmc_vqa_dataset


__all__ = ["cli", "main", "make_parser"]


def main(config: PMCVQABuildConfig, build_args: BuildArguments) -> BuildSummary:
    """Build the dataset ``config`` describes and print what the run did."""
    summary = build_pmc_vqa_dataset(config, build_args)
    left_out = ", ".join(f"{k} {v}" for k, v in summary.counters.get("filtered", {}).items())
    print_summary(
        summary,
        build_args,
        "{questions:8d} questions from {volumes:6d} figures, {patients} articles",
        units="figures",
        notes=[f"CT filter left out: {left_out} rows (filtered.jsonl)"] if left_out else [],
    )
    return summary


def make_parser() -> DataclassArgumentParser:
    """The command line: the options of :class:`PMCVQABuildConfig`, then those of :class:`BuildArguments`; ``--help``
    prints this module's docstring."""
    return make_build_parser(PMCVQABuildConfig, __doc__)


def cli(argv: Sequence[str] | None = None) -> None:
    """The console script ``med3dqwen-build-pmc-vqa``."""
    run_build_command(make_parser, main, argv)
