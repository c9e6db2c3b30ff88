"""Finding an existing run and reloading its own config: `medtune run --resume`, `medtune status`.

A run is named by its directory or by its id under an output root. Resuming reloads the run's
config.yaml (the resolved config the run started with, secrets removed; the token comes from the
environment again), optionally changed by `--set`; the run id and output root always stay the run's.
"""

from __future__ import annotations

from pathlib import Path

from medtune.config import MedtuneConfig
from medtune.config_io import load_config
from medtune.errors import RunDirError
from medtune.rundir import RUN_PREFIX, RunDir

DEFAULT_OUTPUT_ROOT = "outputs"


def find_run(ref: str, output_root: str = DEFAULT_OUTPUT_ROOT) -> RunDir:
    """The run named by `ref`: a run directory, or a run id (with or without its prefix) under `output_root`."""
    path = Path(ref).expanduser()
    if (path / "config.yaml").is_file():
        return RunDir(path.resolve())
    run = RunDir.for_run(output_root, ref.removeprefix(RUN_PREFIX))
    if run.config_yaml.is_file():
        return run
    raise RunDirError(
        f"no run {ref!r}: not a run directory with config.yaml, nor a run id under {run.root.parent}; "
        "pass the run directory, or the id with --set output.output_root=<folder>"
    )


def output_root_override(overrides: list[str]) -> str:
    """The output root a `--set output.output_root=...` asks for (the last one wins)."""
    roots = [item.partition("=")[2] for item in overrides if item.partition("=")[0].strip() == "output.output_root"]
    return roots[-1] if roots else DEFAULT_OUTPUT_ROOT


def resume_config(ref: str, overrides: list[str]) -> MedtuneConfig:
    run = find_run(ref, output_root_override(overrides))
    pinned = [f"output.output_root={run.root.parent}", f"output.run_id={run.run_id}"]
    return load_config(run.config_yaml, None, [*overrides, *pinned])
