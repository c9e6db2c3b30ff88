"""kill -9 at seeded random points of training, merge and upload; the same command then finishes the run.

One run directory goes through nine `medtune run` processes, each SIGKILLed by a hook (a
sitecustomize on PYTHONPATH, so only the test's subprocesses carry it) at a point drawn from a seeded
RNG: a training step, the middle of a checkpoint's trainer_state.json, the middle of the merged
weights file, just before `merged/` is renamed into place, an upload after its n-th file, and the
moment before SHA256SUMS. After each kill the run directory and the bucket hold only complete
outputs (or none); the tenth process, the same command without a hook, finishes the run. While the
first one is held at its kill point, a second `medtune run` on the same directory is refused (run lock);
every later process takes over the lock its killed predecessor left.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from medtune.cli import main
from medtune.preemption import last_complete_checkpoint
from tests_support import RUN_ARTIFACTS, S3_BUCKET

SEED = int(os.environ.get("MEDTUNE_KILL_SEED", "8"))
STEPS, SAVE_STEPS = 8, 2

KILL_HOOK = r'''
import os, signal
_point, _, _n = os.environ.get("MEDTUNE_TEST_KILL", "").partition(":")
_n, _calls = int(_n or 0), [0]


def _due():
    _calls[0] += 1
    return _calls[0] == _n


def _die():
    if os.environ.get("MEDTUNE_TEST_HOLD"):  # announce the point, then wait for the test's own SIGKILL
        open(os.environ["MEDTUNE_TEST_HOLD"], "w").close()
        signal.pause()
    os.kill(os.getpid(), signal.SIGKILL)


if _point == "train_step":
    import transformers
    _step = transformers.Trainer.training_step
    def _hooked(self, *a, **k):
        if _due():
            _die()
        return _step(self, *a, **k)
    transformers.Trainer.training_step = _hooked
elif _point == "checkpoint_state":  # trainer_state.json half written, as a kill during its write leaves it
    from transformers.trainer_callback import TrainerState
    _save = TrainerState.save_to_json
    def _hooked(self, path):
        if _due():
            _save(self, path)
            with open(path, "r+") as fh:
                fh.truncate(len(fh.read()) // 2)
            _die()
        return _save(self, path)
    TrainerState.save_to_json = _hooked
elif _point == "merge_weights":  # the merged safetensors file half written
    from transformers import modeling_utils
    _save = modeling_utils.safe_save_file
    def _hooked(tensors, filename, *a, **k):
        _save(tensors, filename, *a, **k)
        if _due():
            os.truncate(filename, os.path.getsize(filename) // 2)
            _die()
    modeling_utils.safe_save_file = _hooked
elif _point == "merge_rename":  # everything written, the rename into merged/ not done
    _replace = os.replace
    def _hooked(src, dst, *a, **k):
        if os.path.basename(os.fspath(dst)) == "merged" and _due():
            _die()
        return _replace(src, dst, *a, **k)
    os.replace = _hooked
elif _point == "upload_file":
    import s3fs
    _put = s3fs.S3FileSystem.put_file
    def _hooked(self, *a, **k):
        if _due():
            _die()
        return _put(self, *a, **k)
    s3fs.S3FileSystem.put_file = _hooked
elif _point == "upload_sums":
    import s3fs
    _pipe = s3fs.S3FileSystem.pipe_file
    def _hooked(self, path, *a, **k):
        if path.endswith("SHA256SUMS") and _due():
            _die()
        return _pipe(self, path, *a, **k)
    s3fs.S3FileSystem.pipe_file = _hooked
'''


def _kill_plan(rng: random.Random) -> list[tuple[str, str]]:
    """(stage, hook point) for each killed process, in order; the numbers are drawn as the run goes."""
    merge = ["merge_weights", "merge_rename", rng.choice(["merge_weights", "merge_rename"])]
    rng.shuffle(merge)
    return [("finetune", "train_step"), ("finetune", "checkpoint_state"), ("finetune", "train_step"),
            *[("merge", point) for point in merge],
            ("upload", "upload_file"), ("upload", "upload_sums"), ("upload", "upload_file")]


def _occurrence(point: str, root: Path, rng: random.Random, bucket_empty: bool) -> int:
    """Which call of the hooked function kills: always one the process is sure to reach."""
    done = last_complete_checkpoint(root / "checkpoints")
    step = int(done.name.split("-")[1]) if done else 0
    if point == "train_step":
        return rng.randint(1, STEPS - step)
    if point == "checkpoint_state":
        return rng.randint(1, (STEPS - step) // SAVE_STEPS)
    if point == "upload_file":  # a first upload sends 20 files; a rerun at least the grown log and the manifest
        return rng.randint(2, 12) if bucket_empty else rng.randint(1, 2)
    return 1


def _command(tiny_overrides: list[str]) -> list[str]:
    sets = [*tiny_overrides, f"training.max_steps={STEPS}", f"training.save_steps={SAVE_STEPS}",
            "training.save_total_limit=2", "training.eval_steps=4", f"infrastructure.output_bucket=s3://{S3_BUCKET}/team"]
    return [sys.executable, "-m", "medtune", "run", "--preset", "smollm2-135m-medical", "--run-id", "kill9",
            *[arg for item in sets for arg in ("--set", item)]]


def _check_complete_or_absent(root: Path, fs, url: str) -> None:
    """What a killed process leaves: every output present is whole; the bucket has no SHA256SUMS yet."""
    json.loads((root / "manifest.json").read_text())
    if (root / "adapters").exists():
        assert {p.name for p in (root / "adapters").iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                                  "README.md"}
        assert load_file(root / "adapters" / "adapter_model.safetensors")
    if (root / "merged").exists():
        assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= \
               {p.name for p in (root / "merged").iterdir()}
        assert "model.embed_tokens.weight" in load_file(root / "merged" / "model.safetensors")
    checkpoint = last_complete_checkpoint(root / "checkpoints")
    if checkpoint is not None:
        assert load_file(checkpoint / "adapter_model.safetensors")
        assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "scheduler.pt").is_file()
    assert not fs.exists(f"{url}/SHA256SUMS")  # the upload's completion mark is written last


def _hold_and_refuse_a_second_run(command: list[str], env: dict[str, str], root: Path, hold: Path,
                                  capsys) -> tuple[int, str]:
    """Two `medtune run` on one run directory: the second is refused in one line and writes nothing."""
    proc = subprocess.Popen(command, env={**env, "MEDTUNE_TEST_HOLD": str(hold)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not hold.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:] if proc.stderr else ""
        time.sleep(0.1)
    files = ("manifest.json", "config.yaml", "training.env", "logs/finetune.log")
    before = {name: (root / name).read_bytes() for name in files}
    capsys.readouterr()
    assert main(command[3:]) == 2  # the same `medtune run ...`, in this process
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: run directory {root} is in use by medtune process {proc.pid} on host "
                              f"{socket.gethostname()}; wait for it to finish"), err
    assert {name: (root / name).read_bytes() for name in files} == before
    proc.kill()
    return proc.wait(), proc.stderr.read()


@pytest.mark.e2e
def test_kill_9_anywhere_then_the_same_command_finishes(tiny_overrides, s3, tmp_path, capsys):
    rng = random.Random(SEED)
    root = Path(next(o for o in tiny_overrides if o.startswith("output.output_root=")).partition("=")[2]) \
        / "medical-finetune-kill9"
    url = f"{S3_BUCKET}/team/medical-finetune-kill9"
    hooks = tmp_path / "kill-hook"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(KILL_HOOK)
    command, fs = _command(tiny_overrides), s3.fs()
    stages_reached = []
    for stage, point in _kill_plan(rng):
        n = _occurrence(point, root, rng, bucket_empty=not fs.exists(url))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")]),
               "MEDTUNE_TEST_KILL": f"{point}:{n}"}
        if not stages_reached:  # the first process holds at its kill point while a second one is refused
            returncode, stderr = _hold_and_refuse_a_second_run(command, env, root, tmp_path / "holding", capsys)
        else:
            proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
            returncode, stderr = proc.returncode, proc.stderr
        assert returncode == -signal.SIGKILL, f"{point}:{n} did not kill (seed {SEED}): {stderr[-2000:]}"
        manifest = json.loads((root / "manifest.json").read_text())
        stages_reached.append((stage, set(manifest.get("stages", {}))))
        _check_complete_or_absent(root, fs, url)
        assert (root / ".lock").is_file()  # left behind by the killed process; the next one takes it over
    # Each kill happened in the stage it was meant for: the stage before it had finished, it had not
    # (the upload records itself in the manifest it then uploads, so there SHA256SUMS is the mark).
    before = {"finetune": "data", "merge": "finetune", "upload": "evaluate"}
    for stage, done in stages_reached:
        assert before[stage] in done and (stage not in done or stage == "upload"), (stage, done)

    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name for p in root.iterdir()} == RUN_ARTIFACTS
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "succeeded" and manifest["training"]["steps"] == STEPS
    assert manifest["validation"]["merge_check"]["passed"]
    history = [h["step"] for h in manifest["training"]["history"] if "loss" in h]
    assert history == list(range(1, STEPS + 1))  # no step skipped; none logged twice
    log = (root / "logs" / "finetune.log").read_text()
    assert log.count("is stale (that process is gone); taking it over") == 9
    sums = fs.cat_file(f"{url}/SHA256SUMS").decode().splitlines()
    for digest, name in (line.split("  ", 1) for line in sums):
        assert hashlib.sha256(fs.cat_file(f"{url}/{name}")).hexdigest() == digest, name
    assert {"adapters/adapter_model.safetensors", "merged/model.safetensors", "manifest.json"} <= \
           {line.split("  ", 1)[1] for line in sums}
