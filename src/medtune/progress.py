"""Live training progress: a rich bar on a terminal, one plain line per logging step everywhere else,
and `logs/progress.json` (rewritten atomically) so other processes can see where a run is.

`run_progress(run_dir)` is the reader: the current stage, step/total and the last losses, from
manifest.json and progress.json only (no imports of torch or the stages, safe to call from a
scheduler-status command or a login node).
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from medtune.rundir import write_text

log = logging.getLogger("medtune.train")

PROGRESS_FILE = "progress.json"
PIPELINE = ("setup", "container", "model", "data", "finetune", "merge", "upload", "validate", "evaluate")


def peak_memory_gib(device: str) -> float:
    """Peak GPU memory allocated by torch, or the process's peak resident memory on CPU."""
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class ProgressLog(TrainerCallback):
    """step/total, loss, lr, tok/s, ETA and peak memory at every logging step (and eval losses)."""

    def __init__(self, logs_dir: Path, device: str, tty: bool | None = None) -> None:
        self.path = logs_dir / PROGRESS_FILE
        self.device = device
        self.start = time.perf_counter()
        self.samples: list[dict[str, Any]] = []
        self.last: dict[str, Any] = {}
        self.bar: Any = None
        self.task: Any = None
        self.tty = sys.stderr.isatty() if tty is None else tty

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.start = time.perf_counter()
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("finetune"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                                TimeRemainingColumn(), transient=True)
            self.task = self.bar.add_task("finetune", total=state.max_steps, completed=state.global_step, info="")
            self.bar.start()
        self._write(state, "running")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=state.global_step, info=self._info(state))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        self._write(state, "done")

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if not logs or not ("loss" in logs or "eval_loss" in logs):
            return
        elapsed = time.perf_counter() - self.start
        tok_s = state.num_input_tokens_seen / elapsed if elapsed > 0 else math.nan
        sample = {"step": state.global_step, "seconds": round(elapsed, 1), "tokens_per_second": round(tok_s, 1),
                  "peak_memory_gib": round(peak_memory_gib(self.device), 3)}
        if "eval_loss" in logs:
            self.last["eval_loss"] = logs["eval_loss"]
            if not state.max_steps:
                return  # the base model's evaluation before training: train.py logs it
            log.info("step %d/%d eval loss %.4f (perplexity %.2f)", state.global_step, state.max_steps,
                     logs["eval_loss"], math.exp(min(logs["eval_loss"], 50)))
        else:
            self.last["loss"] = logs["loss"]
            self.samples.append(sample)
            eta = elapsed / max(state.global_step, 1) * (state.max_steps - state.global_step)
            log.info("step %d/%d loss %.4f lr %.2e %.0f tok/s eta %s", state.global_step, state.max_steps, logs["loss"],
                     logs.get("learning_rate", math.nan), tok_s, time.strftime("%H:%M:%S", time.gmtime(eta)))
        self._write(state, "running")

    def _info(self, state: Any) -> str:
        elapsed = time.perf_counter() - self.start
        tok_s = state.num_input_tokens_seen / elapsed if elapsed > 0 else 0.0
        loss = self.last.get("loss")
        return (f"loss {loss:.4f} " if loss is not None else "") + f"{tok_s:.0f} tok/s"

    def _write(self, state: Any, status: str) -> None:
        data = {"status": status, "step": state.global_step, "total_steps": state.max_steps,
                "tokens": int(state.num_input_tokens_seen), "updated": time.time(), **self.last,
                "elapsed_seconds": round(time.perf_counter() - self.start, 1)}
        try:
            write_text(self.path, json.dumps(data, indent=2) + "\n")
        except OSError as exc:  # progress reporting must never stop training
            log.debug("progress file not written: %s", exc)


def run_progress(run_dir: str | Path) -> dict[str, Any]:
    """Where a run is: {"status", "stage", "stages_done", "step", "total_steps", "loss", "eval_loss", ...}.

    `stage` is the first pipeline stage not yet recorded as done (None when the run has finished).
    """
    root = Path(run_dir)
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    stages = manifest.get("stages", {})
    done = [s for s in PIPELINE if stages.get(s, {}).get("status") == "done"]
    status = manifest.get("status", "not started")
    current = None if status in ("succeeded", "failed") else next((s for s in PIPELINE if s not in done), None)
    out: dict[str, Any] = {"run_dir": str(root), "status": status, "stage": current, "stages_done": done,
                           "step": None, "total_steps": None, "loss": None, "eval_loss": None}
    progress_path = root / "logs" / PROGRESS_FILE
    if progress_path.is_file():
        progress = json.loads(progress_path.read_text())
        out.update({k: progress.get(k) for k in ("step", "total_steps", "loss", "eval_loss", "tokens", "updated")})
    if manifest.get("error"):
        out["error"] = manifest["error"]
    return out
