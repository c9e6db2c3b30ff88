"""Container sources and command lines (apptainer itself cannot run here: a stand-in is on PATH)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from medtune import container as container_mod
from medtune.config import ContainerConfig
from medtune.config_io import load_config
from medtune.container import assemble_parts, build_command, container
from medtune.errors import EnvironmentProblem
from medtune.launch.apptainer import exec_prefix
from medtune.launch.torchrun import WorldPlan, training_command
from medtune.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake_apptainer(tmp_path, monkeypatch):
    """An `apptainer` executable on PATH; its `build --force IMAGE DEF` writes IMAGE, then exits $FAKE_BUILD_RC."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "apptainer"
    tool.write_text('#!/bin/sh\n[ "$1" = build ] && printf SIF-bytes > "$3"\nexit "${FAKE_BUILD_RC:-0}"\n')
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return tool


def test_path_source_needs_the_image(tmp_path, fake_apptainer):
    image = tmp_path / "finetune.sif"
    with pytest.raises(EnvironmentProblem, match="finetune_path .* not found"):
        container(ContainerConfig(source="path", finetune_path=str(image)))
    image.write_bytes(b"SIF")
    assert container(ContainerConfig(source="path", finetune_path=str(image))) == {
        "source": "path", "runtime": "apptainer", "image": str(image)}


def test_no_runtime_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EnvironmentProblem, match="neither apptainer nor singularity"):
        container(ContainerConfig(source="path", finetune_path=str(tmp_path / "x.sif")))


def test_pull_copies_from_the_bucket_once(tmp_path, fake_apptainer):
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    (bucket / "finetune.sif").write_bytes(b"image-bytes" * 100)
    image = tmp_path / "cache" / "finetune.sif"
    container(ContainerConfig(source="pull", bucket=f"file://{bucket}", finetune_path=str(image)))
    assert image.read_bytes() == (bucket / "finetune.sif").read_bytes()
    with pytest.raises(EnvironmentProblem, match="no finetune.sif"):
        container(ContainerConfig(source="pull", bucket=f"file://{tmp_path}", finetune_path=str(image)))


