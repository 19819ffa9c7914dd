"""Reading training data: formats, line-numbered errors, missing columns, renames, eval split, batches."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from rlhf_cli.core.data import check_columns, detect_format, prompts_of, read_records, read_splits, split_eval
from rlhf_cli.errors import DataError, RecipeError
from rlhf_cli.ppo import prompts as ppo
from rlhf_cli.recipe import ChatData, PPORecipe, PreferenceData
from rlhf_cli.stages import generate

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


def test_a_line_of_spaces_between_paragraphs_separates_txt_documents(tmp_path):
    # Editors leave spaces on blank lines; read as no blank line at all, every line became a document.
    (tmp_path / "a.txt").write_text("first doc\nstill first\n  \t\nsecond doc\r\n \r\nthird\n")
    assert [r["text"] for r in read_records(str(tmp_path / "a.txt"))] == ["first doc\nstill first", "second doc", "third"]


def test_a_folder_reads_its_data_files_not_hidden_copies_or_folders_named_like_files(tmp_path):
    # Jupyter keeps a copy of every file it edits under .ipynb_checkpoints: read too, each record counted twice.
    (tmp_path / "chat.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / ".ipynb_checkpoints" / "chat-checkpoint.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    (tmp_path / "._chat.jsonl").write_bytes(b"\x00\x05\x16\x07")
    (tmp_path / "older.json").mkdir()
    assert [r["text"] for r in read_records(str(tmp_path))] == ["a", "b"]


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


@pytest.mark.parametrize(
    ("allowed", "declared", "example"),
    [
        (("preference", "ranked"), "auto", "{question: prompt, good: chosen, bad: rejected}"),  # train-rm
        (("preference",), "auto", "{question: prompt, good: chosen, bad: rejected}"),  # dpo, eval --preference
        (("text",), "auto", "{content: text}"),  # pretrain
        (("prompt", "messages"), "auto", "{question: prompt}"),  # ppo, grpo
        (("messages", "prompt_completion"), "auto", "{instruction: prompt, output: completion}"),  # sft
        (("preference",), "preference", "{question: prompt, good: chosen, bad: rejected}"),
    ],
    ids=["train-rm", "dpo", "pretrain", "ppo", "sft", "declared-preference"],
)
def test_wrong_columns_get_a_rename_example_of_the_stages_format(allowed, declared, example):
    with pytest.raises(DataError) as e:
        detect_format([{"q": "a", "answer": "b"}], "d.jsonl", allowed, declared)
    assert e.value.message.endswith(f"(rename with data.fields, e.g. {example})"), e.value.message


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


def test_a_rename_onto_a_column_that_stays_is_an_error_whatever_the_column_order():
    from rlhf_cli.core.data import rename

    # Which of two "completion" columns survived depended on the order of the record's keys.
    for record in ({"completion": "old", "output": "new", "prompt": "q"}, {"prompt": "q", "output": "new", "completion": "old"}):
        with pytest.raises(DataError, match="renames more than one column to completion"):
            rename(record, {"output": "completion"}, "d.jsonl")
    with pytest.raises(DataError, match="to prompt"):
        rename({"a": "x", "b": "y"}, {"a": "prompt", "b": "prompt"}, "d.jsonl")
    # A swap, or a rename of both, is fine.
    assert rename({"prompt": "p", "completion": "c"}, {"prompt": "completion", "completion": "prompt"}, "d") == {
        "completion": "p", "prompt": "c"}
    assert rename({"completion": "old", "output": "new"}, {"output": "completion", "completion": "draft"}, "d") == {
        "draft": "old", "completion": "new"}


def test_a_record_held_out_takes_its_copies_out_of_train():
    # Each record four times: split by position, every held-out record had copies left in train.
    rows = [{"prompt": f"q{i % 50}", "completion": "a"} for i in range(200)]
    train, held = split_eval(rows, None, 0.1, seed=42)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert len(held) >= 20 and len(train) + len(held) == 200
    # Without duplicates the split is what it always was.
    assert split_eval(ROWS, None, 0.25, seed=1)[1] == [ROWS[i] for i in sorted(_first_shuffled(20, 5, seed=1))]
    # All copies of one record: nothing would be left to train on, so nothing is held out.
    assert split_eval([ROWS[0]] * 4, None, 0.25, seed=1) == ([ROWS[0]] * 4, [])


def _first_shuffled(n: int, k: int, seed: int) -> list[int]:
    import random

    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[:k]


def test_read_splits_checks_the_eval_file_too(tmp_path):
    train = _write(tmp_path / "t.jsonl", ROWS)
    bad_eval = _write(tmp_path / "e.jsonl", [{"text": "x"}])
    spec = ChatData(train=str(train), eval=str(bad_eval))
    with pytest.raises(DataError, match="e.jsonl: format prompt_completion needs columns prompt, completion"):
        read_splits(spec, ("messages", "prompt_completion"), seed=0)
    spec = ChatData(train=str(train), eval_fraction=0.1, max_samples=10)
    tr, ev, fmt = read_splits(spec, ("messages", "prompt_completion"), seed=0)
    assert (len(tr), len(ev), fmt) == (9, 1, "prompt_completion")


def test_eval_max_samples_keeps_the_first_held_out_records_and_trains_on_no_more(tmp_path):
    train = _write(tmp_path / "t.jsonl", ROWS)
    held_out = _write(tmp_path / "e.jsonl", ROWS[:7])
    spec = ChatData(train=str(train), eval=str(held_out), eval_max_samples=3)
    tr, ev, _ = read_splits(spec, ("messages", "prompt_completion"), seed=0)
    assert (tr, ev) == (ROWS, ROWS[:3])
    # Split off train: 5 of 20 held out, 2 of them evaluated, the other 3 still kept out of training.
    spec = ChatData(train=str(train), eval_fraction=0.25, eval_max_samples=2)
    tr, ev, _ = read_splits(spec, ("messages", "prompt_completion"), seed=1)
    full_train, full_held = split_eval(ROWS, None, 0.25, seed=1)
    assert (tr, ev) == (full_train, full_held[:2])


# --------------------------------------------------------------------------- data that cannot be decoded or has wrong types


def _data_error(source: str) -> str:
    with pytest.raises(DataError) as e:
        read_records(source)
    assert e.value.exit_code == 3
    return e.value.message


@pytest.mark.parametrize(
    ("name", "content", "line"),
    [
        ("d.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', 2),
        ("d.csv", b"prompt,completion\nq,a\nq\xff,a\n", 3),
        ("d.json", b'[{"text": "ok"},\n {"text": "\xe9"}]', 2),
        ("d.txt", b"one\n\ntwo \x80\n", 3),
    ],
)
def test_bytes_that_are_not_utf8_name_file_and_line(tmp_path, name, content, line):
    path = tmp_path / name
    path.write_bytes(content)
    assert _data_error(str(path)).startswith(f"{path}:{line}: not UTF-8 text")
    assert path.read_bytes() == content


def test_corrupt_parquet_is_a_data_error(tmp_path):
    good = _write(tmp_path / "d.parquet", ROWS)
    path = tmp_path / "corrupt.parquet"
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert _data_error(str(path)).startswith(f"{path}: not a readable Parquet file")


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"messages": [{"role": "user", "content": 7}]}, "messages: message 1: content: expected a string, got 7"),
        ({"prompt": "p", "chosen": 5, "rejected": "r"}, "chosen: expected a string or a list of {role, content} messages, got 5"),
        ({"messages": "hello"}, "messages: expected a list of {role, content} messages, got a string"),
        ({"messages": 5}, "messages: expected a list of {role, content} messages, got 5"),
        ({"messages": []}, "messages: empty message list"),
        ({"messages": ["hi"]}, "messages: message 1: expected a {role, content} object, got 'hi'"),
        ({"text": ["a", "b"]}, "text: expected a string, got ['a', 'b']"),
        ({"prompt": {"role": "user"}}, "prompt: expected a string or a list of {role, content} messages"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "bogus", "content": "a"}]},
         "messages: message 2: role 'bogus' is not a chat role; use one of system, user, assistant"),
        ({"prompt": "p", "chosen": [{"role": "gpt", "content": "a"}], "rejected": "r"},
         "chosen: message 1: role 'gpt' is another tool's name; rlhf calls it 'assistant'"),
    ],
    ids=["content-number", "chosen-number", "messages-string", "messages-number", "messages-empty",
         "message-string", "text-list", "prompt-object", "unknown-role", "sharegpt-role"],
)
def test_wrong_types_name_file_line_and_column(tmp_path, record, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "ok"}], "prompt": "p", "chosen": "c",
                                "rejected": "r", "text": "t"}) + "\n\n" + json.dumps(record) + "\n")
    assert _data_error(str(path)).startswith(f"{path}:3: {message}")


def test_wrong_types_in_json_and_parquet_name_the_record(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": 3}]
    assert _data_error(str(_write(tmp_path / "d.json", rows))).startswith(f"{tmp_path / 'd.json'}: record 2: completion")
    # Parquet columns have one type each: a whole column of numbers where text belongs.
    path = _write(tmp_path / "d.parquet", [{"messages": [{"role": "user", "content": n}]} for n in (1, 2)])
    assert _data_error(str(path)) == f"{path}: row 1: messages: message 1: content: expected a string, got 1"


def test_csv_row_with_more_cells_than_the_header(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\nq,a\nq,a,extra\n")
    assert _data_error(str(path)) == f"{path}:3: more cells than the header has columns (2)"


def test_renamed_columns_are_type_checked_under_their_new_name(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"instruction": "q", "output": ["not", "messages"]}])
    with pytest.raises(DataError, match=r"d.jsonl:1: completion: message 1: expected a \{role, content\} object"):
        read_records(str(path), fields={"instruction": "prompt", "output": "completion"})


def test_ppo_prompts_whose_messages_is_a_string(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": "hello"}\n')
    recipe = PPORecipe.model_validate({"stage": "ppo", "policy": {"path": "p"}, "reward": {"path": "r"},
                                       "data": {"train": str(path)}})
    with pytest.raises(DataError, match=rf"^{path}:2: messages: expected a list"):
        ppo.read_prompts(recipe)


class _Stdin:
    def __init__(self, data: bytes):
        self.buffer = io.BytesIO(data)

    def isatty(self) -> bool:
        return False


def test_stdin_prompts_closed_or_not_utf8(monkeypatch):
    monkeypatch.setattr(sys, "stdin", None)
    with pytest.raises(DataError, match="stdin is closed"):
        generate.read_prompts("-")
    monkeypatch.setattr(sys, "stdin", _Stdin(b"where is the cat?\r\n\nwo ist die Katze\xdf\n"))
    with pytest.raises(DataError, match=r"^stdin:3: not UTF-8 text \(byte 0xdf\)"):
        generate.read_prompts("-")
    monkeypatch.setattr(sys, "stdin", _Stdin("where is the cat?\r\n\nwo ist die Straße?\n".encode()))
    assert generate.read_prompts("-") == ["where is the cat?", "wo ist die Straße?"]


def test_stdin_that_is_a_terminal_is_a_usage_error(monkeypatch):
    stdin = _Stdin(b"")
    stdin.isatty = lambda: True
    monkeypatch.setattr(sys, "stdin", stdin)
    with pytest.raises(RecipeError, match="stdin is a terminal"):
        generate.read_prompts("-")


def test_empty_prompts_are_counted_in_a_warning(caplog):
    records = [{"prompt": "q"}, {"prompt": " "}, {"messages": [{"role": "user", "content": ""}]}]
    with caplog.at_level("WARNING", logger="rlhf"):
        assert prompts_of(records, "p.jsonl")[0] == "q"
    assert "p.jsonl: 2 of 3 prompts are empty (first: record 2)" in caplog.text


def test_preference_pairs_that_are_all_identical_say_so(tmp_path, caplog):
    same = [{"prompt": f"q{i}", "chosen": "a", "rejected": "a"} for i in range(4)]
    spec = PreferenceData(train=str(_write(tmp_path / "p.jsonl", same)), eval_fraction=0)
    with pytest.raises(DataError, match=r"chosen and rejected are identical in all 4 pairs"):
        read_splits(spec, ("preference",), seed=0)
    spec = PreferenceData(train=str(_write(tmp_path / "p.jsonl", [*same[:1], {"chosen": "a", "rejected": "b"}])), eval_fraction=0)
    with caplog.at_level("WARNING", logger="rlhf"):
        read_splits(spec, ("preference",), seed=0)
    assert "1 of 2 pairs have identical chosen and rejected answers" in caplog.text


def test_a_folder_of_two_formats_names_the_file_and_line_that_differs(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    _write(folder / "a.jsonl", [{"prompt": "q1", "completion": "a1"}, {"prompt": "q2", "completion": "a2"}])
    _write(folder / "b.jsonl", [{"messages": [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3"}]}])
    records = read_records(str(folder))
    fmt = detect_format(records, str(folder), ("prompt_completion", "messages"))
    with pytest.raises(DataError) as e:
        check_columns(records, fmt, str(folder))
    msg = e.value.message
    assert msg.startswith(f"{folder / 'b.jsonl'}:1 lacks prompt, completion (has: messages)")
    assert f"{folder / 'a.jsonl'}:1 is prompt_completion" in msg
