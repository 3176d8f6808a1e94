"""The team setup of docs/tracking-servers.md ("Team tracking server"), for real: `mlflow server` on a PostgreSQL
backend store (a throwaway cluster of Debian's postgresql on 127.0.0.1) with artifacts served by the server, and the
whole flow a team member runs against it: `mlflow run -e main` trains and registers, `mlflow run -e analyze` analyses the
@champion. Then the rows are read back from PostgreSQL itself and the files from the server's artifact folder."""

import subprocess
import urllib.error
import urllib.request
from types import SimpleNamespace

import optuna
import psycopg2
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from tests.conftest import TINY, MlflowServer, Store, mlflow_run, mlflow_run_cmd
from tests.postgres import Postgres
from tests.test_sweep_space import open_at_once

MODEL = "cifar10-resnet18"
DB, ROLE, PASSWORD = "mlflow", "mlflow", "team-pass"
TEAM_HOST = "mlflow.team.test"  # the name team members would use for the server machine
PNG = b"\x89PNG\r\n\x1a\n"
METRICS = ("train/loss", "train/accuracy", "test/loss", "test/accuracy", "lr", "train/images_per_sec")
# conftest.TINY with half the test images (its 256 training images are what a model needs to clearly learn, so
# that its version is champion): this module starts PostgreSQL and a server besides two `mlflow run`s
RUN = {**TINY, "max_test_samples": 64}
ANALYSIS_ARTIFACTS = (
    "gradcam/layer3.png",
    "gradcam/layer4.png",
    "confusion_matrix.png",
    "per_class_accuracy.png",
    "misclassified/gallery.png",
)


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    pg = Postgres(tmp_path_factory.mktemp("postgres")).start()
    try:
        yield pg
    finally:
        pg.stop()


@pytest.fixture(scope="module")
def team_server(postgres, tmp_path_factory):
    """The server command of docs/tracking-servers.md, on 127.0.0.1 (and one worker) instead of 0.0.0.0."""
    uri = postgres.create_database(DB, owner=ROLE, password=PASSWORD)
    srv = MlflowServer(
        tmp_path_factory.mktemp("team-server"),
        backend_store_uri=uri,
        args=("--allowed-hosts", f"{TEAM_HOST}:*,127.0.0.1:*", "--cors-allowed-origins", f"http://{TEAM_HOST}:*"),
    )
    try:
        yield srv.start(timeout=120)  # the first start creates MLflow's tables in PostgreSQL
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def flow(team_server, cifar_root, tmp_path_factory):
    """A team member's session: MLFLOW_TRACKING_URI=<server>, train with `mlflow run`, analyse @champion."""
    client = MlflowClient(team_server.uri)
    experiment_id = client.create_experiment("team")
    work = tmp_path_factory.mktemp("member")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
            mp.delenv(name, raising=False)
        mp.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
        member = Store(work, team_server.uri, "team")
        train = mlflow_run(member, {**RUN, "dataset": "cifar10", "data_dir": cifar_root})
        assert train.returncode == 0, train.stderr[-3000:]
        analyze = mlflow_run(
            member,
            {"model_uri": f"models:/{MODEL}@champion", "max_test_samples": 64, "num_images": 4, "data_dir": cifar_root},
            entry="analyze",
        )
        assert analyze.returncode == 0, analyze.stderr[-3000:]
    runs = {
        ("analysis" if "training_run_id" in r.data.tags else "training"): r for r in client.search_runs([experiment_id])
    }
    assert sorted(runs) == ["analysis", "training"]
    return SimpleNamespace(
        client=client,
        experiment_id=experiment_id,
        work=work,
        train=train,
        training=runs["training"],
        analysis=runs["analysis"],
    )


def test_training_run_is_tracked_and_registered_on_the_server(flow):
    run, client = flow.training, flow.client
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.params["dataset"] == "cifar10" and run.data.params["epochs"] == "2"
    for key in METRICS:
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [1, 2], key
    assert run.info.artifact_uri == f"mlflow-artifacts:/{flow.experiment_id}/{run_id}/artifacts"

    mv = client.get_model_version_by_alias(MODEL, "champion")
    assert str(mv.version) == "1" and mv.run_id == run_id and mv.tags["run_id"] == run_id
    assert float(mv.tags["test_accuracy"]) == pytest.approx(run.data.metrics["test/accuracy"], abs=1e-6)
    assert f"registered models:/{MODEL}/1  (now @champion)" in flow.train.stdout


