"""Runs that survive: stop cleanly on SIGTERM/SIGUSR1 and find the checkpoint to resume from.

Slurm sends SIGTERM before it preempts or cancels a job, and the signal chosen with `--signal`
(medtune's scripts use SIGUSR1) before the time limit. Either one asks training to save a
checkpoint at the next optimizer-step boundary and stop; the process then exits with
`EXIT_PREEMPTED` (75, EX_TEMPFAIL: "try again later"), which the batch scripts turn into a requeue.
A checkpoint counts as complete only once the Trainer has written its `trainer_state.json`, the
last file of a checkpoint; folders without it were cut off mid-save and are removed before resuming.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from medtune.errors import MedtuneError

log = logging.getLogger("medtune.train")

EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class Preempted(MedtuneError):
    """Training stopped on a signal after saving a checkpoint; rerunning resumes it."""

    exit_code = EXIT_PREEMPTED


class StopOnSignal(TrainerCallback):
    """On SIGTERM/SIGUSR1: save a checkpoint at the next step boundary, then end training.

    Under data parallelism every rank must stop at the same step (a rank that stops alone leaves
    the others waiting in a collective), so the ranks agree through one tiny all-reduce per step.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.stopped_at: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopOnSignal:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only set a flag: saving from inside a signal handler could interrupt a half-done step.
        self.signal_name = signal.Signals(signum).name

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.stopped_at is None and any_rank(self.signal_name is not None, args):
            self.signal_name = self.signal_name or "a signal to another rank"
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
            log.warning("finetune: %s received: saving a checkpoint at step %d and stopping",
                        self.signal_name, state.global_step)


def any_rank(flag: bool | torch.Tensor, args: Any) -> bool:
    """Whether `flag` holds on any rank: ranks that stop training must stop at the same step."""
    if args.world_size > 1 and torch.distributed.is_initialized():
        tensor = torch.as_tensor(flag, device=args.device).to(torch.int32).reshape(1)
        torch.distributed.all_reduce(tensor)  # SUM of 0/1 flags: non-zero when any rank has it
        flag = tensor
    return bool(flag)  # note: on a GPU tensor, a CPU-GPU sync point, once per optimizer step


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The newest `checkpoint-N` with its trainer_state.json; None when there is none."""
    complete = [p for p in _checkpoints(folder) if _complete(p)]
    return complete[-1] if complete else None


def _complete(checkpoint: Path) -> bool:
    """trainer_state.json is written last, but in place: a kill while writing it leaves half a JSON file."""
    try:
        return "global_step" in json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False


def remove_incomplete_checkpoints(folder: Path) -> None:
    for path in _checkpoints(folder):
        if not _complete(path):
            log.warning("finetune: removing %s (cut off while being saved)", path.name)
            shutil.rmtree(path, ignore_errors=True)


def _checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]
