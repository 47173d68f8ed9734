"""Reading upstream files as published: CSV tables, untrusted relative paths, unit ids from file paths."""

from __future__ import annotations

import csv
import hashlib
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from med3dqwen.builders.engine import BuildError, skip_entry


__all__ = [
    "UpstreamCSV",
    "path_unit_id",
]


class UpstreamCSV:
    """An upstream CSV, read exactly as published and streamed row by row; use it as a context manager.

    The file is UTF-8 (a BOM is accepted), cells may be of any length, header names are stripped and columns are
    looked up by name (``names``: the stripped header), so extra columns (a pandas index, ``Note``) do not matter::

        with UpstreamCSV(path, COLUMNS) as table:
            for number, source, values in table.rows(COLUMNS, skipped):
                ...  # values["VolumeName"], stripped

    Args:
        path: the CSV file.
        required: columns the header must have (checked at once; :meth:`require` checks more later).
        expected: what the header should hold, for the error on an empty file (default: ``the columns <required>``).

    Raises:
        BuildError: the file is empty, or a required column is missing.
    """

    def __init__(self, path: str | os.PathLike, required: Sequence[str] = (), *, expected: str | None = None):
        csv.field_size_limit(2**31 - 1)  # report texts are long
        self.path = Path(path)
        self._file = open(self.path, newline="", encoding="utf-8-sig")  # closed by __exit__, or below on an error
        try:
            self._reader = csv.reader(self._file)
            header = next(self._reader, None)
            if header is None:
                raise BuildError(f"{self.path}: empty file, expected {expected or f'the columns {tuple(required)}'}")
            self.names = [name.strip() for name in header]
            self.require(required)
        except BaseException:
            self._file.close()
            raise

    def __enter__(self) -> UpstreamCSV:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._file.close()

    def require(self, columns: Iterable[str]) -> None:
        """Raise :class:`BuildError` naming the ``columns`` the header lacks (and what it has), if any."""
        missing = [c for c in columns if c not in self.names]
        if missing:
            raise BuildError(f"{self.path}: missing columns {missing} (found {self.names})")

    def ignored_columns(self, used: Iterable[str]) -> list[str]:
        """The header names not in ``used``, in file order (``<unnamed>`` for a blank one), to name in the card."""
        used = set(used)
        return [name or "<unnamed>" for name in self.names if name not in used]

    def rows(self, columns: Iterable[str], skipped: list[dict[str, Any]]) -> Iterator[tuple[int, str, dict[str, str]]]:
        """The data rows as ``(number, source, values)``: ``number`` counts the rows after the header from 1,
        ``source`` is ``"<file name>:<number>"`` and ``values`` maps each of ``columns`` to its stripped cell.
        Blank lines are passed over; a line the ``csv`` module cannot parse, or with another number of fields than
        the header, is appended to ``skipped`` as a ``malformed_row`` :func:`skip_entry` instead."""
        index = {c: self.names.index(c) for c in columns}
        number = 0
        while True:
            number += 1
            source = f"{self.path.name}:{number}"
            try:
                cells = next(self._reader)
            except StopIteration:
                return
            except csv.Error as err:  # the reader goes on with the next line
                detail = f"unreadable CSV line {self._reader.line_num}: {err}"
                skipped.append(skip_entry("malformed_row", detail, source=source))
                continue
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) != len(self.names):
                detail = f"expected {len(self.names)} fields, got {len(cells)}"
                skipped.append(skip_entry("malformed_row", detail, source=source))
                continue
            yield number, source, {c: cells[i].strip() for c, i in index.items()}


def path_unit_id(path: str, stem: str) -> str:
    """A file-name safe unit id for an upstream file: ``stem`` (its path without the suffix) with ``/`` → ``__``.
    If other characters had to be replaced, or the id would not start with a letter or digit, it becomes
    ``v<slug>-<first 8 hex digits of sha256(path)>``, so that two paths never share an id."""
    joined = stem.replace("/", "__")
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", joined)
    if slug != joined or not slug[:1].isalnum():
        slug = f"v{slug}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"
    return slug
