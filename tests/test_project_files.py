"""The contract files agree: MLproject and the docs pages' parameter tables are what scripts/gen_params.py writes
from the config dataclasses, MLproject <-> configs <-> click options, pyproject pins <-> conda.yaml, and only
the tracking package imports mlflow. The README stays short and links every docs page, and no link points nowhere."""

import ast
import dataclasses
import importlib
import re
import shutil
import subprocess
import sys
import tomllib

import click
import pytest
import yaml

from cifar_mlflow import params_doc
from cifar_mlflow.cli import NumberOrWord, TrueFalse
from cifar_mlflow.config import LRFindConfig, PipelineConfig, TrainConfig
from cifar_mlflow.fields import bool_as_word
from tests.conftest import REPO

# MLproject entry point -> (config dataclass, click command, python module), from params_doc's one list
ENTRY_POINTS = {
    name: (config, getattr(importlib.import_module(module), module.rpartition(".")[2]), module)
    for name, (config, module) in params_doc.ENTRY_POINTS.items()
}
each_entry_point = pytest.mark.parametrize("entry", list(ENTRY_POINTS))
# MLproject entry point -> the docs page that holds its parameter table
PAGES = {
    "main": "docs/training.md",
    "analyze": "docs/analyze.md",
    "lr_find": "docs/lr-find.md",
    "pipeline": "docs/pipeline.md",
    "sweep": "docs/sweep.md",
}

# MLproject type -> dataclass annotation ("float | str": a number or a word such as lr=auto; bool: true/false)
YAML_TYPES = {"int": {"int"}, "float": {"float"}, "string": {"str", "float | str", "bool"}}


def _mlproject():
    return yaml.safe_load((REPO / "MLproject").read_text())


def test_mlproject_and_docs_tables_are_generated_from_the_configs():
    assert params_doc.stale() == [], "stale: run python scripts/gen_params.py"
    assert params_doc.PAGES == PAGES


