"""Data faults the dataset builds must report instead of loading them wrong or crashing raw (issue #7): CSVs that
are not UTF-8 or leave a quote open, ``--overwrite`` of a folder that is not a build, a user's README, temporaries
left by a kill, what ``--push_to_hub`` uploads, and local paths in ``skipped.jsonl``."""

import pytest
from helpers import read_lines, write_csv

from med3dqwen.builders.engine import BuildError
from med3dqwen.builders.upstream import UpstreamCSV


COLUMNS = ["Volumename", "Anatomy", "Sentence"]


def read_csv(path):
    """``(rows, skipped)`` of an upstream CSV with :data:`COLUMNS`."""
    skipped: list[dict] = []
    with UpstreamCSV(path, COLUMNS) as table:
        rows = [(source, values["Sentence"]) for _, source, values in table.rows(COLUMNS, skipped)]
    return rows, skipped


# ---------------------------------------------------------------------------------------------------------------
# Upstream CSVs
# ---------------------------------------------------------------------------------------------------------------


def test_a_row_that_is_not_utf8_is_skipped_and_the_rest_read(tmp_path):
    path = tmp_path / "train_region_report.csv"
    body = "Volumename,Anatomy,Sentence\nv1,lung,Clear.\nv2,heart,Caf\xe9 ok.\nv3,liver,Normal.\n"
    path.write_bytes(body.encode("latin-1"))  # one row saved as Latin-1: byte 0xe9 is not UTF-8
    rows, skipped = read_csv(path)
    assert rows == [("train_region_report.csv:1", "Clear."), ("train_region_report.csv:3", "Normal.")]
    assert skipped == [
        {
            "reason": "malformed_row",
            "unit_id": None,
            "source": "train_region_report.csv:2",
            "rows": 1,
            "detail": "not UTF-8: bytes 0xe9 on line 3",
        }
    ]


def test_a_header_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "table.csv"
    path.write_bytes(b"Volumename,Anat\xf6my,Sentence\nv1,lung,Clear.\n")
    with pytest.raises(BuildError, match=r"table\.csv: the header is not UTF-8 \(bytes 0xf6\)"):
        read_csv(path)


def test_an_unclosed_quote_is_reported_with_the_rows_it_swallows(tmp_path):
    path = tmp_path / "table.csv"
    # Row 2 opens a quote in its last field and never closes it: a plain csv read returns ONE row whose Sentence
    # holds the three lines after it, with the header's field count, so it would load silently wrong.
    lines = ["Volumename,Anatomy,Sentence", "v1,lung,Clear.", 'v2,heart,"Enlarged.', "v3,liver,Normal.", ""]
    lines += ["v4,spleen,Normal.", "v5,aorta,Normal."]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows, skipped = read_csv(path)
    assert rows == [("table.csv:1", "Clear.")]
    assert [(e["reason"], e["source"], e["rows"]) for e in skipped] == [("malformed_row", "table.csv:2", 4)]
    assert "quote opened in the row on line 3 is never closed: lines 3-7" in skipped[0]["detail"]


def test_quoted_fields_over_several_lines_are_still_read(tmp_path):
    path = tmp_path / "table.csv"
    write_csv(path, COLUMNS, [["v1", "lung", "Line one.\nLine two."], ["v2", "heart", 'A "quoted" word.']])
    rows, skipped = read_csv(path)
    assert rows == [("table.csv:1", "Line one.\nLine two."), ("table.csv:2", 'A "quoted" word.')] and not skipped
    # Without a final newline, and with a quoted last field.
    path.write_text('Volumename,Anatomy,Sentence\nv1,lung,"Clear, normal."', encoding="utf-8")
    assert read_csv(path) == ([("table.csv:1", "Clear, normal.")], [])


def test_an_unclosed_quote_in_the_header_names_the_file(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text('Volumename,"Anatomy,Sentence\nv1,lung,Clear.\n', encoding="utf-8")
    with pytest.raises(BuildError, match=r"table\.csv: the header has a quote that is never closed"):
        read_csv(path)
