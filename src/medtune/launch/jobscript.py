"""The body shared by medtune's Slurm and PBS batch scripts.

The job runs `medtune run --resume <run dir>`: the run's config.yaml (written by `medtune submit`)
is the only input, so a requeued job continues the same run from its last checkpoint. The batch
shell forwards SIGUSR1/SIGTERM to medtune (which checkpoints and exits 75) and requeues the job
on exit 75.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

from medtune.errors import EnvironmentProblem
from medtune.launch.torchrun import RDZV_PORT
from medtune.preemption import EXIT_PREEMPTED
from medtune.rundir import RunDir


def render_script(directive: str, options: list[str], run: RunDir, python: str, workdir: Path,
                  head_node: str | None, requeue: str) -> str:
    """`#!/bin/bash`, one `<directive> <option>` line per option, then the job body."""
    lines = ["#!/bin/bash", *(f"{directive} {opt}" for opt in options),
             f"# medtune run {run.run_id}, written by `medtune submit`; a requeued job resumes the same run.",
             *job_body(python, run.root, workdir, head_node, requeue)]
    return "\n".join(lines) + "\n"


def require(tool: str) -> None:
    """Refuse before anything is written when the scheduler's submit command is missing."""
    if shutil.which(tool) is None:
        raise EnvironmentProblem(f"{tool} not found; run `medtune submit` on a login node of the cluster "
                                 "(or add --dry-run to print the script)")


def hand_over(command: list[str], section: str) -> str:
    """Run sbatch/qsub; its stdout (the job id), or a one-line error naming the config section."""
    require(command[0])
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise EnvironmentProblem(f"{command[0]} refused the job: {proc.stderr.strip()}; fix {section}.* and submit again")
    return proc.stdout.strip()


def job_body(python: str, run_root: Path, workdir: Path, head_node: str | None, requeue: str) -> list[str]:
    """Shell lines after the directives; `head_node` is a shell expression naming the first node."""
    run_cmd = f"{shlex.quote(python)} -m medtune run --resume {shlex.quote(str(run_root))}"
    lines = ["set -uo pipefail", f"cd {shlex.quote(str(workdir))}"]
    if head_node:
        lines += [f"head_node=$({head_node})",
                  f'{run_cmd} --set "infrastructure.rdzv_endpoint=${{head_node}}:{RDZV_PORT}" &']
    else:
        lines += [f"{run_cmd} &"]
    lines += [
        'pid=$!',
        '# Pass the scheduler\'s warning on to medtune: it checkpoints at the next step and exits '
        f'{EXIT_PREEMPTED}.',
        "trap 'kill -USR1 \"$pid\" 2>/dev/null' USR1",
        "trap 'kill -TERM \"$pid\" 2>/dev/null' TERM",
        'wait "$pid"',
        'while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done',
        'wait "$pid"; rc=$?  # medtune\'s own exit status, also after a trap interrupted the first wait',
        f'if [ "$rc" -eq {EXIT_PREEMPTED} ]; then',
        f"  echo \"medtune stopped at a checkpoint; requeueing\"; {requeue}",
        "fi",
        'exit "$rc"',
    ]
    return lines
