"""Stage 7, upload: copy the run's deliverables to `infrastructure.output_bucket`, verified by sha256.

Any fsspec URL works (`s3://`, `gs://`, `az://` with their extras installed, `file://`, a folder).
Credentials and endpoints come from each backend's usual environment variables (for S3:
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`), never from the config.

    <output_bucket>/medical-finetune-<RUN_ID>/ adapters/ merged/ logs/ training.env manifest.json
                                               summary.md [report.html] SHA256SUMS

Files go up 4 at a time; the backend splits large ones into parts sent in parallel (s3fs: 50 MB
multipart chunks, 10 at a time). Every file is read back and hashed after its copy; a failure or a
mismatch is retried with exponential backoff, then fails the stage.
A rerun hashes what is already in the bucket and copies only what is missing or different, so an
interrupted upload resumes. The local run directory is never modified beyond manifest.json.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medtune.checksums import file_sha256
from medtune.credentials import url_holds_credential
from medtune.errors import MedtuneError
from medtune.rundir import RunDir
from medtune.transfer import SUMS_NAME, ChecksumMismatch, Retry, with_retries

log = logging.getLogger("medtune.storage")

DELIVERABLES = ("adapters", "merged", "logs", "training.env", "summary.md", "report.html")


class UploadError(MedtuneError):
    """The bucket cannot be reached or written, or a copy does not match its source."""


def upload(output_bucket: str, run: RunDir, workers: int = 4, retry: Retry = Retry()) -> dict[str, Any]:
    """Upload the deliverables, then manifest.json (which records the upload) and SHA256SUMS, last."""
    if not output_bucket:
        log.info("upload: skipped (infrastructure.output_bucket is empty; outputs stay in %s)", run.root)
        run.finish_stage("upload", 0.0, skipped=True)
        return {"skipped": True}
    start = time.perf_counter()
    fs, dest = open_destination(output_bucket, run)
    with tempfile.TemporaryDirectory(prefix="medtune-upload-") as snapshot:
        files = _deliverables(run, Path(snapshot))
        log.info("upload: %d files (%.1f MB) to %s", len(files),
                 sum(p.stat().st_size for p in files.values()) / 1e6, output_bucket)
        sha256 = run.digests()  # log snapshots are fresh copies: hashed here, not remembered
        hashes = {name: (file_sha256 if name.startswith("logs/") else sha256)(path) for name, path in files.items()}
        copied = _sync(fs, dest, files, hashes, workers, retry)
    info = {"destination": f"{output_bucket.rstrip('/')}/{run.root.name}", "files": len(files) + 2}
    # The manifest records the upload before it is uploaded itself, so the bucket's copy says so too.
    run.finish_stage("upload", time.perf_counter() - start, **info)
    hashes["manifest.json"] = file_sha256(run.manifest_path)
    copied += _sync(fs, dest, {"manifest.json": run.manifest_path}, hashes, 1, retry)
    sums = "".join(f"{digest}  {name}\n" for name, digest in sorted(hashes.items()))
    _put_bytes(fs, f"{dest}/{SUMS_NAME}", sums.encode(), retry)
    log.info("upload: %s complete: %d copied, %d already there and verified; checksums in %s",
             info["destination"], len(copied), len(hashes) - len(copied), SUMS_NAME)
    return {**info, "copied": len(copied), "already_present": len(hashes) - len(copied)}


def _deliverables(run: RunDir, snapshot: Path) -> dict[str, Path]:
    """Name in the bucket -> file to read. Logs are still being written (by this very stage), so a
    snapshot of them is uploaded: hashing and copying a growing file would never verify."""
    files = {p.relative_to(run.root).as_posix(): p for name in DELIVERABLES for p in _files(run.root / name)}
    for name, path in files.items():
        if name.startswith("logs/"):
            copy = snapshot / name
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, copy)
            files[name] = copy
    return files


def upload_run(run_dir: Path, url: str) -> dict[str, Any]:
    """`medtune upload RUN_DIR --to URL`: the upload stage for a finished run."""
    run = RunDir(Path(run_dir).expanduser().resolve())
    if not run.manifest_path.is_file():
        raise UploadError(f"{run.root} is not a medtune run directory (no manifest.json); pass medical-finetune-<RUN_ID>")
    if not url:
        raise UploadError("no destination: pass --to with an fsspec URL such as s3://bucket/prefix")
    if url_holds_credential(url):
        raise UploadError("--to holds a credential inside its URL, where every process listing can read it; "
                          "remove it and provide it through the environment (AWS_*, AZURE_STORAGE_*, ...)")
    return upload(url, run)


def open_destination(output_bucket: str, run: RunDir) -> tuple[Any, str]:
    import fsspec

    try:
        fs, base = fsspec.core.url_to_fs(output_bucket.rstrip("/"))
    except ImportError as exc:
        raise UploadError(f"cannot open {output_bucket!r}: {exc} (for s3:// install medtune[s3])") from None
    except ValueError as exc:
        raise UploadError(f"cannot open {output_bucket!r} ({exc}); use an fsspec URL such as s3://bucket/prefix") from None
    return fs, f"{base}/{run.root.name}"


def _sync(fs: Any, dest: str, files: dict[str, Path], hashes: dict[str, str], workers: int, retry: Retry) -> list[str]:
    """Copy every file whose remote copy is missing or differs; returns the names copied."""
    with _progress(sum(p.stat().st_size for p in files.values())) as advance:
        def one(name: str) -> str | None:
            path, remote = files[name], f"{dest}/{name}"
            size = path.stat().st_size
            if _remote_sha256(fs, remote, size) == hashes[name]:
                advance(name, size, copied=False)
                return None
            _with_retries(lambda: _put_verified(fs, path, remote, hashes[name]), f"upload of {remote}", retry)
            advance(name, size, copied=True)
            return name

        pool = ThreadPoolExecutor(max_workers=max(1, workers))
        try:
            results = [f.result() for f in [pool.submit(one, name) for name in sorted(files)]]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # a failed file stops the rest: no waiting them out
    return [name for name in results if name is not None]


def _put_verified(fs: Any, path: Path, remote: str, sha256: str) -> None:
    fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
    fs.put_file(str(path), remote)
    got = _remote_sha256(fs, remote, path.stat().st_size)
    if got != sha256:
        raise ChecksumMismatch(f"{remote}: sha256 {got or 'missing'} after upload, expected {sha256}")


def _remote_sha256(fs: Any, remote: str, size: int) -> str | None:
    """sha256 of the remote object (read back in full), or None when it is absent or of another size."""
    fs.invalidate_cache(remote)
    try:
        if fs.size(remote) != size:
            return None
    except FileNotFoundError:
        return None
    digest = hashlib.sha256()
    with fs.open(remote, "rb", block_size=8 << 20) as fh:
        for block in iter(lambda: fh.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _put_bytes(fs: Any, remote: str, data: bytes, retry: Retry) -> None:
    def put() -> None:
        fs.pipe_file(remote, data)
        fs.invalidate_cache(remote)
        if fs.cat_file(remote) != data:
            raise ChecksumMismatch(f"{remote} differs from what was written")

    _with_retries(put, f"upload of {remote}", retry)


def _with_retries(fn: Callable[[], None], what: str, retry: Retry) -> None:
    with_retries(fn, what, retry, UploadError,
                 "the local run is intact: rerun the same command (or `medtune upload`) to resume")


@contextmanager
def _progress(total: int) -> Iterator[Callable[..., None]]:
    """A rich progress bar on a terminal; one log line per file elsewhere (Slurm logs, CI)."""
    if not sys.stderr.isatty():
        def line(name: str, size: int, copied: bool) -> None:
            log.info("upload: %s %s (%.1f MB)", "copied" if copied else "verified, already there", name, size / 1e6)

        yield line
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn()) as bar:
        task = bar.add_task("upload", total=total)
        yield lambda name, size, copied: bar.advance(task, size)


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
