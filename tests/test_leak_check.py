"""The suite's own guard (conftest.no_leaked_processes): a test that leaves a process running fails the session,
naming the process; multiprocessing's helper processes, which belong to the test process itself, do not. Shown
on probe test files run by pytest in a process of their own, with this suite's conftest as a plugin."""

import os
import subprocess
import sys

from tests.conftest import REPO

LEAKY = """
import subprocess


def test_starts_a_process_and_forgets_it():
    subprocess.Popen(["sleep", "300"])
"""

TIDY = """
import multiprocessing
import subprocess


def test_uses_a_spawn_lock_and_waits_for_its_child():
    multiprocessing.get_context("spawn").Lock()  # starts multiprocessing's resource tracker, for good
    subprocess.run(["true"], check=True)
"""


def _pytest(tmp_path, source: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_probe.py").write_text(source)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-c", os.devnull, "--rootdir", str(tmp_path)]
        + ["-p", "no:cacheprovider", str(tmp_path / "test_probe.py")],
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_process_left_running_fails_the_session_and_is_killed(tmp_path):
    proc = _pytest(tmp_path, LEAKY)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "1 passed, 1 error" in proc.stdout, proc.stdout[-2000:]
    line = next(x for x in proc.stdout.splitlines() if "Failed: 1 process(es) left running" in x)
    assert "1 process(es) left running by the tests (now killed): pid " in line and "sleep 300" in line
    pid = int(line.split("pid ", 1)[1].split(",", 1)[0])
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z", "not killed"


def test_multiprocessings_own_helpers_are_not_leaks(tmp_path):
    proc = _pytest(tmp_path, TIDY)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "1 passed" in proc.stdout and "left running" not in proc.stdout
