"""Secrets and access, end to end: canary credentials never leave the environment.

One full pipeline run on the tiny model with a canary value in every credential variable and file
medtune knows (credentials.py): the finetune stage runs in the container stand-in (so the training
process is a child started through the container command line), the outputs go to a moto S3 server
on 127.0.0.1 that accepts the canary AWS keys, then `medtune submit` (dry run and with stand-in
sbatch/qsub), `medtune config` and `medtune report` run. Every file under the test's folder, every
object in the bucket, the HF caches written meanwhile, the console output and the argv of every
process started (recorded by an audit hook in this process and in each Python child) are searched
for every canary. A planted leak shows the search itself can fail.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

boto3 = pytest.importorskip("boto3")
s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

import argv_audit  # noqa: E402
from test_container_run import STAND_IN  # noqa: E402
from tests_support import free_port as _free_port  # noqa: E402

from medtune.cli import main  # noqa: E402
from medtune.config_io import load_config  # noqa: E402
from medtune.workflow import run_workflow  # noqa: E402

BUCKET = "medtune-secrets"
CANARY_ENV = {
    "HF_TOKEN": "hf_CANARYenvToken0123456789abcdef",
    "HUGGING_FACE_HUB_TOKEN": "hf_CANARYhubToken0123456789abcdef",
    "AWS_ACCESS_KEY_ID": "AKIACANARY0123456789",
    "AWS_SECRET_ACCESS_KEY": "CANARYawsSecret/0123456789abcdefghijklmno",
    "AWS_SESSION_TOKEN": "CANARYawsSession0123456789abcdef",
    "AZURE_STORAGE_KEY": "CANARYazureKey0123456789abcdef==",
    "AZURE_STORAGE_ACCOUNT_KEY": "CANARYazureAccountKey0123456789==",
    "AZURE_STORAGE_CONNECTION_STRING": "DefaultEndpointsProtocol=https;AccountName=medtune;"
                                       "AccountKey=CANARYazureConnKey0123456789==;EndpointSuffix=core.windows.net",
    "AZURE_STORAGE_SAS_TOKEN": "?sv=2024-01-01&sig=CANARYazureSas0123456789",
    "AZURE_STORAGE_CLIENT_SECRET": "CANARYazureClientSecret0123456789",
}
CANARY_FILE_TOKEN = "hf_CANARYfileToken0123456789abcdef"  # model.hf_token_file (0600): the run's token
CANARY_HF_HOME_TOKEN = "hf_CANARYhomeToken0123456789abcdef"  # HF_TOKEN_PATH, left 0644: must be warned about
CANARY_GOOGLE_KEY = "-----BEGIN PRIVATE KEY-----\nCANARYgooglePrivateKey0123456789\n-----END PRIVATE KEY-----\n"
CANARY_GOOGLE_KEY_ID = "CANARYgoogleKeyId0123456789"
CANARY_AWS_FILE_SECRET = "CANARYawsFileSecret0123456789abcdef"
# What must never appear: each whole value, and the secret parts a library might print on their own.
CANARIES = sorted({*CANARY_ENV.values(), "CANARYazureConnKey0123456789==", "sv=2024-01-01&sig=CANARYazureSas0123456789",
                   CANARY_FILE_TOKEN, CANARY_HF_HOME_TOKEN, "CANARYgooglePrivateKey0123456789", CANARY_GOOGLE_KEY_ID,
                   CANARY_AWS_FILE_SECRET})


def _leaks(data: bytes | str) -> list[str]:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    return [c for c in CANARIES if c in text]


def _file_leaks(root: Path, newer_than: float = 0.0, skip: Path | None = None) -> dict[str, list[str]]:
    found = {}
    for path in root.rglob("*"):
        if skip and path.is_relative_to(skip):
            continue
        if path.is_file() and not path.is_symlink() and path.stat().st_mtime >= newer_than:
            hits = _leaks(path.read_bytes())
            if hits:
                found[str(path)] = hits
    return found


def _argv_leaks(log: Path) -> list[tuple[str, list[str]]]:
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    return [(r["event"], r["argv"]) for r in records if _leaks(" ".join(r["argv"]))]


def _credential_files(folder: Path, monkeypatch) -> dict[str, Path]:
    folder.mkdir()
    files = {"hf_token_file": folder / "hf-token", "HF_TOKEN_PATH": folder / "hf-home-token",
             "GOOGLE_APPLICATION_CREDENTIALS": folder / "gcp.json", "AWS_SHARED_CREDENTIALS_FILE": folder / "aws"}
    files["hf_token_file"].write_text(CANARY_FILE_TOKEN + "\n")
    files["HF_TOKEN_PATH"].write_text(CANARY_HF_HOME_TOKEN)
    files["GOOGLE_APPLICATION_CREDENTIALS"].write_text(json.dumps({
        "type": "service_account", "project_id": "medtune", "private_key_id": CANARY_GOOGLE_KEY_ID,
        "private_key": CANARY_GOOGLE_KEY, "client_email": "medtune@medtune.iam.gserviceaccount.com"}))
    files["AWS_SHARED_CREDENTIALS_FILE"].write_text(
        f"[default]\naws_access_key_id = AKIACANARYFILE\naws_secret_access_key = {CANARY_AWS_FILE_SECRET}\n")
    for name, path in files.items():
        path.chmod(0o644 if name == "HF_TOKEN_PATH" else 0o600)
        if name != "hf_token_file":
            monkeypatch.setenv(name, str(path))
    return files


@pytest.fixture
def s3_endpoint(monkeypatch):
    """moto's S3 server on 127.0.0.1, reached with the canary AWS keys (moto accepts any keys)."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(name, CANARY_ENV[name])
    s3fs.S3FileSystem.clear_instance_cache()
    yield url
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def audited(tmp_path, monkeypatch) -> Path:
    """Argv recording on, in this process and (through sitecustomize on PYTHONPATH) in Python children."""
    hooks = tmp_path / "audit-hooks"
    hooks.mkdir()
    shutil.copyfile(argv_audit.__file__, hooks / "sitecustomize.py")
    log = tmp_path / "argv.jsonl"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv(argv_audit.WATCHED_VARS_VAR, ",".join(CANARY_ENV))
    monkeypatch.setenv(argv_audit.LOG_VAR, str(log))
    argv_audit.install()
    return log


