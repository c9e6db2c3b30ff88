"""The embedded default for real: SmolLM2-135M from its GGUF file and the bundled medical data."""

from __future__ import annotations

import json

import pytest

from medtune.cli import main
from medtune.presets import EMBEDDED_PRESET

pytestmark = pytest.mark.e2e


def test_embedded_preset_runs_end_to_end(tmp_path, capsys):
    args = ["run", "--preset", EMBEDDED_PRESET, "--run-id", "e2e",
            "--set", f"output.output_root={tmp_path / 'out'}", "--set", f"model.model_cache_dir={tmp_path / 'models'}",
            "--set", "dataset.max_samples=24", "--set", "training.max_steps=3",
            "--set", "evaluation.validation_questions=1", "--set", "evaluation.max_new_tokens=24",
            "--set", "evaluation.mcq_questions=4", "--set", "evaluation.probe_max_new_tokens=16"]
    assert main(args) == 0
    run = tmp_path / "out" / "medical-finetune-e2e"
    assert f"Outputs in {run}" in capsys.readouterr().out
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "succeeded"
    assert manifest["stages"]["model"]["source"] == "gguf" and len(manifest["stages"]["model"]["gguf_sha256"]) == 64
    assert manifest["stages"]["data"]["report"]["eval_examples"] == 30  # the bundled held-out file
    assert manifest["validation"]["merge_check"]["passed"]
    # The acceptance artifacts: eval results before/after, the answer sheet, the safety table, the report.
    assert manifest["training"]["eval_loss"] < manifest["training"]["base_eval_loss"]
    evaluation = manifest["evaluation"]
    assert evaluation["answers"][0]["greedy"]["tuned"]["text"] and evaluation["mcq"]["questions"] == 4
    assert len(evaluation["safety"]["rows"]) == evaluation["safety"]["summary"]["probes"]
    report = (run / "report.html").read_text()
    assert "Safety probes" in report and "Answers to held-out questions" in report
    merged_config = json.loads((run / "merged" / "config.json").read_text())
    assert merged_config["architectures"] == ["LlamaForCausalLM"] and merged_config["dtype"] == "bfloat16"
    tokenizer_config = (run / "merged" / "chat_template.jinja").read_text()
    assert "<|im_start|>" in tokenizer_config
    # The converted model is cached: a second run reuses it instead of converting again.
    cache = [p for p in (tmp_path / "models").iterdir() if p.is_dir() and p.name != "data-cache"]
    assert len(cache) == 1 and (cache[0] / "model.safetensors").is_file()
    assert (tmp_path / "models" / "medtune-base-eval.json").is_file()  # the base model's eval loss, cached
