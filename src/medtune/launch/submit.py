"""`medtune submit`: write the run's config.yaml and batch script, hand the job to Slurm or PBS.

The run directory is created at submission: config.yaml (with the run id and the scheduler) is
what the job runs (`medtune run --resume <run dir>`), the script goes to logs/job.<scheduler>, and
the job id to the manifest (`scheduler`), where `medtune status` finds it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from medtune import __version__
from medtune.config import MedtuneConfig
from medtune.config_io import render_yaml
from medtune.launch import pbs, slurm
from medtune.launch.jobscript import require
from medtune.rundir import RunDir, new_run_id, write_text

Scheduler = Literal["slurm", "pbs"]
SCHEDULERS = {"slurm": slurm, "pbs": pbs}
SUBMIT_TOOLS = {"slurm": "sbatch", "pbs": "qsub"}


@dataclass(frozen=True)
class Submission:
    run: RunDir
    script: str
    job_id: str | None  # None for --dry-run


def for_scheduler(cfg: MedtuneConfig, scheduler: Scheduler) -> MedtuneConfig:
    """The config the job runs: this scheduler, and a fixed run id so a requeue finds the run."""
    infra = cfg.infrastructure.model_copy(update={"cluster": scheduler})
    output = cfg.output.model_copy(update={"run_id": cfg.output.run_id or new_run_id()})
    return cfg.model_copy(update={"infrastructure": infra, "output": output})


def submit(cfg: MedtuneConfig, scheduler: Scheduler, dry_run: bool = False,
           python: str = sys.executable, workdir: Path | None = None) -> Submission:
    cfg = for_scheduler(cfg, scheduler)
    run = RunDir.for_run(cfg.output.output_root, cfg.output.run_id)
    module = SCHEDULERS[scheduler]
    script = module.render(cfg, run, python, (workdir or Path.cwd()).resolve())
    if dry_run:
        return Submission(run, script, None)
    require(SUBMIT_TOOLS[scheduler])
    run.create()
    write_text(run.config_yaml, render_yaml(cfg, header=f"Resolved config of run {run.run_id} (secrets removed)."))
    path = run.logs / f"job.{scheduler}"
    write_text(path, script)
    job_id = module.submit(path)
    run.update_manifest(medtune_version=__version__, run_id=run.run_id, status="queued",
                        scheduler={"kind": scheduler, "job_id": job_id, "script": str(path)})
    return Submission(run, script, job_id)
