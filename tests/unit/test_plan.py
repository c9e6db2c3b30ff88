"""`medtune plan`: exact parameter counts, memory model sanity, offline speed for every preset."""

from __future__ import annotations

import dataclasses

import math
import time

import pytest

from medtune.cli import main
from medtune.presets import PRESETS
from medtune.config_io import load_config
from medtune.plan import make_plan, parameter_counts, recipe, throughput
from medtune.plan_batches import first_micro_batch_rows, mean_above, planned_micro_batch, steps_per_epoch
from medtune.plan_memory import MicroBatch, Recipe, estimate, layer_saved_bytes, static_bytes
from medtune.plan_tables import CARDS, KNOWN_SHAPES
from medtune.token_bins import MEASURED_FILL

L8B = KNOWN_SHAPES["meta-llama/Llama-3.1-8B-Instruct"]
GIB = 2**30

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


def _recipe(*overrides, device="cuda"):
    # the memory recipe does not depend on how micro batches are cut; row batches let packing be switched off
    return recipe(load_config(preset="llama3-8b-medical", overrides=["training.micro_batch_tokens=0", *overrides]), device)


def test_weights_by_quantization():
    q4, q8, full = (static_bytes(L8B, _recipe(f"lora.quantization={q}"))["weights"] / GIB
                    for q in ("4bit", "8bit", "none"))
    assert q4 < q8 < full
    assert full == pytest.approx(8_030_261_248 * 2 / GIB)
    # 6.98B projection weights at 4.127 bits + 1.05B embedding/lm_head/norm parameters in bf16
    assert q4 == pytest.approx(3.354 + 1.957, abs=0.01)
    upcast = static_bytes(L8B, Recipe("4bit", 64, ALL, 0.05, upcast_frozen=True))["weights"] / GIB
    assert upcast == pytest.approx(q4 + 1.957, abs=0.01)  # prepare_model_for_kbit_training's fp32 copies


def test_lora_states_are_fp32_weights_grads_and_adam():
    r = _recipe()
    assert static_bytes(L8B, r)["lora"] == 167_772_160 * 16
    assert static_bytes(L8B, _recipe("training.optimizer=adamw_8bit"))["lora"] == 167_772_160 * 10


def test_packed_batches_count_row_tokens_and_padded_batches_pad_to_the_longest():
    cfg = load_config(preset="llama3-8b-medical", overrides=["training.micro_batch_size=26", "lora.packing=true",
                                                             "training.gradient_accumulation=4",
                                                             "training.micro_batch_tokens=0"])
    flat = {"rows": 1000, "tokens": 300_000, "length_quantiles": [(0.5, 300), (1.0, 300)]}
    assert planned_micro_batch(cfg, flat, "cuda") == MicroBatch(26 * 300, 26, "packed")  # sum of row tokens
    assert planned_micro_batch(cfg, {**flat, "length_quantiles": None}, "cuda").tokens == 26 * 300  # the mean
    padded = load_config(preset="llama3-8b-medical", overrides=["training.micro_batch_size=4", "lora.packing=false",
                                                                "training.micro_batch_tokens=0"])
    one = {**flat, "length_quantiles": [(1.0, 1001)]}
    assert planned_micro_batch(padded, one, "cuda") == MicroBatch(4 * 1008, 4, "padded")  # rows x longest, to 8
    assert planned_micro_batch(padded, one, "cpu").tokens == 4 * 1001
    assert planned_micro_batch(padded, {**flat, "length_quantiles": [(1.0, 9000)]}, "cuda").tokens == 4 * 2048


