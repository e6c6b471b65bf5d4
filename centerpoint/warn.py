"""Warnings for people: one line on stderr, `warning: ...`, in the style of the CLI's `error: ...` lines.

The project's own warnings go through `warn()`; `one_line_warnings()` (installed by the CLI) makes
Python's `warnings.warn` from any library print the same way, without the source line it would show.
"""

from __future__ import annotations

import sys
import warnings
from typing import TextIO


def format_warning(message: object) -> str:
    """`warning: <message on one line>`."""
    return "warning: " + " ".join(str(message).split())


def warn(message: str, file: TextIO | None = None) -> None:
    """Print one warning line on stderr (or `file`)."""
    out = file or sys.stderr
    print(format_warning(message), file=out, flush=True)


def _show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
          file: TextIO | None = None, line: str | None = None) -> None:
    warn(str(message), file)


def one_line_warnings() -> None:
    """Print every Python warning as one `warning: ...` line (no file name, line number or source)."""
    warnings.showwarning = _show
