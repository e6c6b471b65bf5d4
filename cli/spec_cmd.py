"""`centerpoint spec show|schema`: the resolved spec as YAML, the JSON schema of spec files."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from cli.options import SetOpt, SpecArg, resolve_spec

app = typer.Typer(no_args_is_help=True, help="Show or validate experiment specs.")


@app.command("show")
def spec_show(spec_file: Path | None = SpecArg, sets: list[str] = SetOpt) -> None:
    """Print the resolved spec as YAML."""
    from centerpoint.spec_io import spec_to_yaml

    sys.stdout.write(spec_to_yaml(resolve_spec(spec_file, sets)))


@app.command("schema")
def spec_schema() -> None:
    """Print the JSON schema of spec files."""
    import json

    from centerpoint.spec_io import json_schema

    print(json.dumps(json_schema(), indent=2))
