"""Build CT-RATE report generation (one whole-volume report question per scan; JSONL + dataset card).

Usage (from a clone, ``python datasets_scripts/build_ctrate_reports.py`` takes the same arguments):

    med3dqwen-build-ctrate-reports --data_root ROOT --output_dir build/ctrate_reports
    med3dqwen-build-ctrate-reports --data_root ROOT --output_dir OUT --num_proc 16 \\
        --report_sections findings
    med3dqwen-build-ctrate-reports --data_root ROOT --output_dir OUT --convert_volumes   # HU copies

    # a cluster job array: every task builds one shard, then one merge with the same arguments
    med3dqwen-build-ctrate-reports --data_root ROOT --output_dir OUT --num_shards 32 --shard_index $I
    med3dqwen-build-ctrate-reports --data_root ROOT --output_dir OUT --num_shards 32 --merge_only

Then:

    from datasets import load_dataset
    ds = load_dataset("build/ctrate_reports")      # train / validation / test

Expected upstream folder ROOT: the Hugging Face dataset repository ibrahimhamamci/CT-RATE as downloaded (gated: accept
its terms first):

    ROOT/dataset/radiology_text_reports/{train,validation}_reports.csv
        VolumeName, ClinicalInformation_EN, Technique_EN, Findings_EN, Impressions_EN   (one row per reconstruction)
    ROOT/dataset/metadata/{train,validation}_metadata.csv    RescaleSlope, RescaleIntercept, XYSpacing, ZSpacing, ...
    ROOT/dataset/metadata/no_chest_{train,valid}.txt         volumes that are not chest CTs (left out)
    ROOT/dataset/train/train_<pid>/train_<pid>_<scan>/train_<pid>_<scan>_<recon>.nii.gz
    ROOT/dataset/valid/valid_<pid>/valid_<pid>_<scan>/valid_<pid>_<scan>_<recon>.nii.gz
    ROOT/dataset/{train,valid}_fixed/...                     same names, fixed headers (--volume_folders fixed)

Each folder can be overridden (--reports_dir, --metadata_dir, --no_chest_dir, --train_volume_dir, ...). One record per
scan (its first reconstruction with a file; --reconstructions all keeps every one). The question is a report request
from our templates; the answer is "Findings: ...\\nImpression: ..." (--report_sections findings: the findings only).
Reports are about the whole volume, so there is never a contour and --prompt changes nothing. The original volumes
have blank headers: each record carries rescale_slope / rescale_intercept (HU = value * slope + intercept, applied to
what med3dqwen.processing.ct_io.load_volume returns) and spacing (D, H, W mm) from the metadata CSV; --convert_volumes
writes int16 HU copies with that spacing instead. Output: data/*.jsonl (paths relative to OUT, through the link
OUT/source/<folder> -> the upstream folder), skipped.jsonl (bad rows and why), filtered.jsonl (not-chest volumes left
out on purpose), README.md (card). Upstream valid becomes our test split; our validation split is carved from upstream
train by patient. A re-run with the same arguments resumes where a killed build stopped. The licence (CC BY-NC-SA
4.0) forbids redistribution: --push_to_hub uploads only the JSONL and the card, to a private repo by default.
"""

from collections.abc import Sequence

from med3dqwen.builders.cli import DataclassArgumentParser, make_build_parser, print_summary, run_build_command
from med3dqwen.builders.ctrate import CTRateBuildConfig, build_ctrate_dataset
from med3dqwen.builders.engine import BuildArguments, BuildSummary


__all__ = ["cli", "main", "make_parser"]


def main(config: CTRateBuildConfig, build_args: BuildArguments) -> BuildSummary:
    """Build the dataset ``config`` describes and print what the run did."""
    summary = build_ctrate_dataset(config, build_args)
    no_chest = summary.counters.get("filtered", {}).get("no_chest", 0)
    print_summary(
        summary,
        build_args,
        "{questions:8d} reports from {patients:6d} patients",
        units="scans",
        rate_units="volumes",
        notes=[f"not chest: {no_chest} volumes left out (filtered.jsonl)"] if no_chest else [],
    )
    return summary


def make_parser() -> DataclassArgumentParser:
    """The command line: the options of :class:`CTRateBuildConfig`, then those of :class:`BuildArguments`; ``--help``
    prints this module's docstring."""
    return make_build_parser(CTRateBuildConfig, __doc__)


def cli(argv: Sequence[str] | None = None) -> None:
    """The console script ``med3dqwen-build-ctrate-reports``."""
    run_build_command(make_parser, main, argv)
