"""Stage 7, upload: copy the run's deliverables to `infrastructure.output_bucket` and verify them.

Any fsspec URL works (`s3://`, `gs://`, `az://` with their extras installed, `file://`, a folder).
Credentials come from the usual environment variables of each backend, never from the config.
Every file is checked after the copy by size; a mismatch fails the stage and local outputs stay.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from medtune.errors import EnvironmentProblem
from medtune.rundir import RunDir

log = logging.getLogger("medtune.storage")

DELIVERABLES = ("adapters", "merged", "logs", "training.env", "manifest.json")


def upload(output_bucket: str, run: RunDir) -> dict[str, Any]:
    if not output_bucket:
        log.info("upload: skipped (infrastructure.output_bucket is empty; outputs stay in %s)", run.root)
        return {"skipped": True}
    import fsspec

    try:
        fs, base = fsspec.core.url_to_fs(output_bucket.rstrip("/"))
    except (ImportError, ValueError) as exc:
        raise EnvironmentProblem(f"cannot open infrastructure.output_bucket {output_bucket!r}: {exc}") from None
    dest = f"{base}/{run.root.name}"
    files = [p for name in DELIVERABLES for p in _files(run.root / name)]
    for path in files:
        remote = f"{dest}/{path.relative_to(run.root).as_posix()}"
        fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(path), remote)
        if fs.size(remote) != path.stat().st_size:
            raise EnvironmentProblem(f"upload of {path.name} to {remote} is incomplete; rerun to retry the upload")
    log.info("upload: %d files to %s", len(files), output_bucket)
    return {"destination": f"{output_bucket.rstrip('/')}/{run.root.name}", "files": len(files)}


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
