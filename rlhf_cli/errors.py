"""Expected failures carry their exit code; the CLI (cli.py) turns them into one line on stderr, and
nothing here prints or logs.

Exit codes: 0 ok, 1 runtime failure, 2 recipe or usage error, 3 data error,
4 an eval gate failed, 130 interrupted (after a checkpoint was saved).
"""

from __future__ import annotations


class RlhfError(Exception):
    exit_code = 1

    def __init__(self, message: str, *, details: list[str] | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or []


class TrainingError(RlhfError):
    """Training broke: NaN loss, out of memory, missing hardware."""

    exit_code = 1


class RecipeError(RlhfError):
    """The recipe or the command line is wrong; nothing was written."""

    exit_code = 2


class DataError(RlhfError):
    """A data file is missing, malformed or lacks the columns a stage needs."""

    exit_code = 3


class GateFailed(RlhfError):
    exit_code = 4


class Interrupted(RlhfError):
    """SIGINT/SIGTERM arrived; a checkpoint was written before raising this."""

    exit_code = 130
