"""RadGenome-ChestCT → boundary-prompt VQA JSONL (the library behind ``datasets_scripts/build_radgenome.py``).

Reads the six upstream CSVs per split, links the upstream volume and mask folders under ``OUT/source/`` and turns each
row into one question whose contour comes from the RadGenome mask source (leaf mask, else its region). Upstream
layout, CSV columns and the decisions (untrusted paths, linking rule, deduplication, templates, splits, skip
reasons): ``docs/datasets/radgenome.md``.
"""

from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from med3dqwen.anatomy.labels import RADGENOME_NO_CONTOUR, RADGENOME_REGIONS
from med3dqwen.anatomy.radlex import RadLexNormalizer
from med3dqwen.builders.engine import (
    PNG_MODES,
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
    write_prompt_pngs,
)
from med3dqwen.builders.upstream import UpstreamCSV
from med3dqwen.data.rewrite import build_record, rewrite_qa
from med3dqwen.data.splits import DEFAULT_RATIOS, assign_split
from med3dqwen.io import UnsafePathError, safe_relpath
from med3dqwen.segmentation import MaskFileNotFoundError, MaskResult, UnknownStructureError, get_mask_source


__all__ = [
    "CSV_COLUMNS",
    "CSV_FILES",
    "QUESTION_TYPES",
    "RADGENOME_CITATION",
    "REGIONS",
    "TEMPLATES",
    "WHOLE_VOLUME_ANATOMY",
    "RadGenomeBuildConfig",
    "RadGenomeBuilder",
    "VolumeName",
    "build_radgenome_dataset",
    "dedupe_anatomy_levels",
    "parse_anatomy",
    "parse_volume_name",
    "split_probabilities",
]

logger = logging.getLogger(__name__)

QUESTION_TYPES = ("presence", "abnormality", "location", "size", "case_disorders", "region_report")
"""The six question types, in output order within a volume."""

CSV_FILES = {
    "presence": "vqa_presence",
    "abnormality": "vqa_abnormality",
    "location": "vqa_location",
    "size": "vqa_size",
    "case_disorders": "case_disorders",
    "region_report": "region_report",
}
"""Question type → CSV name stem; the file is ``<train|validation>_<stem>.csv``."""

CSV_COLUMNS = {
    "presence": ("Volumename", "Anatomy", "Finding", "Presence"),
    "abnormality": ("Volumename", "Anatomy", "Abnormality"),
    "location": ("Volumename", "Anatomy", "Abnormality"),
    "size": ("Volumename", "Anatomy", "Abnormality", "Size"),
    "case_disorders": ("Volumename", "Disorders"),
    "region_report": ("Volumename", "Anatomy", "Sentence"),
}
"""The columns each CSV must have (exact upstream spelling)."""

# The 10 region masks (``*_region_mask/seg_<volume>/<region>.nii.gz``: the allowed heads of an anatomy path) and the
# heads/leaves meaning "no specific structure" (whole-volume question, no contour), shared with the mask sources.
REGIONS = RADGENOME_REGIONS
WHOLE_VOLUME_ANATOMY = RADGENOME_NO_CONTOUR

# Our template sets. {region} = anatomy leaf, {finding} = upstream text as is.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "presence": (
        "Is there {finding} in the {region}?",
        "Can {finding} be seen in the {region}?",
        "Does the {region} show {finding}?",
        "Is there evidence of {finding} in the {region}?",
        "Are there signs of {finding} in the {region}?",
    ),
    "abnormality": (
        "What abnormalities are seen in the {region}?",
        "What are the abnormal findings in the {region}?",
        "Which abnormalities does the {region} show?",
        "What is abnormal in the {region}?",
    ),
    "location": (
        "Where is the {finding} located?",
        "Where in the scan is the {finding} found?",
        "Which structure contains the {finding}?",
        "What is the location of the {finding}?",
    ),
    "size": (
        "What is the size of the {finding} in the {region}?",
        "How large is the {finding} in the {region}?",
        "What does the {finding} in the {region} measure?",
        "What is the approximate size of the {finding} in the {region}?",
    ),
    "case_disorders": (
        "What disorders does this scan show?",
        "What are the abnormalities in this scan?",
        "Which diseases are seen in this CT scan?",
        "What are the main findings of this scan?",
    ),
    "region_report": (
        "Describe the findings in the {region}.",
        "Write the report for the {region}.",
        "What does the {region} look like on this scan?",
        "Please describe the {region}.",
    ),
    "whole_report": (
        "Describe the findings of this CT scan.",
        "Write the findings of the report for this scan.",
        "Please describe this scan.",
    ),
}
"""Question templates per type (``whole_report``: region-report rows without an anatomy)."""

