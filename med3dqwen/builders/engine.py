"""Shared machinery of the dataset builders (``datasets_scripts/build_<name>.py``): resumable, parallel, sharded.

A builder lists its dataset as work units (one per volume), :meth:`DatasetBuilder.process` turns one unit into
records, and :func:`run_build` plans, shards, processes (one atomic ``.work/units/<id>.json`` per finished unit, so a
killed build resumes) and merges in plan order, so the output is byte-identical however it was run. The output
folder, sharding and how to write a new builder: ``docs/builders.md``.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TextIO

import numpy as np

from med3dqwen.builders.cards import DatasetStats, render_dataset_card
from med3dqwen.builders.hub import push_dataset_to_hub
from med3dqwen.data.rewrite import RewriteConfig
from med3dqwen.data.schema import RECORD_FORMATS, record_features, to_format
from med3dqwen.data.splits import SPLIT_NAMES
from med3dqwen.io import atomic_output, read_jsonl, safe_relpath


__all__ = [
    "PNG_MODES",
    "PROMPTS",
    "BuildArguments",
    "BuildError",
    "BuildSummary",
    "DatasetBuilder",
    "Plan",
    "UnitResult",
    "WorkUnit",
    "link_folder",
    "merge_build",
    "read_skipped",
    "read_unit",
    "rewrite_configs",
    "run_build",
    "shard_of",
    "skip_entry",
    "stable_index",
    "write_prompt_pngs",
]


logger = logging.getLogger(__name__)

PROMPTS = ("red", "blue", "none")
"""``--prompt`` values: contour colour of the rewritten questions, or ``none`` for the no-prompt variant."""
PNG_MODES = ("none", "montage", "stack")
"""``--write_png`` values: no PNGs, one montage per (volume, ROI), or the montage plus one PNG per ROI slice."""

WORK_DIR = ".work"
_UNIT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_FORMAT_VERSION = 2
"""Version of the work in ``.work/`` (unit records): 2 added ``closed_answer`` / ``closed_choices``. Work of another
version is not resumed or merged."""


class BuildError(RuntimeError):
    """A build cannot go on: ``--strict`` met a bad row, a merge found unfinished units, a configuration changed."""


def skip_entry(
    reason: str, detail: str, *, unit_id: str | None = None, source: str | None = None, rows: int = 1
) -> dict[str, Any]:
    """One line of ``skipped.jsonl``.

    Args:
        reason: short machine-readable reason (``missing_volume``, ``missing_mask``, ``unreadable_volume``,
            ``empty_roi``, ``unknown_anatomy``, ``malformed_row``, ``unsafe_path``, ...); the card counts rows per
            reason.
        detail: what exactly was wrong (file name, bad value).
        unit_id: the volume the item belongs to, if known.
        source: where the item comes from, e.g. ``"train_vqa_presence.csv:12"`` (file and 1-based data row).
        rows: how many upstream rows this entry stands for (a missing volume skips all rows about it at once).
    """
    return {"reason": reason, "unit_id": unit_id, "source": source, "rows": int(rows), "detail": detail}


def stable_index(seed: int, key: str, n: int) -> int:
    """A deterministic pseudo-random index in ``range(n)`` for ``(seed, key)``, identical in every process.

    Use it to pick a question template per row: the choice depends on the row's content, not on the order rows are
    processed in.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % n


