"""Training engine: device and precision choice, optimiser and schedule, train_one_epoch / evaluate / fit.

Knows nothing of MLflow: fit() returns the per-epoch metrics and calls an optional `on_epoch_end` callback.
The hot loop never syncs with the host: losses and correct counts accumulate in device tensors and are read
once per epoch.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cifar_mlflow import checkpoint, distributed, stop
from cifar_mlflow.config import TrainConfig
from cifar_mlflow.errors import TrainingDiverged

# One-cycle shape: linear warm-up over the first 20% of steps, then linear decay to ~0 (Smith 2018; the
# DAWNBench ResNet recipes peak at epoch ~5 of 24). Start at peak/25 and end at peak/25/1e4 ~ 0.
ONECYCLE_PCT_START = 0.2
ONECYCLE_DIV_FACTOR = 25.0
ONECYCLE_FINAL_DIV_FACTOR = 1e4

Metrics = dict[str, float]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(ctx: distributed.Context | None = None) -> torch.device:
    """The GPU if there is one (under torchrun: this process's own), else the CPU."""
    if ctx is not None:
        return ctx.device
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU features that make bf16 autocast faster than fp32 (~2x here)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 where the device runs it natively, else fp32. Explicit choices are kept."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def precision_is_emulated(precision: str, device: torch.device) -> bool:
    """bf16 or fp16 autocast on a CPU without native bf16: emulated, 10x or more slower than fp32 (measured on an
    AVX2-only EPYC; fp16 autocast on a CPU is emulated everywhere)."""
    return device.type == "cpu" and (precision == "fp16" or (precision == "bf16" and not cpu_has_native_bf16()))


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_optimizer(cfg: Any, params: Iterable[nn.Parameter], lr: float | None = None) -> torch.optim.Optimizer:
    """cfg: any config with optimizer, momentum and weight_decay; lr defaults to cfg.lr."""
    lr = cfg.lr if lr is None else lr
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0
        )
    betas = (cfg.momentum, 0.999)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=cfg.weight_decay)


# plateau: x0.1 after 2 epochs without a lower test loss -- in a 20-epoch budget a longer patience (the notebooks
# use 4) would leave time for at most a couple of reductions.
PLATEAU_FACTOR, PLATEAU_PATIENCE = 0.1, 2
# cyclic: triangular2 between lr/10 and lr with 2-epoch half cycles (Smith 2017 suggests 2-10 epochs); the
# amplitude halves every cycle, so the LR settles low by the end as one-cycle's does.
CYCLIC_BASE_DIV, CYCLIC_HALF_EPOCHS = 10.0, 2


@dataclass
class Schedule:
    """A learning-rate scheduler and when to step it: after every optimiser step, or once per epoch on the
    test loss (ReduceLROnPlateau)."""

    scheduler: Any
    per_step: bool

    def after_step(self) -> None:
        if self.per_step:
            self.scheduler.step()

    def after_epoch(self, test_loss: float) -> None:
        if not self.per_step:
            self.scheduler.step(test_loss)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Schedule:
    sched = torch.optim.lr_scheduler
    total = cfg.epochs * steps_per_epoch
    if cfg.scheduler == "onecycle":
        return Schedule(
            sched.OneCycleLR(
                optimizer,
                max_lr=cfg.lr,
                total_steps=total,
                pct_start=ONECYCLE_PCT_START,
                anneal_strategy="linear",
                div_factor=ONECYCLE_DIV_FACTOR,
                final_div_factor=ONECYCLE_FINAL_DIV_FACTOR,
                cycle_momentum=False,
            ),
            per_step=True,
        )  # keep the `momentum` parameter as given instead of cycling it
    if cfg.scheduler == "cosine":
        return Schedule(sched.CosineAnnealingLR(optimizer, T_max=total, eta_min=0.0), per_step=True)
    if cfg.scheduler == "cyclic":
        return Schedule(
            sched.CyclicLR(
                optimizer,
                base_lr=cfg.lr / CYCLIC_BASE_DIV,
                max_lr=cfg.lr,
                step_size_up=max(1, CYCLIC_HALF_EPOCHS * steps_per_epoch),
                mode="triangular2",
                cycle_momentum=False,
            ),
            per_step=True,
        )  # cycling momentum would fight Adam's betas
    if cfg.scheduler == "plateau":
        return Schedule(
            sched.ReduceLROnPlateau(optimizer, mode="min", factor=PLATEAU_FACTOR, patience=PLATEAU_PATIENCE),
            per_step=False,
        )
    return Schedule(sched.LambdaLR(optimizer, lambda _: 1.0), per_step=True)


def l1_weights(model: nn.Module) -> list[nn.Parameter]:
    """Conv and linear weights: what an L1 penalty should shrink (not norm scales or biases)."""
    return [p for p in model.parameters() if p.ndim > 1]


