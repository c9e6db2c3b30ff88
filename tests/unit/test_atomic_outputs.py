"""Outputs written outside rundir.atomic_dir still appear whole or not at all."""

from __future__ import annotations

import os
import stat

import pytest

from medtune import container as container_mod
from medtune.config import ContainerConfig
from medtune.errors import EnvironmentProblem


@pytest.fixture
def fake_build(tmp_path, monkeypatch):
    """An `apptainer` whose `build --force IMAGE DEF` writes part of IMAGE, then exits with $FAKE_BUILD_RC."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "apptainer"
    tool.write_text('#!/bin/sh\nprintf "SIF-partial" > "$3"\nexit "${FAKE_BUILD_RC:-0}"\n')
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(container_mod.os, "geteuid", lambda: 0)
    return tmp_path / "images" / "finetune.sif"


def test_a_container_build_is_renamed_into_place(fake_build):
    fake_build.parent.mkdir()
    container_mod.container(ContainerConfig(source="build", finetune_path=str(fake_build)))
    assert fake_build.read_text() == "SIF-partial"
    assert [p.name for p in fake_build.parent.iterdir()] == ["finetune.sif"]


def test_a_failed_build_leaves_no_image(fake_build, monkeypatch):
    fake_build.parent.mkdir()
    monkeypatch.setenv("FAKE_BUILD_RC", "1")
    with pytest.raises(EnvironmentProblem, match="could not build the container"):
        container_mod.container(ContainerConfig(source="build", finetune_path=str(fake_build)))
    assert list(fake_build.parent.iterdir()) == []  # a half-built image is never at finetune_path