RADGENOME_CITATION = """@article{zhang2024radgenome,
  title   = {RadGenome-Chest CT: A Grounded Vision-Language Dataset for Chest CT Analysis},
  author  = {Zhang, Xiaoman and Wu, Chaoyi and Zhao, Ziheng and Lei, Jiayu and Zhang, Ya and Wang, Yanfeng and
             Xie, Weidi},
  journal = {arXiv preprint arXiv:2404.16754},
  year    = {2024}
}

@article{hamamci2024ctrate,
  title   = {Developing Generalist Foundation Models from a Multimodal Dataset for 3D Computed Tomography},
  author  = {Hamamci, Ibrahim Ethem and others},
  journal = {arXiv preprint arXiv:2403.17834},
  year    = {2024}
}"""

SPLIT_MODES = ("upstream", "overall")
# Upstream split → (CSV prefix, folder prefix).
_UPSTREAM = {"train": ("train", "train"), "validation": ("validation", "valid")}
_FOLDERS = (
    "train_preprocessed",
    "valid_preprocessed",
    "train_anatomy_mask",
    "valid_anatomy_mask",
    "train_region_mask",
    "valid_region_mask",
)
_VOLUME_NAME = re.compile(r"^(train|valid)_(\d+)_([A-Za-z]+)_(\d+)\.nii\.gz$")
_MISSING = ("", "nan", "none", "null")


# ---------------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------------


class VolumeName(NamedTuple):
    """A parsed ``Volumename`` such as ``train_362_a_1.nii.gz``."""

    prefix: str  # "train" | "valid"
    patient: int  # 362
    scan: str  # "a"
    recon: int  # 1

    @property
    def volume_id(self) -> str:
        return f"{self.prefix}_{self.patient}_{self.scan}_{self.recon}"

    @property
    def patient_id(self) -> str:
        return f"{self.prefix}_{self.patient}"

    @property
    def file_name(self) -> str:
        return f"{self.volume_id}.nii.gz"

    def relpaths(self) -> tuple[str, str]:
        """Where the volume may sit inside ``<prefix>_preprocessed``: RadGenome's layout, then CT-RATE's."""
        patient = self.patient_id
        return (
            f"{patient}/{patient}{self.scan}/{self.file_name}",  # train_362/train_362a/train_362_a_1.nii.gz
            f"{patient}/{patient}_{self.scan}/{self.file_name}",  # train_362/train_362_a/train_362_a_1.nii.gz
        )

    def sort_key(self) -> tuple:
        return (self.prefix != "train", self.patient, self.scan, self.recon)


def parse_volume_name(name: str) -> VolumeName:
    """Parse ``<train|valid>_<pid>_<scan>_<recon>.nii.gz``.

    Raises:
        UnsafePathError: the name holds a path (``/``, ``\\``, ``..``).
        ValueError: any other mismatch.
    """
    if "/" in name or "\\" in name or ".." in name.replace(".nii.gz", "") or "\x00" in name:
        raise UnsafePathError(f"volume name {name!r} holds a path")
    match = _VOLUME_NAME.match(name)
    if match is None:
        raise ValueError(f"volume name {name!r} does not match <train|valid>_<pid>_<scan>_<recon>.nii.gz")
    prefix, patient, scan, recon = match.groups()
    return VolumeName(prefix, int(patient), scan, int(recon))


def parse_anatomy(anatomy: str) -> tuple[str, ...]:
    """The components of an anatomy path (``"lung/lung/right lung"`` → ``("lung", "lung", "right lung")``).

    Raises:
        UnsafePathError: absolute path, ``.`` / ``..`` components, backslashes.
        ValueError: empty path or empty components (``"lung//x"``); a head that is not one of :data:`REGIONS` or
            :data:`WHOLE_VOLUME_ANATOMY` (message starts with "unknown anatomy").
    """
    text = anatomy.strip()
    if not text:
        raise ValueError("empty anatomy path")
    parts = tuple(part.strip() for part in text.split("/"))
    if text.startswith("/") or "\\" in text or "\x00" in text or any(p in (".", "..") for p in parts):
        raise UnsafePathError(f"anatomy {anatomy!r} is not a relative structure path")
    if any(not p for p in parts):
        raise ValueError(f"anatomy {anatomy!r} has an empty component")
    if parts[0].lower() not in (*REGIONS, *WHOLE_VOLUME_ANATOMY):
        raise ValueError(f"unknown anatomy head {parts[0]!r} in {anatomy!r} (known: {', '.join(REGIONS)})")
    return parts