def l1_penalty(weights: list[nn.Parameter]) -> torch.Tensor:
    """Sum of absolute values of the given weights, on their device (no host sync)."""
    return torch.stack([p.abs().sum() for p in weights]).sum()


def to_device_images(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float (B, C, H, W) in [0, 1]. The permuted view of an NHWC tensor already has the
    channels_last layout, so no copy is needed for the model's memory format."""
    x = x.to(device, non_blocking=True).permute(0, 3, 1, 2)
    return x.float().div_(255.0)


def _progress(loader: Any, desc: str) -> Iterator[Any]:
    """The loader's batches, with a progress bar on a terminal (silence in CI logs); before each batch, a stop
    that Ctrl-C or SIGTERM asked for is raised (cifar_mlflow.stop)."""
    from tqdm import tqdm

    for batch in tqdm(loader, desc=desc, unit="batch", leave=False, disable=None, mininterval=1.0):
        stop.check()
        yield batch


# How often the loop looks at the device for a NaN/inf loss: a host sync every 10 steps costs little even on a
# GPU, and the exact first bad step is recorded on the device in between.
NAN_CHECK_EVERY = 10


def train_one_epoch(
    model: nn.Module,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    device: torch.device,
    precision: str,
    label_smoothing: float,
    scaler: torch.amp.GradScaler | None = None,
    desc: str = "train",
    l1: float = 0.0,
    lr_log: list[float] | None = None,
    epoch: int = 1,
    first_step: int = 1,
    first_step_time: list[float] | None = None,
    ctx: distributed.Context | None = None,
) -> Metrics:
    """One pass over loader. Returns train/loss (plain cross-entropy, comparable with test/loss; the optimised
    objective adds label smoothing and the L1 penalty), train/accuracy, train/images_per_sec and lr (the LR of the
    epoch's last step). Every step's LR is appended to lr_log. A NaN/inf loss raises TrainingDiverged naming
    the global step (first_step is the number of this epoch's first step).
    Data-parallel (ctx): the metrics cover every process's shard (sums gathered once per epoch), and
    `ranks/<r>/train/loss|accuracy|samples` report each process's own share."""
    model.train()
    penalised = l1_weights(model) if l1 > 0 else []
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    bad_step = torch.full((), -1, dtype=torch.int64, device=device)  # first step with a non-finite loss
    seen, lr = 0, float(optimizer.param_groups[0]["lr"])
    start = time.perf_counter()
    for i, (images, labels) in enumerate(_progress(loader, desc)):
        x = to_device_images(images, device)
        y = labels.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        if penalised:
            loss = loss + l1 * l1_penalty(penalised)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        lr = optimizer.param_groups[0]["lr"]  # the LR this step used (a Python float: no sync)
        if lr_log is not None:
            lr_log.append(float(lr))
        if first_step_time is not None and not first_step_time:
            first_step_time.append(time.time())  # start-up cost as users feel it (reported by the job)
        schedule.after_step()
        with torch.no_grad():
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), first_step + i, bad_step)
            logits = logits.detach().float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(dim=1) == y).sum()
        seen += len(labels)
        if (i + 1) % NAN_CHECK_EVERY == 0:
            _raise_if_diverged(int(bad_step.item()), epoch)
    # the epoch's one host sync: all values in one transfer (one collective too, when data-parallel)
    local = torch.stack(
        [loss_sum, correct.double(), torch.tensor(float(seen), dtype=torch.float64, device=device), bad_step.double()]
    )
    ranks = (distributed.all_gather(local, ctx.world) if ctx else local[None]).tolist()
    bad = [int(r[3]) for r in ranks if r[3] >= 0]
    _raise_if_diverged(min(bad) if bad else -1, epoch)
    total_loss, total_correct, total_seen = (sum(r[i] for r in ranks) for i in range(3))
    elapsed = time.perf_counter() - start
    out = {
        "train/loss": total_loss / max(total_seen, 1),
        "train/accuracy": total_correct / max(total_seen, 1),
        "train/images_per_sec": total_seen / elapsed if elapsed > 0 else 0.0,
        "lr": float(lr),
    }
    if ctx:
        for r, (r_loss, r_correct, r_seen, _) in enumerate(ranks):
            out.update(
                {
                    f"ranks/{r}/train/loss": r_loss / max(r_seen, 1),
                    f"ranks/{r}/train/accuracy": r_correct / max(r_seen, 1),
                    f"ranks/{r}/train/samples": r_seen,
                }
            )
    return out


