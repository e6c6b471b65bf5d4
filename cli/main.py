"""The `centerpoint` command line, assembled: the app, its command groups, and how errors, usage mistakes
and signals end the process (exit codes, one-line messages). The commands live in one module each.

Nothing here imports torch at module level, so `centerpoint --help` stays fast.
"""

from __future__ import annotations

import sys

import typer

from centerpoint.errors import CenterpointError
from centerpoint.runtime.interrupt import Interrupted
from cli import checkpoint_cmd, data_cmd, spec_cmd
from cli.eval_cmd import evaluate
from cli.export_cmd import export
from cli.predict_cmd import predict
from cli.train_cmd import TrainCommand, resume_command
from cli.train_cmd import train as train_command

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="CenterNet object detection on torch.func: train, evaluate, predict.")
app.command("train", cls=TrainCommand)(train_command)
app.command("eval")(evaluate)
app.command("predict")(predict)
app.command("export")(export)
app.add_typer(spec_cmd.app, name="spec")
app.add_typer(data_cmd.app, name="data")
app.add_typer(checkpoint_cmd.app, name="checkpoint")

_DEBUG = {"on": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _DEBUG["on"] = debug


def _one_line(err: BaseException | str) -> str:
    """The error's message on one line. An error raised in a DataLoader worker arrives re-raised with the
    worker's traceback inside its message; its last line holds the original message."""
    text = str(err).strip()
    if "Caught " in text and "Original Traceback" in text:
        last = text.splitlines()[-1]  # "centerpoint.errors.CenterpointError: <message>"
        text = text.split("Caught ", 1)[0] + (last.split(": ", 1)[1] if ": " in last else last)
    return " ".join(text.split())


def _interrupted(sig: Interrupted) -> None:
    """The one line an interrupted command prints (none on workers that rank 0 speaks for)."""
    if sig.quiet:
        return
    if sig.step is not None:
        print(f"interrupted at step {sig.step}; resume with: {resume_command(sys.argv, sig.workdir)}",
              file=sys.stderr, flush=True)
    else:
        print(f"interrupted ({sig})", file=sys.stderr, flush=True)


def main() -> None:
    """Console-script entry: CenterpointError, OSError and usage errors -> one line on stderr, exit 2
    (--debug: traceback); SIGINT / SIGTERM -> exit 130 / 143."""
    from centerpoint.errors import one_line_warnings
    from centerpoint.runtime.interrupt import raise_on_signals

    raise_on_signals()
    one_line_warnings()
    debug = _DEBUG["on"] or "--debug" in sys.argv
    try:
        code = app(standalone_mode=False)
    except Interrupted as sig:
        _interrupted(sig)
        sys.exit(sig.exit_code)
    except CenterpointError as err:
        if debug:
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as err:  # disk full, permissions, a path that is a file: the user's environment
        if debug:
            raise
        where = f" ({err.filename})" if err.filename else ""
        print(f"error: {err.strerror or _one_line(err)}{where}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:  # click's usage errors and friends (typer may vendor its own click: duck-typed)
        if isinstance(err, typer.Exit):
            sys.exit(err.exit_code)
        if isinstance(err, typer.Abort):
            sys.exit(130)
        if type(err).__name__ == "NoArgsIsHelpError":  # a group without its subcommand: show its help
            err.show()  # type: ignore[attr-defined]
            sys.exit(getattr(err, "exit_code", 2))
        if callable(getattr(err, "format_message", None)) and hasattr(err, "exit_code"):
            ctx = getattr(err, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            print(f"error: {_one_line(err.format_message())}{hint}", file=sys.stderr)  # type: ignore[attr-defined]
            sys.exit(2)
        raise
    # Without standalone mode typer returns an exit code instead of exiting (130 for a KeyboardInterrupt
    # raised by code that is not ours): pass it on rather than ending with 0.
    if isinstance(code, int) and code:
        if code == 130:
            print("interrupted", file=sys.stderr)
        sys.exit(code)


if __name__ == "__main__":
    main()
