"""Ctrl-C and SIGTERM stop training between two steps, never inside one.

Python raises KeyboardInterrupt (and a handler raising on SIGTERM raises its exception) wherever the main thread
happens to be: inside a lock held by MLflow's store client, SQLAlchemy's pool or the epoch reporter's thread pool.
The cleanup that then ends the run KILLED needs the same lock and waits for it for ever (seen in CI: a Ctrl-C'd
run that never exited). So, while `deferred()` is active (training from its first epoch to the registered model:
engine.fit, the flip TTA, the figures, the logging and registration of the model, where a raise can also land in a
weakref callback that swallows it; and the LR range test), a first signal is
only recorded, and `check()`, which the loops call before each batch, raises it there, where no lock is held. A
second signal raises at once, wherever the process is: a user pressing Ctrl-C twice is never kept waiting.
Outside `deferred()` a signal raises at once, as Python's own handler does.

Knows nothing of MLflow: `install()` is called by the entry points' command-line plumbing (cli.run_cli); where it
is not (a click command invoked in a test process), Python's handlers stay and nothing here changes anything."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from typing import Any

from cifar_mlflow.errors import Terminated

_pending: BaseException | None = None
_pending_at = 0.0  # when the pending stop was asked for (time.monotonic)
_deferring = 0
# A signal within this long of the first is the same request, not a second press: `timeout`, `kill -- -PGID`
# together with the pid, and init systems deliver one SIGTERM to the process and another to its group at once.
SAME_REQUEST_S = 0.1


def _exception(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


def _handler(signum: int, frame: Any) -> None:
    global _pending, _pending_at
    if _deferring and _pending is None:
        _pending, _pending_at = _exception(signum), time.monotonic()
        return
    if _deferring and time.monotonic() - _pending_at < SAME_REQUEST_S:
        return  # the same stop, delivered twice
    _pending = None
    raise _exception(signum)


def install() -> None:
    """SIGINT and SIGTERM through this module (main thread only, as Python's signal handlers are)."""
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)


def check() -> None:
    """Raise the stop a signal asked for, if one did: KeyboardInterrupt (SIGINT) or errors.Terminated (SIGTERM)."""
    global _pending
    if _pending is not None:
        exc, _pending = _pending, None
        raise exc


def request(exc: BaseException) -> None:
    """Ask the loops to stop with `exc` at their next check(), from any thread: the epoch reporter's, whose
    failed checkpoint must stop training at the next batch, not after another whole epoch."""
    global _pending
    if _pending is None:
        _pending = exc


def withdraw(exc: BaseException) -> None:
    """Forget a stop that request(exc) asked for and no check() has raised (the loop had ended already)."""
    global _pending
    if _pending is exc:
        _pending = None


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """While inside, a first signal waits for the next check() (or the end of the block) to raise."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    check()  # a stop asked for after the last check: honoured as the block ends, before anything else runs
