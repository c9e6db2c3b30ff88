"""PBS (PBS Pro / OpenPBS / Torque): the batch script of `medtune submit --scheduler pbs`, qsub, job state.

Every `#PBS` line comes from `infrastructure.pbs`. The job is rerunnable (`-r y`); PBS sends
SIGTERM before killing a job, which the batch shell passes to medtune, and exit 75 reruns it
(`qrerun`). With a `select` of more than one chunk the finetune stage starts one torchrun agent
per node through pbsdsh, with rendezvous on the first node of $PBS_NODEFILE.
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
    p = cfg.infrastructure.pbs
    # -V: the job gets qsub's environment, credentials included (Slurm's default, --export=ALL), so no
    # token or key is ever written into the script.
    options = ["-N medtune", f"-o {run.logs}/pbs.out", "-j oe", "-r y", "-V"]
    options += [f"-A {p.account}"] * bool(p.account) + [f"-q {p.queue}"] * bool(p.queue)
    options += [f"-l walltime={p.walltime}", f"-l select={p.select}", *p.extra_directives]
    head = 'head -n 1 "$PBS_NODEFILE"' if p.chunks > 1 else None
    return render_script("#PBS", options, run, python, workdir, head, 'qrerun "$PBS_JOBID"')


def submit(script: Path) -> str:
    """qsub the script; returns the job id."""
    return hand_over(["qsub", str(script)], "infrastructure.pbs")


def job_state(job_id: str) -> str | None:
    """The job_state letter from `qstat -f` (Q queued, R running, F finished...); None when unknown."""
    if shutil.which("qstat") is None:
        return None
    proc = subprocess.run(["qstat", "-x", "-f", job_id], capture_output=True, text=True)
    match = re.search(r"job_state = (\w+)", proc.stdout)
    return match.group(1) if proc.returncode == 0 and match else None