def _stand_in_tools(tmp_path: Path, image: Path, monkeypatch) -> Path:
    """`apptainer` (runs the worker with this Python, see test_container_run), `sbatch` and `qsub`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tools = {"apptainer": STAND_IN.format(image=image, calls=tmp_path / "apptainer-calls.txt", python=sys.executable),
             "sbatch": "#!/bin/sh\necho 4242\n", "qsub": "#!/bin/sh\necho 4243.pbs\n"}
    for name, body in tools.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return bin_dir


def _public_grants(client, key: str) -> list[str]:
    grants = client.get_object_acl(Bucket=BUCKET, Key=key)["Grants"]
    return [g["Grantee"]["URI"] for g in grants
            if g["Grantee"].get("URI", "").rsplit("/", 1)[-1] in ("AllUsers", "AuthenticatedUsers")]


def test_the_leak_checks_can_fail(tmp_path, audited, monkeypatch):
    """The searches below find a canary in a file, in a process's argv, and in a grandchild's argv
    that only a Python child's own hook saw (the child read the value from its environment)."""
    canary = CANARY_ENV["AWS_SECRET_ACCESS_KEY"]
    for name in CANARY_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", canary)
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "leak.txt").write_text(f"x {canary} y")
    assert _file_leaks(tmp_path, skip=audited) == {str(tmp_path / "deep" / "leak.txt"): [canary]}
    subprocess.run([sys.executable, "-c", "pass", canary], check=True)
    assert [event for event, _ in _argv_leaks(audited)] == ["subprocess.Popen", "start"]
    audited.unlink()
    grandchild = ("import os, subprocess, sys; "
                  "subprocess.run([sys.executable, '-c', 'pass', os.environ['AWS_SECRET_ACCESS_KEY']])")
    subprocess.run([sys.executable, "-c", grandchild], check=True)
    records = [json.loads(line) for line in audited.read_text().splitlines()]
    assert canary not in json.dumps(records[0]) and records[1]["env_has"] == ["AWS_SECRET_ACCESS_KEY"]
    leaked = _argv_leaks(audited)
    assert [event for event, _ in leaked] == ["subprocess.Popen", "start"]
    assert all(r["pid"] != os.getpid() for r in records if canary in json.dumps(r))


