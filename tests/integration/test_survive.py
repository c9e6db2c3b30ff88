"""Runs that survive: kill -9 mid-training then --resume, and SIGTERM -> checkpoint + exit 75.

The training subprocess is the real `medtune run` on the tiny model; only its optimizer step is
slowed (the `slow_steps` fixture, in every process of the run) so the test can act while it trains.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medtune.cli import main
from medtune.preemption import EXIT_PREEMPTED, last_complete_checkpoint
from tests_support import RUN_ARTIFACTS, loopback_only

ARTIFACTS = RUN_ARTIFACTS
STEPS = 16


def _start(overrides: list[str], run_id: str, hooks: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])}
    args = ["run", "--preset", "smollm2-135m-medical", "--run-id", run_id, *_sets([*overrides, *extra]),
            "--set", f"training.max_steps={STEPS}", "--set", "training.save_steps=2", "--set", "training.logging_steps=1",
            "--set", "evaluation.validation_questions=0"]
    # loopback_only: with 2 ranks, torchrun's stores would listen on every interface (tests_support).
    return subprocess.Popen(loopback_only([sys.executable, "-m", "medtune", *args]), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _sets(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"training ended before the test could act (rc {proc.returncode}): {proc.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("training did not reach the expected point in time")
        time.sleep(0.1)


def _root(overrides: list[str], run_id: str) -> Path:
    out = next(item.partition("=")[2] for item in overrides if item.startswith("output.output_root="))
    return Path(out) / f"medical-finetune-{run_id}"


def _logged_steps(text: str) -> list[int]:
    return [int(m.group(1)) for m in re.finditer(r"step (\d+)/\d+ loss", text)]


@pytest.mark.e2e
def test_kill_9_then_resume_continues_from_the_checkpoint(tiny_overrides, slow_steps):
    root = _root(tiny_overrides, "killed")
    proc = _start(tiny_overrides, "killed", slow_steps)
    _wait_for(lambda: (c := last_complete_checkpoint(root / "checkpoints")) is not None and c.name != "checkpoint-2",
              proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    resumed_from = int(last_complete_checkpoint(root / "checkpoints").name.split("-")[1])
    assert 2 < resumed_from < STEPS
    before = (root / "logs" / "finetune.log").read_text()

    assert main(["run", "--resume", str(root)]) == 0

    assert {p.name for p in root.iterdir()} == ARTIFACTS
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "succeeded" and manifest["training"]["steps"] == STEPS
    after = (root / "logs" / "finetune.log").read_text()[len(before):]
    assert f"resuming from {root / 'checkpoints' / f'checkpoint-{resumed_from}'}" in after
    # The resumed process logs only the steps after the checkpoint: no restart from step 0.
    assert _logged_steps(after) == list(range(resumed_from + 1, STEPS + 1))
    history = [h["step"] for h in manifest["training"]["history"] if "loss" in h]
    assert history == list(range(1, STEPS + 1))


@pytest.mark.e2e
@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_saves_a_checkpoint_and_exits_75(tiny_overrides, slow_steps, processes):
    """SIGTERM to `medtune run` (what Slurm sends): with 2 ranks it reaches both, which stop at one step."""
    root = _root(tiny_overrides, "stopped")
    proc = _start(tiny_overrides, "stopped", slow_steps, f"infrastructure.cpu_processes={processes}",
                  "training.gradient_accumulation=1")
    log = root / "logs" / "finetune.log"
    _wait_for(lambda: log.is_file() and len(_logged_steps(log.read_text())) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED == 75
    assert "training stopped by SIGTERM" in err.strip().splitlines()[-1]
    manifest = json.loads((root / "manifest.json").read_text())
    step = manifest["preemption"]["step"]
    assert manifest["status"] == "preempted" and 3 <= step < STEPS
    checkpoint = last_complete_checkpoint(root / "checkpoints")
    assert checkpoint.name == f"checkpoint-{step}"  # saved at the signal, not only on the schedule
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step
    assert "stopped by SIGTERM" in (root / "summary.md").read_text()
