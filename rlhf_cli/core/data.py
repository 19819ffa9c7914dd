"""Read training data: local JSONL / JSON / Parquet / CSV / TXT (or a folder of them), or a hub dataset.

    records = read_records("data/chat.jsonl", fields={"instruction": "prompt"})
    fmt = detect_format(records, "data/chat.jsonl", allowed=("messages", "prompt_completion"))
    train, held_out = split_eval(records, eval_records=None, fraction=0.05, seed=42)

Records are plain dicts; bytes that are not UTF-8, a malformed line, a value of the wrong type or a
missing column is a DataError (exit 3) naming the file, the line and the columns.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import random
import re
import reprlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rlhf_cli.core.hub import check_dataset_ref, is_local_path
from rlhf_cli.errors import DataError

log = logging.getLogger("rlhf")

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt")

# Columns that identify each format, in detection order (most specific first).
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "preference": ("chosen", "rejected"),
    "ranked": ("responses",),  # with a ranking (indices, best first) or scores; an empty one awaits labelling
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "prompt": ("prompt",),
}


# A data.fields rename that fits each format, for the error that asks for one: the columns data sets of
# that kind often have instead of ours.
RENAME_EXAMPLES: dict[str, str] = {
    "preference": "{question: prompt, good: chosen, bad: rejected}",
    "ranked": "{question: prompt, answers: responses}",
    "messages": "{instruction: prompt, output: completion}",
    "prompt_completion": "{instruction: prompt, output: completion}",
    "text": "{content: text}",
    "prompt": "{question: prompt}",
}


class Records(list):
    """The records read_records returns: a list of dicts that also knows where each one came from
    ("file:line" or "file: record N"), so a check made later names the file of a folder, not the folder."""

    def __init__(self, records: Iterable[dict[str, Any]], where: list[str]) -> None:
        super().__init__(records)
        self.where = where


def where_of(records: list[dict[str, Any]], i: int, source: str) -> str:
    """Where records[i] came from: its file and line when read_records read it, else its number in source."""
    where = getattr(records, "where", None)
    return where[i] if where is not None and i < len(where) else f"{source}: record {i + 1}"


def read_records(
    source: str,
    *,
    fields: dict[str, str] | None = None,
    split: str = "train",
    max_samples: int | None = None,
) -> list[dict[str, Any]]:
    """Records of a file, a folder of files or a hub dataset, renamed by `fields`; each one's text columns
    are checked here, where its line is still known."""
    path = Path(source)
    if path.is_dir():
        # Hidden files and folders are tools' copies (.ipynb_checkpoints, macOS ._ files), not more data.
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(f"{source}: folder holds no {'/'.join(SUFFIXES)} files")
        located = [r for f in files for r in _read_file(f)]
    elif path.is_file():
        located = _read_file(path)
    elif path.suffix in SUFFIXES or is_local_path(source):
        raise DataError(f"{source}: data file not found")
    else:
        check_dataset_ref(source)
        located = _read_hub(source, split)
    if not located:
        raise DataError(f"{source}: no records")
    records, wheres = [], []
    for where, record in located[:max_samples] if max_samples else located:
        if fields:
            record = rename(record, fields, source)
        check_types(record, where)
        records.append(record)
        wheres.append(where)
    return Records(records, wheres)


def rename(record: dict[str, Any], fields: dict[str, str], source: str) -> dict[str, Any]:
    missing = [old for old in fields if old not in record]
    if missing:
        raise DataError(
            f"{source}: data.fields renames {', '.join(missing)} but records have only: {', '.join(sorted(record))}"
        )
    # A column renamed onto one that stays would keep whichever of the two comes last in the record.
    kept = [k for k in record if k not in fields]
    clash = sorted({new for new in fields.values() if new in kept}
                   | {new for new in fields.values() if list(fields.values()).count(new) > 1})
    if clash:
        raise DataError(
            f"{source}: data.fields renames more than one column to {', '.join(clash)}; records have: "
            f"{', '.join(sorted(record))} (rename the other one too, e.g. {{{clash[0]}: {clash[0]}_old}})"
        )
    return {fields.get(k, k): v for k, v in record.items()}


def decode_utf8(data: bytes, source: str) -> str:
    """Bytes as text; anything but UTF-8 (a BOM is allowed) is a DataError naming the line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{source}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); convert the file, e.g. iconv -f latin1 -t utf-8"
        ) from None


Located = list[tuple[str, dict[str, Any]]]  # (where: "file:line" or "file: record N", record)


