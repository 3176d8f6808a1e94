"""Checkpoints in the run's artifacts: two slots written in turn and a manifest naming the complete one with its
SHA-256, so a crash while writing never leaves a run without a checkpoint to resume from; reading them back
verified; the epochs a run has logged, for a resume. Each function takes the run's RunLogger and uses its client."""

from __future__ import annotations

import contextlib
import errno
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from cifar_mlflow import data
from cifar_mlflow.errors import ModelError, StorageError, first_line
from cifar_mlflow.tracking.logger import RunLogger
from cifar_mlflow.training import checkpoint

CHECKPOINTS = "checkpoints"
MANIFEST = f"{CHECKPOINTS}/latest.json"
SLOT_FILE = "checkpoint.pt"


def _sha256(path: Path) -> str:
    return data.file_digest(path, "sha256")


def _slot_path(epoch: int) -> str:
    """Odd epochs in slot-a, even in slot-b."""
    return f"{CHECKPOINTS}/slot-{'a' if epoch % 2 else 'b'}/{SLOT_FILE}"


def log_checkpoint(
    log: RunLogger, state: dict[str, Any], epoch: int, previous: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Two slots used in turn, then a manifest naming the slot just finished with its SHA-256, and the other
    slot's entry (`previous`) as the fallback. A crash while uploading a slot leaves the manifest on the other,
    complete one; the store holds two checkpoints, not one per epoch. Returns the manifest's entry."""
    client, run_id = log.client, log.run_id
    entry: dict[str, Any] = {"epoch": epoch, "path": _slot_path(epoch)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / SLOT_FILE
        try:
            checkpoint.save(state, path)
            entry["sha256"] = _sha256(path)
            client.log_artifact(run_id, str(path), entry["path"].rsplit("/", 1)[0])
            before = {k: previous[k] for k in entry} if previous and previous.get("epoch") == epoch - 1 else None
            manifest = {**entry, "previous": before}
            client.log_dict(run_id, manifest, MANIFEST)
        except (OSError, RuntimeError) as exc:  # torch reports a full disk as a RuntimeError of its writer
            raise StorageError(
                f"cannot write the checkpoint of epoch {epoch} ({_storage_reason(exc)}); {_storage_advice(exc)}, "
                f"then resume the run (mlflow run --run-id {run_id})"
            ) from None
    return entry


def _storage_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or first_line(exc)
    return "the write failed: is the disk full?"  # torch's zip writer reports no errno ("unexpected pos ...")


_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _storage_advice(exc: BaseException) -> str:
    """What to do about it: free space only where space is what ran out."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None or code in _FULL:
        return "free space"
    if code == errno.EROFS:
        return "make the artifact store writable again (it is mounted read-only)"
    if code in (errno.EACCES, errno.EPERM):
        return "give this user write access to the artifact store"
    return "fix the artifact store"


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _entry_problem(entry: Any) -> str | None:
    """Why a manifest entry is not one log_checkpoint writes (so it is not followed), or None."""
    if not isinstance(entry, dict):
        return f"a {type(entry).__name__}, not an object"
    epoch = entry.get("epoch")
    if type(epoch) is not int or epoch < 1:
        return f"epoch {epoch!r:.40} is not an integer >= 1"
    if entry.get("path") != _slot_path(epoch):
        return f"path {str(entry.get('path'))[:160]!r} is not {_slot_path(epoch)}, where epoch {epoch} belongs"
    if not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
        return "it has no SHA-256 of 64 hex digits"
    return None


def read_manifest(log: RunLogger) -> dict[str, Any] | None:
    """The run's checkpoint manifest, checked, or None if the run has no checkpoints."""
    client, run_id = log.client, log.run_id
    if not client.list_artifacts(run_id, CHECKPOINTS):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = Path(client.download_artifacts(run_id, MANIFEST, tmp))
            manifest: Any = json.loads(path.read_text()) if path.stat().st_size < 65536 else "a file over 64 KB"
        except (MlflowException, OSError, ValueError, RecursionError) as exc:
            raise ModelError(
                f"run {run_id}: its checkpoint manifest {MANIFEST} is unreadable ({first_line(exc)})"
            ) from None
    problem = _entry_problem(manifest)
    if problem:
        raise ModelError(
            f"run {run_id}: its checkpoint manifest {MANIFEST} is malformed ({problem}); it was not "
            "followed. Restore it, or start a new run"
        )
    return manifest


def _verified(client: MlflowClient, run_id: str, entry: dict[str, Any], tmp: str) -> dict[str, Any]:
    """The checkpoint an entry names: its SHA-256 checked, loaded safely, holding the epoch the entry says."""
    try:
        path = Path(client.download_artifacts(run_id, entry["path"], tmp))
    except (MlflowException, OSError) as exc:
        raise ModelError(f"run {run_id}: {entry['path']} is unreadable ({first_line(exc)})") from None
    if _sha256(path) != entry["sha256"]:
        raise ModelError(f"run {run_id}: {entry['path']} does not match the SHA-256 in {MANIFEST}")
    state = checkpoint.load(path, name=f"run {run_id}: {entry['path']}")
    if state["epoch"] != entry["epoch"]:
        raise ModelError(
            f"run {run_id}: {entry['path']} holds epoch {state['epoch']}, the manifest says {entry['epoch']}"
        )
    return state


def load_latest_checkpoint(log: RunLogger) -> dict[str, Any] | None:
    """The run's last complete checkpoint, verified against the manifest, or None if it has none. If the latest
    slot fails verification (truncated, altered), the other slot's checkpoint of the epoch before is used, when
    the manifest vouches for it."""
    manifest = read_manifest(log)
    if manifest is None:
        return None
    client, run_id = log.client, log.run_id
    previous: Any = manifest.get("previous")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return _verified(client, run_id, manifest, tmp)
        except ModelError as exc:
            if _entry_problem(previous) is not None or previous["epoch"] != manifest["epoch"] - 1:
                raise
            latest_error = exc
        state = _verified(client, run_id, previous, tmp)
    print(f"{latest_error}; resuming from the other slot, {previous['path']} (epoch {previous['epoch']})")
    return state


def entry_of(log: RunLogger, epoch: int) -> dict[str, Any] | None:
    """The manifest's entry for `epoch` (its latest, or the other slot after a fallback), or None."""
    with contextlib.suppress(ModelError):
        manifest = read_manifest(log)
        for entry in (manifest, (manifest or {}).get("previous")):
            if isinstance(entry, dict) and entry.get("epoch") == epoch and _entry_problem(entry) is None:
                return entry
    return None


def logged_through(log: RunLogger, key: str = "test/accuracy") -> int:
    """The last epoch whose metrics the run holds (0: none)."""
    return max((m.step for m in log.client.get_metric_history(log.run_id, key)), default=0)


def backfill_epochs(log: RunLogger, history: list[dict[str, float]]) -> None:
    """After a crash between a checkpoint and its metrics: log the metrics of checkpointed epochs that the run
    lacks, so that its history holds every epoch exactly once."""
    client, run_id = log.client, log.run_id
    missing = []
    now = int(time.time() * 1000)
    for key in history[0] if history else ():
        logged = {m.step for m in client.get_metric_history(run_id, key)}
        missing += [
            Metric(key, float(h[key]), now, epoch) for epoch, h in enumerate(history, start=1) if epoch not in logged
        ]
    if missing:
        client.log_batch(run_id, metrics=missing)
