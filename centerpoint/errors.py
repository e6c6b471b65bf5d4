"""The one exception type the CLI turns into a single clear line (exit code 2)."""


class CenterpointError(Exception):
    """A problem with the user's input (spec, data, checkpoint, flags, files) that they can fix.

    The message must name the file/field and say what to do; the CLI prints it on one line without a
    traceback.
    """