_BLANK_LINE = re.compile(r"\n[ \t\f\v]*\n")


def _read_file(path: Path) -> Located:
    suffix = path.suffix
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix!r} (use {', '.join(SUFFIXES)})")
    text = decode_utf8(path.read_bytes(), str(path))
    if suffix == ".csv":
        return _read_csv(path, text)
    # Universal newlines, as open() reads text (csv above needs the file's own, for quoted cells).
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if suffix == ".jsonl":
        return _read_jsonl(path, text)
    if suffix == ".json":
        return _read_json(path, text)
    # .txt: blank lines separate documents (a line of spaces is blank too); a file without blank lines is one
    # document per line.
    docs = [d.strip() for d in _BLANK_LINE.split(text)] if _BLANK_LINE.search(text) else text.splitlines()
    return [(f"{path}: document {i}", {"text": d}) for i, d in enumerate((d for d in docs if d.strip()), 1)]


def _read_jsonl(path: Path, text: str) -> Located:
    out = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
        out.append((f"{path}:{lineno}", obj))
    return out


def _read_json(path: Path, text: str) -> Located:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list) or not all(isinstance(o, dict) for o in obj):
        raise DataError(f"{path}: expected a JSON list of objects (or {{\"data\": [...]}})")
    return [(f"{path}: record {i}", o) for i, o in enumerate(obj, 1)]


def _read_csv(path: Path, text: str) -> Located:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    out = []
    for row in reader:
        # DictReader files surplus cells under the key None, which no column name can match.
        if None in row:
            raise DataError(f"{path}:{reader.line_num}: more cells than the header has columns ({len(reader.fieldnames or [])})")
        out.append((f"{path}:{reader.line_num}", dict(row)))
    return out


def _read_parquet(path: Path) -> Located:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e}); rewrite it, or convert it to JSONL") from None
    return [(f"{path}: row {i}", r) for i, r in enumerate(rows, 1)]


def _read_hub(name: str, split: str) -> Located:
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types for "not found / offline"
        raise DataError(f"{name}: not a local file, and loading it as a hub dataset failed ({type(e).__name__})") from None
    return [(f"{name}: record {i}", dict(r)) for i, r in enumerate(ds, 1)]


def detect_format(records: list[dict[str, Any]], source: str, allowed: Iterable[str], declared: str = "auto") -> str:
    """The format of `records`: the declared one (checked) or the first whose columns are present."""
    allowed = tuple(allowed)
    columns = set(records[0])
    if declared != "auto":
        needed = FORMAT_COLUMNS[declared]
        if not set(needed) <= columns:
            raise DataError(
                f"{source}: format {declared} needs columns {', '.join(needed)}; records have: {', '.join(sorted(columns))}"
                f" (rename with data.fields, e.g. {RENAME_EXAMPLES[declared]})"
            )
        return declared
    for fmt in allowed:
        if set(FORMAT_COLUMNS[fmt]) <= columns:
            log.info("%s: detected format %s (columns: %s)", source, fmt, ", ".join(sorted(columns)))
            return fmt
    wanted = " or ".join("+".join(FORMAT_COLUMNS[f]) for f in allowed)
    raise DataError(
        f"{source}: needs columns {wanted}; records have: {', '.join(sorted(columns))} "
        f"(rename with data.fields, e.g. {RENAME_EXAMPLES[allowed[0]]})"
    )


# Columns a format reads besides the ones that identify it.
OPTIONAL_COLUMNS: dict[str, tuple[str, ...]] = {
    "preference": ("prompt",),
    "ranked": ("prompt", "ranking", "scores"),
    "prompt": ("messages", "text"),
}
# What the field's datasets call the prompt (`{"query", "chosen", "rejected"}` is the common form of Chinese
# RLHF data; Alpaca-style sets say instruction, QA sets question).
PROMPT_ALIASES = ("query", "question", "instruction")


def adopt_prompt_alias(records: list[dict[str, Any]], fmt: str, source: str) -> list[dict[str, Any]]:
    """Records whose prompt goes by another common name, with that column read as the prompt."""
    if "prompt" not in OPTIONAL_COLUMNS.get(fmt, ()) or "prompt" in records[0]:
        return records
    alias = next((a for a in PROMPT_ALIASES if a in records[0]), None)
    if alias is None:
        return records
    log.info("%s: reading column %s as the prompt (set data.fields to choose another)", source, alias)
    renamed = [{("prompt" if k == alias else k): v for k, v in r.items()} for r in records]
    return Records(renamed, records.where) if isinstance(records, Records) else renamed


