"""One `medtune run` per run directory: a lock file holding the owner's pid, host and start time.

Two processes on one run directory would interleave checkpoints, rewrite each other's manifest and
race on the atomic renames, so the second one is refused. The lock is `<run>/.lock`, created whole by
a hard link (atomic on local and NFS file systems) and removed when the run ends. A lock whose owner
is gone is stale and taken over: on this host the pid no longer runs (or now belongs to a process
started later, a reused pid); on any host, the owner was an earlier allocation of the same Slurm job
(a requeued job keeps its job id). A lock from another host that cannot be checked is never taken.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from medtune.errors import MedtuneError

log = logging.getLogger("medtune")

LOCK_NAME = ".lock"


class RunLocked(MedtuneError):
    """Another medtune process is working on this run directory."""


def _start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _this_owner() -> dict[str, Any]:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "started": _start_time(pid),
            "slurm_job": os.environ.get("SLURM_JOB_ID", "")}


def _is_stale(owner: dict[str, Any], me: dict[str, Any]) -> bool:
    if owner.get("slurm_job") and owner["slurm_job"] == me["slurm_job"]:
        return True  # our own job, requeued (possibly to another node): its earlier allocation is gone
    if owner.get("host") != me["host"]:
        return False
    started = _start_time(int(owner.get("pid", -1)))
    return started is None or (owner.get("started") is not None and abs(started - owner["started"]) > 1.0)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable (the lock is always linked in whole): treat as stale


def _create(path: Path, owner: dict[str, Any]) -> bool:
    """Write the owner to a temp file and hard-link it into place: the lock appears whole or not at all."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(owner))
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink()
    return True


def acquire(root: Path, stale: list[str] | None = None) -> Path:
    """Take the run's lock, taking over a stale one (noted in `stale`); raise RunLocked while a live
    process holds it."""
    path, me, stale = root / LOCK_NAME, _this_owner(), [] if stale is None else stale
    for _ in range(3):  # a second try after removing a stale lock; a third if another process raced us
        if _create(path, me):
            return path
        owner = _read(path)
        if owner is None:
            continue  # released between our attempt and the read
        if owner and not _is_stale(owner, me):
            raise RunLocked(
                f"run directory {root} is in use by medtune process {owner.get('pid')} on host {owner.get('host')}; "
                f"wait for it to finish (or stop it), or remove {path} if no such process is running there"
            )
        # Logged again by the caller once the run's log file is open (see `run_lock`).
        stale.append(f"run lock {path} of process {owner.get('pid', '?')} on {owner.get('host', '?')} is stale "
                     "(that process is gone); taking it over")
        log.warning(stale[-1])
        path.unlink(missing_ok=True)
    raise RunLocked(f"could not take the run lock {path}: other processes keep taking it; run one medtune at a time")


def release(path: Path) -> None:
    owner = _read(path)
    if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def run_lock(root: Path) -> Iterator[list[str]]:
    """Hold the lock for the block; yields the notes on stale locks taken over, for the run's log."""
    stale: list[str] = []
    path = acquire(root, stale)
    try:
        yield stale
    finally:
        release(path)
