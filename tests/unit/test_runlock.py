"""The run lock: one medtune process per run directory; locks of dead processes are taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import psutil
import pytest

from medtune.runlock import LOCK_NAME, RunLocked, acquire, release, run_lock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _plant(root, **owner) -> None:
    (root / LOCK_NAME).write_text(json.dumps(owner))


def test_lock_holds_pid_and_host_and_is_removed_after(tmp_path):
    path = tmp_path / LOCK_NAME
    with run_lock(tmp_path) as stale:
        assert stale == []
        owner = json.loads(path.read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        assert owner["started"] == psutil.Process().create_time()
    assert not path.exists()


def test_a_live_holder_refuses_the_second(tmp_path):
    with run_lock(tmp_path):
        with pytest.raises(RunLocked) as caught:
            acquire(tmp_path)
    message = str(caught.value)
    assert f"in use by medtune process {os.getpid()} on host {socket.gethostname()}" in message
    assert f"remove {tmp_path / LOCK_NAME} if no such process is running there" in message
    assert "\n" not in message


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = _dead_pid()
    _plant(tmp_path, pid=dead, host=socket.gethostname(), started=1.0, slurm_job="")
    stale: list[str] = []
    path = acquire(tmp_path, stale)
    assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"process {dead} on {socket.gethostname()} is stale" in stale[0] and stale[0] in caplog.text
    release(path)
    assert not path.exists()


def test_a_reused_pid_is_not_mistaken_for_the_owner(tmp_path):
    """Our own pid, but a start time from before this process existed: the owner is gone."""
    started = psutil.Process().create_time()
    _plant(tmp_path, pid=os.getpid(), host=socket.gethostname(), started=started - 3600, slurm_job="")
    assert json.loads(acquire(tmp_path).read_text())["started"] == started


def test_another_hosts_lock_is_never_taken(tmp_path):
    _plant(tmp_path, pid=_dead_pid(), host="node-elsewhere", started=1.0, slurm_job="")
    with pytest.raises(RunLocked, match="on host node-elsewhere"):
        acquire(tmp_path)


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    _plant(tmp_path, pid=1, host="node-before-requeue", started=1.0, slurm_job="4242")
    assert json.loads(acquire(tmp_path).read_text())["slurm_job"] == "4242"


def test_a_half_written_lock_is_stale(tmp_path):
    (tmp_path / LOCK_NAME).write_text('{"pid": 12')
    assert json.loads(acquire(tmp_path).read_text())["pid"] == os.getpid()


def test_release_leaves_another_owners_lock(tmp_path):
    _plant(tmp_path, pid=1, host="node-elsewhere", started=1.0, slurm_job="")
    release(tmp_path / LOCK_NAME)
    assert (tmp_path / LOCK_NAME).exists()
