"""CT-RATE → report-generation JSONL (the library behind ``datasets_scripts/build_ctrate_reports.py``).

One whole-volume report question per scan, the answer being its findings (and impression) text; the records say how
to turn the stored values into HU and the true voxel size. Upstream layout and the decisions (reconstructions,
question and answer text, HU and spacing, splits, not-chest volumes, skip reasons): ``docs/datasets/ctrate.md``.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from med3dqwen.anatomy.radlex import RadLexNormalizer
from med3dqwen.builders.engine import (
    PROMPTS,
    BuildArguments,
    BuildError,
    BuildSummary,
    DatasetBuilder,
    Plan,
    UnitResult,
    WorkUnit,
    link_folder,
    rewrite_configs,
    run_build,
    skip_entry,
    stable_index,
)
from med3dqwen.builders.radgenome import VolumeName, parse_volume_name, split_probabilities
from med3dqwen.builders.upstream import UpstreamCSV
from med3dqwen.data.rewrite import RewriteConfig, build_record, rewrite_qa
from med3dqwen.data.splits import DEFAULT_RATIOS, assign_split
from med3dqwen.io import UnsafePathError


__all__ = [
    "CTRATE_CITATION",
    "METADATA_COLUMNS",
    "QUESTION_TYPE",
    "REPORT_COLUMNS",
    "TEMPLATES",
    "CTRateBuildConfig",
    "CTRateBuilder",
    "VolumeMetadata",
    "build_ctrate_dataset",
    "format_report",
    "parse_spacing",
    "read_metadata",
    "read_name_list",
    "read_reports",
]

logger = logging.getLogger(__name__)

QUESTION_TYPE = "report"
"""The ``question_type`` of every record."""

REPORT_COLUMNS = ("VolumeName", "Findings_EN", "Impressions_EN")
"""Columns the reports CSV must have (``ClinicalInformation_EN`` and ``Technique_EN`` are not used)."""

METADATA_COLUMNS = ("VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing")
"""Columns the metadata CSV must have (of its 44)."""

REPORT_SECTIONS = ("findings_impressions", "findings")
RECONSTRUCTIONS = ("first", "all")
VOLUME_FOLDERS = ("original", "fixed")
RESCALE_MODES = ("auto", "none")

# Our report requests; the findings-only set never asks for an impression.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "findings_impressions": (
        "Write the radiology report for this chest CT scan.",
        "Write the findings and the impression for this chest CT volume.",
        "Generate a radiology report, with findings and impression, for this CT scan.",
        "Please report this chest CT examination.",
        "What are the findings and the impression of this chest CT scan?",
    ),
    "findings": (
        "Describe the findings of this chest CT scan.",
        "Write the findings section of the report for this CT volume.",
        "What are the findings in this chest CT scan?",
        "Please describe this chest CT examination.",
        "Report the findings of this CT scan.",
    ),
}
"""Question templates per ``report_sections``."""

CTRATE_CITATION = """@article{hamamci2024ctrate,
  title   = {Developing Generalist Foundation Models from a Multimodal Dataset for 3D Computed Tomography},
  author  = {Hamamci, Ibrahim Ethem and Er, Sezgin and Almas, Furkan and Simsek, Ayse Gulnihan and Esirgun, Sevval Nil
             and Dogan, Irem and Dasdelen, Muhammed Furkan and Durugol, Omer Faruk and Wittmann, Bastian and
             Amiranashvili, Tamaz and others},
  journal = {arXiv preprint arXiv:2403.17834},
  year    = {2024}
}"""

# Upstream split → (CSV prefix, folder prefix).
_UPSTREAM = {"train": ("train", "train"), "validation": ("validation", "valid")}
_MISSING = ("", "nan", "none", "null", "not given", "not given.")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_SCAN_NAME = re.compile(r"^(train|valid)_(\d+)_([A-Za-z]+)$")
_AIR_HU = (-1100.0, -850.0)
_MIN_FRACTION = 0.01


# ---------------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------------


class VolumeMetadata(NamedTuple):
    """What the metadata CSV says about one volume."""

    slope: float
    intercept: float
    spacing: tuple[float, float, float]  # (D, H, W) mm


class ReportRow(NamedTuple):
    """One usable row of a reports CSV."""

    number: int  # 1-based data row
    source: str  # "train_reports.csv:12"
    findings: str
    impressions: str  # "" when upstream has none


class _Candidate(NamedTuple):
    volume: VolumeName
    row: ReportRow
    metadata: VolumeMetadata | str | None  # str: why the metadata row is unusable; None: no row


def _is_missing(text: str) -> bool:
    return " ".join(text.split()).lower() in _MISSING


def parse_spacing(xy_spacing: str, z_spacing: str) -> tuple[float, float, float]:
    """Voxel size (D, H, W) in mm from the metadata's ``XYSpacing`` (a string list ``"[0.34, 0.34]"``: row, column
    spacing) and ``ZSpacing``; a single XY number means square pixels.

    Raises:
        ValueError: not one or two XY numbers, or a spacing that is not a positive finite number.
    """
    xy = [float(v) for v in _NUMBER.findall(xy_spacing)]
    if len(xy) == 1:
        xy = xy * 2
    if len(xy) != 2:
        raise ValueError(f"XYSpacing {xy_spacing!r} is not one or two numbers")
    z = [float(v) for v in _NUMBER.findall(z_spacing)]
    if len(z) != 1:
        raise ValueError(f"ZSpacing {z_spacing!r} is not a number")
    spacing = (z[0], xy[0], xy[1])
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing {spacing} is not positive (XYSpacing {xy_spacing!r}, ZSpacing {z_spacing!r})")
    return spacing


def format_report(findings: str, impressions: str, sections: str = "findings_impressions") -> str:
    """The answer text: ``"Findings: ...\\nImpression: ..."`` (no impression line without one) or the findings alone.

    Raises:
        ValueError: empty findings or unknown ``sections``.
    """
    if sections not in REPORT_SECTIONS:
        raise ValueError(f"report_sections must be one of {REPORT_SECTIONS}, got {sections!r}")
    findings = " ".join(findings.split())
    if not findings:
        raise ValueError("empty findings")
    if sections == "findings":
        return findings
    impressions = " ".join(impressions.split())
    return f"Findings: {findings}" + (f"\nImpression: {impressions}" if impressions else "")


def read_reports(
    path: Path, upstream_split: str
) -> tuple[list[tuple[VolumeName, ReportRow]], list[dict[str, Any]], int]:
    """Read a CT-RATE reports CSV: usable rows, skipped rows, and the number of repeated ``VolumeName`` rows dropped.

    Raises:
        BuildError: the file has no header or lacks a required column.
    """
    _, folder_prefix = _UPSTREAM[upstream_split]
    rows: list[tuple[VolumeName, ReportRow]] = []
    skipped: list[dict[str, Any]] = []
    seen: set[str] = set()
    repeated = 0
    with UpstreamCSV(path, REPORT_COLUMNS) as table:
        for number, source, values in table.rows(REPORT_COLUMNS, skipped):
            try:
                volume = parse_volume_name(values["VolumeName"])
            except UnsafePathError as err:
                skipped.append(skip_entry("unsafe_path", str(err), source=source))
                continue
            except ValueError as err:
                skipped.append(skip_entry("malformed_row", str(err), source=source))
                continue
            if volume.prefix != folder_prefix:
                detail = f"volume {values['VolumeName']!r} in the {upstream_split} CSV"
                skipped.append(skip_entry("malformed_row", detail, unit_id=volume.volume_id, source=source))
                continue
            if _is_missing(values["Findings_EN"]):
                skipped.append(skip_entry("empty_report", "no Findings_EN", unit_id=volume.volume_id, source=source))
                continue
            if volume.volume_id in seen:
                repeated += 1
                continue
            seen.add(volume.volume_id)
            impressions = "" if _is_missing(values["Impressions_EN"]) else values["Impressions_EN"]
            rows.append((volume, ReportRow(number, source, values["Findings_EN"], impressions)))
    return rows, skipped, repeated


def read_metadata(path: Path) -> dict[str, VolumeMetadata | str]:
    """Volume id → :class:`VolumeMetadata`, or a string saying why its row is unusable.

    Raises:
        BuildError: the file has no header or lacks a required column.
    """
    found: dict[str, VolumeMetadata | str] = {}
    malformed: list[dict[str, Any]] = []  # no volume name we could trust: that volume will have no metadata
    with UpstreamCSV(path, METADATA_COLUMNS) as table:
        for _, source, values in table.rows(METADATA_COLUMNS, malformed):
            try:
                volume_id = parse_volume_name(values["VolumeName"]).volume_id
            except ValueError:
                continue
            if volume_id in found:
                continue
            try:
                slope, intercept = float(values["RescaleSlope"]), float(values["RescaleIntercept"])
                if not (math.isfinite(slope) and math.isfinite(intercept)) or slope == 0:
                    raise ValueError(f"RescaleSlope {slope} / RescaleIntercept {intercept}")
                spacing = parse_spacing(values["XYSpacing"], values["ZSpacing"])
            except ValueError as err:
                found[volume_id] = f"{source}: {err}"
                continue
            found[volume_id] = VolumeMetadata(slope, intercept, spacing)
    return found


def read_name_list(path: Path) -> tuple[set[str], list[str]]:
    """Volume ids (``train_1_a_1``) and scan ids (``train_1_a``) listed in a ``no_chest_*.txt`` file, and the lines
    that are neither."""
    names: set[str] = set()
    bad: list[str] = []
    # A byte that is not UTF-8 is written as \xNN: that line is no volume name and is reported with the others.
    for line in path.read_text(encoding="utf-8-sig", errors="backslashreplace").splitlines():
        text = line.strip().strip(",").strip()
        if not text or text.startswith("#"):
            continue
        name = Path(text).name
        stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name
        try:
            names.add(parse_volume_name(f"{stem}.nii.gz").volume_id)
        except ValueError:
            if _SCAN_NAME.match(stem):
                names.add(stem.lower())
            else:
                bad.append(text)
    return names, bad


def _hu_check(hu: np.ndarray) -> tuple[float, float]:
    """Fractions of voxels that are air ([-1100, -850] HU) and that lie below -1500 HU without being the volume's
    minimum (padding outside the field of view is one constant, the minimum). A chest CT in HU has plenty of the
    first and almost none of the second; a missing rescale has no air, a doubled one puts air below -1500."""
    air = np.count_nonzero((hu > _AIR_HU[0]) & (hu < _AIR_HU[1])) / hu.size
    below = np.count_nonzero((hu < -1500) & (hu > hu.min())) / hu.size
    return float(air), float(below)


def _scan_id(volume: VolumeName) -> str:
    return f"{volume.patient_id}_{volume.scan}"


# ---------------------------------------------------------------------------------------------------------------
# The builder
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class CTRateBuildConfig:
    """What to build: one field per setting, declared once; its ``help`` says what it does, and the build
    command (``--help``) takes it as an option of the same name.
    """

    data_root: str = field(metadata={"help": "The downloaded CT-RATE repository (holds dataset/)."})
    output_dir: str = field(metadata={"help": "Folder to write the dataset to (created)."})
    prompt: str = field(
        default="none",
        metadata={"help": "red | blue | none. Recorded only: reports are whole-volume questions, never outlined."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the template choice and of the dev split."})
    split_ratios: tuple[float, float, float] = field(
        default=DEFAULT_RATIOS,
        metadata={
            "help": "Target train / validation / test patient fractions. split_mode=upstream: test = upstream "
            "valid and upstream train is split train:validation = ratio[0]:ratio[1]; overall: the "
            "fractions hold over all patients (test topped up from upstream train)."
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
            "help": "auto: slope/intercept from the metadata CSV unless the NIfTI header scales | none: the files"
            " are in HU already (records get 1 / 0)."
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
    _folders: dict[str, str] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("prompt", self.prompt, PROMPTS),
            ("reconstructions", self.reconstructions, RECONSTRUCTIONS),
            ("report_sections", self.report_sections, REPORT_SECTIONS),
            ("volume_folders", self.volume_folders, VOLUME_FOLDERS),
            ("rescale", self.rescale, RESCALE_MODES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        self.split_ratios = tuple(float(r) for r in self.split_ratios)
        split_probabilities(1, 0, self.split_ratios, self.split_mode)  # validates ratios and mode
        dataset = Path(self.data_root) / "dataset"
        suffix = "_fixed" if self.volume_folders == "fixed" else ""
        defaults = {
            "reports": dataset / "radiology_text_reports",
            "metadata": dataset / "metadata",
            "no_chest": Path(self.metadata_dir) if self.metadata_dir else dataset / "metadata",
            "train": dataset / f"train{suffix}",
            "valid": dataset / f"valid{suffix}",
        }
        overrides = {
            "reports": self.reports_dir,
            "metadata": self.metadata_dir,
            "no_chest": self.no_chest_dir,
            "train": self.train_volume_dir,
            "valid": self.valid_volume_dir,
        }
        self._folders = {k: str(Path(overrides[k] or defaults[k]).expanduser().resolve()) for k in defaults}

    @property
    def folders(self) -> dict[str, Path]:
        """``reports``, ``metadata``, ``no_chest``, ``train``, ``valid`` (absolute), after overrides."""
        return {key: Path(value) for key, value in self._folders.items()}

    def link_name(self, prefix: str) -> str:
        """Name of the link under ``source/`` to the volume folder of ``train`` / ``valid``."""
        return f"{prefix}_fixed" if self.volume_folders == "fixed" else prefix


class CTRateBuilder(DatasetBuilder):
    """CT-RATE report generation (one whole-volume question per scan)."""

    name = "ctrate_reports"
    script = "datasets_scripts/build_ctrate_reports.py"
    owned_paths = ("source", "volumes")

    def __init__(self, config: CTRateBuildConfig):
        self.cfg = config

    def config(self) -> dict[str, Any]:
        values = asdict(self.cfg)
        for key in ("output_dir", "data_root", "_folders", *(k for k in values if k.endswith("_dir"))):
            values.pop(key, None)
        values["folders"] = dict(self.cfg._folders)
        return values

    def extra_features(self) -> dict[str, Any]:
        import datasets

        return {
            "reconstruction": datasets.Value("int64"),
            "rescale_slope": datasets.Value("float64"),
            "rescale_intercept": datasets.Value("float64"),
            "spacing": datasets.List(datasets.Value("float64")),
            "intensity": datasets.Value("string"),
            "source_row": datasets.Value("string"),
        }

    def unit_dirs(self, unit: WorkUnit) -> list[str]:
        return [f"volumes/{unit.unit_id}"]

    # -- planning --------------------------------------------------------------------------------------------------

    def prepare(self, out_dir: Path) -> None:
        for prefix in ("train", "valid"):
            folder = self.cfg.folders[prefix]
            if folder.is_dir():
                link_folder(out_dir, f"source/{self.cfg.link_name(prefix)}", folder)

    def plan(self) -> Plan:
        cfg, folders = self.cfg, self.cfg.folders
        skipped: list[dict[str, Any]] = []
        filtered: list[dict[str, Any]] = []
        counters: dict[str, Counter] = {"reconstructions": Counter(), "no_chest_list": Counter()}
        scans: defaultdict[str, list[_Candidate]] = defaultdict(list)
        for upstream in ("train", "validation"):
            csv_prefix, folder_prefix = _UPSTREAM[upstream]
            reports = folders["reports"] / f"{csv_prefix}_reports.csv"
            metadata_path = folders["metadata"] / f"{csv_prefix}_metadata.csv"
            for path, option in ((reports, "--reports_dir"), (metadata_path, "--metadata_dir")):
                if not path.is_file():
                    raise BuildError(f"{path} not found: expected the CT-RATE CSVs there ({option})")
            rows, bad, repeated = read_reports(reports, upstream)
            skipped.extend(bad)
            counters["reconstructions"]["repeated_report_rows"] += repeated
            metadata = read_metadata(metadata_path)
            excluded: set[str] = set()
            no_chest = folders["no_chest"] / f"no_chest_{folder_prefix}.txt"
            if cfg.exclude_no_chest:
                if no_chest.is_file():
                    excluded, unparsed = read_name_list(no_chest)
                    counters["no_chest_list"]["unparsed_lines"] += len(unparsed)
                    if unparsed:
                        logger.warning(
                            "%s: %d lines are not volume names, e.g. %r", no_chest, len(unparsed), unparsed[0]
                        )
                else:
                    logger.warning("%s not found: no volume is excluded as not chest", no_chest)
                    counters["no_chest_list"][f"missing {no_chest.name}"] += 1
            if rows and not folders[folder_prefix].is_dir():
                raise BuildError(f"volume folder {folders[folder_prefix]} not found (--{folder_prefix}_volume_dir)")
            for volume, row in rows:
                if volume.volume_id in excluded or _scan_id(volume) in excluded:
                    filtered.append(
                        skip_entry(
                            "no_chest", f"listed in {no_chest.name}", unit_id=volume.volume_id, source=row.source
                        )
                    )
                    continue
                scans[_scan_id(volume)].append(_Candidate(volume, row, metadata.get(volume.volume_id)))

        ordered = sorted(scans.values(), key=lambda c: c[0].volume.sort_key())
        patients = {
            prefix: {c[0].volume.patient_id for c in ordered if c[0].volume.prefix == prefix}
            for prefix in ("train", "valid")
        }
        probabilities = split_probabilities(
            len(patients["train"]), len(patients["valid"]), cfg.split_ratios, cfg.split_mode
        )
        units: list[WorkUnit] = []
        for candidates in ordered:
            candidates = sorted(candidates, key=lambda c: c.volume.recon)
            first = candidates[0].volume
            split = "test" if first.prefix == "valid" else assign_split(first.patient_id, cfg.seed, probabilities)
            counters["reconstructions"]["rows"] += len(candidates)
            if cfg.reconstructions == "first":
                units.append(WorkUnit(_scan_id(first), first.patient_id, split, payload=candidates))
            else:
                for candidate in candidates:
                    units.append(WorkUnit(candidate.volume.volume_id, first.patient_id, split, payload=[candidate]))
        return Plan(
            units=units,
            skipped=skipped,
            counters={name: dict(values) for name, values in counters.items() if values},
            filtered=filtered,
        )

    # -- processing ------------------------------------------------------------------------------------------------

    def process(self, unit: WorkUnit, out_dir: Path) -> UnitResult:
        import nibabel as nib

        from med3dqwen.io import save_nifti
        from med3dqwen.processing.ct_io import CTInputError, load_volume, standard_affine

        cfg = self.cfg
        candidates: list[_Candidate] = unit.payload
        result = UnitResult()
        rows = len(candidates)
        folder = cfg.folders[candidates[0].volume.prefix]
        link = f"source/{cfg.link_name(candidates[0].volume.prefix)}"

        chosen, rel = None, None
        for candidate in candidates:
            found = [r for r in reversed(candidate.volume.relpaths()) if (folder / r).is_file()]  # CT-RATE's first
            if found:
                chosen, rel = candidate, found[0]
                break
        if chosen is None:
            names = ", ".join(c.volume.relpaths()[1] for c in candidates)
            detail = f"{folder.name}/{names} not found"
            result.skipped.append(skip_entry("missing_volume", detail, unit_id=unit.unit_id, rows=rows))
            return result
        volume_name, path = chosen.volume, folder / rel
        if chosen is not candidates[0]:
            result.counters["reconstructions"] = {"fallback_to_later_reconstruction": 1}

        try:
            image = nib.load(path)
            proxy = image.dataobj
            header_slope, header_inter = float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))
            header_geometry = int(image.header["sform_code"]) > 0 or int(image.header["qform_code"]) > 0
            # Voxel size along the canonical (D, H, W) = world (S, P, L) axes of the data axes' zooms.
            ornt = nib.orientations.io_orientation(image.affine)
            zooms = [float(z) for z in image.header.get_zooms()[:3]]
            header_spacing = [0.0, 0.0, 0.0]
            for data_axis, (world_axis, _) in enumerate(ornt):
                header_spacing[2 - int(world_axis)] = zooms[data_axis]
        except Exception as err:  # nibabel raises many types on damaged headers
            detail = f"{rel}: cannot read the NIfTI header ({type(err).__name__}: {err})"
            result.skipped.append(skip_entry("unreadable_volume", detail, unit_id=unit.unit_id, rows=rows))
            return result
        header_scaled = not (header_slope == 1.0 and header_inter == 0.0)

        metadata = chosen.metadata
        needs_metadata = (cfg.rescale == "auto" and not header_scaled) or not header_geometry
        if needs_metadata and not isinstance(metadata, VolumeMetadata):
            reason = "missing_metadata" if metadata is None else "malformed_metadata"
            detail = metadata or f"no row for {volume_name.file_name} in the metadata CSV"
            result.skipped.append(skip_entry(reason, detail, unit_id=unit.unit_id, rows=rows))
            return result
        counters: Counter[str] = Counter()
        if cfg.rescale == "none" or header_scaled:
            slope, intercept = 1.0, 0.0
            counters["rescale: none" if cfg.rescale == "none" else "rescale: header"] += 1
        else:
            slope, intercept = metadata.slope, metadata.intercept
            counters["rescale: metadata"] += 1
        if header_geometry:
            spacing = tuple(header_spacing)
            counters["spacing: header"] += 1
            if isinstance(metadata, VolumeMetadata) and not np.allclose(spacing, metadata.spacing, rtol=0.01):
                counters["spacing: header differs from metadata"] += 1
        else:
            spacing = metadata.spacing
            counters["spacing: metadata"] += 1

        volume_path = f"{link}/{rel}"
        if cfg.validate_files or cfg.convert_volumes:
            try:
                volume = load_volume(path)
            except CTInputError as err:
                result.skipped.append(skip_entry("unreadable_volume", str(err), unit_id=unit.unit_id, rows=rows))
                return result
            hu = volume.array * np.float32(slope) + np.float32(intercept)
            air, below = _hu_check(hu)
            if air < _MIN_FRACTION or below > _MIN_FRACTION:
                counters["implausible_hu"] += 1
                logger.warning(
                    "%s: after the rescale (x%g %+g) %.1f%% of voxels are air and %.1f%% below -1500 HU: check "
                    "--rescale / --volume_folders",
                    volume_name.file_name,
                    slope,
                    intercept,
                    100 * air,
                    100 * below,
                )
            if cfg.convert_volumes:
                affine = volume.affine if header_geometry else standard_affine(spacing)
                data = np.clip(np.rint(hu), -32768, 32767).astype(np.int16)
                volume_path = f"volumes/{unit.unit_id}/{volume_name.file_name}"
                save_nifti(out_dir / volume_path, data, affine, np.int16)
                slope, intercept = 1.0, 0.0
                counters["converted"] += 1
            del hu

        row = chosen.row
        answer = format_report(row.findings, row.impressions, cfg.report_sections)
        if cfg.report_sections == "findings_impressions" and not row.impressions:
            counters["no impression"] += 1
        templates = TEMPLATES[cfg.report_sections]
        question = templates[stable_index(cfg.seed, f"{volume_name.volume_id}|report", len(templates))]
        _, whole = rewrite_configs(cfg.prompt)
        config = RewriteConfig(color=whole.color, prompt=False, normalize_anatomy=cfg.normalize_anatomy)
        qa = rewrite_qa(question, answer, answer_type="open", config=config, normalizer=RadLexNormalizer())
        result.records.append(
            build_record(
                qa,
                volume_path=volume_path,
                mask_path=None,
                mask_source=None,
                roi=None,
                question_type=QUESTION_TYPE,
                split=unit.split,
                patient_id=unit.patient_id,
                volume_id=volume_name.volume_id,
                extra={
                    "reconstruction": volume_name.recon,
                    "rescale_slope": float(slope),
                    "rescale_intercept": float(intercept),
                    "spacing": [float(s) for s in spacing],
                    "intensity": "hu",
                    "source_row": row.source,
                },
            )
        )
        result.counters["volumes"] = dict(counters)
        return result

    # -- card ------------------------------------------------------------------------------------------------------

    def card(self, summary: BuildSummary) -> dict[str, Any]:
        cfg = self.cfg
        counters = summary.counters
        notes: list[str] = []
        if cfg.split_mode == "upstream":
            dev = split_probabilities(1, 0, cfg.split_ratios, cfg.split_mode)[1]
            notes.append(
                "Splits by patient (`train_<pid>` / `valid_<pid>`): `test` is the upstream validation set; "
                f"`validation` holds about {dev:.1%} of the upstream-train patients (hash of `train_<pid>`, seed "
                f"{cfg.seed}), `train` the rest."
            )
        else:
            notes.append(
                f"Splits by patient, fractions {list(cfg.split_ratios)} of all patients: `test` is the upstream "
                "validation set topped up with upstream-train patients; `validation` is carved from upstream train "
                f"(hash of `train_<pid>`, seed {cfg.seed})."
            )
        recon = counters.get("reconstructions", {})
        if cfg.reconstructions == "first":
            notes.append(
                f"One question per scan: {recon.get('rows', 0)} report rows (one per reconstruction) of the kept "
                "scans gave one record each from the lowest-numbered reconstruction with a file (normally `_1`)"
                + (
                    f"; {recon['fallback_to_later_reconstruction']} scans used a later reconstruction because the "
                    "first file is missing."
                    if recon.get("fallback_to_later_reconstruction")
                    else "."
                )
            )
        else:
            notes.append(
                "One question per reconstruction (`reconstruction` field); a scan's reconstructions share "
                "its report and its split."
            )
        if recon.get("repeated_report_rows"):
            notes.append(
                f"{recon['repeated_report_rows']} repeated `VolumeName` rows of the reports CSVs were ignored."
            )
        if cfg.exclude_no_chest:
            no_chest = counters.get("filtered", {}).get("no_chest", 0)
            notes.append(
                f"{no_chest} volumes listed in `no_chest_{{train,valid}}.txt` (not chest CTs) were left out on "
                "purpose; they are listed in `filtered.jsonl`, not in `skipped.jsonl`."
            )
        volumes = counters.get("volumes", {})
        rescale = ", ".join(f"{k.split(': ')[1]} {v}" for k, v in volumes.items() if k.startswith("rescale: "))
        spacing = ", ".join(
            f"{k.split(': ')[1]} {v}" for k, v in volumes.items() if k in ("spacing: header", "spacing: metadata")
        )
        notes.append(
            "HU: `rescale_slope` / `rescale_intercept` are applied to the values `load_volume(volume_path)` returns "
            f"(HU = value * slope + intercept); taken from: {rescale or 'n/a'}. `spacing` is the (D, H, W) voxel "
            f"size in mm, taken from: {spacing or 'n/a'}. The original CT-RATE headers are blank, so use `spacing` "
            "instead of the file's."
        )
        if volumes.get("spacing: header differs from metadata"):
            notes.append(
                f"{volumes['spacing: header differs from metadata']} volumes have a header spacing that differs from "
                "the metadata CSV by more than 1 %; the header's was used."
            )
        if volumes.get("converted"):
            notes.append(f"{volumes['converted']} volumes were converted to int16 HU NIfTI copies under `volumes/`.")
        if volumes.get("implausible_hu"):
            notes.append(
                f"{volumes['implausible_hu']} volumes look wrongly rescaled (almost no air in -1100..-850 HU, or "
                "many voxels below -1500 HU): check `--rescale` / `--volume_folders`."
            )
        if volumes.get("no impression"):
            notes.append(f"{volumes['no impression']} reports have no impression: their answer is the findings only.")
        answer = (
            '`"Findings: <Findings_EN>\\nImpression: <Impressions_EN>"`'
            if cfg.report_sections == "findings_impressions"
            else "`Findings_EN` alone"
        )
        return {
            "pretty_name": "CT-RATE report generation (Med3DQwen build)",
            "summary": (
                "Report generation on CT-RATE chest CT volumes: one question per scan, a report request from our own "
                f"templates (`med3dqwen.builders.ctrate.TEMPLATES`), answered by the upstream report: {answer} "
                + ("(anatomy terms RadLex-normalised)." if cfg.normalize_anatomy else "(upstream text as is).")
            ),
            "prompt_description": (
                "No boundary prompt: a report is about the whole volume, so there is no ROI and no contour, and "
                f"every question has the no-prompt wording and system prompt (build option `--prompt {cfg.prompt}` "
                "is recorded only)."
            ),
            "source": (
                "[CT-RATE](https://huggingface.co/datasets/ibrahimhamamci/CT-RATE) (volumes, reports, metadata). "
                "Licence: CC BY-NC-SA 4.0, non-commercial; the CT-RATE terms forbid redistributing any part of the "
                "data, so this folder holds no volume: it links to your download under `source/` (and holds "
                "converted copies under `volumes/` only if built with `--convert_volumes`); pushed copies leave "
                "both out and must stay private."
            ),
            "license": "cc-by-nc-sa-4.0",
            "citation": CTRATE_CITATION,
            "notes": notes,
            "files_description": (
                'Volumes are not copied: `folder / sample["volume_path"]` opens the upstream NIfTI through the '
                "`source/` link (or a converted copy under `volumes/`). Load it with "
                "`med3dqwen.processing.ct_io.load_volume`, then apply `rescale_slope` / `rescale_intercept` and use "
                "`spacing`. `filtered.jsonl` lists the volumes left out on purpose (not chest CTs)."
            ),
            "extra_fields": {
                "reconstruction": "upstream reconstruction number of the volume (`_1`, `_2`, ...)",
                "rescale_slope": "HU = value * `rescale_slope` + `rescale_intercept`, value = what "
                "`load_volume(volume_path)` returns",
                "rescale_intercept": "see `rescale_slope` (slope 1, intercept 0 for converted copies and for headers "
                "that scale)",
                "spacing": "voxel size (D, H, W) in mm (metadata `ZSpacing`, `XYSpacing`, or the header)",
                "intensity": "`hu`: Hounsfield units after the rescale; window them as usual",
                "source_row": "upstream reports CSV and 1-based data row, e.g. `train_reports.csv:12`",
            },
            "tags": ["ct-rate", "chest", "report-generation"],
        }


def build_ctrate_dataset(config: CTRateBuildConfig, args: BuildArguments | None = None) -> BuildSummary:
    """Build CT-RATE report generation into ``config.output_dir`` (see the module docstring).

    Args:
        config: see :class:`CTRateBuildConfig`.
        args: how to run (processes, shards, resume, strict, push).

    Returns:
        A :class:`~med3dqwen.builders.engine.BuildSummary`.
    """
    return run_build(CTRateBuilder(config), config.output_dir, args)