def test_token_bins_plan_the_budget_as_the_micro_batch_and_steps_from_tokens():
    cfg = load_config(preset="llama3-8b-medical", overrides=["training.micro_batch_tokens=16384",
                                                             "training.gradient_accumulation=2"])
    data = {"rows": 10_000, "tokens": 2_500_000, "length_quantiles": [(0.5, 200), (1.0, 2048)]}
    assert planned_micro_batch(cfg, data, "cuda") == MicroBatch(16384, round(16384 / 250), "packed")
    bins = math.ceil(2_500_000 / (16384 * MEASURED_FILL))  # 153 bins of ~16.35k tokens
    assert steps_per_epoch(cfg, data, 1) == math.ceil(bins / 2) == 77
    assert steps_per_epoch(cfg, data, 2) == math.ceil(bins / 4) == 39
    two = load_config(preset="llama3-8b-medical", overrides=["training.micro_batch_tokens=16384",
                                                             "training.gradient_accumulation=2",
                                                             "infrastructure.num_gpus=2"])
    plan = make_plan(two, gpu="H100", rows=10_000)
    mean = round(plan["data"]["tokens"] / plan["data"]["rows"])
    assert plan["micro_batch"] == {"tokens": 16384, "rows": round(16384 / mean), "layout": "packed",
                                   "why": "set in the config", "micro_batch_size": 16, "micro_batch_tokens": 16384}
    per_step = 16384 * MEASURED_FILL * 2 * 2
    assert plan["time"]["steps_per_epoch"] == math.ceil(math.ceil(plan["data"]["tokens"] / (16384 * MEASURED_FILL)) / 4)
    assert plan["time"]["steps_per_epoch"] == pytest.approx(plan["data"]["tokens"] / per_step, abs=1)


def test_first_micro_batch_of_a_length_grouped_epoch():
    """The shared medical set's percentiles give the first micro batch the sampler replay measures:
    27,881 tokens at 26 rows x 4 steps, 18,615 at 13 x 8 (bench/plan_vs_measured.py's replay)."""
    knots = [(0.5, 219), (0.9, 515), (0.95, 659), (0.99, 1471), (1.0, 2048)]
    assert first_micro_batch_rows(knots, 1800, 26, 4, 2048)[0] == pytest.approx(27_881, rel=0.1)
    assert first_micro_batch_rows(knots, 1800, 13, 8, 2048)[0] == pytest.approx(18_615, rel=0.1)
    assert mean_above([(0.5, 100), (1.0, 300)], 0.5) == pytest.approx(200)
    assert first_micro_batch_rows(knots, 1800, 26, 4, 512)[0] == 26 * 512  # rows are cut at max_seq_length


def test_activation_levers():
    batch = MicroBatch(8192, 26, "packed")
    gc, no_gc = _recipe("lora.packing=true"), _recipe("lora.packing=true", "lora.gradient_checkpointing=false")
    with_gc, without = estimate(L8B, gc, batch), estimate(L8B, no_gc, batch)
    assert without["activations"] > 5 * with_gc["activations"]
    # activations grow linearly with the tokens of a packed micro batch
    assert layer_saved_bytes(L8B, gc, MicroBatch(2 * 8192, 52)) == pytest.approx(2 * layer_saved_bytes(L8B, gc, batch))
    # PEFT's LoRA keeps a dropped copy and a mask per projection; medtune's fused backward (the default) the
    # shared inputs once, as PEFT does without dropout, and with the lean MLP not the down projection's input
    peft = _recipe("lora.packing=true", "training.fused_lora=false")
    peft_no_dropout = _recipe("lora.packing=true", "training.fused_lora=false", "lora.lora_dropout=0")
    assert layer_saved_bytes(L8B, peft_no_dropout, batch) < layer_saved_bytes(L8B, peft, batch)
    assert gc.fused_backward and gc.lean_mlp and not peft.fused_backward and not peft.lean_mlp
    without_lean = dataclasses.replace(gc, lean_mlp=False)
    assert layer_saved_bytes(L8B, without_lean, batch) == layer_saved_bytes(L8B, peft_no_dropout, batch)
    assert layer_saved_bytes(L8B, without_lean, batch) - layer_saved_bytes(L8B, gc, batch) == 14336 * 2 * 8192
    # without Liger the loss holds fp32 logits: tokens x vocab x 12 bytes
    no_liger = estimate(L8B, _recipe("lora.packing=true", "training.liger_kernels=false"), batch)
    assert no_liger["peak_moment"] == "loss" and no_liger["transient"] >= 8192 * 128256 * 12 / GIB
    assert with_gc["transient"] < 1.5  # no logits: 8,192 x 128,256 of them in 16 bits alone are 1.96 GiB
    # SDPA given a padding mask keeps a bias per layer and repeated k/v; flash-style kernels do not;
    # medtune_varlen's k/v copies were kept repeated to every head on PyTorch <= 2.11 (keys_repeated); the
    # attention now keeps them unrepeated (medtune.attention.keep_unrepeated)
    padded = MicroBatch(16 * 608, 16, "padded")
    flash = layer_saved_bytes(L8B, Recipe("4bit", 64, ALL, 0.05, attention="flash_attention_2"), padded)
    sdpa = layer_saved_bytes(L8B, _recipe("lora.packing=false", "training.attn_implementation=sdpa",
                                          "training.fused_lora=false"), padded)  # as the Recipe beside it
    assert sdpa > flash
    varlen = layer_saved_bytes(L8B, Recipe("4bit", 64, ALL, 0.05, attention="medtune_varlen", keys_repeated=True),
                               batch)
    assert varlen - layer_saved_bytes(L8B, Recipe("4bit", 64, ALL, 0.05, attention="flash"), batch) == \
        2 * (4096 - 1024) * 2 * 8192
    assert layer_saved_bytes(L8B, Recipe("4bit", 64, ALL, 0.05, attention="medtune_varlen"), batch) == \
        layer_saved_bytes(L8B, Recipe("4bit", 64, ALL, 0.05, attention="flash"), batch)