def shard_of(unit_id: str, num_shards: int) -> int:
    """The shard of a unit: ``int(sha256(unit_id).hexdigest()[:16], 16) % num_shards`` (see the module docstring)."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    return int(hashlib.sha256(unit_id.encode()).hexdigest()[:16], 16) % num_shards


def rewrite_configs(prompt: str) -> tuple[RewriteConfig, RewriteConfig]:
    """``(roi_config, whole_volume_config)`` for a ``--prompt`` value.

    Questions about a region use the contour wording in a prompted build; whole-volume questions (no ROI, so no
    contour) keep the no-prompt wording in every build, as do all questions of a ``none`` build.
    """
    if prompt not in PROMPTS:
        raise ValueError(f"prompt must be one of {PROMPTS}, got {prompt!r}")
    unprompted = RewriteConfig(prompt=False)
    return (RewriteConfig(color=prompt) if prompt != "none" else unprompted), unprompted


def write_prompt_pngs(
    volume_hu: np.ndarray,
    mask: np.ndarray,
    out_dir: str | os.PathLike,
    volume_id: str,
    name: str,
    *,
    prompt: str,
    write_png: str,
    thickness: int = 3,
) -> list[str]:
    """Write the prompt PNGs of one (volume, ROI) under ``out_dir/prompts/<volume_id>/`` and return their paths
    relative to ``out_dir`` (slices in order, then the montage), or ``[]`` for ``prompt="none"``,
    ``write_png="none"`` or an empty ROI. Call it once per (volume, ROI) and share the list between the questions.

    Args:
        volume_hu: (D, H, W) HU volume. mask: (D, H, W) ROI mask on the same grid.
        out_dir: the dataset folder. volume_id: sub-folder. name: file prefix (letters, digits, ``_``, ``-``).
        prompt: contour colour or ``none``. write_png: ``none`` | ``montage`` | ``stack``. thickness: contour px.
    """
    from med3dqwen.io import prompt_png_stack

    if write_png not in PNG_MODES:
        raise ValueError(f"write_png must be one of {PNG_MODES}, got {write_png!r}")
    if prompt == "none" or write_png == "none":
        return []
    out_dir = Path(out_dir)
    written = prompt_png_stack(
        volume_hu,
        mask,
        out_dir / "prompts" / safe_relpath(volume_id),
        color=prompt,
        thickness=thickness,
        write_slices=write_png == "stack",
        prefix=name,
    )
    files = written.slices + ([written.montage] if written.montage else [])
    return [Path(os.path.relpath(p, out_dir)).as_posix() for p in files]


def link_folder(out_dir: str | os.PathLike, link: str, target: str | os.PathLike) -> Path:
    """Create or update the symlink ``out_dir/link`` → ``target`` (absolute), atomically.

    Builders of large upstream datasets use this instead of copying volumes: records then hold paths like
    ``source/train_preprocessed/...`` that are relative to the dataset folder and resolve through the link.

    Raises:
        FileExistsError: ``out_dir/link`` exists and is not a symlink.
    """
    path = Path(out_dir) / safe_relpath(link)
    target = Path(target).resolve()
    if path.is_symlink() and Path(os.readlink(path)) == target:
        return path
    if path.exists() and not path.is_symlink():
        raise FileExistsError(f"{path} exists and is not a symlink; remove it or use another output folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp, target_is_directory=True)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Units, plans, builders
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkUnit:
    """One volume to build.

    Args:
        unit_id: unique, file-name safe id (letters, digits, ``.``, ``_``, ``-``), usually the volume id.
        patient_id: the split unit (patient, or article for PMC-VQA).
        split: ``train`` / ``validation`` / ``test``, decided at planning time (by patient); every record of the unit
            carries it (checked).
        payload: the builder's inputs for this volume (picklable), e.g. its CSV rows.
    """

    unit_id: str
    patient_id: str
    split: str
    payload: Any = None


@dataclass
class UnitResult:
    """What processing one unit gave.

    Args:
        records: JSONL records, in their final order within the unit.
        skipped: :func:`skip_entry` dicts.
        counters: named counters summed over units by the merge, e.g. ``{"deduplicated": {"presence": 3}}``.
    """

    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    counters: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass
class Plan:
    """The units of a dataset in canonical (output) order, and what was left out before processing.

    Args:
        units: the work units.
        skipped: rows rejected as bad data (:func:`skip_entry` dicts), written to ``skipped.jsonl``; ``--strict``
            stops at the first.
        counters: named counters, summed with the units' ones by the merge.
        filtered: rows left out on purpose by a documented rule (not chest CTs, a case shared between splits, a
            figure that is not CT): :func:`skip_entry` dicts whose reason names the rule. The merge writes them to
            ``filtered.jsonl`` (the format of ``skipped.jsonl``) and counts their rows per reason in
            ``counters["filtered"]``, which the card reports; ``--strict`` does not stop at them. ``None`` (a builder
            without such a rule) writes no ``filtered.jsonl``; ``[]`` writes an empty one.
    """

    units: list[WorkUnit]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    counters: dict[str, dict[str, int]] = field(default_factory=dict)
    filtered: list[dict[str, Any]] | None = None


class DatasetBuilder(abc.ABC):
    """A dataset builder: planning, per-unit processing and the card text. Must be picklable."""

    name: ClassVar[str] = "dataset"
    """Short name, used in progress bars and logs."""
    script: ClassVar[str] = ""
    """The build script, named in the card (``datasets_scripts/build_<name>.py``)."""
    owned_paths: ClassVar[tuple[str, ...]] = ("prompts",)
    """Top-level entries of the output folder this builder writes (removed by ``--overwrite``)."""
    hub_allow_patterns: ClassVar[tuple[str, ...]] = ("README.md", "data/*.jsonl", "skipped.jsonl", "filtered.jsonl")
    """What ``--push_to_hub`` uploads: ``huggingface_hub`` patterns (``fnmatch``, ``*`` crosses ``/``) matched against
    paths relative to the output folder. By default the dataset card and the JSONL files only: prompt PNGs, masks
    and converted volumes are renderings of the upstream data, whose licence may forbid redistribution, and
    ``source/`` links to it. A builder whose files may be redistributed adds them (the phantom: its synthetic
    volumes and PNGs)."""
    hub_ignore_patterns: ClassVar[tuple[str, ...]] = ()
    """Patterns taken out of what :attr:`hub_allow_patterns` allows (``.work/`` and temporaries always are)."""

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """Everything that changes the output (not the output folder, not ``num_proc`` / shards), JSON-serialisable."""

    @abc.abstractmethod
    def plan(self) -> Plan:
        """Read the upstream index (CSVs, folder listing) and return the units in canonical order."""

    @abc.abstractmethod
    def process(self, unit: WorkUnit, out_dir: Path) -> UnitResult:
        """Build one unit: write its files under ``out_dir`` (atomically) and return its records."""

    @abc.abstractmethod
    def card(self, summary: BuildSummary) -> dict[str, Any]:
        """Keyword arguments of :func:`~med3dqwen.builders.cards.render_dataset_card` besides the counts:
        ``pretty_name``, ``summary``, ``prompt_description``, ``source``, ``license``, ``citation``, and optionally
        ``notes``, ``files_description``, ``extra_fields``, ``tags``."""

    def prepare(self, out_dir: Path) -> None:  # noqa: B027 (optional hook)
        """Set up the output folder before planning (e.g. :func:`link_folder`); must be idempotent."""

    def unit_dirs(self, unit: WorkUnit) -> list[str]:
        """Folders (relative to the output folder) that hold only this unit's files. They are deleted before the
        unit is (re)built, so files of an attempt that was killed half-way never survive into the output."""
        return [f"prompts/{unit.unit_id}"]

    def extra_features(self) -> dict[str, Any]:
        """``datasets`` feature types of the builder's own record fields (the ``extra`` of ``build_record``)."""
        return {}

    def features(self, format: str = "trl"):
        """The ``datasets.Features`` of this builder's records in layout ``format`` (:mod:`~med3dqwen.data.schema`)."""
        return record_features(self.extra_features(), format)


