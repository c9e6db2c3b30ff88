"""Upload against a real S3 endpoint: moto's server on 127.0.0.1 (the `s3` fixture), through s3fs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from medtune.cli import main  # noqa: E402
from medtune.config_io import load_config  # noqa: E402
from medtune.rundir import RunDir  # noqa: E402
from medtune.storage import Retry, UploadError, upload  # noqa: E402
from medtune.workflow import run_workflow  # noqa: E402
from tests_support import S3_BUCKET as BUCKET  # noqa: E402  (the `s3` fixture: integration/conftest.py)

CANARY = "hf_CANARYuploadTOKEN0123456789abcdef"
FAST = Retry(attempts=2, backoff_s=0.05)


@pytest.fixture
def run_dir(tmp_path) -> RunDir:
    """A finished run's deliverables (content only; the pipeline itself is covered elsewhere)."""
    run = RunDir(tmp_path / "medical-finetune-up1")
    files = {
        "adapters/adapter_model.safetensors": b"\x01" * 300_000, "adapters/adapter_config.json": b"{}",
        "adapters/README.md": b"# card", "merged/model-00001-of-00002.safetensors": b"\x02" * 200_000,
        "merged/model-00002-of-00002.safetensors": b"\x03" * 100_000, "merged/config.json": b"{}",
        "logs/finetune.log": b"log line\n", "training.env": b"A=1\n", "summary.md": b"# summary\n",
        "report.html": b"<html></html>", "data/train.arrow": b"not a deliverable",
    }
    for name, data in files.items():
        (run.root / name).parent.mkdir(parents=True, exist_ok=True)
        (run.root / name).write_bytes(data)
    run.update_manifest(run_id="up1", status="succeeded")
    return run


def _remote_sums(fs, url: str) -> dict[str, str]:
    lines = fs.cat_file(f"{url}/SHA256SUMS").decode().splitlines()
    return {name: digest for digest, name in (line.split("  ", 1) for line in lines)}


def _check_bucket_matches(fs, run: RunDir, url: str) -> dict[str, str]:
    sums = _remote_sums(fs, url)
    for name, digest in sums.items():
        remote, local = fs.cat_file(f"{url}/{name}"), (run.root / name).read_bytes()
        assert hashlib.sha256(remote).hexdigest() == digest, name
        # The log keeps growing after its snapshot was uploaded; everything else is byte-identical.
        assert local.startswith(remote) if name.startswith("logs/") else local == remote, name
    return sums


def test_full_upload_verified(s3, run_dir):
    result = upload(f"s3://{BUCKET}/runs", run_dir, retry=FAST)
    url = f"{BUCKET}/runs/medical-finetune-up1"
    assert result["destination"] == f"s3://{url}" and result["copied"] == 11 and result["already_present"] == 0
    fs = s3.fs()
    sums = _check_bucket_matches(fs, run_dir, url)
    assert set(sums) == {"adapters/adapter_model.safetensors", "adapters/adapter_config.json", "adapters/README.md",
                         "merged/model-00001-of-00002.safetensors", "merged/model-00002-of-00002.safetensors",
                         "merged/config.json", "logs/finetune.log", "training.env", "summary.md", "report.html",
                         "manifest.json"}
    assert not fs.exists(f"{url}/data")  # working state stays local
    uploaded_manifest = json.loads(fs.cat_file(f"{url}/manifest.json"))
    assert uploaded_manifest["stages"]["upload"]["destination"] == f"s3://{url}"
    assert (run_dir.root / "data" / "train.arrow").is_file() and (run_dir.adapters / "README.md").is_file()

    again = upload(f"s3://{BUCKET}/runs", run_dir, retry=FAST)  # nothing changed: only the manifest moves
    assert again["copied"] == 1 and again["already_present"] == 10