def _anatomy_key(parts: tuple[str, ...]) -> str:
    return "/".join(p.lower() for p in parts)


def _text_key(text: str) -> str:
    return " ".join(text.split()).casefold()


def _is_whole(parts: tuple[str, ...]) -> bool:
    return not parts or parts[0].lower() in WHOLE_VOLUME_ANATOMY or parts[-1].lower() in WHOLE_VOLUME_ANATOMY


class Row(NamedTuple):
    """One usable CSV row."""

    question_type: str
    number: int  # 1-based data row in its CSV
    source: str  # "train_vqa_presence.csv:12"
    anatomy: tuple[str, ...]  # () = whole scan
    text: str  # Finding / Abnormality / Disorders / Sentence
    extra: str = ""  # Presence ("Yes." / "No.") or Size

    def content_key(self) -> tuple[str, ...]:
        return (self.question_type, _text_key(self.text), _text_key(self.extra))


def read_csv_rows(
    path: Path, question_type: str, upstream_split: str
) -> tuple[list[tuple[VolumeName, Row]], list[dict[str, Any]]]:
    """Read one RadGenome CSV exactly as published; return the usable rows and the skipped ones.

    Raises:
        BuildError: the file has no header or lacks a required column.
    """
    csv_prefix, folder_prefix = _UPSTREAM[upstream_split]
    rows: list[tuple[VolumeName, Row]] = []
    skipped: list[dict[str, Any]] = []
    columns = CSV_COLUMNS[question_type]
    with UpstreamCSV(path, columns) as table:
        for number, source, values in table.rows(columns, skipped):
            try:
                volume = parse_volume_name(values["Volumename"])
            except UnsafePathError as err:
                skipped.append(skip_entry("unsafe_path", str(err), source=source))
                continue
            except ValueError as err:
                skipped.append(skip_entry("malformed_row", str(err), source=source))
                continue
            unit_id = volume.volume_id
            if volume.prefix != folder_prefix:
                detail = f"volume {values['Volumename']!r} in {csv_prefix} CSV"
                skipped.append(skip_entry("malformed_row", detail, unit_id=unit_id, source=source))
                continue
            anatomy: tuple[str, ...] = ()
            if "Anatomy" in values:
                raw = values["Anatomy"]
                if raw.lower() in _MISSING and question_type == "region_report":
                    anatomy = ()  # whole-report row
                else:
                    try:
                        anatomy = parse_anatomy("" if raw.lower() in _MISSING else raw)
                    except UnsafePathError as err:
                        skipped.append(skip_entry("unsafe_path", str(err), unit_id=unit_id, source=source))
                        continue
                    except ValueError as err:
                        reason = "unknown_anatomy" if str(err).startswith("unknown anatomy") else "malformed_row"
                        skipped.append(skip_entry(reason, str(err), unit_id=unit_id, source=source))
                        continue
            text_column = {"presence": "Finding", "case_disorders": "Disorders", "region_report": "Sentence"}.get(
                question_type, "Abnormality"
            )
            text, extra = values[text_column], ""
            if question_type == "presence":
                answer = values["Presence"].lower().rstrip(".").strip()
                if answer not in ("yes", "no"):
                    detail = f"Presence {values['Presence']!r} is neither Yes. nor No."
                    skipped.append(skip_entry("malformed_row", detail, unit_id=unit_id, source=source))
                    continue
                extra = "Yes." if answer == "yes" else "No."
            elif question_type == "size":
                extra = values["Size"]
            if text.lower() in _MISSING or (question_type == "size" and extra.lower() in _MISSING):
                detail = f"empty {text_column if text.lower() in _MISSING else 'Size'}"
                skipped.append(skip_entry("malformed_row", detail, unit_id=unit_id, source=source))
                continue
            rows.append((volume, Row(question_type, number, source, anatomy, text, extra)))
    return rows, skipped


def dedupe_anatomy_levels(rows: list[Row]) -> tuple[list[Row], Counter[str]]:
    """Keep the deepest anatomy level of each repeated finding (see the module docstring).

    Args:
        rows: the rows of one volume.

    Returns:
        ``(kept rows in their input order, removed rows per question type)``.
    """
    groups: defaultdict[tuple[str, ...], list[Row]] = defaultdict(list)
    for row in rows:
        groups[row.content_key()].append(row)
    kept: set[int] = set()
    for group in groups.values():
        paths = {_anatomy_key(r.anatomy) for r in group if r.anatomy}
        deepest = [
            r for r in group if not r.anatomy or not any(p.startswith(_anatomy_key(r.anatomy) + "/") for p in paths)
        ]
        by_leaf: dict[str, Row] = {}
        for row in sorted(deepest, key=lambda r: (_anatomy_key(r.anatomy), r.number)):
            by_leaf.setdefault(row.anatomy[-1].lower() if row.anatomy else "", row)
        kept.update(id(r) for r in by_leaf.values())
    removed: Counter[str] = Counter(r.question_type for r in rows if id(r) not in kept)
    return [r for r in rows if id(r) in kept], removed


