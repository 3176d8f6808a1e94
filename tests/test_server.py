"""Against a real `mlflow server` on 127.0.0.1 (sqlite backend, artifacts served by the server): a server that is
down fails in seconds, a server gone for 35 s mid-run and at registration loses nothing (one that stays gone ends
the process resumably), two runs at once both register and `champion` ends on the better one, and basic-auth works
with credentials and fails clearly without.

The outages are a `Relay` in front of the module's server going down and up again: while down, its port refuses
connections and the open ones are reset, which is all a client sees of a stopped server (a restart of the server
itself costs ~13 CPU-s, and each scenario had three). The scenarios spend most of their time waiting outages out
(35 s, then MLflow's backoff of up to another 30 s): they start as the module starts, each in a thread with a relay
of its own, and run while the module's other tests do; their tests, last in the module, collect them."""

import contextlib
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cifar_mlflow.cli import invoke
from entrypoints.train import train
from tests.conftest import REPO, MlflowServer, free_port

# batch 16: enough steps in these short runs for a model that clearly learns (the champion rule needs it)
TINY = [
    "--batch_size",
    "16",
    "--num_workers",
    "0",
    "--max_test_samples",
    "64",
    "--width",
    "16",
    "--log_images_every",
    "0",
]


def _env(uri, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        MLFLOW_TRACKING_URI=uri,
        MLFLOW_DISABLE_TELEMETRY="true",
        NO_ALBUMENTATIONS_UPDATE="1",
        PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
        **extra,
    )
    return env


