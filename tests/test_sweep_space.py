"""The sweep's search space and its study bookkeeping, without training: a space file is checked before any trial
(one line naming the bad entry), the default space follows the base recipe, and the Optuna study on a real sqlite
storage shares trials, refuses a worker with another recipe, closes a surplus trial and retries a dead worker's."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from cifar_mlflow.cli import invoke
from cifar_mlflow.config import TrainConfig
from cifar_mlflow.errors import ConfigError, TrackingError
from cifar_mlflow.sweeps import studies, study_storage
from cifar_mlflow.sweeps.search_space import Dim, default_space, load_space
from cifar_mlflow.sweeps.sweep_config import SweepConfig
from tests.conftest import at_once, cli_args


def _space(tmp_path: Path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


def test_default_space_centres_lr_on_the_base_and_skips_it_for_lr_auto():
    dims = {d.name: d for d in default_space(TrainConfig(lr=0.1))}
    assert (dims["lr"].low, dims["lr"].high, dims["lr"].log) == (0.025, 0.4, True)
    assert dims["weight_decay"].log and dims["weight_decay"].low < 5e-4 < dims["weight_decay"].high
    assert dims["augment"].choices == ("standard", "flip-cutout", "none")
    assert "lr" not in {d.name for d in default_space(TrainConfig(lr="auto"))}


def test_space_file_is_read_with_every_type(tmp_path):
    path = _space(
        tmp_path,
        "- {name: lr, type: float, low: 0.01, high: 0.4, log: true}\n"
        "- {name: batch_size, type: int, low: 32, high: 256}\n"
        "- {name: optimizer, type: categorical, choices: [sgd, adamw]}\n",
    )
    assert load_space(path, TrainConfig()) == [
        Dim("lr", "float", 0.01, 0.4, True),
        Dim("batch_size", "int", 32, 256, False),
        Dim("optimizer", "categorical", choices=("sgd", "adamw")),
    ]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("- {name: epochs, type: int, low: 1, high: 5}", "name='epochs' is not allowed: expected one of batch_size"),
        ("- {name: colour, type: float, low: 0, high: 1}", "name='colour' is not allowed"),
        ("- {name: lr, type: float, low: 0.4, high: 0.1}", "low=0.4 is not allowed: expected a number < high=0.1"),
        ("- {name: lr, type: float, low: -1, high: 0.1}", "(lr): low lr=-1 is not allowed: expected a number > 0"),
        ("- {name: label_smoothing, type: float, low: 0.0, high: 0.2, log: true}", "not allowed with log: true"),
        ("- {name: label_smoothing, type: float, low: 0.0, high: 1.5}", "high label_smoothing=1.5 is not allowed"),
        ("- {name: lr, type: int, low: 1, high: 2}", "type=int is not allowed for lr, which takes float values"),
        ("- {name: batch_size, type: int, low: 16.5, high: 64}", "low=16.5 is not allowed: expected an integer"),
        ("- {name: lr, type: gaussian, low: 0.1, high: 1}", "type='gaussian' is not allowed"),
        ("- {name: lr, type: float, low: 0.1}", "high is missing"),
        ("- {name: lr, type: float, low: 0.1, high: 1, step: 2}", "key 'step' is not allowed for type float"),
        ("- {name: augment, type: categorical, choices: [standard, sepia]}", "choice augment='sepia' is not allowed"),
        ("- {name: augment, type: categorical, choices: []}", "choices=[] is not allowed: expected a non-empty list"),
        ("- {name: augment, type: categorical, choices: [none, none]}", "repeat a value"),
        (
            "- {name: lr, type: float, low: 0.1, high: 1}\n- {name: lr, type: float, low: 0.2, high: 1}",
            "searched twice",
        ),
        ("lr: [0.1, 1]", "expected a non-empty YAML list"),
        ("[", "is not valid YAML"),
        ("- lr", "entry 1: expected a mapping"),
    ],
)
def test_bad_space_file_is_refused_with_one_line(tmp_path, text, expected):
    with pytest.raises(ConfigError) as err:
        SweepConfig(space=_space(tmp_path, text))
    message = str(err.value)
    assert expected in message and "\n" not in message, message


def _alias_bomb(levels: int = 9) -> str:
    """The 313-byte 'billion laughs': nine anchors, each nine aliases of the one before (9**9 strings)."""
    lines = ['a0: &a0 "lol"'] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines)


@pytest.mark.parametrize(
    "make, expected",
    [
        (
            lambda tmp: _space(tmp, "- {name: &n lr, type: float, low: 0.1, high: 1}\n- {name: *n, type: float}"),
            "uses YAML anchors or aliases (&name, *name); write each value out",
        ),
        (
            lambda tmp: _space(tmp, _alias_bomb().replace("a8: &a8", "- name: &a8") + "\n  type: categorical"),
            "uses YAML anchors or aliases (&name, *name); write each value out",
        ),
        (
            lambda tmp: _space(
                tmp,
                "- name: augment\n  type: categorical\n  choices: [&a0 lol, "
                + ", ".join(f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9))
                + "]",
            ),
            "uses YAML anchors or aliases",
        ),
        (lambda tmp: _space(tmp, "[" * 20_000 + "]" * 20_000), "nested deeper than 3 levels"),
        (lambda tmp: "/dev/zero", "space='/dev/zero' is not a regular file: expected a YAML space file"),
        (lambda tmp: (os.mkfifo(tmp / "fifo"), str(tmp / "fifo"))[1], "is not a regular file"),
        (lambda tmp: _space(tmp, "x" * (64 * 1024 + 1)), "the file is over 64 KB; a space is a short list"),
        (lambda tmp: _space(tmp, f"- {{name: {'x' * 60_000}, type: float}}"), "is not allowed: expected one of"),
        (lambda tmp: _space(tmp, f"- {{name: lr, type: float, low: '{'9' * 60_000}', high: 1}}"), "not allowed"),
    ],
    ids=[
        "alias",
        "bomb-as-name",
        "bomb-in-choices",
        "deep",
        "dev-zero",
        "fifo",
        "over-64kb",
        "long-name",
        "long-value",
    ],
)
def test_hostile_space_files_are_one_short_line_before_anything_is_expanded(tmp_path, make, expected):
    """Issue 26: a 313-byte alias bomb grew to GB (as a name) or printed a 312 MB "one-line" error (in choices);
    /dev/zero passed the size guard and was read until memory ran out; 20,000 levels were a RecursionError."""
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load_space(make(tmp_path), TrainConfig())
    message = str(err.value)
    assert expected in message and "\n" not in message and len(message) < 600, message[:1000]
    assert time.monotonic() - start < 5


def test_numbers_read_as_yaml_1_2_and_every_other_yaml_tool_reads_them(tmp_path):
    """PyYAML follows YAML 1.1, where 1e-3 (no dot) is a string; a space written by hand or by a YAML 1.2 tool
    (ruamel, yq, JavaScript's yaml) means the number."""
    dims = load_space(
        _space(
            tmp_path,
            "- {name: lr, type: float, low: 1e-3, high: 4E-1, log: true}\n"
            "- {name: weight_decay, type: float, low: 5.0e-5, high: .005}\n"
            "- {name: label_smoothing, type: categorical, choices: [0, 1e-1]}\n",
        ),
        TrainConfig(),
    )
    assert [(d.low, d.high) for d in dims[:2]] == [(0.001, 0.4), (5e-05, 0.005)]
    assert dims[2].choices == (0, 0.1)
    with pytest.raises(ConfigError, match=r"choice label_smoothing='1e-2' is not allowed"):  # quoted: a string
        load_space(_space(tmp_path, "- {name: label_smoothing, type: categorical, choices: ['1e-2']}"), TrainConfig())


def test_missing_space_file_and_choice_the_base_rules_out_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"space='.*nope.yaml' cannot be read"):
        SweepConfig(space=str(tmp_path / "nope.yaml"))
    text = "- {name: augment, type: categorical, choices: [standard, heavy]}"
    with pytest.raises(ConfigError, match="loader='device' is not allowed with augment='heavy'"):
        SweepConfig(space=_space(tmp_path, text), loader="device")


