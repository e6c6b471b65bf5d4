"""Specs in and out: YAML spec files, `--set key=value` overrides (unknown keys get a suggestion), the
JSON stored in checkpoints, YAML for `spec show` and spec.yaml, and the JSON schema for editors. Errors
name the file and the field path. Like `spec`, this module must not import torch.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from centerpoint.errors import CenterpointError
from centerpoint.spec import ExperimentSpec


def field_paths(model: type[BaseModel] = ExperimentSpec, prefix: str = "") -> list[str]:
    """All dotted field paths of a spec class, e.g. 'optim.lr'."""
    paths = []
    for name, info in model.model_fields.items():
        path = prefix + name
        paths.append(path)
        ann = info.annotation
        if get_origin(ann) in (Union, UnionType):  # an optional section, e.g. `CenterCropSpec | None`
            ann = next((a for a in get_args(ann) if a is not type(None)), ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            paths.extend(field_paths(ann, path + "."))
    return paths


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, field_paths(), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    path = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{path}'{_suggest(path)}"
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    msg = first["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {path or 'spec'}: {msg}{shown}{more}"


def spec_from_dict(data: dict[str, Any], source: str = "spec") -> ExperimentSpec:
    """Validate a plain nested dict into an ExperimentSpec; errors name the field path."""
    try:
        return ExperimentSpec.model_validate(data)
    except ValidationError as err:
        raise CenterpointError(_format_validation_error(err, source)) from None


def read_spec_dict(path: Path) -> dict[str, Any]:
    """Read a YAML spec file into a nested dict (safe loading only)."""
    path = Path(path)
    if not path.is_file():
        raise CenterpointError(f"{path}: spec file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise CenterpointError(f"{path}: not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CenterpointError(f"{path}: a spec file must be a YAML mapping, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """Split 'a.b=value' into ('a.b', parsed value); the value is parsed as YAML ('3' -> 3, '[1,2]')."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise CenterpointError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.lr=0.001")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_override(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """Return a copy of nested dict `data` with dotted `key` set; unknown keys are rejected with a hint."""
    if key not in field_paths():
        raise CenterpointError(f"--set {key}: unknown key{_suggest(key)}")
    out = json.loads(json.dumps(data, default=str))
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value
    return out


def load_spec(path: Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentSpec:
    """Load a spec file (None: the built-in default experiment) and apply `--set` overrides in order."""
    data = read_spec_dict(path) if path is not None else {}
    logging = data.get("logging")
    if path is not None and (logging is None or isinstance(logging, dict) and "workdir" not in logging):
        # A spec file without a run directory of its own trains into runs/<its name>, never into the
        # built-in experiment's runs/shapes.
        data = {**data, "logging": {**(logging or {}), "workdir": f"runs/{Path(path).stem}"}}
    source = str(path) if path is not None else "default spec"
    for item in overrides:
        data = apply_override(data, *parse_override(item))
    if overrides:
        source += " with --set"
    return spec_from_dict(data, source)


def with_updates(spec: ExperimentSpec, updates: dict[str, Any]) -> ExperimentSpec:
    """Return `spec` with dotted-key `updates` applied and re-validated (CLI flags go through here)."""
    data = spec_to_dict(spec)
    for key, value in updates.items():
        data = apply_override(data, key, value)
    return spec_from_dict(data, "command-line flags")


def spec_to_dict(spec: ExperimentSpec) -> dict[str, Any]:
    """Plain JSON-compatible nested dict (paths as strings, tuples as lists)."""
    return spec.model_dump(mode="json")


def spec_to_yaml(spec: ExperimentSpec) -> str:
    """The resolved spec as YAML text, in field order."""
    return yaml.safe_dump(spec_to_dict(spec), sort_keys=False)


def spec_to_json(spec: ExperimentSpec) -> str:
    """Compact JSON of the resolved spec (stored in checkpoint metadata)."""
    return json.dumps(spec_to_dict(spec), separators=(",", ":"))


def spec_from_json(text: str, source: str = "checkpoint") -> ExperimentSpec:
    """Inverse of `spec_to_json`."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise CenterpointError(f"{source}: spec metadata is not valid JSON") from None
    return spec_from_dict(data, source)


def json_schema() -> dict[str, Any]:
    """JSON schema of spec files, for editor validation."""
    return ExperimentSpec.model_json_schema()
