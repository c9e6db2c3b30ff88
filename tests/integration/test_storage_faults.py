"""Storage faults: the bucket endpoint going away mid-upload and mid-download, a corrupted download,
a full disk (a small tmpfs, else a loop-mounted file; skipped when this machine can mount neither).
Each one is retried (bounded, with backoff) or refused in one line, and leaves the local outputs intact."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

s3fs = pytest.importorskip("s3fs")

import medtune.data  # noqa: E402
import medtune.merge  # noqa: E402
from medtune.cli import main  # noqa: E402
from medtune.config import DatasetConfig  # noqa: E402
from medtune.data.load import load_raw  # noqa: E402
from medtune.errors import DataError  # noqa: E402
from medtune.rundir import RunDir  # noqa: E402
from medtune.storage import upload  # noqa: E402
from medtune.transfer import Retry  # noqa: E402
from tests_support import S3_BUCKET  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "assets"
FAST = Retry(attempts=4, backoff_s=0.2)  # retries at 0.2, 0.4, 0.8 s: 1.4 s of patience in all


def _outage(s3, seconds: float) -> None:
    """Stop the endpoint now; bring it back after `seconds`, as a restarted gateway does."""
    s3.stop()
    threading.Timer(seconds, s3.start).start()


def _before_call(monkeypatch, name: str, n: int, action) -> list[str]:
    """Run `action()` just before the n-th call of S3FileSystem.<name>; returns the paths of all calls."""
    real, seen = getattr(s3fs.S3FileSystem, name), []

    def hooked(self, path, *args, **kwargs):
        seen.append(path)
        if len(seen) == n:
            action()
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, name, hooked)
    return seen


# --- upload ---------------------------------------------------------------------------------------

@pytest.fixture
def finished(tmp_path) -> RunDir:
    run = RunDir(tmp_path / "medical-finetune-st1")
    for name, data in {"adapters/adapter_model.safetensors": os.urandom(200_000), "adapters/adapter_config.json": b"{}",
                       "merged/model.safetensors": os.urandom(300_000), "logs/finetune.log": b"line\n",
                       "summary.md": b"# ok\n"}.items():
        (run.root / name).parent.mkdir(parents=True, exist_ok=True)
        (run.root / name).write_bytes(data)
    run.update_manifest(run_id="st1", status="succeeded")
    return run


def test_endpoint_away_mid_upload_is_retried_until_it_returns(s3, finished, monkeypatch, caplog):
    before = {p: p.read_bytes() for p in finished.root.rglob("*") if p.is_file() and p.name != "manifest.json"}
    _before_call(monkeypatch, "put_file", 2, lambda: _outage(s3, 0.5))
    caplog.set_level(logging.WARNING, "medtune")
    result = upload(f"s3://{S3_BUCKET}/r", finished, workers=1, retry=FAST)
    assert result["copied"] == 6
    assert "retry 1/3" in caplog.text
    fs = s3.fs()
    for line in fs.cat_file(f"{S3_BUCKET}/r/medical-finetune-st1/SHA256SUMS").decode().splitlines():
        digest, name = line.split("  ", 1)
        assert hashlib.sha256(fs.cat_file(f"{S3_BUCKET}/r/medical-finetune-st1/{name}")).hexdigest() == digest
    assert all(p.read_bytes() == data for p, data in before.items())  # the local outputs are untouched


# --- download -------------------------------------------------------------------------------------

@pytest.fixture
def bucket_data(s3) -> DatasetConfig:
    """The tiny dataset in the bucket, with a SHA256SUMS beside it (as `medtune upload` writes one)."""
    fs, data = s3.fs(), (ASSETS / "tiny_medical.jsonl").read_bytes()
    fs.pipe_file(f"{S3_BUCKET}/sets/med/train.jsonl", data)
    fs.pipe_file(f"{S3_BUCKET}/sets/med/SHA256SUMS", f"{hashlib.sha256(data).hexdigest()}  train.jsonl\n".encode())
    return DatasetConfig(dataset_source="bucket", dataset_bucket=f"s3://{S3_BUCKET}", dataset_bucket_path="sets/med",
                         dataset_format="jsonl", eval_split="")


def test_endpoint_away_mid_download_is_retried_until_it_returns(s3, bucket_data, tmp_path, monkeypatch):
    monkeypatch.setattr("medtune.data.load.DOWNLOAD_RETRY", FAST)
    seen = _before_call(monkeypatch, "get_file", 1, lambda: _outage(s3, 0.5))
    raw = load_raw(bucket_data, tmp_path / "cache", None)
    assert len(raw.train) == 12 and len(seen) >= 2  # the first attempt failed, a retry succeeded


def test_endpoint_gone_for_good_is_refused_in_one_line(s3, bucket_data, tmp_path, monkeypatch):
    monkeypatch.setattr("medtune.data.load.DOWNLOAD_RETRY", Retry(attempts=2, backoff_s=0.05))
    _before_call(monkeypatch, "get_file", 1, s3.stop)
    with pytest.raises(DataError) as caught:
        load_raw(bucket_data, tmp_path / "cache", None)
    message = str(caught.value)
    assert "data: download of medtune-test/sets/med/train.jsonl failed after 2 attempts" in message
    assert "rerun the same command" in message and "\n" not in message
    assert not list((tmp_path / "cache").rglob("*.jsonl"))  # nothing half-downloaded stays to be trusted later
    s3.start()


def _corrupt_download(monkeypatch, times: int) -> list[str]:
    real, seen = s3fs.S3FileSystem.get_file, []

    def corrupted(self, rpath, lpath, *args, **kwargs):
        real(self, rpath, lpath, *args, **kwargs)
        seen.append(rpath)
        if len(seen) <= times:
            data = bytearray(Path(lpath).read_bytes())
            data[10] ^= 0xFF  # same size: only the checksum can tell
            Path(lpath).write_bytes(bytes(data))

    monkeypatch.setattr(s3fs.S3FileSystem, "get_file", corrupted)
    return seen


def test_a_corrupted_download_is_fetched_again(s3, bucket_data, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("medtune.data.load.DOWNLOAD_RETRY", FAST)
    seen = _corrupt_download(monkeypatch, times=1)
    raw = load_raw(bucket_data, tmp_path / "cache", None)
    assert len(seen) == 2 and "sha256" in caplog.text and "SHA256SUMS says" in caplog.text
    first = json.loads((ASSETS / "tiny_medical.jsonl").read_text().splitlines()[0])
    assert raw.train[0]["instruction"] == first["instruction"]


def test_a_download_that_stays_corrupt_is_refused(s3, bucket_data, tmp_path, monkeypatch):
    monkeypatch.setattr("medtune.data.load.DOWNLOAD_RETRY", Retry(attempts=2, backoff_s=0.05))
    _corrupt_download(monkeypatch, times=99)
    with pytest.raises(DataError, match=r"failed after 2 attempts \(ChecksumMismatch: .*SHA256SUMS says"):
        load_raw(bucket_data, tmp_path / "cache", None)
    assert not (tmp_path / "cache" / "bucket").exists() or not any((tmp_path / "cache" / "bucket").iterdir())


# --- a full disk ----------------------------------------------------------------------------------

def _mount_small_disk(where: Path, size_mb: int) -> str | None:
    """A tmpfs of `size_mb`, else an ext2 loop file; None when this machine (not root, no mount) can't."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return None
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(where)],
                      capture_output=True).returncode == 0:
        return "tmpfs"
    image = where.with_suffix(".img")
    if shutil.which("mkfs.ext2") and subprocess.run(["truncate", "-s", f"{size_mb}M", str(image)]).returncode == 0 \
            and subprocess.run(["mkfs.ext2", "-q", "-F", str(image)], capture_output=True).returncode == 0 \
            and subprocess.run(["mount", "-o", "loop", str(image), str(where)], capture_output=True).returncode == 0:
        return "loop"
    return None


