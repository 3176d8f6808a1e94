"""The contract files agree: MLproject <-> TrainConfig <-> click options, pyproject pins <-> conda.yaml,
README documents every parameter, and only tracking.py imports mlflow."""
import ast
import dataclasses
import re
import tomllib

import click
import yaml

from cifar_mlflow.config import TrainConfig
from entrypoints.train import train as train_command
from tests.conftest import REPO

YAML_TYPES = {"int": int, "float": float, "string": str}


def _mlproject():
    return yaml.safe_load((REPO / "MLproject").read_text())


def test_mlproject_main_matches_config_names_types_defaults():
    params = _mlproject()["entry_points"]["main"]["parameters"]
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert list(params) == list(fields), "same names, same order"
    for name, spec in params.items():
        kind = fields[name].type
        assert YAML_TYPES[spec["type"]].__name__ == kind, name
        assert spec["default"] == fields[name].default and type(spec["default"]).__name__ == kind, name


def test_mlproject_command_passes_every_parameter():
    entry = _mlproject()["entry_points"]["main"]
    assert entry["command"].startswith("python -m entrypoints.train ")
    passed = re.findall(r"--(\w+) \{(\w+)\}", entry["command"])
    assert [a for a, b in passed] == [b for a, b in passed] == list(entry["parameters"])


def test_click_options_match_config():
    options = {p.name: p for p in train_command.params if isinstance(p, click.Option)}
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(options) == set(fields)
    for name, f in fields.items():
        assert options[name].default == f.default, name
        assert options[name].opts == [f"--{name}"]
        click_kind = {click.IntRange: "int", click.FloatRange: "float", click.Choice: "str"}.get(
            type(options[name].type), "str" if options[name].type is click.STRING else "?")
        assert click_kind == f.type, name
        if f.metadata["choices"]:
            assert tuple(options[name].type.choices) == f.metadata["choices"], name


def test_pins_agree_between_pyproject_and_conda():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    pip_deps = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert deps == pip_deps
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][\w.]*", d) for d in deps), "exact pins only"
    assert "python=3.11" in conda["dependencies"]


def test_readme_documents_every_parameter():
    readme = (REPO / "README.md").read_text()
    for f in dataclasses.fields(TrainConfig):
        assert re.search(rf"^\| `{f.name}` \|", readme, re.M), f"README parameter table lacks {f.name}"
    assert "make train" in readme and "make test" in readme


def test_only_the_tracking_module_imports_mlflow():
    importers = set()
    for path in list((REPO / "cifar_mlflow").glob("*.py")) + list((REPO / "entrypoints").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "mlflow" or n.startswith("mlflow.") for n in names):
                importers.add(path.name)
    assert importers == {"tracking.py"}


def test_ci_runs_the_readme_test_command():
    assert "make test" in (REPO / ".ci" / "run").read_text()
