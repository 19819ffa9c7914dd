"""Reading training data: formats, line-numbered errors, missing columns, renames, eval split, batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_cli.core.data import check_columns, detect_format, read_records, read_splits, split_eval
from rlhf_cli.errors import DataError
from rlhf_cli.recipe import ChatData

ROWS = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)]


def _write(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        keys = list(rows[0])
        path.write_text(",".join(keys) + "\n" + "".join(",".join(r[k] for k in keys) + "\n" for r in rows))
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_file_format_reads_the_same_records(tmp_path, suffix):
    assert read_records(str(_write(tmp_path / f"d{suffix}", ROWS))) == ROWS


def test_txt_files_are_documents_split_on_blank_lines(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nstill first\n\nsecond doc\n")
    (tmp_path / "b.txt").write_text("one line\nanother line\n")
    records = read_records(str(tmp_path))
    assert [r["text"] for r in records] == ["first doc\nstill first", "second doc", "one line", "another line"]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "broken"\n')
    with pytest.raises(DataError) as e:
        read_records(str(path))
    assert e.value.message.startswith(f"{path}:3: malformed JSON")
    assert e.value.exit_code == 3


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        read_records(str(tmp_path / "nope.jsonl"))


def test_missing_columns_list_what_is_there_and_what_is_needed():
    records = [{"question": "q", "answer": "a"}]
    with pytest.raises(DataError) as e:
        detect_format(records, "d.jsonl", ("messages", "prompt_completion"))
    msg = e.value.message
    assert "needs columns messages or prompt+completion" in msg and "records have: answer, question" in msg
    with pytest.raises(DataError, match="record 2 lacks completion"):
        check_columns([{"prompt": "a", "completion": "b"}, {"prompt": "c"}], "prompt_completion", "d.jsonl")


def test_fields_rename_columns_and_auto_detect_says_what_it_found(tmp_path, caplog):
    path = _write(tmp_path / "d.jsonl", [{"instruction": "q", "output": "a"}])
    records = read_records(str(path), fields={"instruction": "prompt", "output": "completion"})
    assert records == [{"prompt": "q", "completion": "a"}]
    with caplog.at_level("INFO", logger="rlhf"):
        assert detect_format(records, str(path), ("messages", "prompt_completion")) == "prompt_completion"
    assert "detected format prompt_completion" in caplog.text
    with pytest.raises(DataError, match="renames nope"):
        read_records(str(path), fields={"nope": "prompt"})


def test_eval_split_is_seeded_and_disjoint():
    train, held = split_eval(ROWS, None, 0.25, seed=1)
    assert len(held) == 5 and len(train) == 15
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert split_eval(ROWS, None, 0.25, seed=1) == (train, held)
    assert split_eval(ROWS, [ROWS[0]], 0.25, seed=1) == (ROWS, [ROWS[0]])


def test_read_splits_checks_the_eval_file_too(tmp_path):
    train = _write(tmp_path / "t.jsonl", ROWS)
    bad_eval = _write(tmp_path / "e.jsonl", [{"text": "x"}])
    spec = ChatData(train=str(train), eval=str(bad_eval))
    with pytest.raises(DataError, match="e.jsonl: format prompt_completion needs columns prompt, completion"):
        read_splits(spec, ("messages", "prompt_completion"), seed=0)
    spec = ChatData(train=str(train), eval_fraction=0.1, max_samples=10)
    tr, ev, fmt = read_splits(spec, ("messages", "prompt_completion"), seed=0)
    assert (len(tr), len(ev), fmt) == (9, 1, "prompt_completion")
