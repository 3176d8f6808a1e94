"""The contract files agree: MLproject <-> TrainConfig <-> click options, pyproject pins <-> conda.yaml,
README documents every parameter, and only tracking.py imports mlflow."""

import ast
import dataclasses
import re
import tomllib

import click
import pytest
import yaml

from cifar_mlflow.cli import NumberOrWord
from cifar_mlflow.config import AnalyzeConfig, LRFindConfig, PipelineConfig, TrainConfig
from entrypoints.analyze import analyze as analyze_command
from entrypoints.lr_find import lr_find as lr_find_command
from entrypoints.pipeline import pipeline as pipeline_command
from entrypoints.train import train as train_command
from tests.conftest import REPO

# MLproject entry point -> (config dataclass, click command, python module)
ENTRY_POINTS = {
    "main": (TrainConfig, train_command, "entrypoints.train"),
    "analyze": (AnalyzeConfig, analyze_command, "entrypoints.analyze"),
    "lr_find": (LRFindConfig, lr_find_command, "entrypoints.lr_find"),
    "pipeline": (PipelineConfig, pipeline_command, "entrypoints.pipeline"),
}
each_entry_point = pytest.mark.parametrize("entry", list(ENTRY_POINTS))

# MLproject type -> dataclass annotation ("float | str": a number or a word such as lr=auto)
YAML_TYPES = {"int": {"int"}, "float": {"float"}, "string": {"str", "float | str"}}


def _mlproject():
    return yaml.safe_load((REPO / "MLproject").read_text())


def test_every_entry_point_is_tested_here():
    assert set(_mlproject()["entry_points"]) == set(ENTRY_POINTS) | {"ddp"}


def test_ddp_entry_point_is_main_under_torchrun():
    """`ddp` takes main's parameters (same order, types, defaults) plus nproc_per_node, and runs main's command
    under torchrun."""
    points = _mlproject()["entry_points"]
    ddp, main = points["ddp"], points["main"]
    assert list(ddp["parameters"]) == ["nproc_per_node"] + list(main["parameters"])
    assert {k: v for k, v in ddp["parameters"].items() if k != "nproc_per_node"} == main["parameters"]
    assert ddp["parameters"]["nproc_per_node"] == {"type": "int", "default": 2}
    launcher = "torchrun --standalone --nproc_per_node {nproc_per_node} -m entrypoints.train "
    assert ddp["command"] == launcher + main["command"].removeprefix("python -m entrypoints.train ")


@each_entry_point
def test_mlproject_matches_config_names_types_defaults(entry):
    config, _, _ = ENTRY_POINTS[entry]
    params = _mlproject()["entry_points"][entry]["parameters"]
    fields = {f.name: f for f in dataclasses.fields(config)}
    assert list(params) == list(fields), "same names, same order"
    for name, spec in params.items():
        kind = fields[name].type
        assert kind in YAML_TYPES[spec["type"]], name
        assert spec["default"] == fields[name].default and type(spec["default"]).__name__ in kind, name


@each_entry_point
def test_mlproject_command_passes_every_parameter(entry):
    _, _, module = ENTRY_POINTS[entry]
    spec = _mlproject()["entry_points"][entry]
    assert spec["command"].startswith(f"python -m {module} ")
    passed = re.findall(r"--(\w+) \{(\w+)\}", spec["command"])
    assert [a for a, b in passed] == [b for a, b in passed] == list(spec["parameters"])


@each_entry_point
def test_click_options_match_config(entry):
    config, command, _ = ENTRY_POINTS[entry]
    options = {p.name: p for p in command.params if isinstance(p, click.Option)}
    fields = {f.name: f for f in dataclasses.fields(config)}
    assert set(options) == set(fields)
    for name, f in fields.items():
        assert options[name].default == f.default, name
        assert options[name].opts == [f"--{name}"]
        click_kind = {
            click.IntRange: "int",
            click.FloatRange: "float",
            click.Choice: "str",
            NumberOrWord: "float | str",
        }.get(type(options[name].type), "str" if options[name].type is click.STRING else "?")
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


@each_entry_point
def test_readme_documents_every_parameter(entry):
    """Each entry point has a README section whose table lists every parameter with its default."""
    config, _, _ = ENTRY_POINTS[entry]
    readme = (REPO / "README.md").read_text()
    section = readme.split(f"## Parameters (`{entry}` entry point)", 1)[1].split("\n## ", 1)[0]
    for f in dataclasses.fields(config):
        assert re.search(rf"^\| `{f.name}` \| {re.escape(str(f.default))} \|", section, re.M), (
            f"README {entry} table lacks {f.name} with default {f.default}"
        )
    assert "make train" in readme and "make test" in readme


def test_only_the_tracking_module_imports_mlflow():
    importers = set()
    for path in list((REPO / "cifar_mlflow").rglob("*.py")) + list((REPO / "entrypoints").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(n == "mlflow" or n.startswith("mlflow.") for n in names):
                importers.add(path.name)
    assert importers == {"tracking.py"}


def test_ci_runs_the_readme_test_command():
    assert "make test" in (REPO / ".ci" / "run").read_text()