def test_gen_params_check_names_the_stale_file_and_the_rewrite_fixes_it(tmp_path):
    (tmp_path / "docs").mkdir()
    for name in ("MLproject", *PAGES.values()):
        shutil.copy(REPO / name, tmp_path / name)
    text = (tmp_path / "MLproject").read_text()
    (tmp_path / "MLproject").write_text(
        text.replace("epochs: {type: int, default: 20}", "epochs: {type: int, default: 3}")
    )
    assert params_doc.stale(tmp_path) == ["MLproject"]
    assert params_doc.stale(tmp_path, write=True) == ["MLproject"]
    assert params_doc.stale(tmp_path) == [] and (tmp_path / "MLproject").read_text() == text
    page = tmp_path / PAGES["lr_find"]
    text = page.read_text()
    page.write_text(text.replace("| `num_iter` | 100 |", "| `num_iter` | 50 |"))
    assert params_doc.stale(tmp_path) == [PAGES["lr_find"]]
    assert params_doc.stale(tmp_path, write=True) == [PAGES["lr_find"]]
    assert params_doc.stale(tmp_path) == [] and page.read_text() == text
    proc = subprocess.run(
        [sys.executable, "scripts/gen_params.py", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_derived_configs_take_each_field_from_where_it_is_defined():
    """lr_find and pipeline define only their own parameters; the others are TrainConfig's (AnalyzeConfig's,
    LRFindConfig's) fields taken by name: the same default, help and allowed values."""
    for config in (LRFindConfig, PipelineConfig):
        for name, source in config.__taken__.items():
            mine, theirs = config.__dataclass_fields__[name], source.__dataclass_fields__[name]
            assert (mine.type, mine.default, dict(mine.metadata)) == (
                theirs.type,
                theirs.default,
                dict(theirs.metadata),
            )
    assert set(LRFindConfig.__dataclass_fields__) - set(LRFindConfig.__taken__) == {"start_lr", "end_lr", "num_iter"}
    assert set(PipelineConfig.__dataclass_fields__) - set(PipelineConfig.__taken__) == {"reuse"}
    assert set(TrainConfig.__dataclass_fields__) - set(PipelineConfig.__dataclass_fields__) == {"lr"}


def test_every_entry_point_is_in_the_one_list():
    """Each module of entrypoints/ is an entry point of params_doc.ENTRY_POINTS, and so of the MLproject."""
    modules = {f"entrypoints.{path.stem}" for path in (REPO / "entrypoints").glob("*.py") if path.stem != "__init__"}
    assert modules == {module for _, _, module in ENTRY_POINTS.values()}
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
        expected = bool_as_word(fields[name].default)  # booleans: the strings "true"/"false" mlflow passes and logs
        assert spec["default"] == expected and type(spec["default"]) is type(expected), name


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
        assert options[name].default == bool_as_word(f.default), name
        assert options[name].type.convert(options[name].default, None, None) == f.default, name
        assert options[name].opts == [f"--{name}"]
        click_kind = {
            click.IntRange: "int",
            click.FloatRange: "float",
            click.Choice: "str",
            NumberOrWord: "float | str",
            TrueFalse: "bool",
        }.get(type(options[name].type), "str" if options[name].type is click.STRING else "?")
        assert click_kind == f.type, name
        if f.metadata["choices"]:
            assert tuple(options[name].type.choices) == f.metadata["choices"], name


@pytest.mark.parametrize("entry, name", [("main", "compile"), ("pipeline", "reuse")])
def test_boolean_options_take_true_or_false_as_mlflow_passes_them(entry, name):
    command = ENTRY_POINTS[entry][1]
    assert command.make_context(entry, [f"--{name}", "true"]).params[name] is True
    assert command.make_context(entry, [f"--{name}", "false"]).params[name] is False
    with pytest.raises(click.BadParameter, match="'yes' is not one of 'true', 'false'"):
        command.make_context(entry, [f"--{name}", "yes"])


def test_pins_agree_between_pyproject_and_conda():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    pip_deps = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert deps == pip_deps
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][\w.]*", d) for d in deps), "exact pins only"
    assert "python=3.11" in conda["dependencies"]


@each_entry_point
def test_docs_page_documents_every_parameter(entry):
    """Each entry point's docs page has a section whose table lists every parameter with its default."""
    config, _, _ = ENTRY_POINTS[entry]
    page = (REPO / PAGES[entry]).read_text()
    section = page.split(f"## Parameters (`{entry}` entry point)", 1)[1].split("\n## ", 1)[0]
    for f in dataclasses.fields(config):
        assert re.search(rf"^\| `{f.name}` \| {re.escape(str(bool_as_word(f.default)))} \|", section, re.M), (
            f"{PAGES[entry]} table lacks {f.name} with default {f.default}"
        )
    readme = (REPO / "README.md").read_text()
    assert "make train" in readme and "make test" in readme


def _outside_code(text: str) -> str:
    """Markdown without its fenced blocks and inline code spans (where brackets and # are not links or headings)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`]*`", "", text)


def _anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    anchors, count = set(), {}  # count: a repeated heading's anchor gets -1, -2, ...
    fenceless = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    for heading in re.findall(r"^#{1,6} +(.+?) *$", fenceless, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.add(f"{slug}-{count[slug]}" if slug in count else slug)
        count[slug] = count.get(slug, 0) + 1
    return anchors


def _links(path) -> list[str]:
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", _outside_code(path.read_text()))


DOCS = sorted((REPO / "docs").glob("*.md"))


def test_readme_is_short_and_links_every_docs_page():
    """A newcomer reads the README in ten minutes; everything else is one link away, and every page links back."""
    readme = REPO / "README.md"
    assert len(readme.read_text().splitlines()) <= 250
    assert DOCS and set(PAGES.values()) <= {str(p.relative_to(REPO)) for p in DOCS}
    linked = {link.split("#")[0] for link in _links(readme)}
    assert [str(p.relative_to(REPO)) for p in DOCS if str(p.relative_to(REPO)) not in linked] == []
    for page in DOCS:
        assert "../README.md" in {link.split("#")[0] for link in _links(page)}, f"{page.name} links not to the README"


@pytest.mark.parametrize("path", [REPO / "README.md", *DOCS], ids=lambda p: p.name)
def test_every_relative_link_points_to_a_file_and_heading_that_exist(path):
    broken = []
    for link in _links(path):
        if re.match(r"[a-z]+:", link):  # https:, mailto:: not this repository's
            continue
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        if not file.exists():
            broken.append(f"{link} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text()):
            broken.append(f"{link} (no such heading)")
    assert broken == [], f"{path.name}: {broken}"


def test_only_the_tracking_package_imports_mlflow():
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
                importers.add("/".join(path.relative_to(REPO).parts[:2]))
    assert importers == {"cifar_mlflow/tracking"}


def _package_imports(root=REPO) -> dict[str, set[str]]:
    """cifar_mlflow's modules -> the package's modules each imports, module-level or inside a function alike (a
    package's own name stands for its __init__.py; `from pkg import name` is pkg.name where that is a module)."""
    paths = {}
    for path in (root / "cifar_mlflow").rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in paths.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, one level up per dot after the first
                    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                    package = package.rsplit(".", node.level - 1)[0]
                    base = f"{package}.{base}" if base else package
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in paths:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found.add(target)
        graph[name] = found
    return graph


def test_the_package_imports_have_no_cycle():
    """No two modules of cifar_mlflow import each other, directly or round a longer circle, not even inside a
    function: data flows one way (cifar_mlflow/__init__.py)."""
    graph = _package_imports()
    assert {"cifar_mlflow.config", "cifar_mlflow.sweeps.search_space"} <= graph["cifar_mlflow.sweeps.sweep_config"]
    reach = {name: set(targets) for name, targets in graph.items()}
    changed = True
    while changed:  # transitive closure (a few dozen modules)
        changed = False
        for seen in reach.values():
            more = set().union(*(reach[t] for t in seen)) - seen
            if more:
                seen |= more
                changed = True
    circles = sorted(name for name, seen in reach.items() if name in seen)
    assert not circles, f"modules on an import cycle: {circles}"


def test_ci_runs_the_readme_test_command():
    assert "make test" in (REPO / ".ci" / "run").read_text()
