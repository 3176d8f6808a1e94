"""Shared fixtures: generated data in the exact CIFAR-10 python layout, a real sqlite MLflow store in a temp dir,
a helper that runs the real `mlflow run` on this project, and the browser (Chromium) the UI tests drive."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers, each training in its own process or in-process: one compute thread per process (this one and
    # every training subprocess it starts) keeps two cores busy without OpenMP threads spinning against each other.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
# Every process the tests start (mlflow run, mlflow models serve, python -c) imports this checkout's package, not
# whichever copy an editable install points at.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
# Small on purpose: a training step on CPU runs ~100 images/s.
TRAIN_PER_BATCH = 64  # x 5 batch files = 320 training images
TEST_IMAGES = 128


def write_cifar_layout(
    root: Path, *, train_per_batch: int = TRAIN_PER_BATCH, test_images: int = TEST_IMAGES, encoding: str = "python2"
) -> Path:
    """Write root/cifar-10-batches-py/ with learnable images (the synthetic generator's), encoded as the official
    files are (Python 2's cPickle: byte strings everywhere) unless `encoding` names the Python 3 variant."""
    from cifar_mlflow import data

    folder = root / data.LAYOUT
    folder.mkdir(parents=True, exist_ok=True)
    train = data.make_synthetic(5 * train_per_batch, seed=11)
    for i, name in enumerate(data.TRAIN_FILES):
        part = data.Split(
            train.images[i * train_per_batch : (i + 1) * train_per_batch],
            train.labels[i * train_per_batch : (i + 1) * train_per_batch],
        )
        data.write_batch(folder / name, part, encoding=encoding, label=f"training batch {i + 1} of 5")
    data.write_batch(
        folder / data.TEST_FILE,
        data.make_synthetic(test_images, seed=12),
        encoding=encoding,
        label="testing batch 1 of 1",
    )
    data.write_meta(folder / data.META_FILE, data.SYNTHETIC_CLASSES, encoding=encoding)
    return root


def official_archive(
    folder: Path, out: Path, *, train_per_batch: int = TRAIN_PER_BATCH, test_images: int = TEST_IMAGES
) -> str:
    """An archive laid out as cifar-10-python.tar.gz is (cifar-10-batches-py/ with data_batch_1..5, test_batch,
    batches.meta and readme.html, in the official member order, official encoding); returns its MD5."""
    from cifar_mlflow import data

    write_cifar_layout(folder, train_per_batch=train_per_batch, test_images=test_images)
    layout = folder / data.LAYOUT
    (layout / "readme.html").write_text(
        "<meta HTTP-EQUIV='REFRESH' content='0; url=http://www.cs.toronto.edu/~kriz/cifar.html'>\n"
    )
    members = ["data_batch_4", "readme.html", "test_batch", "data_batch_3", "batches.meta", "data_batch_2"]
    members += ["data_batch_5", "data_batch_1"]

    def owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 1000
        info.uname = info.gname = "kriz"
        info.mode = 0o755 if info.isdir() else 0o644
        return info

    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:gz", format=tarfile.GNU_FORMAT) as tar:
        tar.add(layout, arcname=data.LAYOUT, recursive=False, filter=owned)
        for name in members:
            tar.add(layout / name, arcname=f"{data.LAYOUT}/{name}", filter=owned)
    return hashlib.md5(out.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data_dir holding a small CIFAR-10 layout in the official files' encoding. Treat as read-only."""
    return write_cifar_layout(tmp_path_factory.mktemp("cifar"))


WITHOUT_PROJECT = Path(__file__).parent / "without_project"


@dataclass
class Store:
    root: Path
    uri: str
    experiment: str

    def env_without_project(self, **extra: str) -> dict[str, str]:
        """env() for a process that behaves as on a machine where this project is not installed
        (tests/without_project/sitecustomize.py): a stock MLflow user's."""
        return self.env(PYTHONPATH=str(WITHOUT_PROJECT), **extra)

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("MLFLOW_RUN_ID", None)
        # MLproject runs `python -m ...`: make that this interpreter, whatever PATH the suite started with.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        # MLflow samples system metrics every 10 s: a run over 10 s records some. Every second (SAMPLED_EVERY_SECOND)
        # costs a process ~0.06 CPU-s a second (psutil, then a write to the store), so only where it is checked.
        env.update(MLFLOW_TRACKING_URI=self.uri, **extra)
        return env


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    """A real MLflow sqlite store with its artifacts under tmp_path, active in this process too."""
    yield from make_store(tmp_path, monkeypatch)


_SQLITE_TEMPLATE: list[Path] = []


def _fresh_sqlite(path: Path) -> None:
    """An empty, fully migrated MLflow sqlite database at path. Creating one runs MLflow's schema migrations
    (1.5 s idle, several seconds on a busy machine); copying one made once per test process takes milliseconds."""
    import mlflow

    if not _SQLITE_TEMPLATE:
        template = Path(tempfile.mkdtemp(prefix="mlflow-template-")) / "template.db"
        mlflow.MlflowClient(f"sqlite:///{template}").search_experiments()
        _SQLITE_TEMPLATE.append(template)
    shutil.copyfile(_SQLITE_TEMPLATE[0], path)


@pytest.fixture(scope="module")
def module_store(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Store:
    """One real store for a whole module (a module that wants it names it `store` in a fixture of its own); each
    test looks only at the runs and models it made."""
    with pytest.MonkeyPatch.context() as mp:
        yield from make_store(tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2]), mp)


def runs_of(store: Store) -> list:
    """Every run of the store's test experiment, newest first."""
    import mlflow

    client = mlflow.MlflowClient(store.uri)
    return client.search_runs([client.get_experiment_by_name(store.experiment).experiment_id])


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a plain child process (`python -c ...`) of the suite: this one's, the venv's python first
    on PATH, one compute thread; `extra` on top."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def one_line(args: list[str], command=None) -> str:
    """The message of an entry point's click command (train unless another is named) that must refuse `args`:
    a non-zero exit and one line."""
    from cifar_mlflow.cli import invoke

    if command is None:
        from entrypoints.train import train as command
    code, message = invoke(command, args)
    assert code != 0, f"{args} was accepted"
    assert message and "\n" not in message.strip(), message
    return message


def at_once(calls: list[Callable[[], object]]) -> list[object]:
    """Each call in a thread of its own, the threads released together (a race, as separate processes or workers
    would run it): what each returned, or the exception it raised, in the order of `calls`."""
    start, outcomes = threading.Barrier(len(calls)), [None] * len(calls)

    def run(i: int) -> None:
        start.wait()
        try:
            outcomes[i] = calls[i]()
        except Exception as exc:  # the caller's to judge
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def make_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Generator behind the store fixtures (function- or module-scoped)."""
    import mlflow

    _fresh_sqlite(tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment("tests", artifact_location=(tmp_path / "artifacts").as_uri())
    # (mlflow.set_experiment would export MLFLOW_EXPERIMENT_ID for good; monkeypatch undoes it after the test)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    yield Store(tmp_path, uri, "tests")
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def mlflow_run_cmd(params: dict[str, object], *, entry: str = "main", run_id: str | None = None) -> list[str]:
    """`mlflow run <repo> --env-manager local -e entry [--run-id ID] -P k=v ...`, exactly as a user types it.
    The experiment comes from MLFLOW_EXPERIMENT_ID (the store fixtures set it)."""
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local", "-e", entry]
    if run_id:
        cmd += ["--run-id", run_id]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    return cmd


def mlflow_run(
    store: Store,
    params: dict[str, object],
    *,
    entry: str = "main",
    run_id: str | None = None,
    timeout: int = 600,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """mlflow_run_cmd run to completion in the store's folder, output captured."""
    return subprocess.run(
        mlflow_run_cmd(params, entry=entry, run_id=run_id),
        cwd=store.root,
        env=store.env(**(extra_env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def mlflow_run_process(store: Store, params: dict[str, object], *, entry: str = "main") -> subprocess.Popen:
    """mlflow_run_cmd started in the store's folder, in its own session (a test can kill its whole group, as a
    crash would), stdout discarded, stderr kept for the reason of a failure."""
    return subprocess.Popen(
        mlflow_run_cmd(params, entry=entry),
        cwd=store.root,
        env=store.env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def train_process(store: Store, args: list[str], entry: str = "train") -> subprocess.Popen:
    """`python -m entrypoints.<entry> ARGS` started in its own session (so a test can signal its whole group),
    stdout discarded, stderr kept for the reason of a failure."""
    return subprocess.Popen(
        [sys.executable, "-m", f"entrypoints.{entry}", *args],
        cwd=REPO,
        env=store.env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def cli_args(params: dict[str, object]) -> list[str]:
    """{"epochs": 2} -> ["--epochs", "2"]: the same parameters for an entry point's click command in-process."""
    return [x for key, value in params.items() for x in (f"--{key}", str(value))]


# Batch 16: 32 steps at lr=scaled (0.00625), enough for the synthetic shapes to be learnt and so clearly above
# chance that a registered tiny model takes @champion; batch 64 (8 steps) stays at chance, and the champion rule
# rightly withholds the alias from it. Width 16: the same ResNet18 (layer1..layer4, GradCAM targets, export) at a
# sixteenth of the compute; these runs test plumbing, and test_learning.py trains the published width. No GradCAM
# panel (log_images_every=0): importing grad-cam (scikit-learn, scipy.stats) and drawing the panels costs a training
# process ~3 CPU-s; the panels are checked on the shared store (TRAINED below: test_e2e.py, test_user_facing.py).
NARROW = 16
NO_PANELS = 0
TINY = {
    "epochs": 2,
    "batch_size": 16,
    "num_workers": 0,
    "max_train_samples": 256,
    "max_test_samples": 128,
    "width": NARROW,
    "log_images_every": NO_PANELS,
}


# One store trained and analysed through the real `mlflow run` once for the whole suite, shared by the modules that
# only look at such a store (and add runs of their own to their copy): a tiny training run, registered as version 1
# @champion, and the analysis of models:/cifar10-resnet18@champion. The lr is spelled as a user types it: `mlflow
# run` logs -P values as given. The GradCAM panels as by default (after each of the 3 epochs), system metrics
# sampled every second (SAMPLED_EVERY_SECOND): test_e2e.py checks both.
TRAINED = {**{k: v for k, v in TINY.items() if k != "log_images_every"}, "epochs": 3, "lr": "6.25e-3"}
TRAINED_ANALYSIS = {"max_test_samples": 128, "num_images": 10}


@dataclass(frozen=True)
class Trained:
    store: Store
    experiment_id: str
    train_run_id: str
    train_run_name: str
    train_stdout: str  # what `mlflow run` printed
    analysis_run_id: str
    analysis_run_name: str
    version: str
    data_dir: Path  # the data it trained on (cifar_root's images, downloaded as an official-layout archive)


# What a test that checks system metrics gives its training process (short test runs record some).
SAMPLED_EVERY_SECOND = {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}


def _shared_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder every xdist worker of this session sees (their base temp folders' parent), else the base one."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def _exclusive(path: Path):
    import fcntl

    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _train_and_analyse(root: Path) -> dict:
    """Build the shared store in root (MLFLOW_* of this process left alone: the children get their own)."""
    import mlflow

    from cifar_mlflow import data

    root.mkdir(parents=True, exist_ok=True)
    # a folder name with a space: `mlflow run -P data_dir=...` logs it shell-quoted, which broke every fresh run once
    # (test_run_parameters.py checks what the runs logged); empty: the training run downloads an archive laid out
    # as the official one into it (test_cifar_files.py checks what it read)
    data_dir = root / "my data"
    md5 = official_archive(root / "archive", root / "www" / data.ARCHIVE)
    _fresh_sqlite(root / "mlflow.db")
    store = Store(root, f"sqlite:///{root / 'mlflow.db'}", "tests")
    client = mlflow.MlflowClient(store.uri)
    experiment_id = client.create_experiment("tests", artifact_location=(root / "artifacts").as_uri())
    env = store.env(MLFLOW_EXPERIMENT_ID=experiment_id, **SAMPLED_EVERY_SECOND)
    env.pop("MLFLOW_EXPERIMENT_NAME", None)

    def run(params: dict[str, object], entry: str, **extra_env: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            mlflow_run_cmd(params, entry=entry),
            cwd=root,
            env={**env, **extra_env},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, f"mlflow run -e {entry} of the shared store failed:\n{proc.stderr[-3000:]}"
        return proc

    with serve_folder(root / "www") as base:
        train = run({**TRAINED, "data_dir": data_dir}, "main", **{data.URL_ENV: f"{base}/{data.ARCHIVE}#md5={md5}"})
    run({**TRAINED_ANALYSIS, "model_uri": "models:/cifar10-resnet18@champion", "data_dir": data_dir}, "analyze")
    runs = client.search_runs([experiment_id])
    (analysis,) = [r for r in runs if "training_run_id" in r.data.tags]
    (training,) = [r for r in runs if "training_run_id" not in r.data.tags]
    return {
        "experiment_id": experiment_id,
        "train_run_id": training.info.run_id,
        "train_run_name": training.info.run_name,
        "train_stdout": train.stdout,
        "analysis_run_id": analysis.info.run_id,
        "analysis_run_name": analysis.info.run_name,
        "version": str(client.get_model_version_by_alias("cifar10-resnet18", "champion").version),
        "data_dir": str(data_dir),
    }


@pytest.fixture(scope="session")
def trained_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The shared store, built by the first test process that needs it while the others wait: (folder, facts)."""
    import json

    root = _shared_tmp(tmp_path_factory) / "trained"
    with _exclusive(root.with_suffix(".lock")):
        facts = root / "trained.json"
        if not facts.exists():
            if root.exists():  # a build that failed in another process: start over
                shutil.rmtree(root)
            facts_now = _train_and_analyse(root)
            facts.write_text(json.dumps(facts_now))
    return root, json.loads(facts.read_text())


@pytest.fixture(scope="module")
def trained(trained_template, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Trained:
    """A copy of the shared store's database for this module, active in this process as the store fixtures make
    theirs (the runs' artifacts stay where the shared store keeps them: new runs add folders beside them)."""
    root, facts = trained_template
    mine = tmp_path_factory.mktemp(f"trained-{request.module.__name__.rpartition('.')[2]}")
    shutil.copyfile(root / "mlflow.db", mine / "mlflow.db")
    store = Store(mine, f"sqlite:///{mine / 'mlflow.db'}", "tests")
    with pytest.MonkeyPatch.context() as mp:
        import mlflow

        mp.setenv("MLFLOW_TRACKING_URI", store.uri)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        mp.setenv("MLFLOW_EXPERIMENT_ID", facts["experiment_id"])
        mlflow.set_tracking_uri(store.uri)
        yield Trained(store, **{**facts, "data_dir": Path(facts["data_dir"])})
        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(None)


@contextlib.contextmanager
def serve_folder(www: Path):
    """A real HTTP server on 127.0.0.1 serving the folder www, in a thread of this process: its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def http_dir(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www: (folder, base URL)."""
    www = tmp_path / "www"
    www.mkdir()
    with serve_folder(www) as base:
        yield www, base


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (sqlite backend unless `backend_store_uri` names another, artifacts
    served by the server from root/server-artifacts, `args` appended to its command line), which a test can stop
    and start again on the same port and store."""

    def __init__(
        self,
        root: Path,
        *,
        app_name: str | None = None,
        env: dict[str, str] | None = None,
        backend_store_uri: str | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.root, self.port, self.app_name, self.args = root, free_port(), app_name, tuple(args)
        self.backend_store_uri = backend_store_uri or f"sqlite:///{root / 'server.db'}"
        self.artifacts_destination = root / "server-artifacts"
        # no job-execution workers (three extra processes the tests never use)
        self.env = {
            **os.environ,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            **(env or {}),
        }
        self.proc: subprocess.Popen | None = None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> MlflowServer:
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            self.backend_store_uri,
            "--artifacts-destination",
            str(self.artifacts_destination),
        ]
        if self.app_name:
            cmd += ["--app-name", self.app_name]
        cmd += self.args
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=self.env, stdout=log, stderr=log, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1)
                return self
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.2)
        raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


# The MLflow UI in a real browser: Debian's Chromium driven by Playwright (the UI tests of several modules)

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium's own connections (updates, sync) are refused on a closed
# network and slow every page down. --no-sandbox: CI runs as root; --disable-dev-shm-usage: containers often have
# a tiny /dev/shm.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
UI_TIMEOUT_MS = 45_000  # generous: the CI machine may be busy; every wait is explicit and ends early


def ui_server(backend_store_uri: str, root: Path):
    """Generator behind a module's `ui` fixture: `mlflow server` over a test store on 127.0.0.1."""
    srv = MlflowServer(root, backend_store_uri=backend_store_uri)
    srv.start(timeout=90)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import expect, sync_playwright

    # Playwright's assertions wait 5 s by default: one failed on a machine loaded by three test workers
    expect.set_options(timeout=UI_TIMEOUT_MS)

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: run scripts/system-packages.sh (apt-get install chromium)"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    yield page
    context.close()


def shown(page, tmp_path: Path, locator, what: str, seen_js: str) -> None:
    """Wait (explicitly, up to UI_TIMEOUT_MS) until `locator` is visible; otherwise save failure.png and fail
    naming what was expected and what the page showed instead (`seen_js` collects that in the page)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        locator.wait_for(state="visible")
    except PlaywrightTimeout:
        page.screenshot(path=tmp_path / "failure.png")
        seen = page.evaluate(seen_js)
        pytest.fail(
            f"expected {what} on {page.url} within {UI_TIMEOUT_MS / 1000:.0f} s; the page shows {seen!r} "
            f"(screenshot: {tmp_path / 'failure.png'})"
        )


RUN_LINKS_JS = "() => [...document.querySelectorAll('a[href*=\"/runs/\"]')].map(a => a.textContent.trim())"


# No test may leave a process running (a server, a trainer, a browser): checked once per test process at the end
# of its session. As a subreaper (Linux), this process also inherits the orphans of the processes its tests start
# (the trainer under a killed `mlflow run`), which would otherwise be re-parented to init and never seen.
LEAK_GRACE_S = 5.0


# multiprocessing's own helpers, started once by this process the first time a test uses a lock or shared memory
# of a spawn/forkserver context (torch's loaders do): they belong to this process, not to a test, and exit with it.
OWN_HELPERS = ("from multiprocessing.resource_tracker import main", "from multiprocessing.forkserver import main")


def _live_descendants() -> list:
    import psutil

    me, alive = os.getpid(), []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.ppid() == me and any(helper in " ".join(proc.cmdline()) for helper in OWN_HELPERS):
                continue
            alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


def _describe(proc) -> str:
    import psutil

    try:
        age = time.time() - proc.create_time()
        return f"pid {proc.pid}, {age:.0f} s old: {' '.join(proc.cmdline())[:200]}"
    except psutil.Error:
        return f"pid {proc.pid} (gone while being described)"


@pytest.fixture(scope="session", autouse=True)
def heavy_imports_once():
    """Every xdist worker of the suite imports torch, torchvision and MLflow sooner or later: up front, as the entry
    points do (cifar_mlflow.cli.heavy_imports: the garbage collector paused meanwhile, then kept off what they
    made). Not in a pytest without workers (tests/test_leak_check.py's probes need none of them: ~7 CPU-s each)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    from cifar_mlflow.cli import heavy_imports

    with heavy_imports():
        import mlflow  # noqa: F401
        import torchvision  # noqa: F401


@pytest.fixture(scope="session", autouse=True)
def no_leaked_processes():
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    yield
    deadline = time.time() + LEAK_GRACE_S  # a group just sent SIGTERM gets a moment to go
    while (leaked := _live_descendants()) and time.time() < deadline:
        time.sleep(0.2)
    if leaked:
        described = [_describe(proc) for proc in leaked]
        for proc in leaked:
            with contextlib.suppress(Exception):
                proc.kill()
        pytest.fail(f"{len(leaked)} process(es) left running by the tests (now killed): " + "; ".join(described))
    with contextlib.suppress(ChildProcessError):  # reap the orphans this subreaper inherited
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


# Slowest modules first: with files spread over two xdist workers (`-n 2 --dist loadfile`, which keeps each
# module's module-scoped servers and runs on one worker), a long module started last leaves one worker idle at the
# end. Everything else keeps its order (the sort is stable). xdist would reorder files by their number of tests
# (most first): pyproject's addopts turn that off (--no-loadscope-reorder).
# Roughly longest first; the figures are each module's total (seconds; "+": at least) in a clean clone's `make test`
# on the 2-core AMD EPYC without AVX512-BF16 (benchmarks/RESULTS.md, section 10). The two learning modules start
# first, one on each worker.
SLOW_FIRST = (
    "test_learning_lr_auto.py",  # 33
    "test_learning.py",  # 160: the default recipe at the published width, fp32, one thread
    "test_server.py",  # 154: two 35 s outages, two retry budgets run out (in threads, beside the other tests)
    "test_resume.py",  # 78+
    "test_sweep_resume.py",  # 72
    "test_analyze_e2e.py",  # 69 (the first to ask builds conftest.trained)
    "test_team_server.py",  # 92
    "test_benchmarks.py",  # 118
    "test_sweep.py",  # 51+
    "test_e2e.py",
    "test_pipeline.py",  # 77
    "test_distributed.py",  # 48
    "test_user_facing.py",
    "test_stock_mlflow.py",
    "test_run_leases.py",  # 49+
    "test_options_e2e.py",
    "test_checkpoint_files.py",
    "test_run_parameters.py",
)


# `make check` (the fast loop) leaves out the tests marked slow: every test of the modules above and these ones,
# except one end-to-end smoke that trains, logs and registers a model in a process of its own.
SLOW_TOO = (
    "tests/test_cifar_files.py::test_mlflow_run_downloads_checks_extracts_and_trains_on_an_official_layout_archive",
)
SMOKE = "tests/test_e2e.py::test_direct_run_on_synthetic_data"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    for item in items:
        if (item.path.name in SLOW_FIRST or item.nodeid in SLOW_TOO) and item.nodeid != SMOKE:
            item.add_marker(pytest.mark.slow)
