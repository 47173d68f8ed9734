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


_END = "\ud800"
"""Marks the end of an upstream CSV for the reader: a lone high surrogate, which decoding never produces (bytes
that are not UTF-8 become U+DC80..U+DCFF)."""


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
        BuildError: the file is empty, its header is not UTF-8 or opens a quote it never closes, or a required
            column is missing.
    """

    def __init__(self, path: str | os.PathLike, required: Sequence[str] = (), *, expected: str | None = None):
        csv.field_size_limit(2**31 - 1)  # report texts are long
        self.path = Path(path)
        # Bytes that are not UTF-8 become lone surrogates (U+DC80..U+DCFF) instead of raising deep inside the csv
        # module: the row holding them is reported (skipped) and the rest of the file is still read.
        self._file = open(self.path, newline="", encoding="utf-8-sig", errors="surrogateescape")  # closed by __exit__
        self._lines: list[str] = []  # the physical lines of the record being read
        try:
            self._reader = csv.reader(self._feed())
            header = next(self._reader, None)
            if header is None or header == [_END]:
                raise BuildError(f"{self.path}: empty file, expected {expected or f'the columns {tuple(required)}'}")
            if any(_END in name for name in header):
                raise BuildError(f"{self.path}: the header has a quote that is never closed")
            if _not_utf8(header):
                raise BuildError(f"{self.path}: the header is not UTF-8 (bytes {_not_utf8(header)})")
            self.names = [name.strip() for name in header]
            self.require(required)
        except BaseException:
            self._file.close()
            raise

    def _feed(self) -> Iterator[str]:
        """The file's lines for the csv reader, then one line holding only :data:`_END`.

        A quoted field left open at the end of the file swallows that line, so the csv module's own quote tracking
        tells us whether the file ended inside quotes (it returns the swallowed text as a field, not an error).
        """
        for line in self._file:
            self._lines.append(line)
            yield line
        yield _END + "\n"

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

        Blank lines are passed over. These rows are appended to ``skipped`` as ``malformed_row``
        :func:`skip_entry` entries instead (the detail gives the file's line numbers):

        - a line the ``csv`` module cannot parse, or a row with another number of fields than the header;
        - a row holding bytes that are not UTF-8 (the rest of the file is still read);
        - a quote that is never closed: it would swallow every following line into one field, so the row and
          the rows after it are reported as one entry (``rows`` counts them) and reading stops there.
        """
        index = {c: self.names.index(c) for c in columns}
        number = 0
        while True:
            number += 1
            source = f"{self.path.name}:{number}"
            first = self._reader.line_num + 1  # the file's line where this record starts (the header is line 1)
            self._lines.clear()
            try:
                cells = next(self._reader)
            except StopIteration:
                return
            except csv.Error as err:  # the reader goes on with the next line
                detail = f"unreadable CSV line {self._reader.line_num}: {err}"
                skipped.append(skip_entry("malformed_row", detail, source=source))
                continue
            if cells == [_END]:
                return
            lines = f"line {first}" if len(self._lines) <= 1 else f"lines {first}-{first + len(self._lines) - 1}"
            if any(_END in cell for cell in cells):
                after = _count_rows(self._lines[1:])
                detail = (
                    f"a quote opened in the row on line {first} is never closed: lines {first}-"
                    f"{first + len(self._lines) - 1} (the end of the file) cannot be split into rows; "
                    f"this row and the {after} after it are not read"
                )
                skipped.append(skip_entry("malformed_row", detail, source=source, rows=1 + after))
                return
            if not any(cell.strip() for cell in cells):
                continue
            if _not_utf8(cells):
                detail = f"not UTF-8: bytes {_not_utf8(cells)} on {lines}"
                skipped.append(skip_entry("malformed_row", detail, source=source))
                continue
            if len(cells) != len(self.names):
                detail = f"expected {len(self.names)} fields, got {len(cells)}"
                if len(self._lines) > 1:
                    detail += f" ({lines}: a quoted field spans several lines)"
                skipped.append(skip_entry("malformed_row", detail, source=source))
                continue
            yield number, source, {c: cells[i].strip() for c, i in index.items()}


def _not_utf8(cells: Sequence[str]) -> str:
    """The bytes of ``cells`` that were not UTF-8 (``"0xe9 0xff"``, each once, in order), or ``""``."""
    found = dict.fromkeys(ord(ch) - 0xDC00 for cell in cells for ch in cell if "\udc80" <= ch <= "\udcff")
    return " ".join(f"0x{byte:02x}" for byte in found)


def _count_rows(lines: list[str]) -> int:
    """How many non-blank rows ``lines`` hold when read on their own (the rows an unclosed quote swallowed)."""
    try:
        return sum(1 for cells in csv.reader(lines) if any(cell.strip() for cell in cells))
    except csv.Error:
        return sum(1 for line in lines if line.strip())


def path_unit_id(path: str, stem: str) -> str:
    """A file-name safe unit id for an upstream file: ``stem`` (its path without the suffix) with ``/`` → ``__``.
    If other characters had to be replaced, or the id would not start with a letter or digit, it becomes
    ``v<slug>-<first 8 hex digits of sha256(path)>``, so that two paths never share an id."""
    joined = stem.replace("/", "__")
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", joined)
    if slug != joined or not slug[:1].isalnum():
        slug = f"v{slug}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"
    return slug