def test_bad_sweep_parameters_are_one_line_before_any_work(tmp_path):
    """Through the click command, as `mlflow run -e sweep` calls it: no store is opened, no trial runs."""
    from entrypoints.sweep import sweep

    bad_space = _space(tmp_path, "- {name: momentum, type: float, low: 0.5, high: 1.0}")
    for params, expected in (
        ({"space": bad_space}, "high momentum=1.0 is not allowed: expected a number >= 0 and < 1"),
        ({"storage": "redis://db"}, "storage='redis://db' is not allowed: expected auto, or an RDB URL"),
        ({"study": "my study"}, "study='my study' is not allowed"),
        ({"metric": "train/loss"}, "'train/loss' is not one of 'test/accuracy', 'test/loss'"),
        # issue 26's probes: an absurd trial count (it used to start, and run for ever), odd study names
        ({"n_trials": 10**9}, "1000000000 is not in the range 1<=x<=10000"),
        ({"n_trials": -1}, "-1 is not in the range 1<=x<=10000"),
        ({"study": "../../etc"}, "study='../../etc' is not allowed: expected letters, digits, '_', '-' and '.'"),
        ({"study": "x" * 129}, "is not allowed: expected letters, digits, '_', '-' and '.' (at most 128)"),
        ({"study": "naïve"}, "study='naïve' is not allowed"),
        ({"storage": "sqlite"}, "storage='sqlite' is not allowed: expected auto, or an RDB URL"),
    ):
        code, message = invoke(sweep, cli_args(params))
        assert code != 0 and expected in message and "\n" not in message, (params, message)