def test_analysis_of_champion_runs_and_its_artifacts_come_through_the_server(flow):
    run, client = flow.analysis, flow.client
    assert run.info.status == "FINISHED"
    assert run.data.tags["model_version"] == "1" and run.data.tags["training_run_id"] == flow.training.info.run_id
    assert client.get_model_version(MODEL, "1").tags["analysis_run_id"] == run.info.run_id
    assert run.data.metrics["test/accuracy"] == flow.training.data.metrics["test/accuracy"]
    assert run.info.artifact_uri.startswith(f"mlflow-artifacts:/{flow.experiment_id}/")

    local = client.download_artifacts(run.info.run_id, "", str(flow.work / "download"))
    for name in ANALYSIS_ARTIFACTS:
        with open(f"{local}/{name}", "rb") as fh:
            assert fh.read(8) == PNG, name


def test_runs_and_registry_are_rows_in_postgresql(flow, postgres):
    training, analysis = flow.training.info.run_id, flow.analysis.info.run_id
    with postgres.connect(DB, user=ROLE, password=PASSWORD) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT run_uuid, status, artifact_uri FROM runs WHERE experiment_id = %s", [int(flow.experiment_id)]
        )
        assert sorted(cur.fetchall()) == sorted(
            (r.info.run_id, "FINISHED", r.info.artifact_uri) for r in (flow.training, flow.analysis)
        )
        cur.execute(
            "SELECT step, value FROM metrics WHERE run_uuid = %s AND key = 'test/accuracy' ORDER BY step", [training]
        )
        assert cur.fetchall() == [
            (m.step, m.value)
            for m in sorted(flow.client.get_metric_history(training, "test/accuracy"), key=lambda m: m.step)
        ]
        cur.execute("SELECT name, version, run_id FROM model_versions WHERE name = %s", [MODEL])
        assert cur.fetchall() == [(MODEL, 1, training)]
        cur.execute("SELECT name, alias, version FROM registered_model_aliases WHERE name = %s", [MODEL])
        assert cur.fetchall() == [(MODEL, "champion", 1)]
        cur.execute("SELECT value FROM model_version_tags WHERE name = %s AND key = 'analysis_run_id'", [MODEL])
        assert cur.fetchall() == [(analysis,)]
    conn.close()
    # the password is really checked: the one in the server's URI is what let it in
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        postgres.connect(DB, user=ROLE, password="wrong")


def test_artifacts_are_files_in_the_servers_artifacts_destination(flow, team_server):
    dest = team_server.artifacts_destination
    on_disk = dest / flow.experiment_id / flow.analysis.info.run_id / "artifacts"
    for name in ANALYSIS_ARTIFACTS:
        assert (on_disk / name).read_bytes() == (flow.work / "download" / name).read_bytes(), name
    training = dest / flow.experiment_id / flow.training.info.run_id / "artifacts"
    assert (training / "curves.png").read_bytes()[:8] == PNG
    assert (training / "checkpoints" / "latest.json").is_file()
    # the registered model's files (MLflow 3 keeps logged models under <experiment>/models/)
    assert [p.name for p in (dest / flow.experiment_id / "models").rglob("model.pt2")] == ["model.pt2"]
    # and nothing was written next to the team member's working directory
    assert not (flow.work / "mlruns").exists() and not (flow.work / "mlflow.db").exists()


