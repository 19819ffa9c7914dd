"""A JSONL file a command appends to one line at a time, and a rerun continues: `rlhf compare --output`.

    out = JsonlFile(path)          # locked for this process; out.records: the whole lines already there
    out.append(record)             # one write of one line, so a line is kept once it is there
    out.close()

A kill between lines loses nothing; one during a write leaves a last line without its newline (torn),
which is not a record: it is left out of `records` and cut off before the next line is appended.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

from rlhf_cli.errors import RecipeError
from rlhf_cli.result import jsonl_line


class JsonlFile:
    def __init__(self, path: str | Path, *, lock_hint: str = "choose another file"):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            # Two writers would interleave their lines.
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise RecipeError(f"{self.path} is being written by another process: wait for it to finish, or {lock_hint}") from None
        data = os.pread(self._fd, os.fstat(self._fd).st_size, 0)
        self._whole = data.rfind(b"\n") + 1  # bytes up to the last newline; what follows is torn
        self._torn = self._whole < len(data)
        self.records: list[Any] = []
        for number, line in enumerate(data[: self._whole].decode("utf-8", errors="replace").splitlines(), start=1):
            try:
                self.records.append(json.loads(line))
            except json.JSONDecodeError:
                raise RecipeError(f"{self.path} line {number} is not JSON: {line[:60]!r}; give a file this command "
                                  f"wrote, or another one") from None

    def append(self, record: dict[str, Any]) -> None:
        if self._torn:
            os.ftruncate(self._fd, self._whole)
            self._torn = False
        os.write(self._fd, jsonl_line(record))
        self.records.append(record)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