# ---------------------------------------------------------------------------------------------------------------
# Arguments and results
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class BuildArguments:
    """How to run a build: the options every build command shares (the dataset's own options are the fields of its
    ``*BuildConfig``; :func:`~med3dqwen.builders.cli.make_build_parser` parses both)."""

    num_proc: int = field(default=1, metadata={"help": "Worker processes (multiprocessing pool; 1 = in process)."})
    num_shards: int = field(
        default=1,
        metadata={
            "help": "Split the volumes into this many shards (by a hash of the volume id); a shard run builds only "
            "its volumes and does not merge. Run every --shard_index, then the same command with --merge_only."
        },
    )
    shard_index: int = field(default=0, metadata={"help": "Which shard this run builds (0 .. num_shards-1)."})
    merge_only: bool = field(
        default=False,
        metadata={"help": "Only assemble data/*.jsonl, skipped.jsonl and README.md from the finished volumes."},
    )
    strict: bool = field(default=False, metadata={"help": "Stop at the first bad row instead of skipping it."})
    overwrite: bool = field(
        default=False,
        metadata={"help": "Delete a previous build in output_dir (its .work/, data/ and the builder's files) first."},
    )
    progress: bool = field(default=True, metadata={"help": "Show progress bars (tqdm, on stderr)."})
    format: str = field(
        default="trl",
        metadata={
            "help": "Record layout of data/*.jsonl: trl (messages with content lists and an image placeholder, media "
            "as path columns) | paper ([system, user, vision, assistant], vision = 'nifti:...; prompt_png:[...]')."
        },
    )
    start_method: str = field(
        default="spawn", metadata={"help": "multiprocessing start method of the pool: spawn | forkserver | fork."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the built folder to the Hugging Face Hub."})
    hub_repo_id: str | None = field(default=None, metadata={"help": "Hub dataset repo id (user/name) to push to."})
    hub_private: bool = field(default=True, metadata={"help": "Create the Hub repo as private."})

    def __post_init__(self) -> None:
        if self.num_proc < 1:
            raise ValueError(f"num_proc must be >= 1, got {self.num_proc}")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"need 0 <= shard_index < num_shards, got {self.shard_index} and {self.num_shards}")
        if self.start_method not in multiprocessing.get_all_start_methods():
            raise ValueError(
                f"start_method must be one of {multiprocessing.get_all_start_methods()}, got {self.start_method!r}"
            )
        if self.format not in RECORD_FORMATS:
            raise ValueError(f"format must be one of {RECORD_FORMATS}, got {self.format!r}")
        if self.push_to_hub and not self.hub_repo_id:
            raise ValueError("--push_to_hub needs --hub_repo_id")
        if self.push_to_hub and self.num_shards > 1 and not self.merge_only:
            raise ValueError("--push_to_hub happens after the merge: pass it to the --merge_only run")


@dataclass
class BuildSummary:
    """Result of :func:`run_build` / :func:`merge_build`. Counts are filled only when the dataset was merged."""

    output_dir: Path
    merged: bool = False
    units_total: int = 0
    units_in_shard: int = 0
    units_processed: int = 0
    units_reused: int = 0
    seconds: float = 0.0
    questions: dict[str, int] = field(default_factory=dict)
    volumes: dict[str, int] = field(default_factory=dict)
    patients: dict[str, int] = field(default_factory=dict)
    question_types: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    counters: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def volumes_per_minute(self) -> float:
        """Units processed by this run per minute of wall time (0 when nothing was processed)."""
        return 60.0 * self.units_processed / self.seconds if self.units_processed and self.seconds > 0 else 0.0


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------


def _unit_path(out: Path, unit_id: str) -> Path:
    return out / WORK_DIR / "units" / f"{unit_id}.json"


def _merge_counters(into: dict[str, Counter], counters: Mapping[str, Mapping[str, int]]) -> None:
    for name, values in counters.items():
        into.setdefault(name, Counter()).update(values)


def _check_plan(plan: Plan) -> None:
    seen: set[str] = set()
    for unit in plan.units:
        if not _UNIT_ID.match(unit.unit_id):
            raise BuildError(f"unit id {unit.unit_id!r} is not file-name safe")
        if unit.unit_id in seen:
            raise BuildError(f"unit id {unit.unit_id!r} appears twice in the plan")
        if unit.split not in SPLIT_NAMES:
            raise BuildError(f"unit {unit.unit_id!r} has split {unit.split!r}, expected one of {SPLIT_NAMES}")
        seen.add(unit.unit_id)


def _read_marker(out: Path) -> dict[str, Any] | None:
    """The content of ``out/.work/config.json``, the marker of a folder a build of ours writes into (written before
    anything else), or ``None`` if the folder has none. A file that is not ours raises :class:`BuildError`."""
    path = out / WORK_DIR / "config.json"
    if not path.is_file():
        return None
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BuildError(f"{path} is not the configuration file of a build ({err}); use another --output_dir") from err
    if not isinstance(found, dict) or not {"format", "builder", "config"} <= set(found):
        raise BuildError(f"{path} is not the configuration file of a build; use another --output_dir")
    return found


def _output_names(builder: DatasetBuilder) -> tuple[str, ...]:
    """Top-level entries of the output folder a build writes (besides ``.work/``)."""
    return ("data", "skipped.jsonl", "filtered.jsonl", "README.md", *builder.owned_paths)


def _check_output_folder(out: Path, builder: DatasetBuilder, overwrite: bool) -> None:
    """Refuse to delete or replace files that no build of ours wrote.

    A folder without the marker (``.work/config.json``) that already holds entries a build writes (a user's
    ``README.md``, a ``data/`` folder) is not one of our builds: ``--overwrite`` would delete them and a build would
    replace them (the dataset card replaces ``README.md``), so both stop with a :class:`BuildError` instead.
    """
    if _read_marker(out) is not None:
        return
    names = (WORK_DIR, *_output_names(builder)) if overwrite else _output_names(builder)
    found = [name for name in names if (out / name).exists() or (out / name).is_symlink()]
    if not found:
        return
    if overwrite:
        raise BuildError(
            f"--overwrite would delete {', '.join(found)} in {out}, but no build wrote that folder "
            f"({WORK_DIR}/config.json is missing): delete them yourself, or choose another --output_dir"
        )
    them = "it" if len(found) == 1 else "them"
    raise BuildError(
        f"{out} already holds {', '.join(found)}, which no build wrote ({WORK_DIR}/config.json is missing), and a "
        f"build would replace {them} (README.md becomes the dataset card): move {them} away, or choose another "
        "--output_dir"
    )


def _check_config(out: Path, builder: DatasetBuilder) -> None:
    """Record the build configuration in ``.work/config.json``; refuse to mix work done with another one."""
    wanted = {"format": _FORMAT_VERSION, "builder": builder.name, "config": builder.config()}
    text = json.dumps(wanted, indent=2, sort_keys=True, default=str) + "\n"
    path = out / WORK_DIR / "config.json"
    found = _read_marker(out)
    if found is not None:
        if path.read_text(encoding="utf-8") != text:
            old, new = found.get("config", {}), json.loads(text)["config"]
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if found.get("format") != _FORMAT_VERSION:
                changed.insert(0, f"work format {found.get('format')} -> {_FORMAT_VERSION}, from another med3dqwen")
            raise BuildError(
                f"{out} holds work done with another configuration (changed: {', '.join(changed) or 'builder'}); "
                "re-run with the same arguments, or pass --overwrite, or use another --output_dir"
            )
        return
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _clear_outputs(out: Path, builder: DatasetBuilder) -> None:
    for name in (WORK_DIR, *_output_names(builder)):
        path = out / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)  # never follows the symlinks inside (source/ links stay pointing at the data)


