"""`medtune plan`: exact parameter counts, memory model sanity, offline speed for every preset."""

from __future__ import annotations

import time

import pytest

from medtune.cli import main
from medtune.config import PRESETS
from medtune.config_io import load_config
from medtune.plan import make_plan, memory_gib, parameter_counts
from medtune.plan_tables import KNOWN_SHAPES

# Published parameter counts of the presets' base models (their model cards / safetensors index).
PUBLISHED = {
    "meta-llama/Llama-3.1-8B-Instruct": 8_030_261_248,
    "meta-llama/Llama-3.1-70B-Instruct": 70_553_706_496,
    "mistralai/Mistral-7B-Instruct-v0.2": 7_241_732_096,
    "google/gemma-7b-it": 8_537_680_896,
    "meta-llama/Llama-2-7b-chat-hf": 6_738_415_616,
    "HuggingFaceTB/SmolLM2-135M-Instruct": 134_515_008,
}
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("model_id", sorted(PUBLISHED))
def test_known_shapes_give_published_parameter_counts(model_id):
    assert parameter_counts(KNOWN_SHAPES[model_id], 8, ALL)["total"] == PUBLISHED[model_id]


def test_counts_match_peft_on_a_real_model(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = load_config(overrides=["model.model_source=local", f"model.local_model_path={tiny_model_dir}",
                                 "lora.lora_r=4", "lora.target_modules=[q_proj, v_proj, down_proj]"])
    plan = make_plan(cfg, gpu="cpu")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert plan["model"]["parameters"] == model.num_parameters()
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    assert plan["model"]["lora_trainable"] == peft.get_nb_trainable_parameters()[0]
    assert str(tiny_model_dir) in plan["model"]["shape_source"]


def test_memory_model_orders_the_levers():
    def total(*overrides):
        cfg = load_config(preset="llama3-8b-medical", overrides=list(overrides))
        shape = KNOWN_SHAPES[cfg.model.base_model_id]
        counts = parameter_counts(shape, cfg.lora.lora_r, cfg.lora.target_modules)
        return memory_gib(cfg, shape, counts, "cuda", cfg.training.max_seq_length)

    q4, q8, full = total(), total("lora.quantization=8bit"), total("lora.quantization=none")
    assert q4["weights"] < q8["weights"] < full["weights"]
    assert 14.5 < full["weights"] < 15.5  # 8.03B parameters in 16 bits = 14.96 GiB
    no_gc = total("lora.gradient_checkpointing=false")
    assert no_gc["activations"] > 5 * q4["activations"]
    assert total("training.micro_batch_size=4")["activations"] == pytest.approx(4 * q4["activations"])


def test_plan_reports_when_it_does_not_fit(capsys):
    assert main(["plan", "--preset", "llama3-8b-medical", "--gpu", "A10", "--set", "lora.quantization=none",
                 "--set", "training.micro_batch_size=8"]) == 0
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert main(["plan", "--preset", "llama3-8b-medical", "--gpu", "TPU"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown --gpu 'TPU'; choose one of: cpu, H100-80GB")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_plans_offline_fast(preset, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert main(["plan", "--preset", preset, "--set", f"output.output_root={tmp_path}"]) == 0
    assert time.perf_counter() - start < 5
    out = capsys.readouterr().out
    assert "trainable parameters" in out and "#SBATCH --time=" in out and "#PBS -l walltime=" in out


def test_plan_uses_an_earlier_runs_data_report(tmp_path):
    import json

    from medtune.config_io import to_dict

    cfg = load_config(preset="llama3-8b-medical", overrides=[f"output.output_root={tmp_path}"])
    run = tmp_path / "medical-finetune-x"
    run.mkdir()
    report = {"train_examples": 1234, "train_tokens": 456789, "length_max": 900, "max_seq_length": 2048}
    (run / "manifest.json").write_text(json.dumps({"config": to_dict(cfg),
                                                   "stages": {"data": {"report": report}}}))
    plan = make_plan(cfg, gpu="H100")
    assert plan["data"]["tokens"] == 456789 and plan["sequence_tokens"] == 900
    assert plan["data"]["source"] == "data report of medical-finetune-x"
    assert plan["time"]["epoch_seconds"] == round(456789 / plan["throughput"]["tokens_per_second"])
