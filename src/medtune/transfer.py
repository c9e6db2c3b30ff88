"""Copies to and from buckets that survive a flaky endpoint: bounded retries with backoff, verified bytes.

Used by the upload (storage.py) and by downloads from a bucket (the dataset's `dataset_bucket`). A
download is written under a temp name, checked against the remote size and, when the bucket holds a
`SHA256SUMS` beside the data (the file medtune's own upload writes: `<sha256>  <relative path>` per
line), against its sha256, and only then renamed into place. A full local disk is not retried: it
is reported at once (diskspace.py).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medtune.checksums import file_sha256
from medtune.diskspace import is_disk_full
from medtune.errors import MedtuneError

log = logging.getLogger("medtune.storage")

SUMS_NAME = "SHA256SUMS"


@dataclass(frozen=True)
class Retry:
    attempts: int = 4
    backoff_s: float = 2.0  # doubled after each failed attempt


class ChecksumMismatch(Exception):
    pass


def with_retries(fn: Callable[[], None], what: str, retry: Retry, error: type[MedtuneError], hint: str) -> None:
    """Run `fn`, retrying any failure but a full disk; after the last attempt raise `error` with `hint`."""
    delay = retry.backoff_s
    for attempt in range(1, retry.attempts + 1):
        try:
            fn()
            return
        # Backends raise their own transport errors (botocore's EndpointConnectionError is no OSError),
        # so any failure of a copy is retried, then reported with the rerun hint.
        except Exception as exc:
            if is_disk_full(exc):
                raise
            if attempt == retry.attempts:
                raise error(f"{what} failed after {attempt} attempts ({type(exc).__name__}: {exc}); {hint}") from None
            log.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(exc).__name__, exc,
                        attempt, retry.attempts - 1, delay)
            time.sleep(delay)
            delay *= 2


def remote_sums(fs: Any, folder: str) -> dict[str, str]:
    """Relative path -> sha256 from `<folder>/SHA256SUMS`; {} when the bucket has none."""
    try:
        text = fs.cat_file(f"{folder.rstrip('/')}/{SUMS_NAME}").decode()
    except FileNotFoundError:
        return {}
    return {name: digest for digest, _, name in (line.partition("  ") for line in text.splitlines()) if name}


def get_verified(fs: Any, remote: str, local: Path, sha256: str | None) -> None:
    """Download `remote` to `local` through a temp name; its size (and sha256 when known) must match."""
    tmp = local.with_name(f".{local.name}.tmp-{os.getpid()}")
    try:
        fs.get_file(remote, str(tmp))
        size = fs.size(remote)
        if tmp.stat().st_size != size:
            raise ChecksumMismatch(f"{remote}: {tmp.stat().st_size} bytes arrived, the bucket has {size}")
        if sha256 and (got := file_sha256(tmp)) != sha256:
            raise ChecksumMismatch(f"{remote}: sha256 {got[:12]}… after download, {SUMS_NAME} says {sha256[:12]}…")
        os.replace(tmp, local)
    finally:
        tmp.unlink(missing_ok=True)