@pytest.fixture
def small_disk(tmp_path):
    where = tmp_path / "small-disk"
    if _mount_small_disk(where, 48) is None:
        pytest.skip("cannot mount a small tmpfs or loop file here (needs root and mount)")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    filler = disk / "filler"
    with filler.open("wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, shutil.disk_usage(disk).free - leave)
    return filler


def test_a_full_disk_during_merge_is_one_line_and_the_rerun_finishes(tiny_overrides, small_disk, monkeypatch, capsys):
    sets = [*[o for o in tiny_overrides if not o.startswith("output.output_root=")], f"output.output_root={small_disk}",
            "output.run_id=full", "evaluation.mcq_questions=0", "evaluation.safety_probes=false"]
    argv = ["run", "--preset", "smollm2-135m-medical", *[a for s in sets for a in ("--set", s)]]
    root, real_merge, filler = small_disk / "medical-finetune-full", medtune.merge.merge, []

    def merge_on_a_full_disk(*args, **kwargs):
        filler.append(_fill(small_disk, leave=200_000))  # the merged model alone needs ~640 kB
        return real_merge(*args, **kwargs)

    monkeypatch.setattr(medtune.merge, "merge", merge_on_a_full_disk)
    assert main(argv) == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: stage merge: no space left on the disk of {root} (") and "Traceback" not in err
    assert "set output.output_root to a larger disk, then rerun the same command" in line
    assert not (root / "merged").exists() and not list(root.glob(".merged.*"))
    adapter = (root / "adapters" / "adapter_model.safetensors").read_bytes()
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "no space left" in manifest["error"]
    assert manifest["stages"]["finetune"]["status"] == "done" and "merge" not in manifest["stages"]

    filler[0].unlink()
    monkeypatch.setattr(medtune.merge, "merge", real_merge)
    assert main(argv) == 0
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "succeeded" and manifest["validation"]["merge_check"]["passed"]
    assert (root / "adapters" / "adapter_model.safetensors").read_bytes() == adapter  # training was not redone


def test_a_full_disk_during_download_is_one_line(s3, tiny_overrides, small_disk, monkeypatch, capsys):
    rows = (ASSETS / "tiny_medical.jsonl").read_bytes() * 60  # ~250 kB
    s3.fs().pipe_file(f"{S3_BUCKET}/big/train.jsonl", rows)
    real_prepare, filler = medtune.data.prepare_data, []

    def prepare_on_a_full_disk(*args, **kwargs):
        filler.append(_fill(small_disk, leave=64_000))  # room for the summary and manifest, not for the data
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(medtune.data, "prepare_data", prepare_on_a_full_disk)
    sets = [*[o for o in tiny_overrides if not o.startswith(("output.output_root=", "dataset."))],
            f"output.output_root={small_disk}", "output.run_id=dl", "dataset.dataset_source=bucket",
            f"dataset.dataset_bucket=s3://{S3_BUCKET}", "dataset.dataset_bucket_path=big/train.jsonl",
            "dataset.dataset_format=jsonl", "dataset.eval_split=", "dataset.eval_fraction=0.2"]
    assert main(["run", "--preset", "smollm2-135m-medical", *[a for s in sets for a in ("--set", s)]]) == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: stage data: no space left on the disk of {small_disk}/"), line
    assert "Traceback" not in err
    root = small_disk / "medical-finetune-dl"
    assert not list(root.rglob("*.jsonl")) and not (root / "data").exists()
    assert json.loads((root / "manifest.json").read_text())["status"] == "failed"