def warn_unused_columns(records: list[dict[str, Any]], fmt: str, source: str) -> None:
    """A column that the format does not read is named, with the rename that would use it."""
    used = set(FORMAT_COLUMNS[fmt]) | set(OPTIONAL_COLUMNS.get(fmt, ()))
    unused = sorted(set(records[0]) - used)
    if unused:
        wanted = sorted(set(OPTIONAL_COLUMNS.get(fmt, ())) - set(records[0])) or sorted(FORMAT_COLUMNS[fmt])
        log.warning("%s: column(s) %s are not used by format %s (it reads %s); to use one, rename it with data.fields, "
                    "e.g. {%s: %s}", source, ", ".join(unused), fmt, ", ".join(sorted(used)), unused[0], wanted[0])


def check_columns(records: list[dict[str, Any]], fmt: str, source: str) -> None:
    """Every record carries the format's columns (the first record alone decided the format)."""
    needed = FORMAT_COLUMNS[fmt]
    for i, r in enumerate(records):
        missing = [c for c in needed if c not in r or r[c] is None]
        if missing:
            where = where_of(records, i, source)
            # In a folder, a record of another format is most often a file of another format.
            mixed = (f"; the files of a folder must share one format, and {where_of(records, 0, source)} is {fmt}"
                     if Path(source).is_dir() else "")
            raise DataError(f"{where} lacks {', '.join(missing)} (has: {', '.join(sorted(r))}){mixed}")


# Columns the stages read as text: `text` a string, `messages` a message list, the others either.
TEXT_COLUMNS = ("prompt", "completion", "chosen", "rejected")
# The roles chat templates know (OpenAI's, plus tool-call turns). Another role is a typo or another tool's
# name (ShareGPT's human/gpt): templates render it as a turn nobody trained on, and it is never an answer.
ROLES = ("system", "user", "assistant", "tool", "function", "ipython", "developer")
# Other tools' names for the roles, named in the error so the fix is one rename.
ROLE_NAMES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


def check_types(record: dict[str, Any], where: str) -> None:
    """The text columns of a record hold what the stages read; `where` is "file:line" or "file: record N".

    Checked while reading, where the line is known: a number where text belongs would otherwise fail deep
    in a chat template, and `messages` given as a string would become one user turn and silently train
    nothing.
    """
    for column in ("text", "messages", *TEXT_COLUMNS):
        value = record.get(column)
        if value is None:
            continue  # a missing value is check_columns' business, once the format is known
        problem = _text_problem(value, column)
        if problem:
            raise DataError(f"{where}: {column}: {problem}")
    responses = record.get("responses")
    if responses is not None:
        if not isinstance(responses, list):
            raise DataError(f"{where}: responses: expected a list of answers, got {reprlib.repr(responses)}")
        for n, answer in enumerate(responses):
            problem = _text_problem(answer, "responses")
            if problem:
                raise DataError(f"{where}: responses[{n}]: {problem}")


def _text_problem(value: Any, column: str) -> str | None:
    if isinstance(value, str):
        return "expected a list of {role, content} messages, got a string" if column == "messages" else None
    if column == "text":
        return f"expected a string, got {reprlib.repr(value)}"
    if not isinstance(value, list):
        wanted = "a list of {role, content} messages" if column == "messages" else "a string or a list of {role, content} messages"
        return f"expected {wanted}, got {reprlib.repr(value)}"
    if not value:
        return "empty message list"
    for n, message in enumerate(value, 1):
        if not isinstance(message, dict):
            return f"message {n}: expected a {{role, content}} object, got {reprlib.repr(message)}"
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                return f"message {n}: {key}: expected a string, got {reprlib.repr(message.get(key))}"
        role = message["role"]
        if role in ROLE_NAMES:
            return f"message {n}: role {role!r} is another tool's name; rlhf calls it {ROLE_NAMES[role]!r}"
        if role not in ROLES:
            return f"message {n}: role {role!r} is not a chat role; use one of {', '.join(ROLES[:3])} (or {', '.join(ROLES[3:])})"
    return None


def check_pairs(records: list[dict[str, Any]], source: str) -> None:
    """Preference pairs whose two answers are the same teach nothing: all of them is an error, some a warning."""
    same = sum(r["chosen"] == r["rejected"] for r in records)
    if same == len(records):
        raise DataError(
            f"{source}: chosen and rejected are identical in all {same} pairs; a preference needs two different "
            "answers (check which columns hold them, and data.fields)"
        )
    if same:
        log.warning("%s: %d of %d pairs have identical chosen and rejected answers and are skipped", source, same, len(records))


