"""Command-line plumbing shared by the entry points: click options generated from a config dataclass (so the
two cannot drift), and one-line errors instead of tracebacks for problems the user can fix."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

import click

from cifar_mlflow.errors import CifarMlflowError, RunBusy, Terminated
from cifar_mlflow.fields import allowed, bool_as_word, field_type
from cifar_mlflow.training import stop

# Exits that leave the MLflow run as it is: Ctrl-C and SIGTERM end it KILLED themselves; a run another process
# trains is not this process's to end.
_RUN_LEFT_ALONE = (130, 143, RunBusy.exit_code)


class NumberOrWord(click.ParamType):
    """A number in a range, or one of a few words (`--lr 0.1` or `--lr auto`)."""

    name = "number|word"

    def __init__(self, number: click.ParamType, words: tuple[str, ...]) -> None:
        self.number, self.words = number, words
        self.name = f"{number.name}|{'|'.join(words)}"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if isinstance(value, str) and value in self.words:
            return value
        return self.number.convert(value, param, ctx)


class TrueFalse(click.types.BoolParamType):
    """click.BOOL taking only the spellings the MLproject passes and `mlflow run` logs: true or false (a `yes`
    would be logged by `mlflow run` as typed, and then differ from the `true` this process logs)."""

    name = "true|false"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if isinstance(value, bool) or value in ("true", "false"):
            return super().convert(value, param, ctx)
        self.fail(f"{value!r} is not one of 'true', 'false'.", param, ctx)


def _click_type(f: dataclasses.Field) -> Any:
    m = f.metadata
    kind = field_type(f)
    if kind is bool:
        return TrueFalse()
    if m["choices"]:
        return click.Choice(m["choices"])
    if kind is int:
        number: click.ParamType = click.IntRange(
            min=m["low"], max=m["high"], min_open=m["low_open"], max_open=m["high_open"]
        )
    elif kind is float:
        number = click.FloatRange(min=m["low"], max=m["high"], min_open=m["low_open"], max_open=m["high_open"])
    else:
        return click.STRING
    return NumberOrWord(number, m["also"]) if m["also"] else number


def config_options(config_cls: type) -> Callable[[Callable], Callable]:
    """Decorator adding one --option per dataclass field, with its default, type, range and help."""

    def decorate(fn: Callable) -> Callable:
        for f in reversed(dataclasses.fields(config_cls)):
            fn = click.option(
                f"--{f.name}",
                f.name,
                type=_click_type(f),
                default=bool_as_word(f.default),  # booleans as `false`, as in MLproject and --help
                show_default=True,
                help=f"{f.metadata['help']} Allowed: {allowed(f)}.",
            )(fn)
        return fn

    return decorate


# Training writes checkpoints: `main` (and `ddp`, the same command), and each sweep trial, trained in the sweep's
# process (its retry resumes from them). The pipeline's main step is a process of its own and says so itself; an
# interrupted analysis or range test has nothing to keep.
_KEPT = {"train": " and its last checkpoint kept", "sweep": " and the trial's last checkpoint kept for its retry"}


def invoke(command: click.Command, args: list[str] | None = None) -> tuple[int, str]:
    """Run a click command in this process: (0, "") on success, else (exit code, one-line message)."""
    try:
        command.main(args=args, standalone_mode=False)
    except click.exceptions.Abort:  # Ctrl-C (click turns KeyboardInterrupt into Abort)
        return 130, f"interrupted (Ctrl-C); the run is KILLED{_KEPT.get(command.name or '', '')}"
    except Terminated:
        return 143, f"terminated (SIGTERM); the run is KILLED{_KEPT.get(command.name or '', '')}"
    except click.ClickException as exc:
        return exc.exit_code, exc.format_message()
    except CifarMlflowError as exc:
        return getattr(exc, "exit_code", 1), str(exc)
    except OSError as exc:  # the machine, not the code: a full disk, a file too large, a folder not writable
        return 1, f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}"
    return 0, ""


@contextlib.contextmanager
def heavy_imports() -> Iterator[None]:
    """Around an entry point's imports of torch, torchvision, MLflow and the job: Python's cyclic garbage collector
    paused meanwhile (the imports allocate millions of objects that live as long as the process, and collecting
    between them costs over a quarter of the imports' CPU time: 10.0 CPU-s against 7.2 on a 2-core AVX2 machine,
    benchmarks/bench_startup.py), then what they made moved out of its reach for good (gc.freeze), so that the
    collections during training never walk it."""
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if paused:
            gc.enable()


def check_store() -> None:
    """The tracking store, checked once per entry point and before its heavy imports: a server that is down
    fails in ~5 s (mlflow's import) instead of after torch and the job have loaded too (~19 s on a busy 2-core
    machine). A new sqlite store is created here, under a lock (tracking.store)."""
    with heavy_imports():
        from cifar_mlflow.tracking.store import check_tracking_server

    check_tracking_server()


def run_cli(command: click.Command) -> None:
    """Run a click command as a program: user errors become one line on stderr, the MLflow run (if `mlflow run`
    made one) is ended FAILED with the reason, and the exit code is non-zero. Ctrl-C and SIGTERM end the run
    KILLED, stopping training between two steps (cifar_mlflow.training.stop)."""
    stop.install()
    code, message = invoke(command)
    # Loader workers still alive are stopped at exit; torch's SIGCHLD handler would then raise "DataLoader worker
    # ... killed by signal" from inside that clean-up, a traceback after the run ended as it should.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    if code:
        _fail(message, code)


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    if code not in _RUN_LEFT_ALONE and os.environ.get("MLFLOW_RUN_ID"):  # `mlflow run` made a run: FAILED + reason
        from cifar_mlflow.tracking import runs  # imported only here: --help and option errors stay fast

        runs.fail_run_from_env(message)
    sys.exit(code)
