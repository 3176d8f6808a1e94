"""Training engine: train_one_epoch / evaluate / flip TTA / fit, over the step of training/train_step.py and the loop of
training/inference.py (device and precision: training/hardware.py; optimiser and schedule: training/optim.py).

Knows nothing of MLflow: fit() returns the per-epoch metrics and calls an optional `on_epoch_end` callback.
The hot loop reads the device only every NAN_CHECK_EVERY steps (one small read, for the NaN check) and at the end
of the epoch: losses and correct counts accumulate in device tensors in between. Evaluation reads once per pass.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cifar_mlflow.config import TrainConfig
from cifar_mlflow.errors import TrainingDiverged
from cifar_mlflow.training import checkpoint, distributed, hardware, inference, optim, stop, train_step

Metrics = dict[str, float]


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's generators (every device's), for a reproducible model and run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _progress(loader: Any, desc: str) -> Iterator[Any]:
    """The loader's batches, with a progress bar on a terminal (silence in CI logs); before each batch, a stop
    that Ctrl-C or SIGTERM asked for is raised (cifar_mlflow.training.stop)."""
    from tqdm import tqdm

    for batch in tqdm(loader, desc=desc, unit="batch", leave=False, disable=None, mininterval=1.0):
        stop.check()
        yield batch


# How often the loop looks at the device for a NaN/inf loss: a host sync every 10 steps costs little even on a
# GPU, and the exact first bad step is recorded on the device in between.
NAN_CHECK_EVERY = 10


class Tally:
    """Cross-entropy sum, correct predictions and samples of one pass, kept on the device (no host read until
    `rows`). Training, evaluation, flip TTA and the analysis all count through it, so they agree exactly."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.seen = 0

    def add(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        """A batch's fp32 logits (or log-probabilities) and labels."""
        self.loss += F.cross_entropy(logits, y, reduction="sum")
        self.correct += (logits.argmax(dim=1) == y).sum()
        self.seen += len(y)

    def rows(self, ctx: distributed.Context | None, *extra: torch.Tensor) -> list[list[float]]:
        """[loss sum, correct, seen, *extra] of every process, in rank order (one row without ctx): one transfer to
        the host, and one collective when data-parallel."""
        local = torch.stack(
            [
                self.loss,
                self.correct.double(),
                torch.tensor(float(self.seen), dtype=torch.float64, device=self.loss.device),
            ]
            + [e.double() for e in extra]
        )
        return (distributed.all_gather(local, ctx.world) if ctx else local[None]).tolist()

    def totals(self, ctx: distributed.Context | None = None) -> tuple[float, float]:
        """(mean loss, accuracy) over every process's samples."""
        return mean_and_accuracy(self.rows(ctx))


def mean_and_accuracy(rows: list[list[float]]) -> tuple[float, float]:
    loss, correct, seen = (sum(r[i] for r in rows) for i in range(3))
    return loss / max(seen, 1), correct / max(seen, 1)


@dataclass
class Epoch:
    metrics: Metrics
    lrs: list[float]  # the LR of every optimiser step, in order
    first_step_at: float  # time.time() when its first optimiser step finished


def train_one_epoch(
    step: train_step.TrainStep,
    loader: Any,
    schedule: optim.Schedule,
    epoch: int = 1,
    ctx: distributed.Context | None = None,
    desc: str = "train",
) -> Epoch:
    """One pass over loader. Its metrics: train/loss (plain cross-entropy, comparable with test/loss; the optimised
    objective adds label smoothing and the L1 penalty), train/accuracy, train/images_per_sec and lr (the LR of the
    epoch's last step). A NaN/inf loss raises TrainingDiverged naming the global step.
    Data-parallel (ctx): the metrics cover every process's shard (sums gathered once per epoch), and
    `ranks/<r>/train/loss|accuracy|samples` report each process's own share."""
    step.model.train()
    optimizer = step.optimizer
    first_step = (epoch - 1) * len(loader) + 1
    tally = Tally(step.device)
    bad_step = torch.full((), -1, dtype=torch.int64, device=step.device)  # first step with a non-finite loss
    lrs: list[float] = []
    first_step_at = 0.0
    start = time.perf_counter()
    for i, (images, labels) in enumerate(_progress(loader, desc)):
        loss, logits, y = step(images, labels)
        lrs.append(float(optimizer.param_groups[0]["lr"]))  # the LR this step used (a Python float: no sync)
        if i == 0:
            first_step_at = time.time()  # start-up cost as users feel it (reported by the job)
        schedule.after_step()
        with torch.no_grad():
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), first_step + i, bad_step)
            tally.add(logits.detach().float(), y)
        if (i + 1) % NAN_CHECK_EVERY == 0:
            _raise_if_diverged(int(bad_step.item()), epoch)
    rows = tally.rows(ctx, bad_step)  # the epoch's closing host read, the first bad step with the sums
    bad = [int(r[3]) for r in rows if r[3] >= 0]
    _raise_if_diverged(min(bad) if bad else -1, epoch)
    elapsed = time.perf_counter() - start
    loss_mean, accuracy = mean_and_accuracy(rows)
    seen = sum(r[2] for r in rows)
    out = {
        "train/loss": loss_mean,
        "train/accuracy": accuracy,
        "train/images_per_sec": seen / elapsed if elapsed > 0 else 0.0,
        "lr": lrs[-1] if lrs else float(optimizer.param_groups[0]["lr"]),
    }
    if ctx:
        for r, (r_loss, r_correct, r_seen, _) in enumerate(rows):
            out.update(
                {
                    f"ranks/{r}/train/loss": r_loss / max(r_seen, 1),
                    f"ranks/{r}/train/accuracy": r_correct / max(r_seen, 1),
                    f"ranks/{r}/train/samples": r_seen,
                }
            )
    return Epoch(out, lrs, first_step_at)


