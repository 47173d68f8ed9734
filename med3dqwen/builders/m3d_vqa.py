"""M3D-VQA → closed / open VQA JSONL (the library behind ``datasets_scripts/build_m3d_vqa.py``).

Reads the M3D-VQA CSVs and points records at the M3D-Cap ``.npy`` images they name; each row gives a closed
(multiple-choice) and/or an open record. Upstream layout and the decisions (answer modes, question types,
intensity, splits and case overlap, skip reasons): ``docs/datasets/m3d_vqa.md``.
"""

from __future__ import annotations

import functools
import logging
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from med3dqwen.anatomy.radlex import RadLexNormalizer
from med3dqwen.builders.choices import ANSWER_MODES, CHOICE_LETTERS, NA_VALUES, choice_key, multiple_choice_records
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
    write_prompt_pngs,
)
from med3dqwen.builders.upstream import UpstreamCSV, path_unit_id
from med3dqwen.data.rewrite import RewriteConfig
from med3dqwen.io import UnsafePathError, safe_relpath


__all__ = [
    "CSV_COLUMNS",
    "DEFAULT_CSVS",
    "M3D_CITATION",
    "MASK_SOURCES",
    "MODES",
    "QUESTION_TYPES",
    "M3DVQABuildConfig",
    "M3DVQABuilder",
    "build_m3d_vqa_dataset",
    "case_id",
    "find_structure",
    "read_vqa_csv",
]

logger = logging.getLogger(__name__)

QUESTION_TYPES = {1: "plane", 2: "phase", 3: "organ", 4: "abnormality", 5: "location"}
"""Upstream ``Question Type`` → our ``question_type``."""

CSV_COLUMNS = (
    "Image Path",
    "Question Type",
    "Question",
    "Choice A",
    "Choice B",
    "Choice C",
    "Choice D",
    "Answer",
    "Answer Choice",
)
"""The columns each CSV must have (exact upstream spelling); ``Text`` and ``Note`` are optional."""

DEFAULT_CSVS = {"train": "M3D_VQA_train.csv", "validation": "M3D_VQA_val.csv", "test": "M3D_VQA_test.csv"}
"""Our split → the upstream CSV it comes from (file names in ``DATA_ROOT``)."""

MODES = ANSWER_MODES
"""``mode`` values: closed, open or both records per row."""
MASK_SOURCES = ("none", "totalsegmentator_files", "totalsegmentator_multilabel", "hu_threshold")
CASE_OVERLAP = ("drop", "keep", "error")
PROMPTABLE_TYPES = ("organ", "abnormality", "location")
"""Question types that may get a contour (plane and phase are properties of the whole image)."""

UNIT_TO_PSEUDO_HU = (-1000.0, 200.0)
"""``[0, 1]`` is read as this HU range (the chest window) for PNG rendering and the ``hu_threshold`` source."""

M3D_CITATION = """@article{bai2024m3d,
  title   = {M3D: Advancing 3D Medical Image Analysis with Multi-Modal Large Language Models},
  author  = {Bai, Fan and Du, Yuxin and Huang, Tiejun and Meng, Max Q.-H. and Zhao, Bo},
  journal = {arXiv preprint arXiv:2404.00578},
  year    = {2024}
}"""

_SPLIT_PRIORITY = {"test": 0, "validation": 1, "train": 2}
_KNOWN_OPTIONAL = ("Text",)  # used upstream for generation, not needed here


class Row(NamedTuple):
    """One usable CSV row."""

    number: int  # 1-based data row in its CSV
    source: str  # "M3D_VQA_train.csv:12"
    image_path: str  # relative to IMAGE_ROOT, validated
    question_type: str  # "plane", ...
    question: str
    choices: tuple[str, str, str, str]  # "" where upstream has NA
    letter: str  # "A" .. "D"
    answer: str  # upstream Answer text (the choice text when empty)


# ---------------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------------


def case_id(image_path: str) -> str:
    """The Radiopaedia case of an image: the two folders above the file (``M3D_Cap_npy/ct_quizze/005749/x.npy`` →
    ``ct_quizze/005749``), or its folder when there is only one."""
    parts = image_path.split("/")[:-1]
    return "/".join(parts[-2:]) if parts else image_path


