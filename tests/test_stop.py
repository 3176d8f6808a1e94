"""Ctrl-C and SIGTERM stop training between two steps (cifar_mlflow.training.stop), in a real process sent real signals:
a first signal raises at the next check, never inside a step (where a lock may be held: CI once saw a Ctrl-C'd run
that never exited); a second raises at once; outside `deferred()` a signal raises at once, as Python's does."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

CHILD = r"""
import signal, sys, time
from cifar_mlflow.training import stop
from cifar_mlflow.errors import Terminated

stop.install()
mode = sys.argv[1]
inside = False
try:
    if mode == "outside":
        print("ready", flush=True)
        time.sleep(60)
    with stop.deferred():
        print("ready", flush=True)
        for step in range(100000):
            stop.check()
            inside = True                   # a step: the signal lands here nearly always
            end = time.time() + (30 if mode == "twice" else 0.05)
            while time.time() < end:
                pass
            inside = False
except (KeyboardInterrupt, Terminated) as exc:
    print(type(exc).__name__, "inside a step" if inside else "between steps", flush=True)
"""


def _signalled(mode: str, *signals: int) -> str:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, mode],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    for sig in signals:
        proc.send_signal(sig)
        time.sleep(0.3)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0
    return out.strip()


@pytest.mark.parametrize("sig, name", [(signal.SIGINT, "KeyboardInterrupt"), (signal.SIGTERM, "Terminated")])
def test_a_first_signal_raises_between_two_steps(sig, name):
    assert _signalled("steps", sig) == f"{name} between steps"


def test_a_second_signal_raises_at_once():
    # the step lasts 30 s, the communicate timeout is 20 s: only an immediate raise gets out in time
    assert _signalled("twice", signal.SIGINT, signal.SIGINT) == "KeyboardInterrupt inside a step"


def test_outside_deferred_a_signal_raises_at_once():
    assert _signalled("outside", signal.SIGTERM) == "Terminated between steps"