def _train(uri, cifar_root, *args, **env):
    cmd = [sys.executable, "-m", "entrypoints.train", "--data_dir", str(cifar_root), *TINY, *args]
    return subprocess.Popen(
        cmd, cwd=REPO, env=_env(uri, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("server")).start()
    yield srv
    srv.stop()


@pytest.fixture
def tracking_server(monkeypatch):
    """Point this process's entry point commands at a server (and credentials) for one test: they check the
    server first, before any other work, as a process of their own does (the refusals and the run with
    credentials are checked in this process; the races and outages, in processes of their own)."""
    import mlflow

    def point(uri: str, **credentials: str) -> None:
        mlflow.set_tracking_uri(None)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_RUN_ID"):
            monkeypatch.delenv(key, raising=False)
        for key, value in credentials.items():
            monkeypatch.setenv(key, value)

    return point


def _refusal(cifar_root, *args: str) -> str:
    """The one line the train command ends with when the server refuses it (exit 1)."""
    code, message = invoke(train, ["--data_dir", str(cifar_root), *TINY, *args])
    assert code == 1 and "\n" not in message.strip(), message
    return message


def test_unreachable_server_fails_within_seconds(cifar_root, tracking_server):
    uri = f"http://127.0.0.1:{free_port()}"
    tracking_server(uri)
    start = time.time()
    assert _refusal(cifar_root, "--epochs", "20") == (
        f"tracking server {uri} is unreachable (connection refused); "
        "start it, or point MLFLOW_TRACKING_URI at one that is up"
    )
    assert time.time() - start < 20


POLL_S = 0.5  # each poll is a request to the server: four scenarios poll at once


def _running_run(client, proc, name, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = client.search_runs(["0"], f"attributes.status = 'RUNNING' and params.registered_model_name = '{name}'")
        if runs:
            return runs[0].info.run_id
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(POLL_S)
    raise AssertionError(f"no RUNNING run for {name} within {timeout} s")


def _wait_metric(client, run_id, key, step, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(m.step >= step for m in client.get_metric_history(run_id, key)):
            return
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(POLL_S)
    raise AssertionError(f"{key} step {step} not logged within {timeout} s")


# After epoch 1 metrics: training goes on while the server is down. After the flip-TTA metric of the last epoch
# (logged just before the figures and the model): the model is being logged and registered.
WHEN = {"mid-run": ("test/accuracy", 1), "at-registration": ("test/accuracy_tta", 3)}
OUTAGE_S = 35  # issue 26: a 30-60 s outage must cost nothing
ARGS = ("--epochs", "3", "--max_train_samples", "160")


class Relay:
    """A TCP relay on a port of its own to `port` on 127.0.0.1, to cut clients off: down() closes the port (new
    connections refused) and resets the open connections, as a stopped server's are; up() opens the same port
    again."""

    def __init__(self, port: int) -> None:
        self.target, self.port = port, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener: socket.socket | None = None

    def up(self) -> "Relay":
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.2)  # accept() checks now and then whether down() closed it
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            if listener is not None:
                _close(listener)
            for conn in self._open:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
                _close(conn)
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by down()
                return
            client.settimeout(None)
            try:
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # down() came in between
                    client.close()
                    server.close()
                    return
                self._open |= {client, server}
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        with self._lock:  # one side is done with the connection: so is the relay
            for conn in (src, dst):
                if conn in self._open:
                    self._open.discard(conn)
                    _close(conn)


def _close(sock: socket.socket) -> None:
    """Shut down, then close: a thread blocked in recv() or accept() on it wakes up (close alone leaves it
    blocked)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@pytest.fixture(scope="module", autouse=True)
def scenarios(server, cifar_root):
    """The two outage scenarios, started in threads as the module starts (autouse), each through a relay of its
    own to the module's server; name -> Future of (the relay, the scenario's outcome). The module ends once they
    have (each waits a bounded time)."""
    pool = ThreadPoolExecutor(2)
    relays = {scenario: Relay(server.port).up() for scenario in (_outages, _long_outages)}
    futures = {
        scenario.__name__: pool.submit(lambda run=scenario, relay=relay: (relay, run(relay, cifar_root)))
        for scenario, relay in relays.items()
    }
    yield futures
    pool.shutdown(wait=True)
    for relay in relays.values():
        relay.down()


def _outages(server, cifar_root):
    """A run of 3 epochs cut off from its server (`server`: a Relay) for OUTAGE_S after epoch 1, then again for
    OUTAGE_S as the model is being registered. Returns the exit code, stderr, the run id and when the second
    outage began."""
    client, name = MlflowClient(server.uri), "outages"
    proc = _train(
        server.uri,
        cifar_root,
        *ARGS,
        *("--registered_model_name", name),
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1",
    )
    try:
        run_id = _running_run(client, proc, name)
        for when in WHEN:
            _wait_metric(client, run_id, *WHEN[when], proc)
            server.down()
            stopped_at = time.time()
            time.sleep(OUTAGE_S)  # reports and requests wait and retry meanwhile
            server.up()
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err, run_id, stopped_at


def checkpoints_epoch(client, run_id):
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(open(client.download_artifacts(run_id, "checkpoints/latest.json", tmp)).read())["epoch"]


def _long_outages(server, cifar_root):
    """With MLflow's retries cut to seconds, the server (a Relay) gone after epoch 1 until the process ends; back
    and the run resumed with --run-id; gone again as the resumed run registers its model until that process ends;
    back and the run resumed once more, with MLflow's retries as they are. Returns, for each outage, (exit code, stderr, seconds from the stop to the exit); the
    run id; the last resume's exit code and stderr."""
    client, name = MlflowClient(server.uri), "long-outages"
    args = (*ARGS, "--registered_model_name", name)
    budget = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    }
    outcomes, run_id, resume = {}, None, {}
    for when in WHEN:
        proc = _train(server.uri, cifar_root, *args, **budget, **resume)
        try:
            run_id = run_id or _running_run(client, proc, name)
            resume = {"MLFLOW_RUN_ID": run_id}
            _wait_metric(client, run_id, *WHEN[when], proc)
            server.down()
            start = time.time()
            _, err = proc.communicate(timeout=240)
            outcomes[when] = (proc.returncode, err, time.time() - start)
        finally:
            if proc.poll() is None:
                proc.kill()
            server.up()
    resumed = _train(server.uri, cifar_root, *args, **resume)
    _, resumed_err = resumed.communicate(timeout=300)
    return outcomes, run_id, resumed.returncode, resumed_err


