"""Who may train a run: a lease taken before any work and renewed while training runs, so that two processes
resuming one run (`mlflow run --run-id R`, twice at once) cannot both train it. Knows nothing of MLflow:
tracking.run_lease keeps a lease in the run as params and a tag.

Taking a lease is an insert-once write: claim n is the run param `lease/<n>`, and a tracking store refuses to
change a param, so of two processes writing the same n exactly one succeeds. The claim names its holder (a random
id, host, process id and start time) and an expiry; the tag `lease` carries the holder's renewals (every
HEARTBEAT seconds) and, at the end, its release. A lease lapses when its expiry passes, or at once when its holder
is a process of this machine that is gone (a resume right after a crash need not wait)."""

from __future__ import annotations

import json
import socket
import time
import uuid
from dataclasses import asdict, dataclass, replace

PARAM_PREFIX = "lease/"
TAG = "lease"
# Renewed every 30 s; lapses after 120 s without renewal: four missed renewals (a tracking server restarting) before
# a holder is taken for dead. A holder on another machine that died blocks a resume that long, no longer.
HEARTBEAT = 30.0
TTL = 120.0


@dataclass(frozen=True)
class Holder:
    """One process's claim on a run."""

    id: str
    host: str
    pid: int
    started: float  # the process's start time: tells the holder from a later process given the same pid
    expires: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> Holder | None:
        """None for anything that is not a holder (a malformed value holds no lease)."""
        try:
            raw = json.loads(text or "")
            return cls(str(raw["id"]), str(raw["host"]), int(raw["pid"]), float(raw["started"]), float(raw["expires"]))
        except (ValueError, TypeError, KeyError):
            return None

    def alive(self, now: float) -> bool:
        if now >= self.expires:
            return False
        return self.host != socket.gethostname() or _process_alive(self.pid, self.started)

    def renewed(self, now: float, ttl: float = TTL) -> Holder:
        return replace(self, expires=now + ttl)

    def released(self) -> Holder:
        return replace(self, expires=0.0)

    def describe(self) -> str:
        until = time.strftime("%H:%M:%S", time.localtime(self.expires))
        return f"process {self.pid} on {self.host} (its lease runs until {until} and is renewed while it trains)"


def this_process(now: float, ttl: float = TTL) -> Holder:
    import psutil

    return Holder(
        uuid.uuid4().hex, socket.gethostname(), psutil.Process().pid, psutil.Process().create_time(), now + ttl
    )


def latest(params: dict[str, str], tags: dict[str, str]) -> tuple[int, Holder | None]:
    """The newest claim's number (0: none yet) and its holder, with the expiry of its latest renewal."""
    claims = {
        int(k[len(PARAM_PREFIX) :]): v
        for k, v in params.items()
        if k.startswith(PARAM_PREFIX) and k[len(PARAM_PREFIX) :].isdigit()
    }
    if not claims:
        return 0, None
    n = max(claims)
    holder, renewal = Holder.from_json(claims[n]), Holder.from_json(tags.get(TAG))
    if holder is not None and renewal is not None and renewal.id == holder.id:
        holder = renewal
    return n, holder


def _process_alive(pid: int, started: float) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and abs(proc.create_time() - started) < 1.0
    except psutil.Error:
        return False