def eval_logits(
    model: nn.Module, loader: Any, device: torch.device, precision: str, desc: str = "test"
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(fp32 logits, labels) per batch, on the device, in eval mode without gradients. The one evaluation path:
    training's test metrics and the analysis entry point both go through it, so they agree exactly."""
    model.eval()
    with torch.inference_mode():
        for images, labels in _progress(loader, desc):
            x = to_device_images(images, device)
            y = labels.to(device, non_blocking=True)
            with autocast(device, precision):
                logits = model(x)
            yield logits.float(), y


def evaluate(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    precision: str,
    desc: str = "test",
    ctx: distributed.Context | None = None,
) -> Metrics:
    """Plain cross-entropy and accuracy over every sample of loader (of every process's shard, with ctx)."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    for logits, y in eval_logits(model, loader, device, precision, desc):
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(dim=1) == y).sum()
        seen += len(y)
    total_loss, total_correct, total_seen = _summed([loss_sum, correct, seen], device, ctx)
    return {"test/loss": total_loss / max(total_seen, 1), "test/accuracy": total_correct / max(total_seen, 1)}


def _summed(values: list[torch.Tensor | int], device: torch.device, ctx: distributed.Context | None) -> list[float]:
    """Device scalars (and host counts) as floats, summed over every process with ctx: one transfer to the host,
    and one collective when data-parallel."""
    totals = torch.stack([torch.as_tensor(v, device=device).double() for v in values])
    if ctx:
        distributed.all_reduce_sum(totals)
    return totals.tolist()


def _raise_if_diverged(bad_step: int, epoch: int) -> None:
    if bad_step >= 0:
        raise TrainingDiverged(bad_step, epoch)


def evaluate_flip_tta(
    model: nn.Module, loader: Any, device: torch.device, precision: str, ctx: distributed.Context | None = None
) -> float:
    """Accuracy of the mean softmax over each image and its horizontal mirror (flip test-time augmentation),
    over every process's shard with ctx."""
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    with torch.inference_mode():
        for images, labels in _progress(loader, "test (flip TTA)"):
            x = to_device_images(images, device)
            y = labels.to(device, non_blocking=True)
            with autocast(device, precision):
                logits, flipped = model(x), model(torch.flip(x, dims=[3]))
            probs = torch.softmax(logits.float(), 1) + torch.softmax(flipped.float(), 1)
            correct += (probs.argmax(dim=1) == y).sum()
            seen += len(y)
    total_correct, total_seen = _summed([correct, seen], device, ctx)
    return total_correct / max(total_seen, 1)


@dataclass
class FitResult:
    history: list[Metrics]  # one dict per epoch, epoch 1 first
    final: Metrics  # the last epoch's metrics
    lr_steps: list[float]  # the LR of every optimiser step, in order
    first_step_at: float | None = None  # time.time() when this process finished its first optimiser step


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
) -> FitResult:
    """Train for cfg.epochs, evaluating after each epoch. on_epoch_end(epoch, metrics, capture) gets 1-based
    epochs and a function returning the full checkpoint state. resume: a checkpoint.capture() state to continue
    from (the next epoch after it); the result then covers every epoch, the resumed ones included.
    ctx (torchrun): training through DistributedDataParallel on each process's shard; evaluation on each
    process's shard of the test split with rank 0's BatchNorm statistics; metrics summed over processes."""
    optimizer = build_optimizer(cfg, model.parameters())
    schedule = build_scheduler(cfg, optimizer, steps_per_epoch=len(train_loader))
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    # The compiled/DDP modules share parameters with `model`; state_dicts, checkpoints and GradCAM use `model`.
    compiled = getattr(cfg, "compile", False)
    eval_net = torch.compile(model) if compiled else model
    train_net = eval_net
    if ctx is not None:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        train_net = torch.compile(ddp) if compiled else ddp
    history: list[Metrics] = []
    lr_steps: list[float] = []
    first_step: list[float] = []
    start = 1
    if resume is not None:
        checkpoint.restore(resume, model, optimizer, schedule.scheduler, scaler)
        history, lr_steps, start = list(resume["history"]), list(resume["lr_steps"]), int(resume["epoch"]) + 1
    for epoch in range(start, cfg.epochs + 1):
        train_loader.sampler.set_epoch(epoch)
        metrics = train_one_epoch(
            train_net,
            train_loader,
            optimizer,
            schedule,
            device,
            precision,
            cfg.label_smoothing,
            scaler,
            desc=f"epoch {epoch}/{cfg.epochs} train",
            l1=cfg.l1,
            lr_log=lr_steps,
            epoch=epoch,
            first_step=(epoch - 1) * len(train_loader) + 1,
            first_step_time=first_step,
            ctx=ctx,
        )
        if ctx is not None:
            distributed.sync_buffers(model)
        metrics.update(
            evaluate(eval_net, test_loader, device, precision, desc=f"epoch {epoch}/{cfg.epochs} test", ctx=ctx)
        )
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
            on_epoch_end(
                epoch,
                metrics,
                lambda e=epoch: checkpoint.capture(model, optimizer, schedule.scheduler, scaler, e, history, lr_steps),
            )
    return FitResult(history, history[-1], lr_steps, first_step[0] if first_step else None)
