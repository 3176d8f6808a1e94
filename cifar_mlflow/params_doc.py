"""The MLproject file and the parameter tables of the docs pages (one page per entry point), written from the config
dataclasses (cifar_mlflow/config.py) so that each parameter is defined once; `python scripts/gen_params.py` rewrites
them, `--check` finds stale ones."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from cifar_mlflow.config import AnalyzeConfig, LRFindConfig, PipelineConfig, SweepConfig, TrainConfig
from cifar_mlflow.fields import allowed, as_param

ROOT = Path(__file__).resolve().parents[1]

# MLproject entry point -> (config, command before the options). `ddp` is `main` under torchrun (written below).
ENTRY_POINTS: dict[str, tuple[Any, str]] = {
    "main": (TrainConfig, "python -m entrypoints.train"),
    "analyze": (AnalyzeConfig, "python -m entrypoints.analyze"),
    "lr_find": (LRFindConfig, "python -m entrypoints.lr_find"),
    "pipeline": (PipelineConfig, "python -m entrypoints.pipeline"),
    "sweep": (SweepConfig, "python -m entrypoints.sweep"),
}
DDP_LAUNCHER = "torchrun --standalone --nproc_per_node {nproc_per_node} -m entrypoints.train"
# Entry point -> the page (relative to the repository) whose `<!-- params:ENTRY -->` region holds its table.
PAGES: dict[str, str] = {
    "main": "docs/training.md",
    "analyze": "docs/analyze.md",
    "lr_find": "docs/lr-find.md",
    "pipeline": "docs/pipeline.md",
    "sweep": "docs/sweep.md",
}
# The pipeline's steps: each receives the pipeline's parameters of the same name (PipelineConfig.steps).
STEPS: dict[str, Any] = {"lr_find": LRFindConfig, "main": TrainConfig, "analyze": AnalyzeConfig}

MLPROJECT_HEAD = """\
# cifar-mlflow: `mlflow run . -P epochs=20` (conda) or `mlflow run . --env-manager local -P epochs=20`.
# Generated from cifar_mlflow/config.py by `python scripts/gen_params.py`: edit the dataclasses there, then rerun it.
name: cifar-mlflow

conda_env: conda.yaml

entry_points:"""
DDP_COMMENT = """\
  # Data-parallel training: torchrun starts nproc_per_node processes of the `main` command (gloo on CPU, nccl
  # on GPUs); rank 0 logs to the run `mlflow run` created. Same parameters as main, plus nproc_per_node."""


def _yaml_scalar(value: object) -> str:
    """A default as YAML that loads back as the same value (booleans as the strings "true"/"false")."""
    value = as_param(value)
    if isinstance(value, float):
        text = f"{value:.12f}".rstrip("0")
        return text + "0" if text.endswith(".") else text
    text = str(value)
    plain = yaml.safe_load(f"{{a: {text}}}") == {"a": value} and not any(c in text for c in ":,#")
    return text if plain else f'"{text}"'


def _parameter(f: dataclasses.Field) -> str:
    kind = {"int": "int", "float": "float"}.get(str(f.type), "string")  # float | str (lr=auto), bool: string
    line = f"      {f.name}: {{type: {kind}, default: {_yaml_scalar(f.default)}}}"
    return line + (f"   # a number, or {', '.join(f.metadata['also'])}" if f.metadata["also"] else "")


def _command(start: str, names: list[str], width: int = 110) -> list[str]:
    """The command as a folded YAML scalar: `start` on its line, then `--name {name}` pairs wrapped at width."""
    lines, line = [start], ""
    for name in names:
        word = f"--{name} {{{name}}}"
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return ["    command: >-"] + [f"      {text}" for text in lines + [line]]


def _entry_point(name: str, config: type, start: str, extra: tuple[str, ...] = ()) -> list[str]:
    fields = dataclasses.fields(config)
    return [
        f"  {name}:",
        "    parameters:",
        *extra,
        *map(_parameter, fields),
        *_command(start, [f.name for f in fields]),
    ]


def mlproject() -> str:
    """The whole MLproject file."""
    lines = [MLPROJECT_HEAD]
    for name, (config, start) in ENTRY_POINTS.items():
        lines += _entry_point(name, config, start) + [""]
    lines += [DDP_COMMENT]
    lines += _entry_point("ddp", TrainConfig, DDP_LAUNCHER, ("      nproc_per_node: {type: int, default: 2}",))
    return "\n".join(lines) + "\n"


def _entry_of(config: type) -> str:
    return next(name for name, (c, _) in ENTRY_POINTS.items() if c is config)


def table(entry: str) -> str:
    """The table of an entry point's parameters: its own with default, allowed values and reason; those
    it takes from another entry point refer to that one's table."""
    config = ENTRY_POINTS[entry][0]
    taken = config.__taken__
    rows = ["| parameter | default | allowed | " + ("why this default |" if entry == "main" else "meaning |")]
    rows.append("|---|---|---|---|")
    for f in dataclasses.fields(config):
        if f.name in taken:
            what = f"as `{_entry_of(taken[f.name])}`"
            steps = [f"`{step}`" for step, c in STEPS.items() if f.name in c.__dataclass_fields__]
            steps_text = ", ".join(steps[:-1]) + " and " + steps[-1] if len(steps) > 1 else steps[0]
            why = f"passed to the {steps_text} step{'s' * (len(steps) > 1)}" if config is PipelineConfig else ""
        else:
            what, why = allowed(f), f.metadata["help"]
        cells = [f"`{f.name}`", str(as_param(f.default)), what, why]
        cells = [cell.replace("|", "\\|") for cell in cells]
        rows.append("|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|")
    return "\n".join(rows)


def page(entry: str, text: str) -> str:
    """The entry point's page with its `<!-- params:ENTRY -->` ... `<!-- /params:ENTRY -->` region rewritten."""
    start, end = f"<!-- params:{entry} -->", f"<!-- /params:{entry} -->"
    if text.count(start) != 1 or text.count(end) != 1:
        raise ValueError(f"{PAGES[entry]} must hold {start} and {end} once each")
    before, _, rest = text.partition(start)
    return f"{before}{start}\n{table(entry)}\n{end}{rest.partition(end)[2]}"


def stale(root: Path = ROOT, write: bool = False) -> list[str]:
    """The generated files that differ from what the config says (rewritten if write)."""
    found = []
    makers: list[tuple[str, Callable[[str], str]]] = [("MLproject", lambda _: mlproject())]
    makers += [(name, functools.partial(page, entry)) for entry, name in PAGES.items()]
    for name, make in makers:
        path = root / name
        old = path.read_text()
        new = make(old)
        if new != old:
            found.append(name)
            if write:
                path.write_text(new)
    return found