@pytest.mark.parametrize(
    "url, reason",
    [
        ("sqlite:////sys/optuna.db", "(sqlite3.OperationalError) unable to open database file"),
        ("sqlite:///{tmp}/no/such/folder/optuna.db", "(sqlite3.OperationalError) unable to open database file"),
        ("sqlite:///{tmp}/garbage.db", "(sqlite3.DatabaseError) file is not a database"),
        ("postgresql+psycopg2://u@127.0.0.1:9/db", "Connection refused"),
    ],
    ids=["unwritable", "missing-folder", "garbage-file", "no-server"],
)
def test_a_storage_that_cannot_be_used_is_one_line(tmp_path, url, reason):
    (tmp_path / "garbage.db").write_bytes(b"this is not sqlite" * 100)
    url = url.format(tmp=tmp_path)
    with pytest.raises(TrackingError) as err:
        study_storage.open_storage(url)
    message = str(err.value)
    assert message.startswith(f"storage={url!r} cannot be opened (") and reason in message and "\n" not in message


# The study on a real sqlite storage


def _open(storage, name="s", parent="parent-1", recipe=None, n_trials=3, direction="maximize", base=None):
    return studies.open_study(
        storage,
        name,
        direction=direction,
        recipe=recipe or {"metric": "test/accuracy"},
        base=base or {"lr": 0.2},
        parent_run_id=parent,
        pruner=optuna.pruners.NopPruner(),
        seed=0,
        n_trials=n_trials,
    )


DIMS = [Dim("lr", "float", 0.05, 0.8, log=True)]


def test_study_is_created_with_the_base_first_and_joined_with_its_parent(tmp_path):
    storage = study_storage.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study, parent = _open(storage)
    assert parent == "parent-1"
    first = studies.ask(study)
    assert studies.suggest(first, DIMS) == {"lr": 0.2} and first.user_attrs["base_recipe"] is True
    joined, parent2 = _open(storage, parent="parent-2")
    assert parent2 == "parent-1", "a joining worker's trials go under the creator's parent run"
    with pytest.raises(ConfigError, match=r"study='s' exists with metric='test/accuracy', not 'test/loss'"):
        _open(storage, recipe={"metric": "test/loss"})