_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]+\.tmp(?:\..*)?$")
"""Names of the temporaries a build creates: ``.<name>.<random characters>.tmp<suffix>`` (:func:`atomic_output`,
through :func:`tempfile.mkstemp`) and ``.<name>.<pid>.tmp`` (the new symlink of :func:`link_folder`)."""


def _remove_temporaries(folder: Path, prefix: str = ".") -> None:
    """Delete the temporaries (files or symlinks) named ``prefix*`` directly in ``folder``: what a killed write
    leaves behind."""
    if folder.is_dir() and not folder.is_symlink():
        for path in folder.glob(f"{prefix}*"):
            if _TEMPORARY.match(path.name) and (path.is_symlink() or path.is_file()):
                path.unlink()


def _remove_all_temporaries(out: Path) -> None:
    """Delete every temporary a killed build left anywhere in ``out`` (never inside the symlinked upstream
    folders). Only safe when no other build process writes into ``out``: at the merge."""
    for dirpath, dirnames, filenames in os.walk(out):  # does not descend into symlinked folders
        for name in (*dirnames, *filenames):
            path = Path(dirpath) / name
            if _TEMPORARY.match(name) and (path.is_symlink() or path.is_file()):
                path.unlink()


def _local_paths(out: Path) -> list[tuple[re.Pattern[str], str]]:
    """How to write the machine's absolute paths relative in ``skipped.jsonl``: each link in the output folder's
    top two levels (:func:`link_folder`'s links to the upstream folders, ``source/<name>``) stands for its target,
    and the output folder for itself (``""``: paths relative to the dataset). Longest path first."""
    pairs: dict[str, str] = {}
    top = list(out.iterdir()) if out.is_dir() else []
    second = [child for entry in top if entry.is_dir() and not entry.is_symlink() for child in entry.iterdir()]
    for path in (*top, *second):  # links are never listed inside: an upstream folder can hold a million files
        if path.is_symlink():
            relative = path.relative_to(out).as_posix()
            for target in (os.readlink(path), str(path.resolve())):
                if os.path.isabs(target):
                    pairs[target] = relative
    for form in {str(out), str(out.absolute()), str(out.resolve())}:
        if os.path.isabs(form):
            pairs[form] = ""
    # A path ends where the next character cannot continue a file name's component (a quote, a space, the end).
    return [
        (re.compile(re.escape(path) + (r"/" if not relative else r"(?=/|[^\w.-]|$)")), relative)
        for path, relative in sorted(pairs.items(), key=lambda item: -len(item[0]))
    ]


