"""One torchrun rank: `python -m medtune.launch.worker <run dir>` trains with the run's own config.

The parent `medtune run` has already written config.yaml and prepared the model (manifest
`stages.model.path`) and the data (`<run>/data`). Rank 0 logs to the run's finetune.log; the other
ranks print warnings only, so the log reads like a single-process run.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from medtune.config_io import load_config
from medtune.credentials import run_secrets
from medtune.errors import MedtuneError
from medtune.rundir import RunDir
from medtune.runlog import setup_logging

log = logging.getLogger("medtune.launch")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    run = RunDir(Path(args[0]).resolve())
    rank = int(os.environ.get("RANK", "0"))  # set by torchrun
    cfg = load_config(run.config_yaml)
    setup_logging(run.log_file if rank == 0 else None, run_secrets(cfg))
    if rank != 0:
        logging.getLogger("medtune").setLevel(logging.WARNING)
        logging.getLogger().setLevel(logging.WARNING)
    from medtune.train import train

    try:
        train(cfg, run, run.stage("model")["path"], str(run.data))
    except MedtuneError as exc:
        log.warning("rank %d: %s", rank, exc)
        if rank == 0:  # the parent `medtune run` prints this line (out of memory, divergence) as its own
            run.update_manifest(worker_error={"message": str(exc), "time": time.time()})
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
