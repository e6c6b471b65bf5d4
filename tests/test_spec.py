from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from centerpoint.errors import CenterpointError
from centerpoint.spec import ExperimentSpec
from centerpoint.spec_io import json_schema, load_spec, spec_from_json, spec_to_json, spec_to_yaml, with_updates

ROOT = Path(__file__).resolve().parents[1]


def test_default_equals_shapes_yaml():
    assert load_spec(ROOT / "experiments" / "shapes.yaml") == ExperimentSpec()
    assert load_spec(None) == ExperimentSpec()


def test_every_experiment_file_validates():
    files = sorted((ROOT / "experiments").glob("*.yaml"))
    assert files
    for f in files:
        load_spec(f)


def test_overrides_apply_and_validate():
    spec = load_spec(None, ["optim.lr=0.001", "train.epochs=3", "data.scale_range=[0.5, 1.5]"])
    assert spec.optim.lr == 0.001
    assert spec.train.epochs == 3
    assert spec.data.scale_range == (0.5, 1.5)
    assert spec.model == ExperimentSpec().model


def test_unknown_key_suggests_nearest():
    with pytest.raises(CenterpointError, match="did you mean 'optim.lr'"):
        load_spec(None, ["optim.lrr=0.1"])


def test_unknown_key_in_file_suggests(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("optim:\n  momentun: 0.9\n")
    with pytest.raises(CenterpointError, match=r"unknown key 'optim.momentun'.*optim.momentum"):
        load_spec(f)


@pytest.mark.parametrize("item, field", [
    ("optim.lr=-1", "optim.lr"),
    ("train.batch_size=abc", "train.batch_size"),
    ("data.input_size=100", "data.input_size"),  # not a multiple of 32
    ("runtime.device=tpu", "runtime.device"),
    ("data.scale_range=[2.0, 1.0]", "data"),
])
def test_bad_values_name_the_field(item, field):
    with pytest.raises(CenterpointError, match=field.replace(".", r"\.")):
        load_spec(None, [item])


def test_malformed_override_and_files(tmp_path):
    with pytest.raises(CenterpointError, match="KEY=VALUE"):
        load_spec(None, ["optim.lr"])
    with pytest.raises(CenterpointError, match="not found"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(CenterpointError, match="not valid YAML"):
        load_spec(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(CenterpointError, match="mapping"):
        load_spec(scalar)


def test_specs_are_frozen():
    spec = ExperimentSpec()
    with pytest.raises(ValidationError):
        spec.optim.lr = 1.0  # type: ignore[misc]


def test_yaml_and_json_round_trip():
    spec = load_spec(None, ["optim.name=sgd", "schedule.milestones=[90, 120]", "model.depth=50"])
    assert spec_from_json(spec_to_json(spec)) == spec
    assert ExperimentSpec.model_validate(yaml.safe_load(spec_to_yaml(spec))) == spec


def test_with_updates_and_schema():
    spec = with_updates(ExperimentSpec(), {"train.batch_size": 4, "logging.workdir": "x"})
    assert spec.train.batch_size == 4 and str(spec.logging.workdir) == "x"
    schema = json_schema()
    assert "optim" in schema["properties"]
    assert schema["$defs"]["OptimSpec"]["properties"]["lr"]["exclusiveMinimum"] == 0.0


def test_yaml_on_off_spellings_of_runtime_compile() -> None:
    assert load_spec(None, ["runtime.compile=on"]).runtime.compile == "on"
    assert load_spec(None, ["runtime.compile=off"]).runtime.compile == "off"
    with pytest.raises(CenterpointError, match="runtime.compile"):
        load_spec(None, ["runtime.compile=sometimes"])