def _volume_id(image_path: str) -> str:
    """File-name safe id of an image: :func:`~med3dqwen.builders.engine.path_unit_id` of its path without ``.npy``."""
    stem = image_path[: -len(".npy")] if image_path.lower().endswith(".npy") else image_path
    return path_unit_id(image_path, stem)


def read_vqa_csv(path: Path, split: str) -> tuple[list[Row], list[dict[str, Any]], list[str]]:
    """Read one M3D-VQA CSV exactly as published: usable rows, skipped rows, and the ignored extra columns.

    Raises:
        BuildError: the file has no header or lacks a required column.
    """
    rows: list[Row] = []
    skipped: list[dict[str, Any]] = []
    with UpstreamCSV(path, CSV_COLUMNS) as table:
        ignored = table.ignored_columns((*CSV_COLUMNS, *_KNOWN_OPTIONAL))
        for number, source, values in table.rows(CSV_COLUMNS, skipped):
            try:
                image_path = safe_relpath(values["Image Path"])
            except UnsafePathError as err:
                skipped.append(skip_entry("unsafe_path", str(err), source=source))
                continue
            unit_id = _volume_id(image_path)

            def bad(detail: str, unit_id: str = unit_id, source: str = source) -> None:
                skipped.append(skip_entry("malformed_row", detail, unit_id=unit_id, source=source))

            if not image_path.lower().endswith(".npy"):
                bad(f"image path {image_path!r} is not a .npy file")
                continue
            try:
                number_type = int(float(values["Question Type"]))
            except ValueError:
                number_type = None
            if number_type not in QUESTION_TYPES:
                bad(f"Question Type {values['Question Type']!r} is not 1-5")
                continue
            if not values["Question"]:
                bad("empty Question")
                continue
            choices = tuple(
                "" if values[f"Choice {x}"].lower() in NA_VALUES else values[f"Choice {x}"] for x in CHOICE_LETTERS
            )
            letter = values["Answer Choice"].strip().strip("().:").upper()
            if len(letter) != 1 or letter not in CHOICE_LETTERS:
                bad(f"Answer Choice {values['Answer Choice']!r} is not A-D")
                continue
            choice = choices[CHOICE_LETTERS.index(letter)]
            if not choice:
                bad(f"Answer Choice {letter} points at an empty (NA) choice")
                continue
            answer = values["Answer"] if values["Answer"].lower() not in NA_VALUES else choice
            rows.append(
                Row(
                    number,
                    source,
                    image_path,
                    QUESTION_TYPES[number_type],
                    values["Question"],
                    choices,
                    letter,
                    answer,
                )
            )
    return rows, skipped, ignored


@functools.lru_cache(maxsize=1)
def _structure_pattern() -> re.Pattern[str]:
    from med3dqwen.anatomy import default_vocabulary

    names: set[str] = set()
    for entry in default_vocabulary().entries.values():
        for name in (entry.totalsegmentator, entry.vista3d, entry.radgenome, entry.radlex, *entry.aliases):
            if name:
                text = " ".join(name.replace("_", " ").split()).lower()
                if len(text) >= 3 and not text.isdigit():
                    names.add(text)
    alternation = "|".join(re.escape(n) for n in sorted(names, key=lambda n: (-len(n), n)))
    return re.compile(rf"\b({alternation})(?:s|es)?\b", re.IGNORECASE)


def find_structure(text: str) -> str | None:
    """The first anatomical structure the vocabulary knows that ``text`` names (longest name at the earliest place,
    plural ``s`` allowed), lower-cased, or ``None``: ``"Where is the lesion in the left kidney?"`` → ``"left
    kidney"``."""
    match = _structure_pattern().search(text)
    return match.group(1).lower() if match else None


