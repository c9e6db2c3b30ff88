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
from medtune.errors import EnvironmentProblem
from medtune.launch.jobscript import job_body
from medtune.rundir import RunDir


def render(cfg: MedtuneConfig, run: RunDir, python: str, workdir: Path) -> str:
    p = cfg.infrastructure.pbs
    options = ["-N medtune", f"-o {run.logs}/pbs.out", "-j oe", "-r y"]
    options += [f"-A {p.account}"] * bool(p.account) + [f"-q {p.queue}"] * bool(p.queue)
    options += [f"-l walltime={p.walltime}", f"-l select={p.select}", *p.extra_directives]
    head = 'head -n 1 "$PBS_NODEFILE"' if p.chunks > 1 else None
    lines = ["#!/bin/bash", *(f"#PBS {opt}" for opt in options),
             f"# medtune run {run.run_id}, written by `medtune submit`; a rerun job resumes the same run.",
             *job_body(python, run.root, workdir, head, 'qrerun "$PBS_JOBID"')]
    return "\n".join(lines) + "\n"


def submit(script: Path) -> str:
    """qsub the script; returns the job id."""
    if shutil.which("qsub") is None:
        raise EnvironmentProblem("qsub not found; run `medtune submit` on a PBS login node "
                                 "(or add --dry-run to print the script)")
    proc = subprocess.run(["qsub", str(script)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise EnvironmentProblem(f"qsub refused the job: {proc.stderr.strip()}; fix infrastructure.pbs.* "
                                 "and submit again")
    return proc.stdout.strip()


def job_state(job_id: str) -> str | None:
    """The job_state letter from `qstat -f` (Q queued, R running, F finished...); None when unknown."""
    if shutil.which("qstat") is None:
        return None
    proc = subprocess.run(["qstat", "-x", "-f", job_id], capture_output=True, text=True)
    match = re.search(r"job_state = (\w+)", proc.stdout)
    return match.group(1) if proc.returncode == 0 and match else None
