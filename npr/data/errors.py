"""Errors of data loading. All are ``NprError``: the CLI prints the message without a traceback."""

from __future__ import annotations

from npr.errors import NprError


class DataError(NprError):
    """A problem spec or data file that cannot be loaded; the message says what to do."""


class DataFileError(DataError, ValueError):
    """A bad line in a problems JSONL file.

    ``path``, ``line`` (1-based) and ``field`` (None when the whole line is bad) locate it.
    """

    def __init__(self, path: str, line: int, field: str | None, problem: str, fix: str):
        self.path, self.line, self.field = path, line, field
        where = f"{path}:{line}" + (f": field {field!r}" if field else "")
        super().__init__(f"{where}: {problem}; {fix}")


class UnknownSpecError(DataError, KeyError):
    """A benchmark name, reasoning-gym task or parameter that does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class MissingBenchmarkError(DataError, FileNotFoundError):
    """A known benchmark with no local file, and no hub to fall back on."""