FLEX = "training.attn_implementation=flex_attention"
# Measured peaks (torch max_memory_allocated, H200) and what their largest timed micro batch held
# (bench/plan_vs_measured.py replays the sampler): the model must stay within the issue's ±20%.
# Runs before the fused LoRA backward became the default kept PEFT's dropout copies: modelled as fused_lora=false.
PEFT_BACKWARD = "training.fused_lora=false"
MEASURED = [
    ("2026-11-28-h200-c.jsonl medtune_qlora_packed_nogc", (FLEX, "lora.gradient_checkpointing=false", PEFT_BACKWARD),
     MicroBatch(4318, 13, "packed"), 35.13),
    ("2026-11-28-h200-c.jsonl medtune_qlora_packed", (FLEX, PEFT_BACKWARD), MicroBatch(8392, 26, "packed"), 11.61),
    ("2026-11-28-h200-c.jsonl medtune_bf16_packed", (FLEX, "lora.quantization=none", PEFT_BACKWARD),
     MicroBatch(8392, 26, "packed"), 22.06),
    ("2026-11-28-h200-a.jsonl medtune_qlora_mb16", ("lora.packing=false", "training.attn_implementation=sdpa",
                                                     PEFT_BACKWARD), MicroBatch(9728, 16, "padded"), 12.18),
    # token-bin micro batches, no recompute: what `gradient_checkpointing: auto` relies on; fused forward only
    ("2026-11-28-h200-n.jsonl bins_nogc", ("lora.gradient_checkpointing=false", PEFT_BACKWARD),
     MicroBatch(8192, 1, "packed"), 63.29),
    ("2026-11-28-h200-n.jsonl bins_nogc4k", ("lora.gradient_checkpointing=false", PEFT_BACKWARD),
     MicroBatch(4096, 1, "packed"), 35.78),
    # ... and with the fused LoRA backward, the default since
    ("2026-11-28-h200-z.jsonl bins_nogc_fbw_short", ("lora.gradient_checkpointing=false",),
     MicroBatch(8192, 1, "packed"), 46.25),
    ("2026-11-28-h200-ae.jsonl bins_nogc4k_fbw", ("lora.gradient_checkpointing=false",),
     MicroBatch(4096, 1, "packed"), 27.24),
]


# ... and since medtune.lean_mlp and attention.keep_unrepeated (the lines above ran before them: on the
# device's PyTorch 2.11 every layer kept k and v repeated, and every MLP the down projection's input)
MEASURED_LEAN = [
    ("2026-11-28-h200-ag.jsonl bins_nogc", ("lora.gradient_checkpointing=false",), MicroBatch(8192, 1, "packed"), 36.25),
    ("2026-11-28-h200-ai.jsonl bins_nogc_dropout0", ("lora.gradient_checkpointing=false", "lora.lora_dropout=0"),
     MicroBatch(8192, 1, "packed"), 36.03),
    ("2026-11-28-h200-ai.jsonl fast20", ("lora.gradient_checkpointing=false", "lora.packing=true"),
     MicroBatch(31048, 26, "packed"), 113.80),
]


