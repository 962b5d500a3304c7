"""Data loading: file formats, column mapping, and one clear error for each bad input."""

from __future__ import annotations

import json

import pytest

from alignment.data import load_rows, sft_rows
from alignment.errors import UserError

ROWS = [{"q": "review of the soup in paris :", "a": " the soup was good ."}, {"q": "x", "a": " y"}]


def write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        path.write_text("q,a\n" + "".join(f'"{r["q"]}","{r["a"]}"\n' for r in rows))
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".csv", ".parquet"])
def test_formats_and_column_mapping(tmp_path, ext):
    path = write(tmp_path / f"d{ext}", ROWS)
    rows, fmt = sft_rows(str(path), {"prompt": "q", "completion": "a"})
    assert fmt == "prompt_completion"
    assert rows == [{"prompt": r["q"], "completion": r["a"]} for r in ROWS]


def test_messages_format(tmp_path):
    path = write(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    rows, fmt = sft_rows(str(path), None)
    assert fmt == "messages" and rows[0]["messages"][0]["content"] == "hi"


def test_toy_sources():
    rows = load_rows("toy:sft")
    assert len(rows) == 2000 and rows[0]["completion"].startswith(" the ")


def test_missing_columns_names_what_was_found(tmp_path):
    path = write(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(UserError, match=r"needs columns .*prompt/completion.*columns found: a, q"):
        sft_rows(str(path), None)
    with pytest.raises(UserError, match=r"no column\(s\) question named in `columns`; columns found: q, a"):
        sft_rows(str(path), {"prompt": "question"})


def test_empty_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(UserError, match="holds no rows"):
        load_rows(str(tmp_path / "e.jsonl"))


def test_bad_json_line_and_non_utf8(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        load_rows(str(tmp_path / "b.jsonl"))
    (tmp_path / "l.jsonl").write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        load_rows(str(tmp_path / "l.jsonl"))


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_rows(str(tmp_path / "nope.jsonl"))


def test_row_location_names_the_line_an_editor_shows(tmp_path):
    from alignment.data import load_rows, row_location

    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3}\n')
    assert [r["a"] for r in load_rows(str(jsonl))] == [1, 2, 3]
    assert [row_location(str(jsonl), i) for i in range(3)] == ["line 1", "line 3", "line 4"]  # blank lines count
    table = tmp_path / "d.csv"
    table.write_text('a,b\n1,2\n\n"two\nlines",3\n4,5\n')  # header, a blank line, a quoted field over two lines
    assert [r["a"] for r in load_rows(str(table))] == ["1", "two\nlines", "4"]
    assert [row_location(str(table), i) for i in range(3)] == ["line 2", "line 4", "line 6"]
    assert row_location("toy:prompts", 4) == "row 5"  # no file lines to point at: the 1-based row
