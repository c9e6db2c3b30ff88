"""A real single-node Slurm cluster (munged + slurmctld + slurmd as root, config in a temp dir).

`medtune submit --scheduler slurm` submits a real job on the tiny model through sbatch; the job
runs `medtune run --resume <run dir>` to completion and leaves the full artifact set. Skips
cleanly when not root or when Slurm/munge are not installed (.ci/run installs them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from medtune.cli import main
from medtune.rundir import RunDir
from medtune.status import run_status
from tests_support import RUN_ARTIFACTS

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol")
ARTIFACTS = RUN_ARTIFACTS


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _slurm_conf(root: Path) -> str:
    memory_mb = psutil.virtual_memory().total // 2**20 // 2
    return f"""ClusterName=medtune-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start again once its old credential expires (default 120 s).
AuthInfo=socket={root}/munge/munge.sock,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
# Bind slurmctld and slurmd to the address `localhost` resolves to, not to every interface.
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
PlugStackConfig={root}/plugstack.conf
NodeName=localhost NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _stop(pid_file: Path) -> None:
    if pid_file.is_file():
        try:
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        except (ProcessLookupError, ValueError):
            pass


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory):
    """SLURM_CONF of a running one-node cluster on 127.0.0.1; stopped afterwards."""
    if os.geteuid() != 0:
        pytest.skip("the Slurm test cluster runs its daemons as root")
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        pytest.skip(f"Slurm/munge not installed ({', '.join(missing)}); `apt-get install slurm-wlm munge`")
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir(mode=0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    (root / "plugstack.conf").write_text("")
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(["munged", "--force", f"--key-file={key}", f"--socket={root}/munge/munge.sock",
                    f"--pid-file={root}/munge/munged.pid", f"--log-file={root}/munge/munged.log",
                    f"--seed-file={root}/munge/seed"], check=True)
    try:
        subprocess.run(["slurmctld", "-f", str(conf), "-i"], check=True, env=env)
        subprocess.run(["slurmd", "-f", str(conf), "-N", "localhost"], check=True, env=env)
        deadline = time.monotonic() + 60
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env).stdout:
            if time.monotonic() > deadline:
                pytest.fail(f"Slurm node never became idle: {(root / 'log' / 'slurmctld.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield conf
    finally:
        for pid_file in (root / "slurmd.pid", root / "slurmctld.pid", root / "munge" / "munged.pid"):
            _stop(pid_file)


@pytest.mark.e2e
def test_submitted_job_runs_the_workflow_to_completion(slurm_cluster, tiny_overrides, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster))
    sets = [arg for item in [*tiny_overrides, "infrastructure.slurm.cpus_per_task=1",
                             "infrastructure.slurm.time=00:15:00", "output.run_id=slurm"] for arg in ("--set", item)]
    assert main(["submit", "--scheduler", "slurm", "--preset", "smollm2-135m-medical", *sets]) == 0
    printed = capsys.readouterr().out
    out_root = next(i.partition("=")[2] for i in tiny_overrides if i.startswith("output.output_root="))
    run = RunDir.for_run(out_root, "slurm")
    job_id = json.loads(run.manifest_path.read_text())["scheduler"]["job_id"]
    assert f"submitted slurm job {job_id}" in printed and str(run.root) in printed

    deadline = time.monotonic() + 300
    while run_status(run)["job_state"] not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        assert time.monotonic() < deadline, "the Slurm job did not finish in 5 minutes"
        time.sleep(1)

    info = run_status(run)
    job_log = (run.logs / f"slurm-{job_id}.out").read_text()
    assert info["job_state"] == "COMPLETED", job_log[-3000:]
    assert info["status"] == "succeeded" and info["stage"] == "done"
    assert info["step"] == info["total_steps"] == 6
    assert {p.name for p in run.root.iterdir()} == ARTIFACTS
    assert {"finetune.log", "job.slurm", f"slurm-{job_id}.out"} <= {p.name for p in run.logs.iterdir()}
    assert (run.merged / "model.safetensors").is_file() and (run.adapters / "adapter_model.safetensors").is_file()
    manifest = json.loads(run.manifest_path.read_text())
    assert manifest["config"]["infrastructure"]["cluster"] == "slurm"
    assert manifest["environment"]["host"]  # the stages ran inside the job



def _wait_state(run: RunDir, states: tuple[str, ...], timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while (state := run_status(run)["job_state"]) not in states:
        assert time.monotonic() < deadline, f"job stuck in {state}"
        time.sleep(1)
    return state


@pytest.mark.e2e
def test_warning_signal_checkpoints_requeues_and_the_job_finishes(slurm_cluster, tiny_overrides, monkeypatch,
                                                                   slow_steps):
    """`--signal=B:USR1` as Slurm sends it before the time limit: checkpoint, exit 75, requeue, resume."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster))
    monkeypatch.setenv("PYTHONPATH", str(slow_steps))  # reaches the job through sbatch's exported environment
    sets = [arg for item in [*tiny_overrides, "infrastructure.slurm.cpus_per_task=1", "output.run_id=requeue",
                             "training.max_steps=16", "training.save_steps=4", "training.logging_steps=1",
                             "evaluation.validation_questions=0"] for arg in ("--set", item)]
    assert main(["submit", "--scheduler", "slurm", "--preset", "smollm2-135m-medical", *sets]) == 0
    out_root = next(i.partition("=")[2] for i in tiny_overrides if i.startswith("output.output_root="))
    run = RunDir.for_run(out_root, "requeue")
    job_id = json.loads(run.manifest_path.read_text())["scheduler"]["job_id"]
    deadline = time.monotonic() + 300
    while run_status(run).get("step", 0) < 3:
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.5)

    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    requeued = _wait_state(run, ("PENDING", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))
    assert requeued == "PENDING", f"{requeued}: {(run.logs / f'slurm-{job_id}.out').read_text()[-3000:]}"
    state = _wait_state(run, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))

    job_log = (run.logs / f"slurm-{job_id}.out").read_text()
    assert state == "COMPLETED", f"{state}: {job_log[-3000:]}"
    manifest = json.loads(run.manifest_path.read_text())
    stopped = manifest["preemption"]
    assert stopped["signal"] == "SIGUSR1" and 3 <= stopped["step"] < 16
    assert "medtune stopped at a checkpoint; requeueing" in job_log
    assert manifest["status"] == "succeeded" and manifest["training"]["steps"] == 16
    log = (run.logs / "finetune.log").read_text()
    checkpoint = run.checkpoints / f"checkpoint-{stopped['step']}"
    assert f"resuming from {checkpoint}" in log
    assert {p.name for p in run.root.iterdir()} == ARTIFACTS
