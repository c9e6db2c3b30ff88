"""`medtune status`: where a run is — stage, step/total, last loss — and what its scheduler says.

Everything comes from the run directory: manifest.json (stages, final metrics, job id), the
progress lines in logs/finetune.log (the newest step), and the last complete checkpoint's
trainer_state.json (when the log has none yet, e.g. a requeued job before its first step).
"""

from __future__ import annotations

import json
import re
from typing import Any

from medtune.cleanup import STAGE_ORDER
from medtune.preemption import last_complete_checkpoint
from medtune.rundir import RunDir

STEP_LINE = re.compile(r"step (\d+)/(\d+) loss ([0-9.]+|nan)")


def run_status(run: RunDir) -> dict[str, Any]:
    manifest = run.manifest()
    stages = manifest.get("stages", {})
    pending = [s for s in STAGE_ORDER if stages.get(s, {}).get("status") != "done"]
    info: dict[str, Any] = {"run_id": run.run_id, "run_dir": str(run.root), "status": manifest.get("status", "unknown"),
                            "stage": pending[0] if pending and manifest.get("status") != "succeeded" else "done"}
    info.update(_progress(run, manifest))
    scheduler = manifest.get("scheduler")
    if scheduler:
        from medtune.launch.submit import SCHEDULERS

        info["scheduler"] = scheduler["kind"]
        info["job_id"] = scheduler["job_id"]
        info["job_state"] = SCHEDULERS[scheduler["kind"]].job_state(scheduler["job_id"]) or "unknown (not in queue)"
    return info


def _progress(run: RunDir, manifest: dict[str, Any]) -> dict[str, Any]:
    training = manifest.get("training", {})
    if "steps" in training:
        losses = [h["loss"] for h in training.get("history", []) if "loss" in h]
        return {"step": training["steps"], "total_steps": training["steps"], "last_loss": losses[-1] if losses else None}
    if run.log_file.is_file():
        found = STEP_LINE.findall(run.log_file.read_text(errors="replace"))
        if found:
            step, total, loss = found[-1]
            return {"step": int(step), "total_steps": int(total), "last_loss": float(loss)}
    checkpoint = last_complete_checkpoint(run.checkpoints)
    if checkpoint is not None:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        losses = [h["loss"] for h in state.get("log_history", []) if "loss" in h]
        return {"step": state["global_step"], "total_steps": state["max_steps"],
                "last_loss": losses[-1] if losses else None}
    return {}
