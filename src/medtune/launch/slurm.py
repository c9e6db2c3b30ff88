"""Slurm: the batch script `medtune submit --scheduler slurm` writes, sbatch, and the job's state.

Every `#SBATCH` line comes from `infrastructure.slurm`. The job can be requeued (`--requeue`), gets
SIGUSR1 `signal_seconds` before its time limit (`--signal=B:USR1@N`, to the batch shell, which
passes it on), and appends to one log in the run's logs/ across requeues. With `nodes` above 1 the
finetune stage starts one torchrun agent per node through srun, with rendezvous on the first node.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from medtune.config import MedtuneConfig
from medtune.launch.jobscript import hand_over, render_script
from medtune.rundir import RunDir


def render(cfg: MedtuneConfig, run: RunDir, python: str, workdir: Path) -> str:
    s = cfg.infrastructure.slurm
    options = [f"--job-name=medtune-{run.run_id}", f"--output={run.logs}/slurm-%j.out", "--open-mode=append"]
    options += [f"--account={s.account}"] * bool(s.account) + [f"--partition={s.partition}"] * bool(s.partition)
    options += [f"--qos={s.qos}"] * bool(s.qos)
    options += [f"--nodes={s.nodes}", "--ntasks-per-node=1", f"--cpus-per-task={s.cpus_per_task}", f"--time={s.time}"]
    options += [f"--gres={s.gres}"] * bool(s.gres)
    options += ["--requeue"] + [f"--signal=B:USR1@{s.signal_seconds}"] * bool(s.signal_seconds)
    options += list(s.extra_directives)
    head = 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' if s.nodes > 1 else None
    return render_script("#SBATCH", options, run, python, workdir, head, 'scontrol requeue "$SLURM_JOB_ID"')


def submit(script: Path) -> str:
    """sbatch the script; returns the job id."""
    return hand_over(["sbatch", "--parsable", str(script)], "infrastructure.slurm").split(";")[0]


def job_state(job_id: str) -> str | None:
    """PENDING/RUNNING/COMPLETED/... from scontrol (which keeps finished jobs a few minutes), then
    sacct (finished jobs, where accounting is on); None when neither knows the job."""
    if shutil.which("scontrol"):
        proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
        match = re.search(r"\bJobState=(\w+)", proc.stdout)
        if proc.returncode == 0 and match:
            return match.group(1)
    if shutil.which("sacct"):
        proc = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True)
        states = proc.stdout.split()
        if proc.returncode == 0 and states:
            return states[0]
    return None
