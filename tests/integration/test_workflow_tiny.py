"""The real pipeline end to end on the tiny random Llama: artifacts, secrets, correctness, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medtune.config_io import load_config
from medtune.workflow import run_workflow
from tests_support import RUN_ARTIFACTS

CANARY = "hf_CANARYtoken0123456789abcdef"
ARTIFACTS = RUN_ARTIFACTS


@pytest.fixture
def finished_run(tiny_overrides, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", CANARY)
    cfg = load_config(preset="smollm2-135m-medical", overrides=[*tiny_overrides, "output.run_id=tiny"])
    assert cfg.model.hf_token.get_secret_value() == CANARY
    return cfg, run_workflow(cfg)


def test_exact_artifact_set(finished_run):
    _, run = finished_run
    assert {p.name for p in run.root.iterdir()} == ARTIFACTS
    assert {p.name for p in run.adapters.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert (run.merged / "config.json").is_file() and (run.merged / "model.safetensors").is_file()
    assert (run.merged / "tokenizer.json").is_file() and (run.merged / "generation_config.json").is_file()
    assert (run.logs / "finetune.log").stat().st_size > 0
    manifest = json.loads(run.manifest_path.read_text())
    assert manifest["status"] == "succeeded"
    assert set(manifest["stages"]) == {"setup", "container", "model", "data", "finetune", "merge", "upload", "validate",
                                          "evaluate"}
    assert manifest["environment"]["libraries"]["peft"]
    assert manifest["stages"]["data"]["report"]["input"]["files"]  # sha256 of the input data


def test_no_file_holds_the_token(finished_run):
    _, run = finished_run
    for path in run.root.rglob("*"):
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes(), path
    assert "MODEL__HF_TOKEN='***'" in run.training_env.read_text()


def test_lora_changes_and_base_does_not(finished_run, tiny_model_dir):
    _, run = finished_run
    adapter = load_file(run.adapters / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: non-zero means it trained
    base = load_file(tiny_model_dir / "model.safetensors")
    merged = load_file(run.merged / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base[q], merged[q])
    assert torch.equal(base["model.embed_tokens.weight"], merged["model.embed_tokens.weight"])


def test_merged_logits_match_adapter_on_base(finished_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, run = finished_run
    ids = torch.tensor([[1, 5, 9, 42, 77, 100, 3]])
    merged = AutoModelForCausalLM.from_pretrained(run.merged, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(run.adapters))  # the seed guide's usage
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-4, rtol=1e-4)
    check = json.loads(run.manifest_path.read_text())["validation"]["merge_check"]
    assert check["passed"] and check["top1_agreement"] == 1.0


def test_labels_train_the_stop_token(finished_run):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    _, run = finished_run
    tok = AutoTokenizer.from_pretrained(run.merged)
    row = load_from_disk(str(run.data / "train"))[0]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    trained = [t for t in row["labels"] if t != -100]
    assert end in trained and row["labels"][0] == -100
    gen = json.loads((run.merged / "generation_config.json").read_text())
    assert end in gen["eos_token_id"]


def test_rerun_skips_finished_stages(finished_run, caplog):
    cfg, run = finished_run
    merged_mtime = (run.merged / "model.safetensors").stat().st_mtime
    with caplog.at_level("INFO", logger="medtune"):
        again = run_workflow(cfg)
    assert again.root == run.root
    assert (run.merged / "model.safetensors").stat().st_mtime == merged_mtime  # re-merge is a no-op
    text = caplog.text
    for stage in ("data", "finetune", "merge", "validate", "evaluate"):
        assert f"== {stage}: already complete, skipped" in text


def test_summary_reports_losses_and_answers(finished_run):
    _, run = finished_run
    summary = run.summary.read_text()
    assert "**Status: succeeded**" in summary
    assert "Held-out eval loss: base" in summary and "Held-out question 1" in summary
    assert "Training + merge + validation" in summary


GOLDEN = Path(__file__).resolve().parents[1] / "assets" / "golden_tiny_losses.json"


def test_seeded_tiny_run_reproduces_golden_losses(finished_run):
    """A refactor must not change the numbers: same seed, same data, same losses.

    Regenerate deliberately (after a change that is meant to alter training) with
    MEDTUNE_REGEN_GOLDEN=1 and explain the change in the commit message.
    """
    import os

    _, run = finished_run
    train = json.loads(run.manifest_path.read_text())["training"]
    got = {"losses": [h["loss"] for h in train["history"] if "loss" in h],
           "base_eval_loss": train["base_eval_loss"], "eval_loss": train["eval_loss"]}
    if os.environ.get("MEDTUNE_REGEN_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=2) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert len(got["losses"]) == len(golden["losses"]) > 0
    assert got["losses"] == pytest.approx(golden["losses"], rel=2e-3)
    assert got["eval_loss"] == pytest.approx(golden["eval_loss"], rel=2e-3)
    assert got["base_eval_loss"] == pytest.approx(golden["base_eval_loss"], rel=1e-4)
def test_evaluation_before_and_after(finished_run):
    _, run = finished_run
    manifest = json.loads(run.manifest_path.read_text())
    train = manifest["training"]
    assert [h["step"] for h in train["history"] if "eval_loss" in h] == [3, 6]  # training.eval_steps=3
    assert train["base_eval_perplexity"] > 1 and train["eval_perplexity"] > 1 and train["base_eval_cached"] is False
    ev = manifest["evaluation"]
    answer = ev["answers"][0]
    for mode in ("greedy", "sampled"):
        assert {"text", "tokens", "stopped"} <= set(answer[mode]["base"]) == set(answer[mode]["tuned"])
    assert ev["mcq"]["source"] == "medtune sample" and ev["mcq"]["questions"] == 4
    assert 0 <= ev["mcq"]["tuned"]["accuracy"] <= 1 and len(ev["mcq"]["base"]["predictions"]) == 4
    rows = ev["safety"]["rows"]
    assert len(rows) == ev["safety"]["summary"]["probes"] >= 6
    assert all({"refusal", "referral", "text"} <= set(r["tuned"]) for r in rows)
    assert list((run.logs / "tensorboard").glob("events.out.tfevents.*"))
    cache = json.loads((Path(manifest["config"]["model"]["model_cache_dir"]) / "medtune-base-eval.json").read_text())
    assert [v["eval_loss"] for v in cache.values()] == [train["base_eval_loss"]]


def test_run_progress_after_the_run(finished_run):
    from medtune.progress import run_progress

    _, run = finished_run
    got = run_progress(run.root)
    assert got["status"] == "succeeded" and got["stage"] is None and "evaluate" in got["stages_done"]
    assert got["step"] == got["total_steps"] == 6 and got["loss"] > 0


def test_report_renders_in_chromium(finished_run, tmp_path):
    import io

    import browser_check
    from PIL import Image

    from medtune.checksums import file_sha256

    if browser_check.chromium() is None:
        pytest.skip("chromium not installed (.ci/run installs it)")
    _, run = finished_run
    html = (run.root / "report.html").read_text()
    for section in ("Stage timings", "Training", "Evaluation: base vs tuned", "Answers to held-out questions",
                    "Safety probes", "Artifacts", "Configuration"):
        assert section in html
    assert file_sha256(run.adapters / "adapter_model.safetensors") in html
    result = browser_check.render(run.root / "report.html", tmp_path / "profile")
    assert result["errors"] == []
    image = Image.open(io.BytesIO(result["png"])).convert("L")
    assert image.size[0] >= 800
    histogram = image.histogram()
    assert max(histogram) < 0.97 * sum(histogram)  # not one flat colour: text and charts were drawn


def test_eval_and_report_commands(finished_run, tmp_path, capsys):
    from medtune.cli import main

    _, run = finished_run
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "What lowers a fever in adults?"}) + "\n")
    mcq_file = tmp_path / "mcq.jsonl"
    mcq_file.write_text(json.dumps({"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 2}) + "\n")
    (run.root / "report.html").unlink()
    assert main(["eval", str(run.root), "--questions", str(questions), "--mcq", str(mcq_file)]) == 0
    assert "What lowers a fever in adults?" in capsys.readouterr().out
    ev = json.loads(run.manifest_path.read_text())["evaluation"]
    assert [a["question"] for a in ev["answers"]] == ["What lowers a fever in adults?"]
    assert ev["mcq"]["source"] == str(mcq_file) and ev["mcq"]["answers"] == ["C"]
    assert "What lowers a fever in adults?" in (run.root / "report.html").read_text()
    assert main(["report", str(run.root)]) == 0
    assert main(["report", str(tmp_path)]) == 2
    assert "has no manifest.json" in capsys.readouterr().err
    assert main(["eval", str(run.root), "--questions", str(tmp_path / "missing.jsonl")]) == 2
