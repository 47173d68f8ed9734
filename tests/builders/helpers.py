"""Helpers shared by the dataset builder tests: fixture CSVs, reading a built folder, interrupting and scripts."""

import contextlib
import csv
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from med3dqwen.builders.engine import BuildArguments, DatasetBuilder


REPO = Path(__file__).resolve().parents[2]
QUIET = BuildArguments(progress=False)


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    """Write an upstream CSV as pandas would (comma-joined lists get quotes), creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def read_lines(path: Path) -> list[dict]:
    """The entries of one JSONL file (``skipped.jsonl``, ``filtered.jsonl``, a split)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_records(out: Path) -> list[dict]:
    """Every record of a built dataset folder, split files in name order."""
    return [record for f in sorted((out / "data").glob("*.jsonl")) for record in read_lines(f)]


def find_record(found: list[dict], source: str, answer_type: str) -> dict:
    """The record of an upstream row (``source_row``) with that answer type."""
    return next(r for r in found if r["source_row"] == source and r["answer_type"] == answer_type)


def rows_per_reason(entries: list[dict]) -> Counter:
    """Upstream rows per reason of ``skipped.jsonl`` / ``filtered.jsonl`` entries."""
    counts = Counter()
    for entry in entries:
        counts[entry["reason"]] += entry["rows"]
    return counts


def file_tree(folder: Path) -> dict[str, bytes]:
    """Every regular file under ``folder`` (not following the source/ links) → its bytes."""
    files = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink()]
        for name in filenames:
            path = Path(dirpath) / name
            files[path.relative_to(folder).as_posix()] = path.read_bytes()
    return files


@contextlib.contextmanager
def killed_after(monkeypatch, builder: type[DatasetBuilder], units: int) -> Iterator[None]:
    """Within the block, ``builder.process`` raises ``KeyboardInterrupt`` instead of starting unit ``units + 1``:
    a build killed after ``units`` volumes. The real ``process`` is back after the block."""
    process = builder.process
    calls = []

    def dying(self, unit, out_dir):
        if len(calls) == units:
            raise KeyboardInterrupt
        calls.append(unit.unit_id)
        return process(self, unit, out_dir)

    monkeypatch.setattr(builder, "process", dying)
    try:
        yield
    finally:
        monkeypatch.setattr(builder, "process", process)


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``datasets_scripts/<name>`` with ``args`` in a fresh interpreter (output captured, never raises)."""
    script = str(REPO / "datasets_scripts" / name)
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=300, check=False)


def script_help(name: str) -> str:
    """The ``--help`` text of ``datasets_scripts/<name>`` (raises if the script fails)."""
    result = run_script(name, "--help")
    result.check_returncode()
    return result.stdout