def _without_local_paths(entry: dict[str, Any], local: list[tuple[re.Pattern[str], str]]) -> dict[str, Any]:
    """A skipped / filtered entry whose ``detail`` and ``source`` name files relative to the dataset (or through
    its links), never by the absolute paths of this machine (error messages of nibabel, PIL, numpy quote them)."""
    entry = dict(entry)
    for key in ("detail", "source"):
        if isinstance(entry.get(key), str):
            for pattern, relative in local:
                entry[key] = pattern.sub(lambda _, relative=relative: relative, entry[key])
    return entry


def _build_unit(builder: DatasetBuilder, out: Path, unit: WorkUnit, strict: bool) -> int:
    # Leftovers of a killed attempt at this unit: its own folders and a half-written unit file.
    for name in builder.unit_dirs(unit):
        path = out / safe_relpath(name)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
    _remove_temporaries(out / WORK_DIR / "units", f".{unit.unit_id}.json.")
    result = builder.process(unit, out)
    if strict and result.skipped:
        first = result.skipped[0]
        raise BuildError(
            f"--strict: {first['reason']} in {unit.unit_id} ({first.get('source') or 'volume'}): {first['detail']}"
        )
    for record in result.records:
        if record.get("split") != unit.split:
            raise BuildError(f"{unit.unit_id}: a record has split {record.get('split')!r}, the unit {unit.split!r}")
    payload = {
        "unit_id": unit.unit_id,
        "records": result.records,
        "skipped": result.skipped,
        "counters": {name: dict(sorted(values.items())) for name, values in sorted(result.counters.items())},
    }
    with atomic_output(_unit_path(out, unit.unit_id)) as tmp:
        tmp.write_text(json.dumps(payload, ensure_ascii=False) + "\n", encoding="utf-8")
    return len(result.records)