def test_a_worker_with_a_metric_of_the_other_direction_is_told_which_metric(tmp_path):
    storage = study_storage.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    _open(storage)
    with pytest.raises(ConfigError) as err:  # what `sweep --metric test/loss` asks of a test/accuracy study
        _open(storage, recipe={"metric": "test/loss"}, direction="minimize")
    assert str(err.value).startswith("study='s' exists with metric='test/accuracy', not 'test/loss'")
    # a study of our recipe made to the other direction (by another tool): refused, naming both
    with pytest.raises(ConfigError, match=r"^study='s' exists and is to maximize its metric, not minimize: use an"):
        _open(storage, direction="minimize")


def test_a_joining_worker_waits_for_its_creator_to_record_the_parent_run(tmp_path):
    storage = study_storage.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    # the creator between optuna.create_study and its last step (open_study records the parent run last)
    made = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    made.set_user_attr("recipe", '{"metric": "test/accuracy"}')
    recorded = threading.Timer(1.0, made.set_user_attr, ("parent_run_id", "parent-1"))
    started = time.monotonic()
    recorded.start()
    try:
        _, parent = _open(storage, parent="parent-2")
    finally:
        recorded.cancel()
    assert parent == "parent-1" and time.monotonic() - started >= 1.0


def test_a_study_whose_creator_died_while_creating_it_is_one_line_after_the_wait(tmp_path, monkeypatch):
    storage = study_storage.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    optuna.create_study(storage=storage, study_name="s", direction="maximize")  # and nothing after: it died
    monkeypatch.setattr(studies, "JOIN_WAIT_S", 0.2)
    with pytest.raises(TrackingError) as err:
        _open(storage)
    assert str(err.value) == (
        "study='s' exists but its creator did not finish recording its recipe and parent run within 0.2 s "
        "(it may have died while creating it); use another study name"
    )


def test_every_dimension_type_draws_values_of_its_type_within_its_bounds(tmp_path):
    dims = [
        Dim("lr", "float", 0.05, 0.8, log=True),
        Dim("batch_size", "int", 32, 256, False),
        Dim("augment", "categorical", choices=("standard", "none")),
    ]
    storage = study_storage.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    base = {"lr": 0.2, "batch_size": 128, "augment": "standard"}
    study, _ = _open(storage, base=base, n_trials=6)
    drawn = [studies.suggest(studies.ask(study), dims) for _ in range(6)]
    assert drawn[0] == base, "the first trial is the base recipe, as enqueued"
    for values in drawn[1:]:
        assert type(values["batch_size"]) is int and 32 <= values["batch_size"] <= 256
        assert type(values["lr"]) is float and 0.05 <= values["lr"] <= 0.8
        assert values["augment"] in ("standard", "none")
    assert len({v["batch_size"] for v in drawn}) > 1, "the int dimension is searched, not fixed"
    # what the trial trains with: a recipe TrainConfig accepts
    assert TrainConfig(**drawn[-1]).batch_size == drawn[-1]["batch_size"]


def test_workers_never_exceed_n_trials_a_late_one_is_closed_as_surplus(tmp_path):
    storage = study_storage.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study, _ = _open(storage, n_trials=2)
    a, b, c = (studies.ask(study) for _ in range(3))  # three workers asking at once for two slots
    assert studies.claim(study, a, 2) and studies.claim(study, b, 2)
    assert not studies.claim(study, c, 2)
    late = study.get_trials()[c.number]
    assert late.state == TrialState.FAIL and late.user_attrs[studies.SURPLUS_ATTR] is True
    assert studies.is_full(study, 2) and not studies.is_done(study, 2)
    for t in (a, b):
        study.tell(t, 0.5)
    assert studies.is_done(study, 2) and studies.counts(study)["complete"] == 2


