"""Problems for people: the one exception type the CLI turns into a single clear line (exit code 2), and
warnings printed the same way, one `warning: ...` line on stderr."""

from __future__ import annotations

import os
import sys
import warnings
from typing import TextIO


class CenterpointError(Exception):
    """A problem with the user's input (spec, data, checkpoint, flags, files) that they can fix.

    The message must name the file/field and say what to do; the CLI prints it on one line without a
    traceback.
    """


def first_line(err: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (at most `limit` characters), or its type's name when the
    message is empty: for quoting a library's error inside a CenterpointError."""
    lines = str(err).strip().splitlines()
    return lines[0][:limit] if lines else type(err).__name__


def format_warning(message: object) -> str:
    """`warning: <message on one line>`."""
    return "warning: " + " ".join(str(message).split())


def warn(message: str, file: TextIO | None = None) -> None:
    """The project's warnings: one line on stderr (or `file`), never Python's warning with its source line."""
    print(format_warning(message), file=file or sys.stderr, flush=True)


_SHOWN: set[tuple[type[Warning], str]] = set()


def _show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
          file: TextIO | None = None, line: str | None = None) -> None:
    """Print a Python warning once per process, and only on rank 0 of a launched job: every rank runs the
    same code, and Python's own once-per-place rule forgets what it showed whenever any library changes
    the warning filters (torch does, so a DataLoader's warning came back at every loader start)."""
    key = (category, " ".join(str(message).split()))
    if key in _SHOWN or os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) != "0":
        return
    _SHOWN.add(key)
    warn(str(message), file)


def one_line_warnings() -> None:
    """Print every Python `warnings.warn` (from any library) as one `warning: ...` line, once per process, on
    rank 0 only (`_show`; the CLI installs it)."""
    warnings.showwarning = _show
