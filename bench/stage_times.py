"""Stage times of one `medtune run`, from its manifest: one JSON line.

Usage: python bench/stage_times.py RUN_DIR EXIT_CODE START_EPOCH END_EPOCH
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(run_dir: str, rc: str, start: str, end: str) -> None:
    manifest_path = Path(run_dir) / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    stages = {name: info.get("seconds") for name, info in manifest.get("stages", {}).items()}
    training = manifest.get("training", {})
    core = sum(stages.get(s) or 0 for s in ("setup", "container", "model", "data", "finetune", "merge"))
    print(json.dumps({
        "run": "e2e_quick_preset", "exit_code": int(rc), "status": manifest.get("status"),
        "wall_seconds": round(float(end) - float(start), 1), "stage_seconds": stages,
        "load_train_merge_save_seconds": round(core, 1),
        "train_rows": manifest.get("stages", {}).get("data", {}).get("report", {}).get("train_examples"),
        "steps": training.get("steps"), "tokens": training.get("tokens"),
        "tokens_per_second": training.get("tokens_per_second"), "peak_memory_gib": training.get("peak_memory_gib"),
        "train_seconds": training.get("train_seconds"), "train_loss": training.get("train_loss"),
        "error": manifest.get("error"),
    }), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
