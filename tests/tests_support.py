"""Paths the tests share (importable from test modules; conftest holds the fixtures)."""

from pathlib import Path

SHARED_DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "medical_mistral_instruct_dataset_short"

# Top-level entries of a finished run directory (the run-directory contract of rundir.py plus the
# resolved config, the data stage's output and the report).
RUN_ARTIFACTS = {"adapters", "merged", "logs", "training.env", "manifest.json", "summary.md", "config.yaml", "data",
                 "report.html"}
