"""PMC-VQA → CT-only closed / open VQA JSONL on 2D figures (the library behind ``datasets_scripts/build_pmc_vqa.py``).

Recognises both upstream CSV schemas per file, keeps figures that a keyword rule calls CT and writes closed and/or
open records per question. Upstream layout and the decisions (the CT rule, answers, splits by article, skip
reasons): ``docs/datasets/pmc_vqa.md``.
"""

from __future__ import annotations

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
)
from med3dqwen.builders.upstream import UpstreamCSV, path_unit_id
from med3dqwen.data.rewrite import RewriteConfig
from med3dqwen.data.splits import assign_split
from med3dqwen.io import UnsafePathError, atomic_output, safe_relpath


__all__ = [
    "DEFAULT_CSV_FILES",
    "DEFAULT_IMAGE_DIRS",
    "FILTER_REASONS",
    "PMC_VQA_CITATION",
    "QUESTION_TYPE",
    "PMCVQABuildConfig",
    "PMCVQABuilder",
    "build_pmc_vqa_dataset",
    "ct_filter",
    "pmcid",
    "read_pmc_csv",
    "strip_choice_letter",
]

logger = logging.getLogger(__name__)

QUESTION_TYPE = "figure_vqa"
"""The ``question_type`` of every record (PMC-VQA has no question types)."""

VERSIONS = ("v1", "v2")
DEFAULT_CSV_FILES = {"v1": ("train.csv", "test.csv"), "v2": ("train_2.csv", "test_2.csv")}
"""The CSVs read by default (``test_clean.csv`` is a subset of ``test.csv``)."""
DEFAULT_IMAGE_DIRS = {"v1": "images", "v2": "images_2"}
"""Where the extracted figures are by default, relative to the root."""
FILTER_REASONS = ("pet_spect_ct", "cbct_or_micro_ct", "not_ct", "mixed_modality")
"""Why a figure is left out by the CT filter, in the order the rule checks them."""
DEFAULT_RATIOS = (0.8, 0.1, 0.1)

PMC_VQA_CITATION = """@article{zhang2023pmcvqa,
  title   = {PMC-VQA: Visual Instruction Tuning for Medical Visual Question Answering},
  author  = {Zhang, Xiaoman and Wu, Chaoyi and Zhao, Ziheng and Lin, Weixiong and Zhang, Ya and Wang, Yanfeng and
             Xie, Weidi},
  journal = {arXiv preprint arXiv:2305.10415},
  year    = {2023}
}"""

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_CHOICE_PREFIX = re.compile(r"^\s*(?:\(([A-Da-d])\)|([A-Da-d])\s*[:.)])\s*")

# The CT filter (see the module docstring). Abbreviations are case-sensitive ("CT", not "ct" in a word).
_PET_SPECT_CT = re.compile(
    r"\b(?:PET|SPECT)\s*[/-]?\s*(?:CT|computed\s+tomograph\w*)\b|\bCT\s*[/-]\s*(?:PET|SPECT)\b", re.IGNORECASE
)
_CBCT = re.compile(r"\bCBCT\b|\bcone[\s-]+beam\b|\bmicro[\s-]?(?:CT|computed)|[µμ][\s-]?CT\b", re.IGNORECASE)
_CT_ABBREVIATIONS = re.compile(r"\b(?:CT|CTs|CTA|HRCT|MDCT|MSCT|CECT|NCCT|NECT|CCTA|CTPA)\b")
_CT_WORDS = re.compile(r"\bcomput(?:ed|eri[sz]ed)\s+(?:axial\s+)?tomograph\w*", re.IGNORECASE)
_OTHER_ABBREVIATIONS = re.compile(r"\b(?:MRI|MR|MRA|fMRI|FLAIR|DWI|PET|SPECT|OCT|DSA)\b|\bH&E\b")
_OTHER_WORDS = re.compile(
    r"magnetic\s+resonance|\bT[12][\s-]weighted|diffusion[\s-]weighted|\bx[\s-]?rays?\b|\bradiographs?\b|"
    r"\bradiography\b|\bultrasound\w*|ultrasonograph\w*|\bsonograph\w*|echocardiograph\w*|\bdoppler\b|"
    r"mammogra\w*|scintigra\w*|endoscop\w*|histolog\w*|histopatholog\w*|ha?ematoxylin|immunohistochem\w*|"
    r"microscop\w*|\bfundus\b|digital\s+subtraction\s+angiograph\w*",
    re.IGNORECASE,
)