def test_build_command_root_fakeroot_sudo(tmp_path, monkeypatch):
    definition = ROOT / "containers" / "finetune.def"
    image = tmp_path / "f.sif"
    assert build_command("apptainer", image, definition, euid=0) == [
        "apptainer", "build", "--force", str(image), str(definition)]
    monkeypatch.setattr(container_mod, "_has_subuid", lambda user: True)
    assert build_command("singularity", image, definition, euid=1000)[:3] == ["singularity", "build", "--fakeroot"]
    monkeypatch.setattr(container_mod, "_has_subuid", lambda user: False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no sudo either
    with pytest.raises(EnvironmentProblem, match="needs root, --fakeroot"):
        build_command("apptainer", image, definition, euid=1000)


def test_definition_installs_the_makefile_pins():
    makefile = (ROOT / "Makefile").read_text()
    definition = (ROOT / "containers" / "finetune.def").read_text()
    # the install recipe's pins; `make test` adds test-only tools (Triton's CPU interpreter) the image does not need
    install = makefile[makefile.index("$(STAMP):"):makefile.index("\ninstall:")]
    pins = re.findall(r"pip install -q (?:--no-deps )?([\w.-]+==[\w.]+)", install)
    assert "torch==2.13.0" in pins and len(pins) >= 2
    for pin in pins:
        assert pin in definition, pin
    assert "pip install -q /opt/medtune" in definition  # the pyproject.toml pins, as `pip install -e .` uses them


def _split(data: bytes, folder: Path, name: str, count: int) -> None:
    size = -(-len(data) // count)
    for i in range(count):
        (folder / f"{name}.part-{i}").write_bytes(data[i * size:(i + 1) * size])
    (folder / f"{name}.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  {name}\n")


def test_parts_are_joined_in_order_and_verified(tmp_path):
    data = os.urandom(12_345)
    parts = tmp_path / "repo"
    parts.mkdir()
    _split(data, parts, "finetune.sif", 12)  # part-10 and part-11 must come after part-9
    image = tmp_path / "out" / "finetune.sif"
    assert assemble_parts(parts, image).read_bytes() == data
    (parts / "finetune.sif.sha256").write_text("0" * 64 + "\n")
    image.unlink()
    with pytest.raises(EnvironmentProblem, match="expected 000000000000"):
        assemble_parts(parts, image)
    assert not image.exists() and not list(image.parent.glob(".*tmp*"))


@pytest.mark.skipif(shutil.which("git") is None or subprocess.run(["git", "lfs", "version"], capture_output=True)
                    .returncode != 0, reason="git-lfs not installed")
def test_lfs_source_clones_pulls_and_assembles(tmp_path, fake_apptainer, monkeypatch):
    """A real git-lfs round trip through a local file:// remote."""
    for key, value in {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t",
                       "GIT_COMMITTER_EMAIL": "t@x", "HOME": str(tmp_path)}.items():
        monkeypatch.setenv(key, value)
    remote, work = tmp_path / "remote.git", tmp_path / "work"
    git = lambda *args, cwd=work: subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)  # noqa: E731
    subprocess.run(["git", "init", "--quiet", "--bare", str(remote)], check=True)
    subprocess.run(["git", "lfs", "install", "--skip-repo"], check=True, capture_output=True)
    git("clone", "--quiet", f"file://{remote}", str(work), cwd=tmp_path)
    git("lfs", "track", "*.part-*")
    data = os.urandom(40_000)
    _split(data, work, "finetune.sif", 3)
    git("add", ".")
    git("commit", "--quiet", "-m", "image parts")
    git("push", "--quiet", "origin", "HEAD")
    image = tmp_path / "images" / "finetune.sif"
    info = container(ContainerConfig(source="lfs", lfs_repo=f"file://{remote}", finetune_path=str(image)))
    assert info["image"] == str(image) and image.read_bytes() == data
    clone = image.parent / "lfs-remote"
    assert b"git-lfs" not in (clone / "finetune.sif.part-0").read_bytes()[:200]  # real content, not a pointer


def test_training_runs_inside_the_image(tmp_path):
    run = RunDir.for_run(tmp_path, "c1")
    info = {"source": "path", "runtime": "apptainer", "image": "/img/finetune.sif"}
    wrap = exec_prefix(info, [run.root, tmp_path / "model", run.root])
    assert wrap == ["apptainer", "exec", "--nv", "--bind", f"{run.root},{tmp_path / 'model'}", "/img/finetune.sif"]
    cfg = load_config(preset="llama3-8b-medical", env={})
    assert training_command(cfg, run, WorldPlan(1, 1, "nccl"), wrap) == [
        *wrap, "python3", "-m", "medtune.launch.worker", str(run.root)]
    multi = load_config(preset="llama3-8b-medical", env={}, overrides=[
        "infrastructure.cluster=slurm", "infrastructure.slurm.nodes=2", "infrastructure.rdzv_endpoint=n1:29500"])
    cmd = training_command(multi, run, WorldPlan(4, 2, "nccl"), wrap)
    assert cmd[0] == "srun" and cmd[4:10] == wrap and cmd[10:13] == ["python3", "-m", "torch.distributed.run"]
    assert exec_prefix({"source": "none"}, [run.root]) == []


def test_a_container_build_is_renamed_into_place(tmp_path, fake_apptainer, monkeypatch):
    monkeypatch.setattr(container_mod.os, "geteuid", lambda: 0)
    image = tmp_path / "images" / "finetune.sif"
    image.parent.mkdir()
    container(ContainerConfig(source="build", finetune_path=str(image)))
    assert image.read_text() == "SIF-bytes" and [p.name for p in image.parent.iterdir()] == ["finetune.sif"]
    monkeypatch.setenv("FAKE_BUILD_RC", "1")  # a failed (or killed) build: its partial output never is the image
    image.unlink()
    with pytest.raises(EnvironmentProblem, match="could not build the container"):
        container(ContainerConfig(source="build", finetune_path=str(image)))
    assert list(image.parent.iterdir()) == []


def test_a_pull_that_does_not_match_sha256sums_is_refused(tmp_path, fake_apptainer, monkeypatch):
    from medtune.transfer import Retry

    monkeypatch.setattr(container_mod, "PULL_RETRY", Retry(attempts=2, backoff_s=0.01))
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    (bucket / "finetune.sif").write_bytes(b"image-bytes")
    (bucket / "SHA256SUMS").write_text(f"{hashlib.sha256(b'other-bytes').hexdigest()}  finetune.sif\n")
    image = tmp_path / "cache" / "finetune.sif"
    with pytest.raises(EnvironmentProblem, match=r"pull of .* failed after 2 attempts \(ChecksumMismatch: .*SHA256SUMS"):
        container(ContainerConfig(source="pull", bucket=f"file://{bucket}", finetune_path=str(image)))
    assert list(image.parent.iterdir()) == []