def split_probabilities(
    n_train_patients: int, n_valid_patients: int, ratios: tuple[float, float, float], mode: str
) -> tuple[float, float, float]:
    """Probabilities ``(train, validation, test)`` for an upstream-*train* patient (upstream validation → test).

    ``ratios`` = target fractions of patients in our (train, validation, test).

    - ``mode="upstream"`` (default): test is exactly upstream validation; upstream train is split into train and
      validation (dev) in the proportion ``ratios[0] : ratios[1]`` (7 : 1 for 70/10/20); ``ratios[2]`` is not used.
      On the full dataset (20,000 / 1,304 patients) that gives about 82 / 12 / 6 %.
    - ``mode="overall"``: the ratios hold for the whole dataset. Our validation takes ``ratios[1] * N`` patients
      from upstream train (``N`` = all patients), and test is upstream validation topped up with
      ``max(0, ratios[2] * N - n_valid)`` upstream-train patients, so 70/10/20 gives 70/10/20 (test keeps all the
      manually verified upstream-validation patients).

    Raises:
        ValueError: bad ratios or mode, or ratios that upstream train cannot satisfy.
    """
    if mode not in SPLIT_MODES:
        raise ValueError(f"split_mode must be one of {SPLIT_MODES}, got {mode!r}")
    r_train, r_val, r_test = (float(r) for r in ratios)
    if min(r_train, r_val, r_test) < 0 or abs(r_train + r_val + r_test - 1) > 1e-6 or r_train <= 0:
        raise ValueError(f"split_ratios {tuple(ratios)} must be 3 non-negative fractions summing to 1, train > 0")
    if n_train_patients == 0:
        return (1.0, 0.0, 0.0)
    if mode == "upstream":
        return (r_train / (r_train + r_val), r_val / (r_train + r_val), 0.0)
    total = n_train_patients + n_valid_patients
    p_test = max(0.0, r_test * total - n_valid_patients) / n_train_patients
    p_val = r_val * total / n_train_patients
    if p_test + p_val >= 1:
        raise ValueError(f"split_ratios {tuple(ratios)} leave no upstream-train patient for train")
    return (1.0 - p_test - p_val, p_val, p_test)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "roi"


# ---------------------------------------------------------------------------------------------------------------
# The builder
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RadGenomeBuildConfig:
    """What to build: one field per setting, declared once; its ``help`` says what it does, and the build
    command (``--help``) takes it as an option of the same name.
    """

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
    split_ratios: tuple[float, float, float] = field(
        default=DEFAULT_RATIOS,
        metadata={
            "help": "Target train / validation / test patient fractions. split_mode=upstream: test = upstream "
            "validation and upstream train is split train:validation = ratio[0]:ratio[1]; overall: the "
            "fractions hold over all patients (test topped up from upstream train)."
        },
    )
    split_mode: str = field(default="upstream", metadata={"help": "upstream | overall (see split_ratios)."})
    question_types: tuple[str, ...] = field(default=QUESTION_TYPES, metadata={"help": "Question types to build."})
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
    _folders: dict[str, str] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.prompt not in PROMPTS:
            raise ValueError(f"prompt must be one of {PROMPTS}, got {self.prompt!r}")
        if self.write_png not in PNG_MODES:
            raise ValueError(f"write_png must be one of {PNG_MODES}, got {self.write_png!r}")
        self.split_ratios = tuple(float(r) for r in self.split_ratios)
        split_probabilities(1, 0, self.split_ratios, self.split_mode)  # validates ratios and mode
        unknown = sorted(set(self.question_types) - set(QUESTION_TYPES))
        if unknown or not self.question_types:
            raise ValueError(f"question_types must be a non-empty subset of {QUESTION_TYPES}, got {unknown or '()'}")
        self.question_types = tuple(q for q in QUESTION_TYPES if q in self.question_types)
        dataset = Path(self.data_root) / "dataset"
        overrides = {
            "csv": self.csv_dir,
            "train_preprocessed": self.train_volume_dir,
            "valid_preprocessed": self.valid_volume_dir,
            "train_anatomy_mask": self.train_anatomy_mask_dir,
            "valid_anatomy_mask": self.valid_anatomy_mask_dir,
            "train_region_mask": self.train_region_mask_dir,
            "valid_region_mask": self.valid_region_mask_dir,
        }
        defaults = {"csv": dataset / "radgenome_files", **{name: dataset / name for name in _FOLDERS}}
        self._folders = {
            key: str(Path(overrides[key] or defaults[key]).expanduser().resolve()) for key in ("csv", *_FOLDERS)
        }

    @property
    def folders(self) -> dict[str, Path]:
        """``csv`` and the six upstream folders (absolute), after overrides."""
        return {key: Path(value) for key, value in self._folders.items()}


