"""The one package that talks to MLflow; each module has one job:

- store: check the tracking store before any work (and create a new sqlite one safely); a client for the jobs;
- runs: open a run (or the one `mlflow run` made) as a RunLogger, end it FAILED/KILLED with the reason;
- sweeps: a sweep's trials as child runs of its run; where its Optuna study lives beside a local store;
- steps: a pipeline's steps, launched as child runs of its run or found finished (with their outputs) for reuse;
- provenance: the digest of the code a run executes (tagged code_version) and the library versions it logs;
- run_lease: this process's lease on the run it trains, so two processes never train one run;
- logger: RunLogger, one object bound to a run id (params, metrics, tags, datasets, artifacts), holding the run's
  one MLflow client, which the functions below that act on the run take from it;
- params: how a value is written as a param, and whether a logged param is the same value;
- checkpoints: two checkpoint slots and a verified manifest in the run's artifacts; resume state;
- reporter: EpochReporter, each finished epoch's checkpoint and metrics written from a background thread;
- registry: log and register a model version, keep the `champion` alias on the best;
- serving: log the model (pytorch flavor + pyfunc) and load a model back as a torch module;
- served_model: the pyfunc's code, served by stock MLflow without this package: its request checks, probabilities;
- lineage: from a model URI to its version and training run; the analysis run linked both ways.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # Models registered before this package existed name `cifar_mlflow.tracking` as their pyfunc loader module
    # (tests/fixtures/model-9a1ef61): MLflow calls cifar_mlflow.tracking._load_pyfunc on them.
    if name == "_load_pyfunc":
        from cifar_mlflow.tracking.serving import _load_pyfunc

        return _load_pyfunc
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
