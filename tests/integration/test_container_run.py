"""The finetune stage inside a container image: the full workflow with an `apptainer` stand-in.

Apptainer cannot run here; the stand-in checks the `exec --nv --bind ... IMAGE python3` shape it
is called with and runs the rest with this test's Python, so the training really happens in the
subprocess the container would hold.
"""

from __future__ import annotations

import json
import os
import stat
import sys

import pytest

from medtune.config_io import load_config
from medtune.workflow import run_workflow
from tests_support import RUN_ARTIFACTS

ARTIFACTS = RUN_ARTIFACTS
STAND_IN = """#!/bin/sh
[ "$1" = exec ] && [ "$2" = --nv ] && [ "$3" = --bind ] && [ "$5" = "{image}" ] && [ "$6" = python3 ] || exit 64
echo "$@" >> {calls}
shift 6
exec {python} "$@"
"""


@pytest.mark.e2e
def test_finetune_runs_in_the_image(tiny_overrides, tmp_path, monkeypatch):
    image, calls, bin_dir = tmp_path / "finetune.sif", tmp_path / "calls.txt", tmp_path / "bin"
    image.write_bytes(b"SIF stand-in")
    bin_dir.mkdir()
    tool = bin_dir / "apptainer"
    tool.write_text(STAND_IN.format(image=image, calls=calls, python=sys.executable))
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    cfg = load_config(preset="smollm2-135m-medical", overrides=[
        *tiny_overrides, "output.run_id=boxed", "infrastructure.container.source=path",
        f"infrastructure.container.finetune_path={image}", "evaluation.validation_questions=0"])
    run = run_workflow(cfg)

    manifest = json.loads(run.manifest_path.read_text())
    assert manifest["status"] == "succeeded" and manifest["training"]["steps"] == 6
    assert manifest["stages"]["container"]["image"] == str(image)
    assert {p.name for p in run.root.iterdir()} == ARTIFACTS
    binds, *rest = calls.read_text().split()[3:]
    assert str(run.root) in binds.split(",")
    assert rest == [str(image), "python3", "-m", "medtune.launch.worker", str(run.root)]
