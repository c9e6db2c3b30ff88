"""Paths the tests share (importable from test modules; conftest holds the fixtures)."""

from pathlib import Path

SHARED_DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "medical_mistral_instruct_dataset_short"
