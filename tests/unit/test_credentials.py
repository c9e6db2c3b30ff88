"""Credentials (which values are secrets, loose credential files), log redaction, and output modes."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest

from medtune.cli import main
from medtune.credentials import loose_permission_warnings, secret_values
from medtune.rundir import RunDir, atomic_dir, write_text
from medtune.runlog import setup_logging

CONN = "DefaultEndpointsProtocol=https;AccountName=lab;AccountKey=CANARYconnKey0123==;EndpointSuffix=core.windows.net"
PEM = "-----BEGIN PRIVATE KEY-----\nCANARYpemBodyLine0123\n-----END PRIVATE KEY-----\n"


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    gcp = tmp_path / "gcp.json"
    gcp.write_text(json.dumps({"type": "service_account", "private_key": PEM, "private_key_id": "CANARYkeyId0123",
                               "client_email": "svc@lab.iam.gserviceaccount.com"}))
    aws = tmp_path / "aws-credentials"
    aws.write_text("[default]\naws_secret_access_key = CANARYawsIni0123\nregion = eu-west-1\n")
    return {"AWS_SECRET_ACCESS_KEY": "CANARYawsEnv0123", "AWS_ACCESS_KEY_ID": "short",
            "AZURE_STORAGE_CONNECTION_STRING": CONN, "AZURE_STORAGE_SAS_TOKEN": "?sv=1&sig=CANARYsas0123",
            "GOOGLE_APPLICATION_CREDENTIALS": str(gcp), "AWS_SHARED_CREDENTIALS_FILE": str(aws),
            "HF_TOKEN_PATH": str(tmp_path / "absent-token"), "AWS_DEFAULT_REGION": "eu-west-1"}


def test_secret_values_cover_variables_files_and_their_parts(env, tmp_path):
    token_file = tmp_path / "hf-token"
    token_file.write_text("hf_CANARYfile0123\n")
    got = secret_values("hf_CANARYcfg0123", str(token_file), env)
    assert {"hf_CANARYcfg0123", "hf_CANARYfile0123", "CANARYawsEnv0123", CONN, "CANARYconnKey0123==",
            "?sv=1&sig=CANARYsas0123", "sv=1&sig=CANARYsas0123", PEM.strip(), "CANARYpemBodyLine0123",
            "CANARYkeyId0123",
            "CANARYawsIni0123"} == set(got)
    assert "short" not in got and "eu-west-1" not in got  # short values and non-secrets stay readable
    assert got == sorted(got, key=len, reverse=True)  # a secret holding another is replaced whole


def test_loose_credential_file_is_named_with_the_fix(env, tmp_path):
    assert loose_permission_warnings(env=env) == []  # all 0600 (the umask below)
    Path(env["GOOGLE_APPLICATION_CREDENTIALS"]).chmod(0o640)
    Path(env["AWS_SHARED_CREDENTIALS_FILE"]).chmod(0o600)
    token_file = tmp_path / "hf-token"
    token_file.write_text("hf_x")
    token_file.chmod(0o604)
    lines = loose_permission_warnings(str(token_file), env)
    assert lines == [
        f"credential file {token_file} has mode 0604: other users on this machine can open it; "
        f"run `chmod 600 {token_file}`",
        f"credential file {env['GOOGLE_APPLICATION_CREDENTIALS']} has mode 0640: other users on this machine can open "
        f"it; run `chmod 600 {env['GOOGLE_APPLICATION_CREDENTIALS']}`"]


@pytest.fixture(autouse=True)
def _private_files():
    """Files written by the env fixture start 0600, so only the test's own chmods loosen them."""
    old = os.umask(0o077)
    yield
    os.umask(old)


def test_log_redacts_messages_and_tracebacks(tmp_path, capsys):
    log_file = tmp_path / "finetune.log"
    setup_logging(log_file, ["CANARYsecret0123", "CANARYother0123"])
    log = logging.getLogger("medtune.test")
    log.info("key %s and %s", "CANARYsecret0123", "CANARYother0123")
    try:
        raise RuntimeError("endpoint refused CANARYsecret0123")
    except RuntimeError:
        log.exception("upload failed")
    text = log_file.read_text() + capsys.readouterr().err
    assert "CANARY" not in text
    assert "key *** and ***" in text and "RuntimeError: endpoint refused ***" in text