def test_credentials_never_leave_the_environment(tiny_overrides, tmp_path, monkeypatch, s3_endpoint, audited, capfd):
    started = time.time() - 1
    creds = _credential_files(tmp_path / "credentials", monkeypatch)
    for name, value in CANARY_ENV.items():
        monkeypatch.setenv(name, value)
    image = tmp_path / "finetune.sif"
    image.write_bytes(b"SIF stand-in")
    _stand_in_tools(tmp_path, image, monkeypatch)
    client = boto3.client("s3", endpoint_url=s3_endpoint)  # signs with the canary keys from the environment
    client.create_bucket(Bucket=BUCKET)
    overrides = [*tiny_overrides, f"model.hf_token_file={creds['hf_token_file']}",
                 "infrastructure.container.source=path", f"infrastructure.container.finetune_path={image}",
                 "evaluation.validation_questions=1", "evaluation.mcq_questions=2"]
    cfg = load_config(preset="smollm2-135m-medical",
                      overrides=[*overrides, "output.run_id=canary", f"infrastructure.output_bucket=s3://{BUCKET}/runs"])
    assert cfg.model.hf_token.get_secret_value() == CANARY_FILE_TOKEN
    old_umask = os.umask(0o002)
    try:
        run = run_workflow(cfg)
    finally:
        os.umask(old_umask)
    manifest = json.loads(run.manifest_path.read_text())
    assert manifest["status"] == "succeeded" and manifest["stages"]["container"]["image"] == str(image)

    # The training process is a child started through the container command line, and it got the
    # credentials through its environment.
    records = [json.loads(line) for line in audited.read_text().splitlines()]
    worker = [r for r in records if r["event"] == "start" and "medtune.launch.worker" in r["argv"]]
    assert len(worker) == 1 and worker[0]["env_has"] == sorted(CANARY_ENV)
    assert any(r["event"] == "subprocess.Popen" and r["argv"][0].endswith("apptainer") for r in records)

    # Every credential value is redacted from the log, and the world-readable token file was named.
    log_text = run.log_file.read_text()
    assert f"credential file {creds['HF_TOKEN_PATH']} has mode 0644" in log_text
    assert f"chmod 600 {creds['HF_TOKEN_PATH']}" in log_text
    assert f"{creds['hf_token_file']} has mode" not in log_text  # 0600: no warning
    logging.getLogger("medtune").warning("planted: %s", " | ".join(CANARIES))
    assert "planted: " + " | ".join(["***"] * len(CANARIES)) in run.log_file.read_text()

    _commands_around_the_job(overrides, run.root, tmp_path / "outputs")
    console = capfd.readouterr()
    assert "#SBATCH" in console.out and "#PBS -V" in console.out and "hf_token" in console.out

    # The search: console, argv of every process, every file written, every object uploaded.
    assert _leaks(console.out + console.err) == []
    assert _argv_leaks(audited) == []
    assert _file_leaks(tmp_path, skip=creds["hf_token_file"].parent) == {}
    for cache in _hf_caches():
        assert _file_leaks(cache, newer_than=started) == {}
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert "runs/medical-finetune-canary/merged/README.md" in keys and len(keys) > 10
    for key in keys:
        assert _leaks(client.get_object(Bucket=BUCKET, Key=key)["Body"].read()) == [], key
        assert _public_grants(client, key) == [], key  # uploaded objects carry no public ACL

    # Outputs follow the user's umask (002 here: group-writable), none is writable by others.
    assert stat.S_IMODE(run.root.stat().st_mode) == 0o775
    for path in [run.root, *run.root.rglob("*")]:
        assert not stat.S_IMODE(path.lstat().st_mode) & 0o002, path
    assert stat.S_IMODE((run.merged / "model.safetensors").stat().st_mode) == 0o664


def _commands_around_the_job(overrides: list[str], run_root: Path, output_root: Path) -> None:
    """What a user runs besides `medtune run`: submit (dry run and for real), config, report."""
    base = ["--preset", "smollm2-135m-medical", *(f"--set={o}" for o in overrides)]
    for scheduler in ("slurm", "pbs"):
        assert main(["submit", "--scheduler", scheduler, "--dry-run", *base]) == 0
        assert main(["submit", "--scheduler", scheduler, *base, f"--set=output.run_id=job-{scheduler}"]) == 0
        assert (output_root / f"medical-finetune-job-{scheduler}" / "logs" / f"job.{scheduler}").is_file()
    assert main(["config", *base]) == 0
    assert main(["report", str(run_root)]) == 0


def test_public_grant_check_sees_a_public_object(s3_endpoint):
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=BUCKET)
    client.put_object(Bucket=BUCKET, Key="public.txt", Body=b"x", ACL="public-read")
    client.put_object(Bucket=BUCKET, Key="private.txt", Body=b"x")
    assert _public_grants(client, "public.txt") == ["http://acs.amazonaws.com/groups/global/AllUsers"]
    assert _public_grants(client, "private.txt") == []


def _hf_caches() -> list[Path]:
    """The Hub and datasets caches this process uses (fixed at import, before the test's environment)."""
    import datasets
    from huggingface_hub import constants

    return [p for p in {Path(constants.HF_HOME), Path(datasets.config.HF_DATASETS_CACHE)} if p.is_dir()]
