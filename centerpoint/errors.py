"""The one exception type the CLI turns into a single clear line (exit code 2)."""


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