def test_a_dead_workers_trial_is_failed_and_retried_with_its_run(tmp_path):
    storage = study_storage.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study, _ = _open(storage)
    trial = studies.ask(study)
    studies.suggest(trial, DIMS)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial.set_user_attr(studies.RUN_ATTR, "run-of-trial-0")
    for key, value in ((study_storage.HOST_ATTR, os.uname().nodename), (study_storage.PID_ATTR, dead.pid)):
        trial.set_user_attr(key, value)
    trial.set_user_attr(study_storage.STARTED_ATTR, time.time() - 5)
    assert study_storage.fail_dead(storage, study) == [trial.number]
    trials = study.get_trials()
    assert trials[trial.number].state == TrialState.FAIL
    retry = trials[-1]
    assert retry.state == TrialState.WAITING and retry.params == {"lr": 0.2}
    assert retry.user_attrs[studies.RUN_ATTR] == "run-of-trial-0", "the retry resumes the same MLflow run"
    again = studies.ask(study)
    assert again.number == retry.number and study_storage.retry_of(storage, again) == trial.number
    # a live process's trial (this one) is left alone
    assert studies.claim(study, again, 3) and study_storage.fail_dead(storage, study) == []


def test_a_silent_worker_on_another_machine_is_failed_after_the_grace_period(tmp_path):
    """A remote worker's death is seen only through its heartbeat (grace shortened from 120 s to 1 s here)."""
    storage = study_storage.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    storage.grace_period = 1
    study, _ = _open(storage)
    trial = studies.ask(study)
    studies.suggest(trial, DIMS)
    for key, value in (
        (study_storage.HOST_ATTR, "gpu-box-7"),
        (study_storage.PID_ATTR, 1),
        (study_storage.STARTED_ATTR, 1.0),
    ):
        trial.set_user_attr(key, value)
    with study_storage.heartbeat(storage, trial):
        assert study_storage.fail_dead(storage, study) == [], "beating: alive"
    assert study.get_trials()[trial.number].state == TrialState.RUNNING, "another host's pid is not checked here"
    time.sleep(2.5)  # > grace + 1: the heartbeat's time is compared at the store's resolution of one second
    study_storage.fail_dead(storage, study)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[1].params == trials[0].params


@pytest.mark.parametrize("after_epochs, pruned_at", [(1, 1), (2, 2)])
def test_pruners_judge_from_epoch_prune_after_epochs_on(after_epochs, pruned_at):
    for name in ("median", "halving"):
        study = optuna.create_study(direction="maximize", pruner=studies.make_pruner(name, 1, after_epochs))
        good = studies.ask(study)
        for epoch in (1, 2, 3):
            good.report(0.9, epoch)
            assert not good.should_prune()  # (successive halving records its rungs here)
        study.tell(good, 0.9)
        bad = studies.ask(study)
        verdicts = []
        for epoch in (1, 2, 3):
            bad.report(0.1, epoch)
            verdicts.append(bad.should_prune())
        assert verdicts.index(True) + 1 == pruned_at, (name, verdicts)


def open_at_once(url: str, workers: int = 4) -> list[str]:
    """open_storage from `workers` threads released together (separate connections, as separate workers): each
    "ok" or its error."""
    outcomes = at_once([functools.partial(study_storage.open_storage, url) for _ in range(workers)])
    return [str(o) if isinstance(o, Exception) else "ok" for o in outcomes]


def test_workers_opening_a_new_sqlite_storage_at_once_all_succeed(tmp_path):
    """Each creates Optuna's tables; the losers ("table studies already exists") try again."""
    assert open_at_once(f"sqlite:///{tmp_path / 'optuna.db'}") == ["ok"] * 4


def test_storage_errors_hide_the_password(tmp_path):
    with pytest.raises(TrackingError) as err:
        study_storage.open_storage("postgresql+psycopg2://bob:s3cret@127.0.0.1:1/optuna")
    assert "s3cret" not in str(err.value) and "bob:***@127.0.0.1:1/optuna" in str(err.value)