def test_two_runs_at_once_register_distinct_versions_and_champion_is_the_better(server, cifar_root):
    client = MlflowClient(server.uri)
    procs = [
        _train(
            server.uri,
            cifar_root,
            "--epochs",
            "2",
            "--max_train_samples",
            "256",
            "--lr",
            lr,
            "--registered_model_name",
            "race",
        )
        for lr in ("0.00625", "0.00001")  # one learns, one stays at chance (never champion, whatever it scores)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    versions = client.search_model_versions("name='race'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]
    assert len({v.run_id for v in versions}) == 2
    best = max(versions, key=lambda v: (float(v.tags["test_accuracy"]), -int(v.version)))
    assert str(client.get_model_version_by_alias("race", "champion").version) == str(best.version)


# MLflow's own basic_auth.ini with its credential cache on (auth_cache_ttl_seconds, off by default): each request
# otherwise hashes the password (scrypt, ~0.15 CPU-s here), ~30 CPU-s of the server's for one short training run.
# Only successful checks are cached: a wrong password is still refused.
AUTH_CACHE_TTL_S = 600


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    import mlflow.server.auth

    root = tmp_path_factory.mktemp("auth")
    shipped = (Path(mlflow.server.auth.__file__).parent / "basic_auth.ini").read_text()
    assert "# auth_cache_ttl_seconds = 0" in shipped
    config = root / "basic_auth.ini"
    config.write_text(shipped.replace("# auth_cache_ttl_seconds = 0", f"auth_cache_ttl_seconds = {AUTH_CACHE_TTL_S}"))
    srv = MlflowServer(
        root,
        app_name="basic-auth",
        env={
            "MLFLOW_AUTH_CONFIG_PATH": str(config),
            "MLFLOW_AUTH_ADMIN_PASSWORD": "Adm1n-pass-word!",
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret",
        },
    ).start()
    yield srv
    srv.stop()


def test_basic_auth_works_with_credentials_and_fails_clearly_without(auth_server, cifar_root, tracking_server):
    def refused_as(password: str) -> None:
        tracking_server(auth_server.uri, MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=password)
        message = _refusal(cifar_root, "--epochs", "1", "--max_train_samples", "64")
        assert "refused the credentials of user 'admin' (HTTP 401)" in message, message

    tracking_server(auth_server.uri)
    assert _refusal(cifar_root, "--epochs", "1", "--max_train_samples", "64") == (
        f"tracking server {auth_server.uri} requires authentication (HTTP 401); set "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    )
    refused_as("wrong")

    tracking_server(auth_server.uri, MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD="Adm1n-pass-word!")
    # a model that clearly learns (32 steps), so that its version is champion; in this process, as the refusals
    code, message = invoke(train, ["--data_dir", str(cifar_root), *TINY, "--epochs", "2", "--max_train_samples", "256"])
    assert code == 0, message
    client = MlflowClient(auth_server.uri)
    (run,) = client.search_runs(["0"])
    assert run.info.status == "FINISHED"
    assert str(client.get_model_version_by_alias("cifar10-resnet18", "champion").version) == "1"
    # with the right password in the server's credential cache, a near miss is still refused
    refused_as("Adm1n-pass-word")


# The outage scenarios started with the module (the `scenarios` fixture): collected last.


def test_outages_of_35_s_mid_run_and_at_registration_cost_nothing(scenarios):
    """The server stopped for 35 s after epoch 1 and again as the model is being registered, each time started
    again on the same store: the run finishes with every epoch's metrics once, and one version, registered after
    the second outage."""
    server, (code, err, run_id, stopped_at) = scenarios["_outages"].result(timeout=600)
    assert code == 0, err[-3000:]
    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "failure_reason" not in run.data.tags
    for key in ("train/loss", "train/accuracy", "test/loss", "test/accuracy", "lr", "train/images_per_sec"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [1, 2, 3], key
    (version,) = client.search_model_versions("name='outages'")
    assert version.run_id == run_id and version.creation_timestamp / 1000 > stopped_at, "registered early"
    assert client.get_model_version_by_alias("outages", "champion").run_id == run_id
    assert checkpoints_epoch(client, run_id) == 3


def test_an_outage_past_mlflows_retries_ends_the_process_resumably_in_one_line(scenarios):
    """With MLflow's retries cut to seconds (the bound; by default MLflow retries a request for minutes), a
    server that stays down ends the process in one line (exit 75, EX_TEMPFAIL), after epoch 1 and again as the
    resumed run registers its model, and --run-id completes the run each time."""
    server, (outcomes, run_id, resumed_code, resumed_err) = scenarios["_long_outages"].result(timeout=600)
    for when, (code, err, gave_up_after) in outcomes.items():
        assert code == 75, f"{when}: {err[-3000:]}"
        assert err.strip().splitlines()[-1] == (
            f"error: tracking server {server.uri} stopped answering and MLflow's retries ran out "
            "(MLFLOW_HTTP_REQUEST_MAX_RETRIES=1, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1); run "
            f"{run_id} stays resumable with the checkpoints it reported: once the server is back, resume it with "
            f"`mlflow run --run-id {run_id}` and the same parameters"
        ), f"{when}: {err[-3000:]}"
        assert "Traceback" not in err and gave_up_after < 120, when
    assert list(outcomes) == list(WHEN)
    assert resumed_code == 0, resumed_err[-3000:]
    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags.get("resumed_from_epoch") in ("1", "2", "3")
    for key in ("train/loss", "test/accuracy", "lr"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [1, 2, 3], key
    assert [v.run_id for v in client.search_model_versions("name='long-outages'")] == [run_id]
