"""The `sweep` entry point's parameters: the search (trials, metric, space, pruner, study and its storage), then every
`main` parameter as the fixed recipe each trial starts from. Written as config.py's dataclasses are (the click
options, the MLproject and the docs page's table are generated from it); its space is read and checked by
sweeps/search_space.py, which knows only `main`'s config.
"""

from __future__ import annotations

import dataclasses

from cifar_mlflow.config import TrainConfig
from cifar_mlflow.fields import Composed, config, param
from cifar_mlflow.sweeps import search_space
from cifar_mlflow.values import check_loader

SWEEP_METRICS = ("test/accuracy", "test/loss")
PRUNERS = ("median", "halving", "none")
REGISTER = ("best", "always", "none")
# Every `main` parameter is the sweep's fixed base; the GradCAM panel is the sweep's own (off by default: one panel
# per trial and epoch would cost more than a short trial).
SWEEP_BASE = [name for name in TrainConfig.__dataclass_fields__ if name != "log_images_every"]


@config((TrainConfig, SWEEP_BASE), own_first=True)
class SweepConfig(Composed):
    """Parameters of the `sweep` entry point: the search (trials, metric, space, pruner, study and its storage),
    then every `main` parameter as the fixed recipe each trial starts from."""

    n_trials: int = param(
        10,
        "Trials in the study, over all its workers (finished or pruned ones count; a failed one is retried); the "
        "first is the base recipe itself, so the best is never worse than the defaults. At most 10,000: TPE's "
        "suggestions slow with every trial it has seen, and each trial keeps two checkpoints (~90 MB).",
        low=1,
        high=10_000,
    )
    metric: str = param(
        "test/accuracy",
        "What a trial is judged by: its test/accuracy after the last epoch (maximised), or test/loss "
        "(minimised); the pruner compares it epoch by epoch.",
        choices=SWEEP_METRICS,
    )
    space: str = param(
        "default",
        "Search space: default = peak lr log-uniform from lr/4 to 4*lr (lr: the base's peak LR, lr=scaled's value "
        "at the base's batch size), weight_decay log-uniform 5e-5-5e-3, "
        "label_smoothing 0-0.2, augment in {standard, flip-cutout, none}; or a YAML file (docs/sweep.md).",
    )
    pruner: str = param(
        "median",
        "Stops hopeless trials after an epoch: median = below the median of earlier trials at the same epoch "
        "(Optuna's MedianPruner); halving = successive halving (Li et al. 2018, Optuna's SuccessiveHalvingPruner); "
        "none = every trial runs all its epochs.",
        choices=PRUNERS,
    )
    prune_after_trials: int = param(
        2,
        "The median pruner prunes nothing until this many trials have finished (they set the bar).",
        low=0,
    )
    prune_after_epochs: int = param(
        1,
        "No trial is pruned before it has run this many epochs (the median pruner's warm-up, successive halving's "
        "first rung); one-cycle's warm-up makes first-epoch accuracy a noisy judge on longer trials.",
        low=1,
    )
    study: str = param(
        "auto",
        "Optuna study name; workers started with the same name on one storage share its trials, and a sweep "
        "started again with it continues. auto = sweep-<this run's id>.",
        pattern=(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", "letters, digits, '_', '-' and '.' (at most 128)"),
    )
    storage: str = param(
        "auto",
        "Optuna storage (an RDB URL): auto = sqlite optuna.db beside a local sqlite tracking store (./optuna.db "
        "otherwise); postgresql+psycopg2://user@host/db for a team's workers (the password in PGPASSWORD, not in "
        "the URL: it would be logged as a param).",
        pattern=(
            r"auto|(sqlite|postgresql|mysql)(\+\w+)?://\S*",
            "auto, or an RDB URL: sqlite:///<file>, postgresql+psycopg2://<user>:<password>@<host>/<db> or mysql://...",
        ),
    )
    register: str = param(
        "best",
        "best = register the best trial's model as one version once the study is done (the champion rule as in "
        "main), unless that trial is at chance (it learned nothing: then nothing is registered and the sweep says "
        "so); always = register the best trial even at chance (never @champion then); none = register nothing.",
        choices=REGISTER,
    )
    log_images_every: int = param(
        0,
        "Each trial's GradCAM panel, as in `main` (-1 = auto, N = every N epochs); 0 = off, the sweep's default.",
        low=-1,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_loader(self)
        self.dims()  # a bad space is refused now, before any trial

    def base(self) -> TrainConfig:
        """The fixed recipe every trial starts from (validated as `main` would)."""
        mine = dataclasses.asdict(self)
        return TrainConfig(**{k: v for k, v in mine.items() if k in TrainConfig.__dataclass_fields__})

    def dims(self) -> list[search_space.Dim]:
        """The search space, checked."""
        base = self.base()
        return (
            search_space.default_space(base) if self.space == "default" else search_space.load_space(self.space, base)
        )