class _Masks:
    """Mask lookups of one volume through the RadGenome mask source; each file's PNGs are written once.

    The linking rule (leaf file, else the head's region file, ``others`` / ``whole scan`` = whole volume) lives in
    :class:`~med3dqwen.segmentation.files.PerStructureFileSource`; this class maps its results and errors to the
    build's record fields and skip reasons.
    """

    def __init__(self, builder: RadGenomeBuilder, volume: VolumeName, image, out_dir: Path):
        self.cfg = builder.cfg
        self.volume = volume
        self.image = image  # CTVolume or None (validate_files=False and no PNGs)
        self.out_dir = out_dir
        self.trees = {kind: f"{volume.prefix}_{kind}_mask" for kind in ("anatomy", "region")}
        folders = builder.cfg.folders
        # naming=None: a record points at one upstream file, so no name translation or union of parts.
        self.source = get_mask_source(
            "radgenome", root=folders[self.trees["anatomy"]], region_root=folders[self.trees["region"]], naming=None
        )
        self.looked_up: dict[tuple[str, str], tuple[tuple[str, str, str, list[str]] | None, str, str]] = {}
        self.pngs: dict[str, list[str]] = {}
        self.slugs: dict[str, str] = {}

    def lookup(self, head: str, leaf: str) -> tuple[tuple[str, str, str, list[str]] | None, str, str]:
        """``(mask, reason, detail)``: mask = ``(relative path, mask_source, roi, pngs)`` or ``None`` with a skip
        reason; ``reason`` is the fallback reason (``"missing"`` / ``"empty"``) when the region mask is used."""
        key = (head, leaf)
        if key not in self.looked_up:
            self.looked_up[key] = self._lookup(head, leaf)
        return self.looked_up[key]

    def _rel(self, kind: str, name: str) -> str:
        path = self.source.file_for(name, self.volume.volume_id, region=kind == "region")
        return f"source/{self.trees[kind]}/{safe_relpath(path.parent.name, path.name)}"

    def _lookup(self, head: str, leaf: str) -> tuple[tuple[str, str, str, list[str]] | None, str, str]:
        from med3dqwen.processing.ct_io import CTInputError, MaskMismatchError

        anatomy = f"{head}/{leaf}"
        volume_id = self.volume.volume_id
        try:
            tried = f"anatomy mask {self._rel('anatomy', leaf)}: {{}}; region mask {self._rel('region', head)}: {{}}"
            if self.image is None:
                _, fallback = self.source.resolve(anatomy, volume_id)
                result = None
            else:
                result = self.source.get_mask(self.image, anatomy, volume_id=volume_id)
                fallback = result.fallback
        except (MaskFileNotFoundError, UnknownStructureError):
            return None, "missing_mask", tried.format("missing", "missing")
        except MaskMismatchError as err:
            return None, "mask_mismatch", str(err)
        except UnsafePathError as err:
            return None, "unsafe_path", str(err)
        except CTInputError as err:
            return None, "unreadable_mask", str(err)
        kind, name = ("region", head) if fallback == "region" else ("anatomy", leaf)
        reason = "missing" if result is None and fallback == "region" else ""
        if result is not None:
            reason = result.fallback_reason or ""
            if result.empty:
                statuses = (reason, "empty") if fallback == "region" else ("empty", "missing")
                return None, "empty_roi", tried.format(*statuses)
        rel = self._rel(kind, name)
        mask = (rel, f"radgenome_{kind}_mask", name, self._write_pngs(kind, name, rel, result))
        return mask, reason, ""

    def _write_pngs(self, kind: str, name: str, rel: str, result: MaskResult | None) -> list[str]:
        if result is None:
            return []
        if rel not in self.pngs:
            slug = f"{kind}_{_slug(name)}"
            while slug in self.slugs and self.slugs[slug] != rel:
                slug += "_"
            self.slugs[slug] = rel
            self.pngs[rel] = write_prompt_pngs(
                self.image.array,
                result.mask,
                self.out_dir,
                self.volume.volume_id,
                slug,
                prompt=self.cfg.prompt,
                write_png=self.cfg.write_png,
                thickness=self.cfg.thickness,
            )
        return self.pngs[rel]


