"""Build CT-RATE report generation (one whole-volume report question per scan; JSONL + dataset card).

Usage:

    python datasets_scripts/build_ctrate_reports.py --data_root ROOT --output_dir build/ctrate_reports
    python datasets_scripts/build_ctrate_reports.py --data_root ROOT --output_dir OUT --num_proc 16 \\
        --report_sections findings
    python datasets_scripts/build_ctrate_reports.py --data_root ROOT --output_dir OUT --convert_volumes   # HU copies

    # a cluster job array: every task builds one shard, then one merge with the same arguments
    python datasets_scripts/build_ctrate_reports.py --data_root ROOT --output_dir OUT --num_shards 32 --shard_index $I
    python datasets_scripts/build_ctrate_reports.py --data_root ROOT --output_dir OUT --num_shards 32 --merge_only

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

import logging
from dataclasses import dataclass, field

from med3dqwen.builders.cli import parse_script_args, print_summary
from med3dqwen.builders.ctrate import CTRateBuildConfig, build_ctrate_dataset
from med3dqwen.builders.engine import BuildArguments


@dataclass
class ScriptArguments:
    """Options of :class:`CTRateBuildConfig`, with its field names."""

    data_root: str = field(metadata={"help": "The downloaded CT-RATE repository (holds dataset/)."})
    output_dir: str = field(metadata={"help": "Folder to write the dataset to (created)."})
    prompt: str = field(
        default="none",
        metadata={"help": "red | blue | none. Recorded only: reports are whole-volume questions, never outlined."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the template choice and of the dev split."})
    split_ratios: list[float] = field(
        default_factory=lambda: [0.7, 0.1, 0.2],
        metadata={
            "help": "Target train / validation / test patient fractions. split_mode=upstream: test = upstream valid "
            "and upstream train is split train:validation = ratio[0]:ratio[1]; overall: the fractions hold over all "
            "patients (test topped up from upstream train)."
        },
    )
    split_mode: str = field(default="upstream", metadata={"help": "upstream | overall (see split_ratios)."})
    reconstructions: str = field(
        default="first",
        metadata={"help": "first: one record per scan (its first reconstruction with a file) | all: one per file."},
    )
    report_sections: str = field(
        default="findings_impressions",
        metadata={"help": 'findings_impressions ("Findings: ...\\nImpression: ...") | findings (findings only).'},
    )
    volume_folders: str = field(
        default="original",
        metadata={"help": "original (dataset/{train,valid}) | fixed (dataset/{train,valid}_fixed)."},
    )
    rescale: str = field(
        default="auto",
        metadata={
            "help": "auto: slope/intercept from the metadata CSV unless the NIfTI header scales | none: the files are "
            "in HU already (records get 1 / 0)."
        },
    )
    convert_volumes: bool = field(
        default=False,
        metadata={"help": "Write int16 HU NIfTI copies with the metadata spacing under OUT/volumes/ and use them."},
    )
    exclude_no_chest: bool = field(
        default=True, metadata={"help": "Leave out the volumes listed in no_chest_{train,valid}.txt."}
    )
    validate_files: bool = field(
        default=True,
        metadata={"help": "Open every volume (skip unreadable ones, check the HU range); False: read headers only."},
    )
    normalize_anatomy: bool = field(
        default=True, metadata={"help": "RadLex-normalise anatomy terms in questions and reports."}
    )
    reports_dir: str | None = field(default=None, metadata={"help": "Default ROOT/dataset/radiology_text_reports."})
    metadata_dir: str | None = field(default=None, metadata={"help": "Default ROOT/dataset/metadata."})
    no_chest_dir: str | None = field(default=None, metadata={"help": "Default: the metadata folder."})
    train_volume_dir: str | None = field(
        default=None, metadata={"help": "Default ROOT/dataset/train (or train_fixed)."}
    )
    valid_volume_dir: str | None = field(
        default=None, metadata={"help": "Default ROOT/dataset/valid (or valid_fixed)."}
    )


def main(script_args: ScriptArguments, build_args: BuildArguments) -> None:
    summary = build_ctrate_dataset(CTRateBuildConfig(**vars(script_args)), build_args)
    no_chest = summary.counters.get("filtered", {}).get("no_chest", 0)
    print_summary(
        summary,
        build_args,
        "{questions:8d} reports from {patients:6d} patients",
        units="scans",
        rate_units="volumes",
        notes=[f"not chest: {no_chest} volumes left out (filtered.jsonl)"] if no_chest else [],
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(*parse_script_args(ScriptArguments, __doc__))