def _status(url, **headers):
    request = urllib.request.Request(
        url,
        headers=headers,
        method="POST" if "Origin" in headers else "GET",
        data=b'{"max_results": 1}' if "Origin" in headers else None,
    )
    if "Origin" in headers:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_server_answers_the_team_host_name_and_refuses_others(team_server):
    """--allowed-hosts / --cors-allowed-origins: MLflow 3 refuses Host headers and browser origins it was not
    told about (DNS-rebinding and CSRF protection), so docs/tracking-servers.md names the team's host in both."""
    search = f"{team_server.uri}/api/2.0/mlflow/experiments/search?max_results=1"
    port = team_server.port
    assert _status(search, Host=f"{TEAM_HOST}:{port}") == 200
    assert _status(search, Host=f"evil.test:{port}") == 403
    post = f"{team_server.uri}/api/2.0/mlflow/experiments/search"  # a POST, as the UI in a browser sends
    assert _status(post, Host=f"{TEAM_HOST}:{port}", Origin=f"http://{TEAM_HOST}:{port}") == 200
    assert _status(post, Host=f"{TEAM_HOST}:{port}", Origin="http://evil.test") == 403


# A sweep shared by two workers: the study in PostgreSQL, the runs on the team server


SWEEP_TRIALS = 5


def test_workers_opening_a_new_postgresql_storage_at_once_all_succeed(postgres):
    """The race two workers started together hit: both create Optuna's tables, one loses on a duplicate pg_type
    row (seen: a worker died 10 s into the two-worker test); the loser tries again and finds them made."""
    assert open_at_once(postgres.create_database("optuna_race")) == ["ok"] * 4


def test_two_workers_share_one_sweep_through_postgresql(team_server, postgres, tmp_path):
    """Two `mlflow run -e sweep` started at once with one study name on one PostgreSQL storage, as two machines
    would: the study holds exactly n_trials finished trials, each run once, in one child run each, all under one
    parent run; the second worker's run is nested under it too; one version is registered."""
    storage = postgres.create_database("optuna", owner="optuna", password="study-pass")
    # as docs/sweep.md advises: the password in PGPASSWORD (libpq reads it), not in the URL that becomes a run param
    without_password = storage.replace("optuna:study-pass@", "optuna@")
    client = MlflowClient(team_server.uri)
    experiment_id = client.create_experiment("team-sweep")
    params = {
        **RUN,
        "dataset": "synthetic",
        "data_dir": tmp_path / "data",
        "n_trials": SWEEP_TRIALS,
        "pruner": "none",
        "study": "team-study",
        "storage": without_password,
        "registered_model_name": "team-sweep",
    }
    with pytest.MonkeyPatch.context() as mp:
        for name in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
            mp.delenv(name, raising=False)
        mp.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
        member = Store(tmp_path, team_server.uri, "team-sweep")
        workers = [
            subprocess.Popen(
                mlflow_run_cmd(params, entry="sweep"),
                cwd=tmp_path,
                env=member.env(PGPASSWORD="study-pass"),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for _ in range(2)
        ]
        outputs = [w.communicate(timeout=900)[0] for w in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-4000:]

    trials = optuna.load_study(study_name="team-study", storage=storage).get_trials()
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == SWEEP_TRIALS, [(t.number, t.state) for t in trials]
    assert all(t.user_attrs.get("surplus") for t in trials if t.state != TrialState.COMPLETE), "only surplus fails"
    assert len({t.user_attrs["pid"] for t in done}) == 2, "both workers ran trials"

    runs = client.search_runs([experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep/role") == "parent"]
    (worker,) = [r for r in runs if r.data.tags.get("sweep/role") == "worker"]
    assert worker.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert all("study-pass" not in str(r.data.params) + str(r.data.tags) for r in runs), "no password in the store"
    trial_runs = [r for r in runs if "trial/number" in r.data.tags]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in trial_runs)
    assert sorted(r.info.run_id for r in trial_runs) == sorted(t.user_attrs["mlflow_run_id"] for t in done)
    assert sorted(int(r.data.tags["trial/number"]) for r in trial_runs) == sorted(t.number for t in done)
    assert all(r.info.status == "FINISHED" and r.data.tags["trial/state"] == "COMPLETE" for r in trial_runs)
    assert client.get_run(parent.info.run_id).data.metrics["sweep/trials_complete"] == SWEEP_TRIALS
    versions = client.search_model_versions("name = 'team-sweep'")
    assert len(versions) == 1 and versions[0].run_id == client.get_run(parent.info.run_id).data.tags["best/run_id"]
