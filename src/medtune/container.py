"""Stage 2, container: which runtime the fine-tuning job runs in.

`none` runs natively in this Python environment. The seed's container sources (`lfs`, `path`,
`pull`, `build`) need a Singularity/Apptainer runtime; until medtune launches jobs inside one, a
config asking for them is refused with a clear line instead of being silently ignored.
"""

from __future__ import annotations

import logging
import shutil

from medtune.config import ContainerConfig
from medtune.errors import EnvironmentProblem

log = logging.getLogger("medtune.container")


def container(cfg: ContainerConfig) -> dict[str, str]:
    if cfg.source == "none":
        log.info("container: none (running natively)")
        return {"source": "none"}
    runtime = shutil.which("apptainer") or shutil.which("singularity")
    raise EnvironmentProblem(
        f"infrastructure.container.source `{cfg.source}` is not supported by this medtune version"
        f"{'' if runtime else ' (and no apptainer/singularity found)'}; set infrastructure.container.source=none"
    )