class Row(NamedTuple):
    """One usable CSV row."""

    number: int  # 1-based data row in its CSV
    source: str  # "train_2.csv:12"
    upstream_split: str  # "train" / "test", from the file name
    figure: str  # Figure_path, validated
    caption: str
    question: str
    choices: tuple[str, str, str, str]  # "" for an empty choice
    letter: str
    answer: str  # answer text (v1), or the choice text (v2)


# ---------------------------------------------------------------------------------------------------------------
# Parsing and the CT filter
# ---------------------------------------------------------------------------------------------------------------


def pmcid(figure_path: str) -> str:
    """The article of a figure: ``Figure_path.split('_')[0]`` of its file name (``PMC1064097_F1.jpg`` →
    ``PMC1064097``)."""
    return Path(figure_path).name.split("_")[0]


def strip_choice_letter(text: str, letter: str | None = None) -> str:
    """A choice without its letter prefix (``"A:Diffuse"``, ``" A:"``, ``"A. x"``, ``"(A) x"`` → ``"Diffuse"``, ``""``,
    ``"x"``, ``"x"``); with ``letter``, only that letter's prefix is removed."""
    match = _CHOICE_PREFIX.match(text)
    if match and (letter is None or (match.group(1) or match.group(2)).upper() == letter):
        return text[match.end() :].strip()
    return text.strip()


def ct_filter(text: str) -> tuple[str | None, str]:
    """Apply the CT rule of the module docstring to a figure's caption + questions + correct answers.

    Returns:
        ``(None, evidence)`` to keep it (evidence = the CT keyword found), or ``(reason, detail)`` with a reason of
        :data:`FILTER_REASONS`.
    """
    for reason, pattern in (("pet_spect_ct", _PET_SPECT_CT), ("cbct_or_micro_ct", _CBCT)):
        match = pattern.search(text)
        if match:
            return reason, f"matched {match.group(0)!r}"
    ct = _CT_ABBREVIATIONS.search(text) or _CT_WORDS.search(text)
    if ct is None:
        return "not_ct", "no CT keyword in the caption, questions or answers"
    other = _OTHER_ABBREVIATIONS.search(text) or _OTHER_WORDS.search(text)
    if other is not None:
        return "mixed_modality", f"CT ({ct.group(0)!r}) and another modality ({other.group(0)!r})"
    return None, ct.group(0)


def _volume_id(figure: str) -> str:
    return path_unit_id(figure, figure.rsplit(".", 1)[0])


