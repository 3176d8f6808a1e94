"""Errors the user can fix. Each carries a one-line message naming the bad value and what is allowed;
the command-line layer prints it without a traceback and exits non-zero."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one short line: the messages of torch, MLflow and the pickle module run to pages."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


class CifarMlflowError(Exception):
    """Base class: a problem with the user's input, data or environment, not a bug."""


class ConfigError(CifarMlflowError, ValueError):
    """A parameter outside its allowed values."""


class DataError(CifarMlflowError):
    """Missing, corrupt or undownloadable data; the message names the file or URL."""


class ModelError(CifarMlflowError):
    """A model that cannot be found or loaded safely."""


class TrainingDiverged(CifarMlflowError, FloatingPointError):
    """The loss became NaN or infinite, in training or in an epoch's evaluation. Training stops within
    engine.NAN_CHECK_EVERY steps of it, before that epoch is reported and before the model is registered; the
    epochs finished earlier keep what was logged for them (metrics, checkpoint)."""

    def __init__(self, step: int, epoch: int, value: str = "nan") -> None:
        self.step, self.epoch = step, epoch
        super().__init__(
            f"the training loss became {value} at step {step} (epoch {epoch}); training stopped and "
            "nothing was registered; try a lower lr or precision=fp32"
        )


class TrackingError(CifarMlflowError):
    """The tracking server cannot be reached or refuses access; the message names its URI."""


class TrackingUnavailable(TrackingError):
    """The tracking server stopped answering mid-run for longer than MLflow's retries wait: the process ends,
    leaving the run resumable, exiting with EX_TEMPFAIL (try again later)."""

    exit_code = 75


class RunBusy(CifarMlflowError):
    """Another live process holds the run's lease: this one stops without touching the run (no status, no tag),
    exiting with EX_TEMPFAIL (try again later)."""

    exit_code = 75


class StorageError(CifarMlflowError):
    """A file could not be written (disk full, file too large, permissions); the message names where."""


class Terminated(BaseException):
    """SIGTERM, turned into an exception so that the run is ended KILLED (a training run keeps its last
    checkpoint)."""


class StoppedEarly(Exception):
    """A sweep's pruner stopped the trial after `epoch`: not an error, its run ends FINISHED tagged
    pruned_at_epoch (tracking.runs.open_run)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        super().__init__(f"pruned after epoch {epoch}")
