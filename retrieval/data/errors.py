"""Errors raised on bad or missing data: they name the file, the line and what was expected."""

from __future__ import annotations

from pathlib import Path


class DataFormatError(ValueError):
    """A data file does not have the expected format.

    The message reads ``path:line: expected <what>, found <what>`` so that editors and
    terminals can jump to the offending line. ``line`` is 1-based; ``None`` when the
    problem is about the file as a whole.
    """

    def __init__(self, path: str | Path, line: int | None, expected: str, found: str | None = None):
        self.path = Path(path)
        self.line = line
        self.expected = expected
        self.found = found
        where = f"{self.path}:{line}" if line is not None else f"{self.path}"
        msg = f"{where}: expected {expected}"
        if found is not None:
            shown = found if len(found) <= 120 else found[:117] + "..."
            msg += f", found {shown!r}"
        super().__init__(msg)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where Sparrow looked; the message says how to get them."""

    def __init__(self, name: str, path: str | Path, hint: str):
        self.name = name
        self.path = Path(path)
        super().__init__(f"dataset {name!r} not found at {self.path}: {hint}")
