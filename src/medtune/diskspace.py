"""A disk that fills up mid-stage: one line naming the folder, its free space and the fix.

Stages write through temp names (rundir.atomic_dir), so a write that fails for lack of space removes
its temp folder and leaves the previous complete state; this module only turns the low-level error
(OSError ENOSPC/EDQUOT, or the errors torch.save and safetensors wrap it in) into a
`DiskFull` the CLI prints as one line. It is not retried: a full disk does not empty itself.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from medtune.errors import EnvironmentProblem, MedtuneError

FULL = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = ("no space left on device", "disk quota exceeded", "file write failed")


class DiskFull(EnvironmentProblem):
    """The disk under the run directory (or the temp folder) filled up while a stage was writing."""


def is_disk_full(exc: BaseException) -> bool:
    """An out-of-space error, also when a library wrapped it (torch.save: "file write failed")."""
    return _full_error(exc) is not None


def _full_error(exc: BaseException | None) -> BaseException | None:
    """The out-of-space error in `exc`'s chain of causes, if there is one."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in FULL:
            return exc
        if any(t in str(exc).lower() for t in _FULL_TEXT):  # e.g. safetensors' SafetensorError: "(os error 28)"
            return exc
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return None


def _existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:  # a temp folder is gone once cleaned up
        folder = folder.parent
    return folder


def _free(folder: Path) -> str:
    usage = shutil.disk_usage(folder)
    return f"{usage.free / 1e6:.0f} MB free of {usage.total / 1e6:.0f} MB"


@contextlib.contextmanager
def disk_full_as_error(what: str, folder: Path) -> Iterator[None]:
    """Turn running out of space inside the block into DiskFull naming `folder` and its free space."""
    try:
        yield
    except Exception as exc:
        full = None if isinstance(exc, MedtuneError) else _full_error(exc)  # a DiskFull is already one line
        if full is None:
            raise
        if isinstance(full, OSError) and full.filename:  # the disk that filled may not be the run's (/tmp)
            folder = Path(os.fsdecode(full.filename)).parent
        folder = _existing(folder)
        raise DiskFull(
            f"{what}: no space left on the disk of {folder} ({_free(folder)} after cleaning up); free space there or "
            "set output.output_root to a larger disk, then rerun the same command (finished stages are kept)"
        ) from None