_WORKER: dict[str, Any] = {}


def _init_worker(builder: DatasetBuilder, out: str, strict: bool) -> None:
    _WORKER.update(builder=builder, out=Path(out), strict=strict)


def _worker_build(unit: WorkUnit) -> str:
    _build_unit(_WORKER["builder"], _WORKER["out"], unit, _WORKER["strict"])
    return unit.unit_id


def _process_units(builder: DatasetBuilder, out: Path, units: Sequence[WorkUnit], args: BuildArguments) -> None:
    from tqdm.auto import tqdm

    if not units:
        return
    with tqdm(total=len(units), desc=f"{builder.name} volumes", unit="vol", disable=not args.progress) as bar:
        if args.num_proc == 1:
            for unit in units:
                _build_unit(builder, out, unit, args.strict)
                bar.update()
            return
        context = multiprocessing.get_context(args.start_method)
        pool = context.Pool(
            min(args.num_proc, len(units)), initializer=_init_worker, initargs=(builder, str(out), args.strict)
        )
        try:
            for _ in pool.imap_unordered(_worker_build, units, chunksize=1):
                bar.update()
            pool.close()
        except BaseException:
            pool.terminate()
            raise
        finally:
            pool.join()


def run_build(builder: DatasetBuilder, out_dir: str | os.PathLike, args: BuildArguments | None = None) -> BuildSummary:
    """Build (this shard of) a dataset into ``out_dir``; resume where a previous run stopped; merge when complete.

    Args:
        builder: the dataset builder.
        out_dir: the dataset folder (created).
        args: execution options (default :class:`BuildArguments`).

    Returns:
        A :class:`BuildSummary` (with counts when this run merged).

    Raises:
        BuildError: ``--strict`` and a bad row; ``out_dir`` holds work done with another configuration, or files no
            build wrote (without ``.work/config.json``: a user's ``README.md``, ``data/``), which a build would
            replace and ``--overwrite`` would delete; a merge with unfinished units.
    """
    args = args or BuildArguments()
    out = Path(out_dir)
    start = time.perf_counter()
    _check_output_folder(out, builder, args.overwrite and not args.merge_only)
    if args.overwrite and not args.merge_only:
        _clear_outputs(out, builder)
    out.mkdir(parents=True, exist_ok=True)
    _check_config(out, builder)
    builder.prepare(out)
    plan = builder.plan()
    _check_plan(plan)
    if args.strict and plan.skipped:
        first = plan.skipped[0]
        raise BuildError(f"--strict: {first['reason']} ({first.get('source')}): {first['detail']}")

    summary = BuildSummary(output_dir=out, units_total=len(plan.units))
    if not args.merge_only:
        mine = [u for u in plan.units if shard_of(u.unit_id, args.num_shards) == args.shard_index]
        pending = [u for u in mine if not _unit_path(out, u.unit_id).exists()]
        summary.units_in_shard, summary.units_reused = len(mine), len(mine) - len(pending)
        if summary.units_reused:
            logger.info("%s: %d of %d volumes already built, resuming", builder.name, summary.units_reused, len(mine))
        process_start = time.perf_counter()
        _process_units(builder, out, pending, args)
        summary.units_processed = len(pending)
        summary.seconds = time.perf_counter() - process_start
    if args.merge_only or args.num_shards == 1:
        merged = merge_build(builder, out, plan, format=args.format, hub_repo_id=args.hub_repo_id)
        merged.units_in_shard, merged.units_processed = summary.units_in_shard, summary.units_processed
        merged.units_reused, merged.seconds = summary.units_reused, summary.seconds
        summary = merged
        if args.push_to_hub:
            push_dataset_to_hub(
                out,
                args.hub_repo_id,
                private=args.hub_private,
                allow=builder.hub_allow_patterns,
                ignore=[WORK_DIR, f"{WORK_DIR}/*", ".*.tmp*", "*/.*.tmp*", *builder.hub_ignore_patterns],
            )
    logger.info("%s: done in %.1f s", builder.name, time.perf_counter() - start)
    return summary