def eval_logits(
    model: nn.Module, loader: Any, device: torch.device, precision: str, desc: str = "test", flip: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(fp32 logits, labels) per batch of loader, on the device, through inference.logits (flip: logits
    (2, B, C) of the images and their mirrors). Training's test metrics, flip TTA and the analysis entry point
    all go through it, so they agree exactly."""
    return inference.logits(model, _progress(loader, desc), device, precision, flip=flip)


def evaluate(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    precision: str,
    desc: str = "test",
    ctx: distributed.Context | None = None,
) -> Metrics:
    """Plain cross-entropy and accuracy over every sample of loader (of every process's shard, with ctx)."""
    return _evaluate(model, loader, device, precision, desc, ctx, flip_tta=False)[0]


def _evaluate(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    precision: str,
    desc: str,
    ctx: distributed.Context | None,
    flip_tta: bool,
) -> tuple[Metrics, float | None]:
    """evaluate()'s metrics, and with flip_tta the flip-TTA accuracy (evaluate_flip_tta's) from the same pass: the
    plain metrics come from the unmirrored logits, which are exactly what a pass without flip computes."""
    tally, tta = Tally(device), Tally(device)
    for logits, y in eval_logits(model, loader, device, precision, desc, flip=flip_tta):
        if flip_tta:
            tta.add(torch.logsumexp(torch.log_softmax(logits, dim=2), dim=0), y)  # log of the summed probabilities
            logits = logits[0]
        tally.add(logits, y)
    loss, accuracy = tally.totals(ctx)
    return {"test/loss": loss, "test/accuracy": accuracy}, (tta.totals(ctx)[1] if flip_tta else None)


def _raise_if_diverged(bad_step: int, epoch: int) -> None:
    if bad_step >= 0:
        raise TrainingDiverged(bad_step, epoch)


def evaluate_flip_tta(
    model: nn.Module, loader: Any, device: torch.device, precision: str, ctx: distributed.Context | None = None
) -> float:
    """Accuracy of the mean softmax over each image and its horizontal mirror (flip test-time augmentation),
    over every process's shard with ctx. (fit(flip_tta=True) measures it with the last epoch's test metrics.)"""
    tta = _evaluate(model, loader, device, precision, "test (flip TTA)", ctx, flip_tta=True)[1]
    assert tta is not None
    return tta


@dataclass
class FitResult:
    history: list[Metrics]  # one dict per epoch, epoch 1 first
    lr_steps: list[float]  # the LR of every optimiser step, in order
    first_step_at: float | None = None  # time.time() when this process finished its first optimiser step
    # fit(flip_tta=True): flip-TTA accuracy of the final model, measured in the last epoch's evaluation (or on its
    # own after a resume that left no epoch to run); None when not asked for
    flip_tta: float | None = None


def _compiled(module: nn.Module) -> nn.Module:
    """torch.compile(module): an OptimizedModule, an nn.Module sharing `module`'s parameters. torch annotates
    compile as returning a plain Callable of the same signature, which loses that it is a module."""
    return torch.compile(module)  # type: ignore[return-value]


@stop.deferred()  # Ctrl-C/SIGTERM stop it between two batches, where no lock is held
def fit(
    model: nn.Module,
    train_loader: Any,
    test_loader: Any,
    cfg: TrainConfig,
    device: torch.device,
    precision: str,
    on_epoch_end: Callable[[int, Metrics, Callable[[], dict]], None] | None = None,
    log: Callable[[str], None] = print,
    resume: dict[str, Any] | None = None,
    ctx: distributed.Context | None = None,
    flip_tta: bool = False,
) -> FitResult:
    """Train for cfg.epochs, evaluating after each epoch. on_epoch_end(epoch, metrics, capture) gets 1-based
    epochs and a function returning the full checkpoint state. resume: a checkpoint.capture() state to continue
    from (the next epoch after it); the result then covers every epoch, the resumed ones included.
    ctx (torchrun): training through DistributedDataParallel on each process's shard; evaluation on each
    process's shard of the test split with rank 0's BatchNorm statistics; metrics summed over processes.
    flip_tta: the last epoch's evaluation also measures flip-TTA accuracy (FitResult.flip_tta), one pass over the
    test set fewer than evaluate_flip_tta afterwards."""
    optimizer = optim.build_optimizer(cfg, model.parameters())
    schedule = optim.build_scheduler(cfg, optimizer, steps_per_epoch=len(train_loader))
    scaler = hardware.grad_scaler(device, precision)
    # The compiled/DDP modules share parameters with `model`; state_dicts, checkpoints and GradCAM use `model`.
    eval_net = _compiled(model) if cfg.compile else model
    train_net = eval_net
    if ctx is not None:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        train_net = _compiled(ddp) if cfg.compile else ddp
    step = train_step.TrainStep(train_net, optimizer, device, precision, cfg.label_smoothing, cfg.l1, scaler)
    history: list[Metrics] = []
    lr_steps: list[float] = []
    first_step_at: float | None = None
    start, tta = 1, None
    if resume is not None:
        checkpoint.restore(resume, model, optimizer, schedule.scheduler, scaler)
        history, lr_steps, start = list(resume["history"]), list(resume["lr_steps"]), int(resume["epoch"]) + 1
    for epoch in range(start, cfg.epochs + 1):
        train_loader.sampler.set_epoch(epoch)
        trained = train_one_epoch(step, train_loader, schedule, epoch, ctx, desc=f"epoch {epoch}/{cfg.epochs} train")
        metrics, first_step_at = trained.metrics, first_step_at or trained.first_step_at
        lr_steps.extend(trained.lrs)
        if ctx is not None:
            distributed.sync_buffers(model)
        last = flip_tta and epoch == cfg.epochs
        tested, tta = _evaluate(eval_net, test_loader, device, precision, f"epoch {epoch}/{cfg.epochs} test", ctx, last)
        metrics.update(tested)
        if not all(math.isfinite(v) for v in metrics.values()):  # e.g. fp16 overflow in evaluation
            raise TrainingDiverged(epoch * len(train_loader), epoch, "non-finite in evaluation")
        schedule.after_epoch(metrics["test/loss"])
        history.append(metrics)
        log(
            f"epoch {epoch}/{cfg.epochs}  train loss {metrics['train/loss']:.4f} acc {metrics['train/accuracy']:.4f}"
            f"  test loss {metrics['test/loss']:.4f} acc {metrics['test/accuracy']:.4f}"
            f"  lr {metrics['lr']:.3g}  {metrics['train/images_per_sec']:.0f} img/s"
        )
        if on_epoch_end is not None:

            def capture(e: int = epoch) -> dict[str, Any]:  # (a lambda with a default is beyond mypy's inference)
                return checkpoint.capture(model, optimizer, schedule.scheduler, scaler, e, history, lr_steps)

            on_epoch_end(epoch, metrics, capture)
    if flip_tta and tta is None:  # resumed after the last epoch: no evaluation ran to measure it in
        tta = evaluate_flip_tta(model, test_loader, device, precision, ctx=ctx)
    return FitResult(history, lr_steps, first_step_at, tta)