class RadGenomeBuilder(DatasetBuilder):
    """RadGenome-ChestCT grounded VQA (six question types) with dataset masks as boundary prompts."""

    name = "radgenome"
    script = "datasets_scripts/build_radgenome.py"
    owned_paths = ("prompts", "source")

    def __init__(self, config: RadGenomeBuildConfig):
        self.cfg = config

    def config(self) -> dict[str, Any]:
        # The options, not where the data lives: records reach the data through the source/ links, so a moved
        # download (new --data_root) re-uses finished volumes. After changing the data itself, use --overwrite.
        values = asdict(self.cfg)
        for key in ("output_dir", "data_root", "_folders", *(k for k in values if k.endswith("_dir"))):
            values.pop(key, None)
        return values

    def extra_features(self) -> dict[str, Any]:
        import datasets

        return {"anatomy": datasets.Value("string"), "source_row": datasets.Value("string")}

    def prepare(self, out_dir: Path) -> None:
        for name in _FOLDERS:
            folder = self.cfg.folders[name]
            if folder.is_dir():
                link_folder(out_dir, f"source/{name}", folder)
            elif name.endswith("_mask"):
                logger.warning("%s not found: questions needing those masks fall back or are skipped", folder)

    def plan(self) -> Plan:
        folders = self.cfg.folders
        volumes: dict[str, VolumeName] = {}
        rows: defaultdict[str, list[Row]] = defaultdict(list)
        skipped: list[dict[str, Any]] = []
        for upstream in ("train", "validation"):
            csv_prefix, folder_prefix = _UPSTREAM[upstream]
            for question_type in self.cfg.question_types:
                path = folders["csv"] / f"{csv_prefix}_{CSV_FILES[question_type]}.csv"
                if not path.is_file():
                    raise BuildError(
                        f"{path} not found: expected the RadGenome CSVs in {folders['csv']} (--csv_dir), or leave "
                        f"{question_type} out with --question_types"
                    )
                found, bad = read_csv_rows(path, question_type, upstream)
                skipped.extend(bad)
                for volume, row in found:
                    volumes[volume.volume_id] = volume
                    rows[volume.volume_id].append(row)
            volume_dir = folders[f"{folder_prefix}_preprocessed"]
            if any(v.prefix == folder_prefix for v in volumes.values()) and not volume_dir.is_dir():
                raise BuildError(f"volume folder {volume_dir} not found (--{folder_prefix}_volume_dir)")

        patients = {
            prefix: {v.patient_id for v in volumes.values() if v.prefix == prefix} for prefix in ("train", "valid")
        }
        probabilities = split_probabilities(
            len(patients["train"]), len(patients["valid"]), self.cfg.split_ratios, self.cfg.split_mode
        )
        units = []
        for volume in sorted(volumes.values(), key=VolumeName.sort_key):
            # Upstream validation is our test; upstream-train patients are hashed into train / validation (/ test).
            split = (
                "test" if volume.prefix == "valid" else assign_split(volume.patient_id, self.cfg.seed, probabilities)
            )
            units.append(
                WorkUnit(
                    unit_id=volume.volume_id,
                    patient_id=volume.patient_id,
                    split=split,
                    payload=(volume, rows[volume.volume_id]),
                )
            )
        return Plan(units=units, skipped=skipped)

    def process(self, unit: WorkUnit, out_dir: Path) -> UnitResult:
        from med3dqwen.processing.ct_io import CTInputError, load_volume

        cfg = self.cfg
        volume, rows = unit.payload
        result = UnitResult()
        folder = f"{volume.prefix}_preprocessed"
        found = [rel for rel in volume.relpaths() if (cfg.folders[folder] / rel).is_file()]
        if not found:
            detail = f"{folder}/{volume.relpaths()[0]} not found"
            result.skipped.append(skip_entry("missing_volume", detail, unit_id=unit.unit_id, rows=len(rows)))
            return result
        volume_path = f"source/{folder}/{found[0]}"
        image = None
        if cfg.validate_files or (cfg.prompt != "none" and cfg.write_png != "none"):
            try:
                image = load_volume(cfg.folders[folder] / found[0])
            except CTInputError as err:
                result.skipped.append(skip_entry("unreadable_volume", str(err), unit_id=unit.unit_id, rows=len(rows)))
                return result

        rows, removed = dedupe_anatomy_levels(rows)
        result.counters["deduplicated"] = dict(removed)
        rows = sorted(rows, key=lambda r: (QUESTION_TYPES.index(r.question_type), r.number))
        masks = _Masks(self, volume, image, out_dir)
        roi_config, whole_config = rewrite_configs(cfg.prompt)
        normalizer = RadLexNormalizer()
        fallback: Counter[str] = Counter()
        whole: Counter[str] = Counter()
        by_type: dict[str, list[dict[str, Any]]] = {question_type: [] for question_type in QUESTION_TYPES}

        def emit(row_or_rows, question: str, answer: str, mask: tuple[str, str, str, list[str]] | None) -> None:
            group = row_or_rows if isinstance(row_or_rows, list) else [row_or_rows]
            first = group[0]
            answer_type = "closed" if first.question_type == "presence" else "open"
            qa = rewrite_qa(
                question,
                answer,
                answer_type=answer_type,
                config=roi_config if mask else whole_config,
                normalizer=normalizer,
            )
            if mask is None:
                whole[first.question_type] += 1
            by_type[first.question_type].append(
                build_record(
                    qa,
                    volume_path=volume_path,
                    mask_path=mask[0] if mask else None,
                    mask_source=mask[1] if mask else None,
                    roi=mask[2] if mask else None,
                    question_type=first.question_type,
                    split=unit.split,
                    patient_id=unit.patient_id,
                    volume_id=unit.unit_id,
                    prompt_pngs=mask[3] if mask else [],
                    extra={
                        "anatomy": "whole scan"
                        if first.question_type == "location" or not first.anatomy
                        else "/".join(first.anatomy),
                        "source_row": ";".join(r.source for r in group),
                    },
                )
            )

        locations: dict[str, list[Row]] = {}
        for row in rows:
            if row.question_type == "location":
                locations.setdefault(_text_key(row.text), []).append(row)
                continue
            key = f"{unit.unit_id}|{row.question_type}|{_anatomy_key(row.anatomy)}|{_text_key(row.text)}"
            if row.question_type == "case_disorders" or (row.question_type == "region_report" and not row.anatomy):
                templates = TEMPLATES["case_disorders" if row.question_type == "case_disorders" else "whole_report"]
                question = templates[stable_index(cfg.seed, key, len(templates))]
                emit(row, question, row.text, None)
                continue
            mask = None
            if not _is_whole(row.anatomy):
                head, leaf = row.anatomy[0], row.anatomy[-1]
                normalizer.normalize_term(leaf)  # counts leaves without a RadLex entry
                mask, reason, detail = masks.lookup(head, leaf)
                if mask is None:
                    result.skipped.append(skip_entry(reason, detail, unit_id=unit.unit_id, source=row.source))
                    continue
                if reason:
                    fallback[f"anatomy mask {reason}"] += 1
            leaf = row.anatomy[-1]
            region = "scan" if leaf.lower() in WHOLE_VOLUME_ANATOMY else leaf
            templates = TEMPLATES[row.question_type]
            question = templates[stable_index(cfg.seed, key, len(templates))].format(finding=row.text, region=region)
            emit(row, question, row.extra if row.question_type in ("presence", "size") else row.text, mask)

        for group in locations.values():
            first = group[0]
            key = f"{unit.unit_id}|location|{_text_key(first.text)}"
            templates = TEMPLATES["location"]
            question = templates[stable_index(cfg.seed, key, len(templates))].format(finding=first.text)
            places = []
            for row in group:
                place = "other structures" if row.anatomy[-1].lower() in WHOLE_VOLUME_ANATOMY else row.anatomy[-1]
                if place not in places:
                    places.append(place)
            phrases = [f"the {place}" for place in places]
            joined = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
            emit(group, question, f"In {joined}.", None)
        result.records = [record for question_type in QUESTION_TYPES for record in by_type[question_type]]
        merged_rows = sum(len(group) for group in locations.values())
        result.counters["location_rows_merged"] = {"rows": merged_rows, "questions": len(locations)}
        result.counters["mask_fallback"] = dict(fallback)
        result.counters["whole_volume"] = dict(whole)
        result.counters["unknown_anatomy_terms"] = dict(normalizer.unknown_terms)
        return result

    def card(self, summary: BuildSummary) -> dict[str, Any]:
        cfg = self.cfg
        counters = summary.counters
        if cfg.prompt != "none":
            pngs = (
                "No PNGs were written."
                if cfg.write_png == "none"
                else f"Each (volume, ROI) has a {cfg.thickness}-px contour {cfg.write_png} under `prompts/`."
            )
            variant = (
                f'Boundary prompts in **{cfg.prompt}**: questions about a structure are rewritten ("Within the '
                f'{cfg.prompt}-outlined area of the CT volume, ...") and the contour is drawn from its RadGenome mask '
                f"(`mask_path`). {pngs} Whole-volume questions (location, case disorders, whole-report and "
                "`others` rows) have no contour and keep the no-prompt wording."
            )
        else:
            variant = "No prompt: questions keep their wording (RadLex-normalised); masks are still listed."
        if cfg.split_mode == "upstream":
            dev = split_probabilities(1, 0, cfg.split_ratios, cfg.split_mode)[1]
            split_text = (
                f"Splits by patient: `test` is the upstream (manually verified) validation set; `validation` holds "
                f"about {dev:.1%} of the upstream-train patients (hash of `train_<pid>`, seed {cfg.seed}), `train` "
                "the rest."
            )
        else:
            split_text = (
                f"Splits by patient, fractions {list(cfg.split_ratios)} of all patients: `test` is the upstream "
                "validation set topped up with upstream-train patients; `validation` is carved from upstream train "
                f"(hash of `train_<pid>`, seed {cfg.seed})."
            )
        notes = [split_text]
        deduplicated = counters.get("deduplicated", {})
        if deduplicated:
            per_type = ", ".join(f"{k} {v}" for k, v in deduplicated.items())
            notes.append(
                f"{sum(deduplicated.values())} rows dropped as the same finding at a shallower level of the anatomy "
                f"tree or the same structure again ({per_type})."
            )
        merged = counters.get("location_rows_merged", {})
        if merged.get("rows"):
            notes.append(f"{merged['rows']} location rows became {merged['questions']} question(s), one per finding.")
        fallback = counters.get("mask_fallback", {})
        if fallback:
            notes.append(
                f"{sum(fallback.values())} questions are outlined by their region mask because the anatomy mask was "
                f"not usable ({', '.join(f'{k}: {v}' for k, v in fallback.items())})."
            )
        whole = counters.get("whole_volume", {})
        if whole:
            notes.append(f"{sum(whole.values())} whole-volume questions have no mask and no contour.")
        unknown = counters.get("unknown_anatomy_terms", {})
        if unknown:
            notes.append(f"Structure names without a RadLex entry, kept as they are: {', '.join(sorted(unknown))}.")
        return {
            "pretty_name": "RadGenome-ChestCT boundary-prompt VQA (Med3DQwen build)",
            "summary": (
                "Grounded VQA from RadGenome-ChestCT (CT-RATE chest CT volumes with SAT organ masks): presence "
                "(closed, Yes./No.), abnormality, location, size, case disorders and region report questions "
                "(open), rewritten for slice-wise boundary prompting. Question text comes from our own templates "
                "(`med3dqwen.builders.radgenome.TEMPLATES`); answers are the upstream text."
            ),
            "prompt_description": variant,
            "source": (
                "[RadGenome/RadGenome-ChestCT](https://huggingface.co/datasets/RadGenome/RadGenome-ChestCT) (CSVs, "
                "masks and preprocessed volumes) on [CT-RATE](https://huggingface.co/datasets/ibrahimhamamci/CT-RATE) "
                "volumes. Licence: CC BY-NC-SA 4.0, non-commercial; the CT-RATE terms forbid redistributing any part "
                "of the data, so this folder holds no volume or mask: it links to your download under `source/`, "
                "and pushed copies must stay private."
            ),
            "license": "cc-by-nc-sa-4.0",
            "citation": RADGENOME_CITATION,
            "notes": notes,
            "files_description": (
                "Volumes and masks are not copied: `source/<folder>` links to the upstream folders "
                '(`train_preprocessed`, `valid_anatomy_mask`, ...), so `folder / sample["volume_path"]` and '
                '`folder / sample["mask_path"]` open the upstream NIfTI files, e.g. with '
                "`med3dqwen.processing.ct_io.load_volume`."
            ),
            "extra_fields": {
                "anatomy": "upstream `Anatomy` path of the row (`whole scan` for whole-volume questions)",
                "source_row": "upstream CSV file and 1-based data row(s), e.g. `train_vqa_presence.csv:12`",
            },
            "tags": ["radgenome", "ct-rate", "chest"],
        }


def build_radgenome_dataset(config: RadGenomeBuildConfig, args: BuildArguments | None = None) -> BuildSummary:
    """Build RadGenome-ChestCT into ``config.output_dir`` (see the module docstring).

    Args:
        config: see :class:`RadGenomeBuildConfig`.
        args: how to run (processes, shards, resume, strict, push).

    Returns:
        A :class:`~med3dqwen.builders.engine.BuildSummary`.
    """
    return run_build(RadGenomeBuilder(config), config.output_dir, args)