def merge_build(
    builder: DatasetBuilder,
    out_dir: str | os.PathLike,
    plan: Plan | None = None,
    *,
    format: str = "trl",
    hub_repo_id: str | None = None,
) -> BuildSummary:
    """Assemble ``data/<split>.jsonl``, ``skipped.jsonl``, ``filtered.jsonl`` (if the plan has a ``filtered`` list)
    and ``README.md`` from the finished units, in plan order.

    Units hold ``trl`` records; each is written in layout ``format`` (:func:`~med3dqwen.data.schema.to_format`), so
    one build can be merged in either layout. Every record is checked against the builder's features (same field
    names), so a builder bug fails here and not in ``load_dataset``. Empty splits get no file (and no entry in the
    card's ``configs``). The card's quick start loads ``hub_repo_id`` when given, else the folder by its name.

    Raises:
        BuildError: units of the plan are not built yet (names how many and the first few), a record does not
            match the features, or a file a record names (volume, mask, prompt PNG) does not exist.
    """
    out = Path(out_dir)
    plan = plan if plan is not None else builder.plan()
    missing = [u.unit_id for u in plan.units if not _unit_path(out, u.unit_id).exists()]
    if missing:
        raise BuildError(
            f"{len(missing)} of {len(plan.units)} volumes are not built yet (e.g. {', '.join(missing[:3])}); "
            "run the missing shards (or the build without --merge_only) first"
        )
    features = builder.features(format)
    names = set(features)
    stats = DatasetStats()
    skipped: Counter[str] = Counter()
    counters: dict[str, Counter] = {}
    _merge_counters(counters, plan.counters)
    data = out / "data"
    # What killed runs left: a merge (data/, skipped.jsonl, README.md), a configuration write, a link.
    _remove_all_temporaries(out)
    with contextlib.ExitStack() as stack:
        files = {}
        for split in SPLIT_NAMES:
            tmp = stack.enter_context(atomic_output(data / f"{split}.jsonl"))
            files[split] = stack.enter_context(open(tmp, "w", encoding="utf-8"))
        skipped_tmp = stack.enter_context(atomic_output(out / "skipped.jsonl"))
        skipped_file = stack.enter_context(open(skipped_tmp, "w", encoding="utf-8"))

        local = _local_paths(out)

        def write_entries(file: TextIO, rows: Counter[str], entries: Iterable[dict[str, Any]]) -> None:
            for entry in entries:
                rows[entry["reason"]] += int(entry.get("rows", 1))
                file.write(json.dumps(_without_local_paths(entry, local), ensure_ascii=False) + "\n")

        write_entries(skipped_file, skipped, plan.skipped)
        if plan.filtered is not None:
            filtered: Counter[str] = Counter()
            with open(stack.enter_context(atomic_output(out / "filtered.jsonl")), "w", encoding="utf-8") as file:
                write_entries(file, filtered, plan.filtered)
            if filtered:
                _merge_counters(counters, {"filtered": filtered})
        checked: set[str] = set()
        for unit in plan.units:
            done = json.loads(_unit_path(out, unit.unit_id).read_text(encoding="utf-8"))
            for record in done["records"]:
                if "prompt_pngs" not in record:
                    raise BuildError(
                        f"{unit.unit_id}: the unit file holds records of an older layout (no prompt_pngs); "
                        "rebuild with --overwrite"
                    )
                _check_media_exist(out, unit.unit_id, record, checked)
                record = to_format(record, format)
                if set(record) != names:
                    raise BuildError(
                        f"{unit.unit_id}: record fields differ from the declared features: missing "
                        f"{sorted(names - set(record))}, unexpected {sorted(set(record) - names)}"
                    )
                files[record["split"]].write(json.dumps(record, ensure_ascii=False) + "\n")
                stats.add(record)
            write_entries(skipped_file, skipped, done["skipped"])
            _merge_counters(counters, done["counters"])
    for split in SPLIT_NAMES:
        if not stats.questions[split]:
            (data / f"{split}.jsonl").unlink()

    summary = BuildSummary(
        output_dir=out,
        merged=True,
        units_total=len(plan.units),
        questions={split: stats.questions[split] for split in SPLIT_NAMES},
        volumes={split: stats.volumes(split) for split in SPLIT_NAMES},
        patients={split: stats.patients(split) for split in SPLIT_NAMES},
        question_types=stats.question_types,
        skipped=dict(sorted(skipped.items())),
        counters={name: dict(sorted(values.items())) for name, values in sorted(counters.items())},
    )
    render_dataset_card(
        out,
        stats=stats,
        builder=builder.script,
        skipped=summary.skipped,
        features=features,
        record_format=format,
        load_path=hub_repo_id,
        **builder.card(summary),
    )
    return summary


def _check_media_exist(out: Path, unit_id: str, record: Mapping[str, Any], checked: set[str]) -> None:
    """Every file a record names (volume, mask, prompt PNGs) exists under ``out``: a dataset never lists media that a
    killed or concurrent build did not write (``checked`` holds the paths seen already, so each is stat'ed once)."""
    paths = [record.get("volume_path"), record.get("mask_path"), *(record.get("prompt_pngs") or [])]
    missing = []
    for path in paths:
        if path is None or path in checked:
            continue
        if not (out / path).exists():
            missing.append(path)
        else:
            checked.add(path)
    if missing:
        raise BuildError(
            f"{unit_id}: {len(missing)} media file(s) its records name do not exist under {out} "
            f"(e.g. {', '.join(missing[:3])}); rebuild the unit with --overwrite"
        )


def read_unit(out_dir: str | os.PathLike, unit_id: str) -> dict[str, Any]:
    """The finished result of one unit (``records``, ``skipped``, ``counters``), e.g. to inspect a volume."""
    return json.loads(_unit_path(Path(out_dir), unit_id).read_text(encoding="utf-8"))


def read_skipped(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The entries of ``skipped.jsonl``."""
    return read_jsonl(Path(out_dir) / "skipped.jsonl")