# ... and since medtune.lora_dropout's kernels
MEASURED_NOW = [
    ("2026-11-28-h200-ak.jsonl bins_nogc", ("lora.gradient_checkpointing=false",), MicroBatch(8192, 1, "packed"), 36.03),
    ("2026-11-28-h200-ak.jsonl fast20", ("lora.gradient_checkpointing=false", "lora.packing=true"),
     MicroBatch(31048, 26, "packed"), 112.68),
]
# What each list's code did differently from today's, as the memory model's recipe fields
CASES = [(*m, {"lean_mlp": False, "keys_repeated": True, "dropout_kernels": False}) for m in MEASURED] \
    + [(*m, {"dropout_kernels": False}) for m in MEASURED_LEAN] + [(*m, {}) for m in MEASURED_NOW]


@pytest.mark.parametrize("source, overrides, batch, measured, then", CASES, ids=[c[0] for c in CASES])
def test_estimate_is_within_20_percent_of_measured_peaks(source, overrides, batch, measured, then):
    r = dataclasses.replace(_recipe(*overrides), **then)
    assert estimate(L8B, r, batch)["total"] == pytest.approx(measured, rel=0.2)


def test_throughput_matches_recipe_then_micro_batch_and_can_leave_a_run_out():
    h200, params = CARDS["H200-141GB"], 8_030_261_248

    def tps(rec, packing, tokens, card=h200, exclude=""):
        return throughput(rec, packing, tokens, "cuda", card, params, exclude=exclude)

    packed = _recipe("lora.packing=true", FLEX)
    assert tps(packed, True, 5360)["tokens_per_second"] == pytest.approx(5168, rel=1e-3)
    own = "bench/results/2026-11-28-h200-c.jsonl medtune_qlora_packed"
    assert f"({own})" not in tps(packed, True, 5360, exclude=own)["anchor"]
    # varlen is measured: its own figure at the nearest micro batch, never FlexAttention's
    varlen = tps(_recipe("lora.packing=true"), True, 9582)
    assert varlen["tokens_per_second"] == pytest.approx(7335, rel=1e-3) and "h200-d.jsonl fast20" in varlen["anchor"]
    # a fused kernel not measured for this recipe borrows another fused kernel's figure, not SDPA's
    flex_bf16 = tps(_recipe("lora.packing=true", "lora.quantization=none", FLEX), True, 5360)
    assert flex_bf16["tokens_per_second"] == pytest.approx(5891, rel=1e-3)
    padded = _recipe("lora.packing=false", "training.attn_implementation=sdpa")
    assert tps(padded, False, 2000)["tokens_per_second"] == pytest.approx(2103, rel=1e-3)
    assert tps(padded, False, 7000)["tokens_per_second"] == pytest.approx(4579, rel=1e-3)
    eight = tps(_recipe("lora.quantization=8bit", "lora.packing=false"), False, 2000, card=CARDS["A100-80GB"])
    assert eight["tokens_per_second"] == pytest.approx(2103 * 312 / 989, rel=1e-3)


def test_plan_reports_when_it_does_not_fit(capsys):
    assert main(["plan", "--preset", "llama3-8b-medical", "--gpu", "A10", "--set", "lora.quantization=none",
                 "--set", "training.micro_batch_size=8", "--set", "lora.packing=false",
                 "--set", "training.micro_batch_tokens=0"]) == 0
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

    cfg = load_config(preset="llama3-8b-medical", overrides=[f"output.output_root={tmp_path}", "lora.packing=false",
                                                                 "training.micro_batch_tokens=0"])
    run = tmp_path / "medical-finetune-x"
    run.mkdir()
    report = {"train_examples": 1234, "train_tokens": 456789, "length_max": 900, "max_seq_length": 2048}
    (run / "manifest.json").write_text(json.dumps({"config": to_dict(cfg),
                                                   "stages": {"data": {"report": report}}}))
    plan = make_plan(cfg, gpu="H100")
    # padded micro batches are sized by the longest row, padded to a multiple of 8 as the collator does
    assert plan["data"]["tokens"] == 456789 and plan["micro_batch"]["tokens"] == cfg.training.micro_batch_size * 904
    assert plan["data"]["source"] == "data report of medical-finetune-x"
    assert plan["time"]["epoch_seconds"] == round(456789 / plan["throughput"]["tokens_per_second"])