def split_eval(
    records: list[dict[str, Any]],
    eval_records: list[dict[str, Any]] | None,
    fraction: float,
    seed: int,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, eval): the given eval set, or a seeded `fraction` held out of train.

    A record held out takes its copies with it: a duplicate left in train would make the held-out loss
    one on trained data."""
    if eval_records is not None:
        return records, eval_records
    if fraction <= 0 or len(records) < 2:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(len(records) * fraction)))
    keys = [_record_key(r) for r in records]
    held_keys = {keys[i] for i in order[:n_eval]}
    held = {i for i, key in enumerate(keys) if key in held_keys}
    if len(held) == len(records):
        return records, []  # every record is a copy of one held out: nothing would be left to train on
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def _record_key(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, ensure_ascii=False, default=str)


def as_messages(value: Any, role: str) -> list[dict[str, str]]:
    """A string or a message list as a message list."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return value
    raise DataError(f"expected a string or a list of {{role, content}} messages, got {type(value).__name__}")


def prompts_of(records: list[dict[str, Any]], source: str) -> list[Any]:
    """What to answer in each record: its prompt (text or messages), a conversation without its final
    answer, or its text."""
    out = []
    for n, record in enumerate(records, 1):
        if record.get("prompt") is not None:
            out.append(record["prompt"])
        elif isinstance(record.get("messages"), list):
            messages = list(record["messages"])
            while messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
                messages.pop()
            if not messages:
                raise DataError(f"{source}: record {n} has no user turn to answer")
            out.append(as_messages(messages, "user"))
        elif isinstance(record.get("text"), str):
            out.append(record["text"])
        else:
            raise DataError(f"{source}: record {n} needs a prompt, messages or text column (has: {', '.join(sorted(record))})")
    warn_empty_prompts(out, source)
    return out


def warn_empty_prompts(prompts: list[Any], source: str) -> None:
    """Blank prompts are answered from nothing but the chat template: say how many, so a wrong column shows."""
    empty = [n for n, p in enumerate(prompts, 1) if not _has_text(p)]
    if empty:
        log.warning("%s: %d of %d prompts are empty (first: record %d); they are answered from nothing",
                    source, len(empty), len(prompts), empty[0])


def _has_text(prompt: Any) -> bool:
    if isinstance(prompt, str):
        return bool(prompt.strip())
    return any(isinstance(m, dict) and str(m.get("content", "")).strip() for m in prompt)


def percentiles(lengths: list[int], qs: Iterable[int] = (50, 90, 99, 100)) -> dict[str, int]:
    if not lengths:
        return {}
    s = sorted(lengths)
    return {f"p{q}": s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))] for q in qs}


def read_splits(spec: Any, allowed: Iterable[str], seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """(train, eval, format) from a recipe's data section: read, rename, detect, check, hold out."""
    records = read_records(spec.train, fields=spec.fields, split=spec.split, max_samples=spec.max_samples)
    fmt = detect_format(records, spec.train, allowed, spec.format)
    records = adopt_prompt_alias(records, fmt, spec.train)
    _check(records, fmt, spec.train)
    warn_unused_columns(records, fmt, spec.train)
    eval_records = None
    if spec.eval:
        eval_records = read_records(spec.eval, fields=spec.fields, split=spec.split, max_samples=spec.eval_max_samples)
        detect_format(eval_records, spec.eval, (fmt,), fmt)
        eval_records = adopt_prompt_alias(eval_records, fmt, spec.eval)
        _check(eval_records, fmt, spec.eval)
    train, held = split_eval(records, eval_records, spec.eval_fraction, seed)
    # Held out of train, the first N of the held-out share: the rest stays out of training all the same.
    return train, held[:spec.eval_max_samples] if spec.eval_max_samples else held, fmt


def fingerprint(*splits: list[Any]) -> str:
    """run.json `data_fingerprint`: a short id of the records a run trains and evaluates on, in order, as
    read (after renames and the held-out split), so a resume can tell that the data changed underneath it."""
    digest = hashlib.sha256()
    for records in splits:
        for record in records:
            digest.update(_record_key(record).encode())
            digest.update(b"\n")
        digest.update(b"\x00")  # where one split ends: moving a record from train to eval changes the id
    return digest.hexdigest()[:16]


def _check(records: list[dict[str, Any]], fmt: str, source: str) -> None:
    check_columns(records, fmt, source)
    if fmt == "preference":
        check_pairs(records, source)