def read_pmc_csv(path: Path) -> tuple[list[Row], list[dict[str, Any]], str, list[str]]:
    """Read one PMC-VQA CSV (v1 or v2 schema, recognised from the header).

    Returns:
        ``(rows, skipped, schema, ignored columns)``.

    Raises:
        BuildError: no header, or a required column is missing.
    """
    upstream_split = "test" if "test" in path.stem.lower() else "train"
    rows: list[Row] = []
    skipped: list[dict[str, Any]] = []
    with UpstreamCSV(path, expected="a PMC-VQA header") as table:
        names = table.names
        answer_text = next((c for c in ("Answer", "Anwser") if c in names), None)
        if "Answer_label" in names:
            schema, letter_column = "v1", "Answer_label"
        else:
            schema, letter_column, answer_text = "v2", answer_text, None
        required = ["Figure_path", "Question", *(f"Choice {x}" for x in CHOICE_LETTERS)]
        table.require([*required, letter_column or "Answer"])
        used = {*required, letter_column, answer_text, "Caption"}
        ignored = table.ignored_columns(used)
        for number, source, values in table.rows([c for c in used if c in names], skipped):
            try:
                figure = safe_relpath(values["Figure_path"])
            except UnsafePathError as err:
                skipped.append(skip_entry("unsafe_path", str(err), source=source))
                continue
            unit_id = _volume_id(figure)

            def bad(detail: str, unit_id: str = unit_id, source: str = source) -> None:
                skipped.append(skip_entry("malformed_row", detail, unit_id=unit_id, source=source))

            if not figure.lower().endswith(_IMAGE_SUFFIXES) or not pmcid(figure):
                bad(f"Figure_path {figure!r} is not a <PMCID>_<figure>.jpg/.png file name")
                continue
            if not values["Question"]:
                bad("empty Question")
                continue
            choices = tuple(
                "" if c.lower() in NA_VALUES else c
                for c in (strip_choice_letter(values[f"Choice {x}"], x) for x in CHOICE_LETTERS)
            )
            raw_letter = values[letter_column]
            letter = raw_letter.strip("().:").strip().upper()
            if len(letter) != 1 and _CHOICE_PREFIX.match(raw_letter):  # "B:Focal uptake" style
                match = _CHOICE_PREFIX.match(raw_letter)
                letter = (match.group(1) or match.group(2)).upper()
            if len(letter) != 1 or letter not in CHOICE_LETTERS:
                keys = [choice_key(c) for c in choices]
                wanted = choice_key(strip_choice_letter(raw_letter))
                letter = CHOICE_LETTERS[keys.index(wanted)] if wanted and wanted in keys else ""
            if not letter:
                bad(f"{letter_column} {raw_letter!r} is neither A-D nor a choice text")
                continue
            choice = choices[CHOICE_LETTERS.index(letter)]
            if not choice:
                bad(f"{letter_column} {letter} points at an empty choice")
                continue
            answer = strip_choice_letter(values[answer_text], letter) if answer_text else ""
            if answer.lower() in NA_VALUES:
                answer = choice
            caption = values.get("Caption", "")
            caption = "" if caption.lower() in NA_VALUES else caption
            rows.append(
                Row(number, source, upstream_split, figure, caption, values["Question"], choices, letter, answer)
            )
    return rows, skipped, schema, ignored