# ---------------------------------------------------------------------------------------------------------------
# The builder
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class M3DVQABuildConfig:
    """What to build: one field per setting, declared once; its ``help`` says what it does, and the build
    command (``--help``) takes it as an option of the same name.
    """

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
            "help": "none | totalsegmentator_files | totalsegmentator_multilabel | hu_threshold (rough: the [0, "
            "1] image read as chest-windowed HU)."
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
    question_types: tuple[str, ...] = field(
        default=tuple(QUESTION_TYPES.values()), metadata={"help": "Question types to build."}
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
    _paths: dict[str, str] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("mode", self.mode, MODES),
            ("prompt", self.prompt, PROMPTS),
            ("write_png", self.write_png, PNG_MODES),
            ("mask_source", self.mask_source, MASK_SOURCES),
            ("case_overlap", self.case_overlap, CASE_OVERLAP),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        known = tuple(QUESTION_TYPES.values())
        unknown = sorted(set(self.question_types) - set(known))
        if unknown or not self.question_types:
            raise ValueError(f"question_types must be a non-empty subset of {known}, got {unknown or '()'}")
        self.question_types = tuple(q for q in known if q in self.question_types)
        if self.mask_source.startswith("totalsegmentator") and not self.mask_dir:
            raise ValueError(f"mask_source {self.mask_source!r} needs mask_dir")
        root = Path(self.data_root).expanduser().resolve()
        self._paths = {
            "image_root": str(Path(self.image_root).expanduser().resolve() if self.image_root else root),
            "mask_dir": str(Path(self.mask_dir).expanduser().resolve()) if self.mask_dir else "",
            **{split: str(root / name) for split, name in self.csv_files().items()},
        }

    def csv_files(self) -> dict[str, str]:
        """Our split → upstream CSV file name."""
        return {"train": self.train_csv, "validation": self.val_csv, "test": self.test_csv}

    @property
    def paths(self) -> dict[str, Path]:
        """``image_root``, ``mask_dir`` and the CSV of each split (absolute)."""
        return {key: Path(value) for key, value in self._paths.items() if value}


class _Masks:
    """The mask source of one image: each structure is looked up, written and drawn once."""

    def __init__(self, cfg: M3DVQABuildConfig, unit: WorkUnit, image: np.ndarray, out_dir: Path):
        from med3dqwen.processing.ct_io import CTVolume
        from med3dqwen.segmentation import (
            FLAT_LAYOUT,
            HUThresholdSource,
            MultilabelFileSource,
            PerStructureFileSource,
        )

        self.cfg, self.unit, self.out_dir = cfg, unit, out_dir
        low, high = UNIT_TO_PSEUDO_HU
        self.pseudo_hu = image.astype(np.float32) * np.float32(high - low) + np.float32(low)
        self.volume = CTVolume.from_array(self.pseudo_hu)  # the .npy grid: 1-mm standard affine
        stem = unit.payload[0][: -len(".npy")]
        if cfg.mask_source == "totalsegmentator_files":
            self.source = PerStructureFileSource(
                cfg.paths["mask_dir"] / stem, FLAT_LAYOUT, naming="totalsegmentator", source_name="totalsegmentator"
            )
        elif cfg.mask_source == "totalsegmentator_multilabel":
            self.source = MultilabelFileSource(cfg.paths["mask_dir"] / f"{stem}.nii.gz")
        else:
            self.source = HUThresholdSource()
        self.done: dict[str, tuple[str, tuple[str, str, list[str]] | None]] = {}

    def get(self, structure: str) -> tuple[str, tuple[str, str, list[str]] | None]:
        """``(status, (mask path, mask source, pngs) or None)``; status ``ok`` or why there is no contour."""
        if structure not in self.done:
            self.done[structure] = self._get(structure)
        return self.done[structure]

    def _get(self, structure: str) -> tuple[str, tuple[str, str, list[str]] | None]:
        from med3dqwen.io import save_nifti
        from med3dqwen.processing.ct_io import CTInputError, MaskMismatchError
        from med3dqwen.segmentation import UnknownStructureError

        try:
            result = self.source.get_mask(self.volume, structure)
        except UnknownStructureError:
            return "structure not available", None
        except MaskMismatchError:
            return "mask on another grid", None
        except CTInputError:
            return "mask file missing or unreadable", None
        if result.whole_volume:
            return "whole volume", None
        if result.empty:
            return "empty mask", None
        slug = re.sub(r"[^a-z0-9]+", "_", structure.lower()).strip("_") or "roi"
        rel = f"masks/{self.unit.unit_id}/{slug}.nii.gz"
        save_nifti(self.out_dir / rel, result.mask, self.volume.affine, np.uint8)
        pngs = write_prompt_pngs(
            self.pseudo_hu,
            result.mask,
            self.out_dir,
            self.unit.unit_id,
            slug,
            prompt=self.cfg.prompt,
            write_png=self.cfg.write_png,
            thickness=self.cfg.thickness,
        )
        return "ok", (rel, result.source, pngs)


class M3DVQABuilder(DatasetBuilder):
    """M3D-VQA multiple-choice and open questions on M3D-Cap images (optionally outlined by a mask source)."""

    name = "m3d_vqa"
    script = "datasets_scripts/build_m3d_vqa.py"
    owned_paths = ("prompts", "masks", "source")

    def __init__(self, config: M3DVQABuildConfig):
        self.cfg = config

    def config(self) -> dict[str, Any]:
        values = asdict(self.cfg)
        for key in ("output_dir", "data_root", "image_root", "mask_dir", "_paths"):
            values.pop(key, None)
        values["paths"] = dict(self.cfg._paths)
        return values

    def extra_features(self) -> dict[str, Any]:
        import datasets

        return {
            "choices": datasets.List(datasets.Value("string")),
            "intensity": datasets.Value("string"),
            "source_row": datasets.Value("string"),
        }

    def unit_dirs(self, unit: WorkUnit) -> list[str]:
        return [f"prompts/{unit.unit_id}", f"masks/{unit.unit_id}"]

    # -- planning --------------------------------------------------------------------------------------------------

    def prepare(self, out_dir: Path) -> None:
        image_root = self.cfg.paths["image_root"]
        if not image_root.is_dir():
            raise BuildError(f"image folder {image_root} not found (--image_root)")
        link_folder(out_dir, "source/images", image_root)

    def plan(self) -> Plan:
        cfg, paths = self.cfg, self.cfg.paths
        skipped: list[dict[str, Any]] = []
        filtered: list[dict[str, Any]] = []
        counters: dict[str, Counter] = defaultdict(Counter)
        by_split: dict[str, list[Row]] = {}
        for split in ("train", "validation", "test"):
            path = paths[split]
            if not path.is_file():
                raise BuildError(f"{path} not found: expected the M3D-VQA CSV of the {split} split (--data_root)")
            rows, bad, ignored = read_vqa_csv(path, split)
            skipped.extend(bad)
            counters["ignored_columns"].update(f"{path.name}: {c}" for c in ignored)
            kept = [r for r in rows if r.question_type in cfg.question_types]
            counters["question_types_not_built"].update(r.question_type for r in rows if r not in kept)
            by_split[split] = kept

        case_splits: defaultdict[str, set[str]] = defaultdict(set)
        for split, rows in by_split.items():
            for row in rows:
                case_splits[case_id(row.image_path)].add(split)
        shared = {case: splits for case, splits in case_splits.items() if len(splits) > 1}
        if shared:
            examples = ", ".join(f"{c} ({'/'.join(sorted(s))})" for c, s in sorted(shared.items())[:3])
            if cfg.case_overlap == "error":
                raise BuildError(f"{len(shared)} cases appear in more than one split, e.g. {examples}")
            logger.warning("%d cases appear in more than one split, e.g. %s", len(shared), examples)
            counters["case_overlap"]["cases"] = len(shared)

        units: list[WorkUnit] = []
        for split, rows in by_split.items():
            images: dict[str, list[Row]] = {}
            for row in rows:
                images.setdefault(row.image_path, []).append(row)
            for image_path in sorted(images):
                group = images[image_path]
                case = case_id(image_path)
                home = min(case_splits[case], key=_SPLIT_PRIORITY.__getitem__)
                if case in shared and cfg.case_overlap == "drop" and split != home:
                    detail = f"case {case} is also in {home}; kept there"
                    filtered.append(
                        skip_entry(
                            "case_overlap",
                            detail,
                            unit_id=_volume_id(image_path),
                            source=";".join(r.source for r in group),
                            rows=len(group),
                        )
                    )
                    continue
                unit_id = f"{split}.{_volume_id(image_path)}"
                units.append(WorkUnit(unit_id, case, split, payload=(image_path, group)))
        return Plan(
            units=units,
            skipped=skipped,
            counters={name: dict(values) for name, values in counters.items() if values},
            filtered=filtered,
        )

    # -- processing ------------------------------------------------------------------------------------------------

    def _load(self, path: Path) -> tuple[np.ndarray | None, str]:
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            return None, f"cannot read .npy ({type(err).__name__}: {err})"
        if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiub":
            return None, f"not a numeric array (dtype {getattr(array, 'dtype', type(array).__name__)})"
        if array.ndim == 4 and array.shape[0] == 1:
            array = array[0]
        if array.ndim != 3 or 0 in array.shape:
            return None, f"expected a (1, D, H, W) or (D, H, W) array, got shape {array.shape}"
        if not np.isfinite(array).all():
            return None, "the array holds NaN or infinite values"
        return array, ""

    def process(self, unit: WorkUnit, out_dir: Path) -> UnitResult:
        cfg = self.cfg
        image_path, rows = unit.payload
        result = UnitResult()
        path = cfg.paths["image_root"] / image_path
        if not path.is_file():
            result.skipped.append(
                skip_entry("missing_volume", f"{image_path} not found", unit_id=unit.unit_id, rows=len(rows))
            )
            return result
        counters: dict[str, Counter] = defaultdict(Counter)
        masks = None
        if cfg.validate_files or cfg.mask_source != "none":
            array, problem = self._load(path)
            if array is None:
                result.skipped.append(
                    skip_entry("unreadable_volume", f"{image_path}: {problem}", unit_id=unit.unit_id, rows=len(rows))
                )
                return result
            if array.min() < -1e-3 or array.max() > 1 + 1e-3:
                counters["volumes"]["values outside [0, 1]"] += 1
            if cfg.mask_source != "none":
                masks = _Masks(cfg, unit, array, out_dir)

        roi_config, whole_config = (
            RewriteConfig(color=c.color, prompt=c.prompt, normalize_anatomy=False) for c in rewrite_configs(cfg.prompt)
        )
        normalizer = RadLexNormalizer()

        def normalize(text: str) -> str:
            return normalizer.normalize_text(text) if cfg.normalize_anatomy and text else text

        volume_path = f"source/images/{image_path}"
        for row in rows:
            stem = normalize(row.question)
            mask = None
            if masks is not None:
                if row.question_type not in PROMPTABLE_TYPES:
                    counters["unprompted"]["plane / phase question"] += 1
                else:
                    structure = find_structure(stem)
                    status, found = masks.get(structure) if structure else ("no structure named", None)
                    if found is None:
                        counters["unprompted"][status] += 1
                    else:
                        mask = (*found, structure)
                        counters["prompted"][row.question_type] += 1
            if choice_key(row.answer) != choice_key(row.choices[CHOICE_LETTERS.index(row.letter)]):
                counters["answers"]["Answer differs from the choice text"] += 1
            choices = [normalize(c) for c in row.choices]
            result.records += multiple_choice_records(
                stem,
                choices,
                row.letter,
                normalize(row.answer),
                mode=cfg.mode,
                config=roi_config if mask else whole_config,
                normalizer=normalizer,
                source=row.source,
                volume_path=volume_path,
                mask_path=mask[0] if mask else None,
                mask_source=mask[1] if mask else None,
                roi=mask[3] if mask else None,
                question_type=row.question_type,
                split=unit.split,
                patient_id=unit.patient_id,
                volume_id=_volume_id(image_path),
                prompt_pngs=mask[2] if mask else [],
                extra={"choices": choices, "intensity": "unit", "source_row": row.source},
            )
        result.counters = {name: dict(values) for name, values in counters.items()}
        return result

    # -- card ------------------------------------------------------------------------------------------------------

    def card(self, summary: BuildSummary) -> dict[str, Any]:
        cfg = self.cfg
        counters = summary.counters
        files = cfg.csv_files()
        notes = [
            f"Splits are upstream's: train = `{files['train']}`, validation = `{files['validation']}`, test = "
            f"`{files['test']}`. The patient unit is the Radiopaedia case (`<source>/<case>` above the image file)."
        ]
        overlap = counters.get("case_overlap", {}).get("cases", 0)
        if overlap and cfg.case_overlap == "drop":
            rows = counters.get("filtered", {}).get("case_overlap", 0)
            notes.append(
                f"{overlap} cases appeared in more than one split: each was kept in its highest-priority split "
                f"(test > validation > train) and its {rows} rows in the other splits were left out "
                "(`filtered.jsonl`)."
            )
        elif overlap:
            notes.append(f"Warning: {overlap} cases appear in more than one split (built with `--case_overlap keep`).")
        else:
            notes.append("No case appears in more than one split.")
        modes = {"closed": "closed (multiple choice)", "open": "open", "both": "closed and open"}
        notes.append(
            f"Answer modes: {modes[cfg.mode]}. Closed: the question + `Choices: A. ... B. ... C. ... D. ...` (choices "
            "that are `NA` upstream are left out), answer `<letter>. <choice>`, `closed_answer` = the letter, "
            "`closed_choices` = the letters listed, `closed_label` = letter index (A = 0); open: the question alone, "
            "answer = upstream `Answer`."
        )
        differs = counters.get("answers", {}).get("Answer differs from the choice text", 0)
        if differs:
            notes.append(
                f"{differs} rows have an `Answer` that differs from the text of their `Answer Choice`: the closed "
                "answer uses the choice text, the open answer the `Answer` text."
            )
        not_built = counters.get("question_types_not_built", {})
        if not_built:
            notes.append(f"Question types not built: {', '.join(f'{k} ({v} rows)' for k, v in not_built.items())}.")
        ignored = counters.get("ignored_columns", {})
        if ignored:
            notes.append(f"Ignored CSV columns: {', '.join(f'`{c}`' for c in ignored)}.")
        if counters.get("volumes", {}).get("values outside [0, 1]"):
            notes.append(f"{counters['volumes']['values outside [0, 1]']} images have values outside [0, 1].")
        if cfg.mask_source == "none":
            variant = (
                "No boundary prompt: M3D-VQA has no masks and this build used no mask source, so every question "
                "keeps the no-prompt wording and system prompt (build option "
                f"`--prompt {cfg.prompt}` changes nothing)."
            )
        else:
            prompted = sum(counters.get("prompted", {}).values())
            unprompted = counters.get("unprompted", {})
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(unprompted.items())) or "none"
            pngs = "" if cfg.write_png == "none" else f" Contour {cfg.write_png} PNGs are under `prompts/`."
            variant = (
                f"Masks from `{cfg.mask_source}`: {prompted} rows of type organ / abnormality / location name a "
                "structure in their question that the source outlines; those questions "
                + (
                    f"carry the {cfg.prompt} boundary wording"
                    if cfg.prompt != "none"
                    else "keep the no-prompt wording"
                )
                + f" and a mask under `masks/`.{pngs} The other rows are un-prompted ({reasons})."
            )
        return {
            "pretty_name": "M3D-VQA (Med3DQwen build)",
            "summary": (
                "M3D-VQA multiple-choice and open questions on 3D CT images of M3D-Cap (Radiopaedia cases): plane, "
                "phase, organ, abnormality and location questions, in the paper's message layout. The images are "
                "(1, 32, 256, 256) arrays in [0, 1], not HU (`intensity: unit`): do not window them."
            ),
            "prompt_description": variant,
            "source": (
                "[GoodBaiBai88/M3D-VQA](https://huggingface.co/datasets/GoodBaiBai88/M3D-VQA) (questions) on "
                "[M3D-Cap](https://huggingface.co/datasets/GoodBaiBai88/M3D-Cap) images, code "
                "[BAAI-DCAI/M3D](https://github.com/BAAI-DCAI/M3D). Licence: the dataset card says apache-2.0, but "
                "the images and reports come from Radiopaedia cases, whose licence is non-commercial "
                "(CC BY-NC-SA): use for non-commercial research only. Images are not copied: `source/images` links "
                "to your download and is never pushed."
            ),
            "license": "other",
            "citation": M3D_CITATION,
            "notes": notes,
            "files_description": (
                'Images are not copied: `folder / sample["volume_path"]` opens the upstream `.npy` through the '
                "`source/images` link: `numpy.load(...)[0]` is the (D, H, W) image in [0, 1]. Masks of outlined "
                "questions are NIfTI files on that grid under `masks/`. `filtered.jsonl` lists rows left out on "
                "purpose (cases shared between splits)."
            ),
            "extra_fields": {
                "choices": 'the four choice texts A-D (`""` where upstream has `NA`), also for open records',
                "intensity": "`unit`: values in [0, 1] from 8-bit images, not HU: no HU window",
                "source_row": "upstream CSV file and 1-based data row, e.g. `M3D_VQA_train.csv:12`",
            },
            "tags": ["m3d", "radiopaedia", "multiple-choice"],
        }


def build_m3d_vqa_dataset(config: M3DVQABuildConfig, args: BuildArguments | None = None) -> BuildSummary:
    """Build M3D-VQA into ``config.output_dir`` (see the module docstring).

    Args:
        config: see :class:`M3DVQABuildConfig`.
        args: how to run (processes, shards, resume, strict, push).

    Returns:
        A :class:`~med3dqwen.builders.engine.BuildSummary`.
    """
    return run_build(M3DVQABuilder(config), config.output_dir, args)
