"""The `sweep` entry point's work: an Optuna study over `main`'s recipe. Each trial is a child run of the sweep's
run, trained in this process by jobs/train (so it logs what a `main` run logs) and pruned between epochs; once the
study is done, the parent run gets the best parameters and value, a trials table and Optuna's figures, and the best
trial's model is registered as one version.

Several workers (`mlflow run . -e sweep -P study=NAME` on several machines, one storage) share one study: the
first to create it is the parent run; a later worker's own run is tagged sweep/role=worker and nested under the
parent, and the trials it runs are children of the parent too. A sweep killed and started again with the same study
(or `mlflow run --run-id <parent>` with study=auto) continues: finished trials stay, the interrupted one is failed
and retried in its own child run, resumed from that run's last checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any

import optuna

from cifar_mlflow import data
from cifar_mlflow.config import TrainConfig
from cifar_mlflow.errors import RunBusy, StoppedEarly, Terminated, TrackingError, TrainingDiverged
from cifar_mlflow.sweeps import studies, study_storage
from cifar_mlflow.sweeps.search_space import Dim
from cifar_mlflow.sweeps.sweep_config import SweepConfig
from cifar_mlflow.tracking import checkpoint_store, registry, runs
from cifar_mlflow.tracking.logger import RunLogger
from cifar_mlflow.tracking.registry import RegisteredVersion
from cifar_mlflow.tracking.run_lease import RunLease
from cifar_mlflow.tracking.sweeps import beside_store, child_run
from cifar_mlflow.training.prepare import prepare

STUDY_FILE = "optuna.db"
# tags: on the sweep's runs (parent, workers) and on each trial's run
ROLE_TAG, STUDY_TAG, STORAGE_TAG = "sweep/role", "sweep/study", "sweep/storage"
TRIAL_TAG, STATE_TAG, RETRY_TAG = "trial/number", "trial/state", "trial/retry_of"


@dataclass(frozen=True)
class SweepOutcome:
    study: str
    parent_run_id: str
    done: bool  # every trial finished (this worker summarised the study)
    best: dict[str, Any] | None = None  # number, value, params, run_id of the best trial
    registered: str | None = None  # model URI of the version registered


def storage_url(setting: str) -> str:
    return f"sqlite:///{beside_store(STUDY_FILE)}" if setting == "auto" else setting


def recipe(metric: str, base: TrainConfig, dims: list[Dim]) -> dict[str, Any]:
    """What every worker of a study must share: the metric, the space and the fixed parameters that change what
    a trial learns (not where data lives or how this machine computes)."""
    machine = {"data_dir", "num_workers", "precision", "loader", "compile"}
    fixed = {k: v for k, v in base.to_params().items() if k not in machine}
    return {"metric": metric, "space": [d.as_dict() for d in dims], **{f"base/{k}": v for k, v in fixed.items()}}


def run_sweep(cfg: SweepConfig) -> SweepOutcome:
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per trial: the sweep prints its own
    dims, base = cfg.dims(), cfg.base()
    url = storage_url(cfg.storage)
    storage = study_storage.open_storage(url)  # a storage that cannot be opened fails here, before any run is touched
    with RunLease() as lease, runs.open_run(lease) as log:
        name = f"sweep-{log.run_id}" if cfg.study == "auto" else cfg.study
        log.log_params(cfg.to_params())
        study, parent_id = studies.open_study(
            storage,
            name,
            direction="maximize" if cfg.metric == "test/accuracy" else "minimize",
            recipe=recipe(cfg.metric, base, dims),
            base={d.name: getattr(base, d.name) for d in dims if studies.fits(d, getattr(base, d.name))},
            parent_run_id=log.run_id,
            pruner=studies.make_pruner(cfg.pruner, cfg.prune_after_trials, cfg.prune_after_epochs),
            seed=cfg.seed,
            n_trials=cfg.n_trials,
        )
        tags = {STUDY_TAG: name, STORAGE_TAG: study_storage.redacted(url)}
        if parent_id == log.run_id:
            parent = log
            log.set_tags({ROLE_TAG: "parent", **tags})
        else:
            parent = runs.logger_of(log.client, parent_id)  # TrackingError if the study's parent run was deleted
            log.set_tags({ROLE_TAG: "worker", runs.PARENT_TAG: parent_id, **tags})
            if parent.status() != "RUNNING":
                parent.set_status("RUNNING")  # restarted: the sweep is running again
            print(f"sweep: joined study {name!r}; trials go under its parent run {parent_id}")
        sweep = Sweep(cfg, base, dims, storage, study, parent)
        sweep.run_trials()
        if not studies.is_done(study, cfg.n_trials):
            print(f"sweep: no trial left to start; {studies.counts(study)} (other workers are finishing theirs)")
            return SweepOutcome(name, parent_id, done=False)
        best, registered = sweep.finish()
        if parent is not log:  # (the parent's own process ends it FINISHED as open_run does)
            runs.clear_failure(parent)  # a sweep stopped by SIGTERM and finished by a restart has not failed
            parent.set_status("FINISHED")
        return SweepOutcome(name, parent_id, True, best, registered)


class Sweep:
    def __init__(
        self, cfg: SweepConfig, base: TrainConfig, dims: list[Dim], storage: Any, study: Any, parent: RunLogger
    ) -> None:
        self.cfg, self.base, self.dims, self.storage, self.study, self.parent = cfg, base, dims, storage, study, parent

    def run_trials(self) -> None:
        """Ask for trials until the study holds n_trials (a retry waiting counts, and is taken first)."""
        while True:
            retried = study_storage.fail_dead(self.storage, self.study)
            if retried:
                print(f"sweep: trial(s) {retried} of a process that died are failed; each is retried")
            waiting = self.study.get_trials(deepcopy=False, states=(studies.TrialState.WAITING,))
            if studies.is_full(self.study, self.cfg.n_trials) and not waiting:
                return
            trial = studies.ask(self.study)
            if not studies.claim(self.study, trial, self.cfg.n_trials):
                return
            self.run_trial(trial)

    def trial_config(self, params: dict[str, Any]) -> TrainConfig:
        return dataclasses.replace(self.base, **params)

    def run_trial(self, trial: Any) -> None:
        params = studies.suggest(trial, self.dims)
        cfg = self.trial_config(params)
        metric = self.cfg.metric
        retry_of = study_storage.retry_of(self.storage, trial)
        run_id = trial.user_attrs.get(studies.RUN_ATTR)  # a retry resumes the run its first attempt trained
        if run_id is None:
            run_id = child_run(self.parent, f"trial-{trial.number}", {STUDY_TAG: self.study.study_name})
            trial.set_user_attr(studies.RUN_ATTR, run_id)
        label = f"trial {trial.number}" + (f" (retry of {retry_of})" if retry_of is not None else "")
        print(
            f"\nsweep: {label}: {', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in params.items())}"
        )
        stopped: list[int] = []

        def after_epoch(epoch: int, metrics: dict[str, float]) -> None:
            trial.report(metrics[metric], epoch)
            if epoch < cfg.epochs and trial.should_prune():
                stopped.append(epoch)
                raise StoppedEarly(epoch)

        try:
            setup = prepare(cfg, cfg.max_test_samples)
            with (
                study_storage.heartbeat(self.storage, trial),
                RunLease(run_id) as lease,
                runs.open_run(lease, run_id) as log,
            ):
                log.set_tags(
                    {
                        TRIAL_TAG: str(trial.number),
                        STATE_TAG: "RUNNING",
                        **({RETRY_TAG: str(retry_of)} if retry_of is not None else {}),
                    }
                )
                from cifar_mlflow.jobs.train import train  # (jobs.train imports much; only a trial needs it)

                outcome = train(cfg, setup, log, lease, after_epoch=after_epoch, register=False)
        except TrainingDiverged as exc:  # a recipe that blows up is a result, not a crash: pruned, the run FAILED
            trial.set_user_attr("diverged_at_epoch", exc.epoch)
            self.study.tell(trial, state=studies.TrialState.PRUNED)
            runs.logger_of(self.parent.client, run_id).set_tags(
                {STATE_TAG: "PRUNED", "trial/diverged_at_epoch": str(exc.epoch)}
            )
            print(f"sweep: {label} diverged at epoch {exc.epoch}: pruned")
            return
        except (KeyboardInterrupt, Terminated):  # this worker is stopping: fail the trial, enqueue its retry
            with contextlib.suppress(Exception):
                study_storage.retry(self.storage, self.study, self.study.get_trials(deepcopy=False)[trial.number])
                runs.logger_of(self.parent.client, run_id).set_tags({STATE_TAG: "FAIL"})
            raise
        except BaseException:
            with contextlib.suppress(Exception):
                self.study.tell(trial, state=studies.TrialState.FAIL)
                runs.logger_of(self.parent.client, run_id).set_tags({STATE_TAG: "FAIL"})
            raise
        tlog = runs.logger_of(self.parent.client, run_id)
        if stopped:
            self.study.tell(trial, state=studies.TrialState.PRUNED)
            tlog.set_tags({STATE_TAG: "PRUNED"})
            print(f"sweep: {label} pruned after epoch {stopped[0]} of {cfg.epochs}")
            return
        value = outcome.metrics[metric] if outcome is not None else tlog.run().data.metrics[metric]
        self.study.tell(trial, value)
        tlog.set_tags({STATE_TAG: "COMPLETE"})
        print(f"sweep: {label} finished: {metric} {value:.4f}")
        # the parent's chart of the search so far (step = trial number), while the sweep runs
        self.parent.log_metrics({"sweep/best_so_far": float(self.study.best_value)}, step=trial.number)

    def finish(self) -> tuple[dict[str, Any] | None, str | None]:
        """The parent's summary, and the best trial's model registered (register=best)."""
        trials = self.study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state in studies.DONE]
        epochs_run = sum(max(t.intermediate_values, default=0) for t in done)
        asked = len(done) * self.base.epochs
        summary = {
            "sweep/trials_complete": sum(t.state == studies.TrialState.COMPLETE for t in trials),
            "sweep/trials_pruned": sum(t.state == studies.TrialState.PRUNED for t in trials),
            "sweep/trials_failed": sum(t.state == studies.TrialState.FAIL for t in trials),
            "sweep/epochs_run": epochs_run,
            "sweep/epochs_asked": asked,
            "sweep/epochs_saved_fraction": 1 - epochs_run / asked if asked else 0.0,
        }
        complete = [t for t in done if t.state == studies.TrialState.COMPLETE and t.value is not None]
        self.parent.log_table(studies.trials_table(trials, self.dims), "sweep/trials.json")
        for name, fig in studies.figures(self.study).items():
            self.parent.log_figure(fig, f"sweep/{name}")
        if not complete:
            self.parent.log_metrics(summary)
            print("sweep: every trial was pruned or failed; nothing to register")
            return None, None
        best = self.study.best_trial
        run_id = best.user_attrs[studies.RUN_ATTR]
        base_trial = next((t for t in complete if t.user_attrs.get("base_recipe")), None)
        self.parent.log_metrics(
            {
                **summary,
                f"best/{self.cfg.metric}": float(best.value),
                **({f"base/{self.cfg.metric}": float(base_trial.value)} if base_trial is not None else {}),
            }
        )
        self.parent.set_tags(
            {
                "best/trial": str(best.number),
                "best/run_id": run_id,
                **{f"best/{k}": _text(v) for k, v in best.params.items()},
            }
        )
        info = {"number": best.number, "value": best.value, "params": best.params, "run_id": run_id}
        self.parent.log_dict(info, "sweep/best.json")
        registered = None
        chance = self._at_chance(run_id)
        if chance and self.cfg.register == "best":
            print(
                f"sweep: the best trial ({best.number}) is at chance: {chance}; nothing registered (register=always "
                "registers it anyway, never as @champion)"
            )
            self.parent.set_tags({"best/at_chance": chance})
        elif self.cfg.register != "none":
            registered = self._register(best, run_id)
        print(
            f"\nsweep finished: {len(done)} trials ({summary['sweep/trials_pruned']} pruned), {epochs_run} of "
            f"{asked} epochs run; best trial {best.number}: {self.cfg.metric} {best.value:.4f} "
            f"({', '.join(f'{k}={_text(v)}' for k, v in best.params.items())})"
            + (f"; registered {registered}" if registered else "")
        )
        return info, registered

    def _at_chance(self, run_id: str) -> str | None:
        """Why the best trial's model learned nothing (registry's chance rule on its final test accuracy), or None."""
        run = self.parent.client.get_run(run_id)
        accuracy, size = run.data.metrics.get("test/accuracy"), run.data.params.get("data/test_size", "")
        if accuracy is None or not size.isdigit():
            return None
        return registry.at_chance(accuracy, data.NUM_CLASSES, int(size))

    def _register(self, best: Any, run_id: str) -> str | None:
        """The best trial's model as one registered version, from its run's last checkpoint (the champion rule
        as in `main`). A version the run registered already (a worker finishing twice) is kept, not duplicated."""
        cfg = self.trial_config(best.params)
        try:
            with RunLease(run_id) as lease, runs.open_run(lease, run_id) as log:
                version = _register_from_checkpoint(cfg, log)
        except RunBusy:  # two workers finished the study at the same moment: the other one registers it
            print(f"sweep: another worker is registering the best trial's run {run_id}")
            return None
        self.parent.set_tags({"registered_model_version": version.version, "best/model_uri": version.model_uri})
        return version.model_uri


def _register_from_checkpoint(cfg: TrainConfig, log: RunLogger) -> RegisteredVersion:
    """Register the model of a finished trial's run (open) from its last checkpoint, as `main` registers its own;
    the run's test accuracy tags the version."""
    from cifar_mlflow.jobs.train import measured_on, register_model

    state = checkpoint_store.load_latest_checkpoint(log)
    if state is None or state["epoch"] < cfg.epochs:
        raise TrackingError(f"run {log.run_id} has no checkpoint of its last epoch ({cfg.epochs}) to register")
    setup = prepare(cfg, cfg.max_test_samples)
    measured_on(log, setup)
    setup.model.load_state_dict(state["model"])
    data.shutdown_workers(setup.train_loader)
    return register_model(cfg, setup, log, float(state["history"][-1]["test/accuracy"]))


def _text(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)