# ---------------------------------------------------------------------------------------------------------------
# The builder
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PMCVQABuildConfig:
    """What to build: one field per setting, declared once; its ``help`` says what it does, and the build
    command (``--help``) takes it as an option of the same name.
    """

    data_root: str = field(metadata={"help": "The downloaded PMC-VQA repository (holds the CSVs)."})
    output_dir: str = field(metadata={"help": "Folder to write the dataset to (created)."})
    version: str = field(
        default="v2", metadata={"help": "v2 (train_2.csv, test_2.csv, images_2/) | v1 (train.csv, test.csv, images/)."}
    )
    csv_files: tuple[str, ...] | None = field(
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
    split_ratios: tuple[float, float, float] = field(
        default=DEFAULT_RATIOS, metadata={"help": "Train / validation / test fractions of articles."}
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
    _paths: dict[str, str] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        for name, value, allowed in (("version", self.version, VERSIONS), ("mode", self.mode, ANSWER_MODES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.prompt not in PROMPTS:
            raise ValueError(f"prompt must be one of {PROMPTS}, got {self.prompt!r}")
        self.split_ratios = tuple(float(r) for r in self.split_ratios)
        assign_split("check", self.seed, self.split_ratios)  # validates the ratios
        self.csv_files = tuple(self.csv_files or DEFAULT_CSV_FILES[self.version])
        if not self.csv_files or len(set(self.csv_files)) != len(self.csv_files):
            raise ValueError(f"csv_files must be distinct file names, got {self.csv_files}")
        root = Path(self.data_root).expanduser().resolve()
        image_dir = (
            Path(self.image_dir).expanduser().resolve() if self.image_dir else root / DEFAULT_IMAGE_DIRS[self.version]
        )
        self._paths = {"root": str(root), "image_dir": str(image_dir)}

    @property
    def paths(self) -> dict[str, Path]:
        """``root`` and ``image_dir`` (absolute)."""
        return {key: Path(value) for key, value in self._paths.items()}


class PMCVQABuilder(DatasetBuilder):
    """PMC-VQA multiple-choice and open questions on CT figures (2D, single-slice volumes)."""

    name = "pmc_vqa"
    script = "datasets_scripts/build_pmc_vqa.py"
    owned_paths = ("source", "volumes")

    def __init__(self, config: PMCVQABuildConfig):
        self.cfg = config

    def config(self) -> dict[str, Any]:
        values = asdict(self.cfg)
        for key in ("output_dir", "data_root", "image_dir", "_paths"):
            values.pop(key, None)
        values["paths"] = dict(self.cfg._paths)
        return values

    def extra_features(self) -> dict[str, Any]:
        import datasets

        string = datasets.Value("string")
        return {
            "image_path": string,
            "choices": datasets.List(string),
            "intensity": string,
            "ct_evidence": string,
            "upstream_split": string,
            "source_row": string,
        }

    def unit_dirs(self, unit: WorkUnit) -> list[str]:
        return [f"volumes/{unit.unit_id}"]

    # -- planning --------------------------------------------------------------------------------------------------

    def prepare(self, out_dir: Path) -> None:
        image_dir = self.cfg.paths["image_dir"]
        if not image_dir.is_dir():
            raise BuildError(
                f"image folder {image_dir} not found: extract the image archive there or pass --image_dir"
            )
        link_folder(out_dir, "source/images", image_dir)

    def plan(self) -> Plan:
        cfg = self.cfg
        skipped: list[dict[str, Any]] = []
        filtered: list[dict[str, Any]] = []
        counters: dict[str, Counter] = defaultdict(Counter)
        figures: dict[str, list[Row]] = {}
        seen: set[tuple] = set()
        for name in cfg.csv_files:
            path = cfg.paths["root"] / name
            if not path.is_file():
                raise BuildError(f"{path} not found: expected the PMC-VQA CSVs in {cfg.paths['root']} (--csv_files)")
            rows, bad, schema, ignored = read_pmc_csv(path)
            skipped.extend(bad)
            counters["schemas"][f"{name}: {schema}"] = len(rows)
            counters["ignored_columns"].update(f"{name}: {c}" for c in ignored)
            for row in rows:
                key = (row.figure, choice_key(row.question), tuple(choice_key(c) for c in row.choices), row.letter)
                if key in seen:
                    counters["rows"]["repeated"] += 1
                    continue
                seen.add(key)
                figures.setdefault(row.figure, []).append(row)

        kept: list[tuple[str, list[Row], str]] = []
        for figure in sorted(figures, key=lambda f: (pmcid(f), f)):
            rows = figures[figure]
            if not cfg.ct_filter:
                kept.append((figure, rows, ""))
                continue
            texts = [
                t for r in rows for t in (r.caption, r.question, r.choices[CHOICE_LETTERS.index(r.letter)], r.answer)
            ]
            reason, detail = ct_filter("\n".join(dict.fromkeys(t for t in texts if t)))
            if reason is None:
                kept.append((figure, rows, detail))
                counters["ct_filter"]["kept figures"] += 1
                counters["ct_filter"]["kept rows"] += len(rows)
                continue
            counters["filtered figures"][reason] += 1
            filtered.append(
                skip_entry(reason, detail, unit_id=_volume_id(figure), source=rows[0].source, rows=len(rows))
            )

        units = []
        for figure, rows, evidence in kept:
            article = pmcid(figure)
            split = assign_split(article, cfg.seed, cfg.split_ratios)
            units.append(WorkUnit(_volume_id(figure), article, split, payload=(figure, rows, evidence)))
        return Plan(
            units=units,
            skipped=skipped,
            counters={name: dict(values) for name, values in counters.items() if values},
            filtered=filtered,
        )

    # -- processing ------------------------------------------------------------------------------------------------

    def process(self, unit: WorkUnit, out_dir: Path) -> UnitResult:
        from PIL import Image

        cfg = self.cfg
        figure, rows, evidence = unit.payload
        result = UnitResult()
        path = cfg.paths["image_dir"] / figure
        if not path.is_file():
            detail = f"{figure} not found in {cfg.paths['image_dir']}"
            result.skipped.append(skip_entry("missing_volume", detail, unit_id=unit.unit_id, rows=len(rows)))
            return result
        image_path = f"source/images/{figure}"
        volume_path = image_path
        if cfg.validate_files or cfg.convert_images:
            try:
                with Image.open(path) as image:
                    grey = np.asarray(image.convert("L"), dtype=np.float32) / np.float32(255.0)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
                detail = f"{figure}: cannot decode the image ({type(err).__name__}: {err})"
                result.skipped.append(skip_entry("unreadable_volume", detail, unit_id=unit.unit_id, rows=len(rows)))
                return result
            if cfg.convert_images:
                volume_path = f"volumes/{unit.unit_id}/{unit.unit_id}.npy"
                with atomic_output(out_dir / volume_path) as tmp:
                    np.save(tmp, grey[None])  # (1, H, W): a single-slice volume

        _, whole = rewrite_configs(cfg.prompt)
        config = RewriteConfig(color=whole.color, prompt=False, normalize_anatomy=False)
        normalizer = RadLexNormalizer()

        def normalize(text: str) -> str:
            return normalizer.normalize_text(text) if cfg.normalize_anatomy and text else text

        answers: Counter[str] = Counter()
        for row in rows:
            if choice_key(row.answer) != choice_key(row.choices[CHOICE_LETTERS.index(row.letter)]):
                answers["answer text differs from the choice text"] += 1
            choices = [normalize(c) for c in row.choices]
            result.records += multiple_choice_records(
                normalize(row.question),
                choices,
                row.letter,
                normalize(row.answer),
                mode=cfg.mode,
                config=config,
                normalizer=normalizer,
                source=row.source,
                volume_path=volume_path,
                mask_path=None,
                mask_source=None,
                roi=None,
                question_type=QUESTION_TYPE,
                split=unit.split,
                patient_id=unit.patient_id,
                volume_id=unit.unit_id,
                extra={
                    "image_path": image_path,
                    "choices": choices,
                    "intensity": "unit",
                    "ct_evidence": evidence,
                    "upstream_split": row.upstream_split,
                    "source_row": row.source,
                },
            )
        if answers:
            result.counters["answers"] = dict(answers)
        return result

    # -- card ------------------------------------------------------------------------------------------------------

    def card(self, summary: BuildSummary) -> dict[str, Any]:
        cfg = self.cfg
        counters = summary.counters
        notes = [
            f"Read {', '.join(f'`{name}`' for name in cfg.csv_files)} "
            f"({', '.join(f'{k}: {v} rows' for k, v in counters.get('schemas', {}).items())}); "
            f"{counters.get('rows', {}).get('repeated', 0)} rows repeated across files were kept once.",
            f"Splits by article (PMCID = `Figure_path.split('_')[0]`), fractions {list(cfg.split_ratios)} of the "
            f"articles (hash of the PMCID, seed {cfg.seed}), over upstream train and test together "
            "(`upstream_split` keeps the origin of each row); a test asserts that no PMCID crosses splits.",
        ]
        if cfg.ct_filter:
            kept = counters.get("ct_filter", {})
            rows = counters.get("filtered", {})
            figures = counters.get("filtered figures", {})
            excluded = "; ".join(f"{r}: {rows[r]} rows ({figures[r]} figures)" for r in FILTER_REASONS if r in rows)
            notes.append(
                f"CT filter (`med3dqwen.builders.pmc_vqa.ct_filter`, on each figure's caption, questions and correct "
                f"answers): kept {kept.get('kept figures', 0)} figures ({kept.get('kept rows', 0)} rows); left out "
                f"{excluded or 'nothing'}. Left-out figures are listed in `filtered.jsonl` (not `skipped.jsonl`)."
            )
        else:
            notes.append("Built without the CT filter: every modality is included.")
        differs = counters.get("answers", {}).get("answer text differs from the choice text", 0)
        if differs:
            notes.append(
                f"{differs} rows have an answer text that differs from the text of their answer letter's choice: "
                "the closed answer uses the choice text, the open answer the answer text."
            )
        ignored = counters.get("ignored_columns", {})
        if ignored:
            notes.append(f"Ignored CSV columns: {', '.join(f'`{c}`' for c in ignored)}.")
        modes = {"closed": "closed (multiple choice)", "open": "open", "both": "closed and open"}
        notes.append(
            f"Answer modes: {modes[cfg.mode]}. Closed: the question + `Choices: A. ... B. ... C. ... D. ...` (letter "
            "prefixes of upstream choices removed), answer `<letter>. <choice>`, `closed_answer` = the letter, "
            "`closed_choices` = the letters listed, `closed_label` = letter index (A = 0); open: the question alone, "
            "answer = the upstream answer text (v1) or the correct choice (v2)."
        )
        return {
            "pretty_name": "PMC-VQA, CT figures (Med3DQwen build)",
            "summary": (
                "Multiple-choice and open questions about CT figures of PubMed Central articles (PMC-VQA), kept by a "
                "documented CT keyword filter. The figures are 2D: each is a single-slice grey volume (D = 1, "
                "`intensity: unit`, values in [0, 1], no HU window) that the processor repeats to the model's depth."
            ),
            "prompt_description": (
                "No boundary prompt: PMC-VQA has no masks, so every question has the no-prompt wording and system "
                f"prompt (build option `--prompt {cfg.prompt}` is recorded only)."
            ),
            "source": (
                "[xmcmic/PMC-VQA](https://huggingface.co/datasets/xmcmic/PMC-VQA). The dataset card gives no licence; "
                "the figures come from PubMed Central Open Access articles, each under its own licence (see "
                "`oa_comm_use_file_list.csv` upstream for the commercially usable subset). Figures are not copied: "
                "`source/images` links to your download and is never pushed."
            ),
            "license": "other",
            "citation": PMC_VQA_CITATION,
            "notes": notes,
            "files_description": (
                '`folder / sample["image_path"]` is the upstream figure (through the `source/images` link). Read it '
                "as grey (`PIL.Image.open(...).convert('L')`, divided by 255) and treat it as a (1, H, W) volume. "
                + (
                    '`folder / sample["volume_path"]` is that array, saved as `.npy` under `volumes/`. '
                    if cfg.convert_images
                    else "`volume_path` is the same file as `image_path`. "
                )
                + "`filtered.jsonl` lists the figures the CT filter left out and why."
            ),
            "extra_fields": {
                "image_path": "the upstream figure, relative to this folder (through `source/images`)",
                "choices": 'the four choice texts A-D, letter prefixes removed (`""` for an empty choice)',
                "intensity": "`unit`: 8-bit grey scaled to [0, 1], not HU: no HU window",
                "ct_evidence": "the CT keyword that kept the figure (empty without the filter)",
                "upstream_split": "the upstream file the row comes from: `train` or `test`",
                "source_row": "upstream CSV file and 1-based data row, e.g. `train_2.csv:12`",
            },
            "tags": ["pmc-vqa", "2d-figures", "multiple-choice"],
        }


def build_pmc_vqa_dataset(config: PMCVQABuildConfig, args: BuildArguments | None = None) -> BuildSummary:
    """Build the CT subset of PMC-VQA into ``config.output_dir`` (see the module docstring).

    Args:
        config: see :class:`PMCVQABuildConfig`.
        args: how to run (processes, shards, resume, strict, push).

    Returns:
        A :class:`~med3dqwen.builders.engine.BuildSummary`.
    """
    return run_build(PMCVQABuilder(config), config.output_dir, args)