def test_error_line_is_redacted(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "CANARYinPath0123")
    assert main(["report", str(tmp_path / "CANARYinPath0123")]) == 2
    err = capsys.readouterr().err
    assert "CANARY" not in err and f"{tmp_path}/*** has no manifest.json" in err


@pytest.mark.parametrize("umask", [0o002, 0o022])
def test_outputs_follow_the_umask_and_are_not_world_writable(tmp_path, umask):
    old = os.umask(umask)
    try:
        run = RunDir.for_run(tmp_path / "outputs", "modes").create()
        write_text(run.training_env, "A=1\n")
        with atomic_dir(run.merged) as tmp:
            weights = tmp / "model.safetensors"
            fd = os.open(weights, os.O_WRONLY | os.O_CREAT, 0o600)  # as safetensors writes its files
            os.close(fd)
    finally:
        os.umask(old)
    for path, full in ((run.root, 0o777), (run.merged, 0o777), (run.training_env, 0o666),
                       (run.merged / "model.safetensors", 0o666)):
        assert stat.S_IMODE(path.stat().st_mode) == full & ~umask, path
        assert not path.stat().st_mode & stat.S_IWOTH


def test_a_world_writable_umask_is_tightened(tmp_path, caplog):
    old = os.umask(0o000)
    try:
        with caplog.at_level("WARNING", logger="medtune"):
            run = RunDir.for_run(tmp_path / "outputs", "open").create()
        assert os.umask(0o022) == 0o002  # for the rest of the run, and its child processes
    finally:
        os.umask(old)
    assert stat.S_IMODE(run.root.stat().st_mode) == 0o775
    assert "umask 000 would make the run's outputs writable by every user; using 002" in caplog.text


@pytest.mark.parametrize("key, url", [
    ("infrastructure.output_bucket", "https://lab.blob.core.windows.net/runs?sv=2024-01-01&sig=abc%3D"),
    ("infrastructure.container.lfs_repo", "https://alice:ghp_token@github.com/lab/containers.git"),
    ("dataset.dataset_bucket", "https://minio.lab/data?X-Amz-Credential=AKIA%2F&X-Amz-Signature=ff"),
])
def test_a_credential_inside_a_url_is_refused(key, url, tmp_path, capsys):
    from medtune.config_io import load_config
    from medtune.errors import ConfigError

    with pytest.raises(ConfigError, match=f"`{key}` holds a credential inside its URL") as err:
        load_config(preset="smollm2-135m-medical", overrides=[f"{key}={url}"], env={})
    assert "abc" not in str(err.value) and "ghp_token" not in str(err.value)
    RunDir(tmp_path).update_manifest(status="succeeded")
    assert main(["upload", str(tmp_path), "--to", url]) == 2
    assert "--to holds a credential inside its URL" in capsys.readouterr().err
    load_config(preset="smollm2-135m-medical", overrides=["infrastructure.output_bucket=s3://lab/runs"], env={})


def test_a_crash_traceback_is_redacted(monkeypatch, capsys):
    import medtune.cli

    monkeypatch.setenv("HF_TOKEN", "hf_CANARYcrash0123")

    def crash(argv=None):
        raise RuntimeError("endpoint said hf_CANARYcrash0123")

    monkeypatch.setattr(medtune.cli, "main", crash)
    with pytest.raises(SystemExit) as exited:
        medtune.cli.run_cli()
    err = capsys.readouterr().err
    assert exited.value.code == 1 and "RuntimeError: endpoint said ***" in err and "CANARY" not in err


def test_a_failed_run_records_its_error_redacted(tiny_overrides, monkeypatch):
    import medtune.setup
    from medtune.config_io import load_config
    from medtune.workflow import run_workflow

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "CANARYfailed0123")

    def broken(cfg, run):
        raise RuntimeError("endpoint said CANARYfailed0123")

    monkeypatch.setattr(medtune.setup, "setup", broken)
    cfg = load_config(preset="smollm2-135m-medical", overrides=[*tiny_overrides, "output.run_id=failed"])
    with pytest.raises(RuntimeError):
        run_workflow(cfg)
    run = RunDir.for_run(cfg.output.output_root, "failed")
    manifest = json.loads(run.manifest_path.read_text())
    assert manifest["status"] == "failed" and manifest["error"] == "RuntimeError: endpoint said ***"
    for path in run.root.rglob("*"):
        if path.is_file():
            assert b"CANARYfailed0123" not in path.read_bytes(), path