def test_interrupted_upload_resumes(s3, run_dir, monkeypatch):
    calls = []
    real_put = s3fs.S3FileSystem.put_file

    def put_then_die(self, lpath, rpath, *args, **kwargs):
        calls.append(rpath)
        if len(calls) == 4:
            s3.stop()  # the endpoint goes away mid-upload
        return real_put(self, lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "put_file", put_then_die)
    with pytest.raises(UploadError, match="rerun the same command"):
        upload(f"s3://{BUCKET}", run_dir, workers=1, retry=FAST)
    s3.start()
    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setattr(s3fs.S3FileSystem, "put_file", real_put)
    result = upload(f"s3://{BUCKET}", run_dir, workers=2, retry=FAST)
    assert result["already_present"] == 3  # the three files that made it are verified, not re-sent
    assert result["copied"] == 8
    _check_bucket_matches(s3.fs(), run_dir, f"{BUCKET}/medical-finetune-up1")


def test_corrupted_object_is_detected_and_replaced(s3, run_dir):
    upload(f"s3://{BUCKET}", run_dir, retry=FAST)
    fs = s3.fs()
    target = f"{BUCKET}/medical-finetune-up1/merged/model-00002-of-00002.safetensors"
    fs.pipe_file(target, b"\x04" * 100_000)  # same size: only a checksum can tell
    result = upload(f"s3://{BUCKET}", run_dir, retry=FAST)
    assert result["copied"] == 2  # the corrupted shard and the manifest
    _check_bucket_matches(fs, run_dir, f"{BUCKET}/medical-finetune-up1")


def test_corruption_in_transit_fails_the_upload(s3, run_dir, monkeypatch):
    real_put = s3fs.S3FileSystem.put_file

    def put_corrupted(self, lpath, rpath, *args, **kwargs):
        real_put(self, lpath, rpath, *args, **kwargs)
        if rpath.endswith("config.json"):
            self.pipe_file(rpath, b"[]")  # same size, different bytes, every attempt

    monkeypatch.setattr(s3fs.S3FileSystem, "put_file", put_corrupted)
    with pytest.raises(UploadError, match="sha256 .* after upload, expected"):
        upload(f"s3://{BUCKET}", run_dir, retry=FAST)
    assert (run_dir.merged / "config.json").read_bytes() == b"{}"  # the local copy is untouched


def test_workflow_uploads_without_leaking_the_token(s3, tiny_overrides, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", CANARY)
    cfg = load_config(preset="smollm2-135m-medical",
                      overrides=[*tiny_overrides, "output.run_id=s3", f"infrastructure.output_bucket=s3://{BUCKET}/team"])
    run = run_workflow(cfg)
    fs = s3.fs()
    url = f"{BUCKET}/team/medical-finetune-s3"
    sums = _check_bucket_matches(fs, run, url)
    assert {"adapters/README.md", "merged/README.md", "summary.md", "manifest.json", "training.env",
            "logs/finetune.log", "merged/config.json"} <= set(sums)
    for name in [*sums, "SHA256SUMS"]:
        assert CANARY.encode() not in fs.cat_file(f"{url}/{name}"), name
    for path in run.root.rglob("*"):
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes(), path
    manifest = json.loads(run.manifest_path.read_text())
    assert manifest["status"] == "succeeded" and manifest["seed"] == cfg.training.seed
    assert manifest["provenance"]["base_model_files"]["model.safetensors"]
    # The cards in the bucket were written after validation, so they carry its results.
    card = fs.cat_file(f"{url}/merged/README.md").decode()
    assert "not a medical device" in card and "Merged weights vs adapter-on-base: top-1 agreement" in card
    assert "*Fine-tuned:*" in card and manifest["provenance"]["base_model_files"]["model.safetensors"] in card


def test_cli_upload_of_a_finished_run(s3, run_dir, capsys):
    assert main(["upload", str(run_dir.root), "--to", f"s3://{BUCKET}/cli"]) == 0
    assert "11 copied, 0 already there" in capsys.readouterr().out
    assert main(["upload", str(Path(run_dir.root).parent), "--to", f"s3://{BUCKET}/cli"]) == 2
