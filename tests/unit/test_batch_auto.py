"""`training.micro_batch_size: auto`: the largest micro batch the memory model fits on the card."""

from __future__ import annotations

import logging

import pytest

from medtune.batch_auto import BUDGETS, BUDGETS_RECOMPUTE, ROWS, resolve
from medtune.config_io import load_config
from medtune.plan import make_plan, memory_gib
from medtune.plan_memory import MicroBatch
from medtune.plan_tables import KNOWN_SHAPES
from medtune.recompute import HEADROOM, with_recompute

LLAMA_8B = KNOWN_SHAPES["meta-llama/Llama-3.1-8B-Instruct"]


def _cfg(*sets: str):
    return load_config(preset="llama3-8b-medical", overrides=["training.micro_batch_size=auto", *sets], env={})


def _peak(cfg, budget: int, recompute: bool, rows: int = 1, layout: str = "packed") -> float:
    return memory_gib(with_recompute(cfg, recompute, 1), LLAMA_8B, "cuda", MicroBatch(budget, rows, layout))["total"]


@pytest.mark.parametrize("memory, budget, recompute", [
    (139.8, 8192, False), (79.6, 8192, False),  # H200, H100 80GB: the measured best, 8,192-token bins without recompute
    (44.4, 8192, False),                        # a 48 GB card: the same, with the lean MLP (39.1 GiB estimated)
    (39.4, 4096, False),                        # a 40 GB card: smaller bins, still no recompute
    (22.0, 16384, True),                        # a 24 GB card: no bin fits without recompute; with it, 8 x 2048
    (11.0, 2048, True),                         # 11 GB free: the smallest, with recompute
    (8.0, 2048, True),                          # 8 GB free: none is estimated to fit, the smallest
])
def test_packed_auto_takes_the_largest_budget_without_recompute_then_with_it(memory, budget, recompute):
    cfg = _cfg()
    resolved, why = resolve(cfg, LLAMA_8B, "cuda", memory)
    t, limit = resolved.training, HEADROOM * memory
    assert (t.micro_batch_tokens, t.micro_batch_size) == (budget, budget // 2048)
    assert t.gradient_accumulation == cfg.training.gradient_accumulation  # accumulation stays as set
    assert resolved.lora.gradient_checkpointing == "auto"  # recompute.resolve still decides (partial) recompute
    assert why.startswith(f"auto: {budget}-token micro batches")
    # The choice is the largest that fits: without recompute first, then with it.
    no_gc = [k * 2048 for k in BUDGETS if _peak(cfg, k * 2048, False) <= limit]
    gc = [k * 2048 for k in BUDGETS_RECOMPUTE if _peak(cfg, k * 2048, True) <= limit]
    if no_gc:
        assert not recompute and budget == max(no_gc) and "without recompute fits" in why
    elif gc:
        assert recompute and budget == max(gc) and "with recompute fits" in why
    else:
        assert budget == 2048 and "none is estimated to fit" in why


def test_an_explicit_recompute_setting_is_kept_and_sized_for():
    resolved, why = resolve(_cfg("lora.gradient_checkpointing=true"), LLAMA_8B, "cuda", 79.6)
    assert resolved.training.micro_batch_tokens == 16384 and resolved.lora.gradient_checkpointing is True
    resolved, _ = resolve(_cfg("lora.gradient_checkpointing=false"), LLAMA_8B, "cuda", 22.0)
    assert resolved.training.micro_batch_tokens == 2048 and "none is estimated to fit" in _


def test_without_packing_auto_counts_rows_of_the_longest_length():
    cfg = _cfg("lora.packing=false", "training.micro_batch_tokens=0")
    for memory in (79.6, 22.0, 12.0):
        resolved, why = resolve(cfg, LLAMA_8B, "cuda", memory)
        rows = resolved.training.micro_batch_size
        fitting = [r for r in ROWS if _peak(cfg, r * 2048, True, r, "padded") <= HEADROOM * memory]
        assert rows == max(fitting, default=1) and resolved.training.micro_batch_tokens == 0
        assert why.startswith(f"auto: {rows} row")


@pytest.mark.parametrize("device, shape, memory, sets", [
    ("cpu", LLAMA_8B, None, ()),
    ("cuda", None, 79.6, ()),                                   # no config.json to read the shape from
    ("cuda", LLAMA_8B, 79.6, ("infrastructure.distributed=fsdp", "infrastructure.num_gpus=2")),
])
def test_without_a_gpu_to_size_against_auto_is_one_row(device, shape, memory, sets):
    resolved, why = resolve(_cfg("lora.packing=false", "training.micro_batch_tokens=0", *sets), shape, device, memory)
    assert (resolved.training.micro_batch_size, resolved.training.micro_batch_tokens) == (1, 0)
    assert why.startswith("auto: 1 row (sized to memory only on a CUDA GPU")
    # with token bins set, the bins stay as set and `auto` only sizes the evaluation batch
    resolved, why = resolve(_cfg(*sets), shape, device, memory)
    assert (resolved.training.micro_batch_size, resolved.training.micro_batch_tokens) == (1, 8192)
    assert "8192-token micro batches as set" in why


def test_a_number_is_kept():
    cfg = load_config(preset="llama3-8b-medical", overrides=["training.micro_batch_size=3"], env={})
    assert resolve(cfg, LLAMA_8B, "cuda", 79.6) == (cfg, "set in the config")


def test_plan_prints_the_choice_for_the_card():
    plan = make_plan(_cfg(), gpu="H100-80GB")
    assert plan["micro_batch"]["micro_batch_tokens"] == 8192 and plan["micro_batch"]["why"].startswith("auto: 8192")
    assert plan["recompute"]["on"] is False and plan["fits"]
    plan = make_plan(_cfg(), gpu="A10-24GB")
    assert plan["micro_batch"]["micro_batch_tokens"] == 16384 and plan["recompute"]["on"] is True


def test_the_training_path_decides_it_before_loading_and_logs_it(tiny_model_dir, caplog):
    from medtune.machine_fit import resolve_recompute

    cfg = load_config(preset="smollm2-135m-medical", overrides=[
        "training.micro_batch_size=auto", "training.device=cpu"], env={})
    with caplog.at_level(logging.INFO, logger="medtune.train"):
        resolved = resolve_recompute(cfg, str(tiny_model_dir))
    assert resolved.training.micro_batch_size == 1
    assert "micro batch (training.micro_batch_size) 1 row: auto: 1 row" in caplog.text


def test_a_resumed_run_keeps_the_micro_batch_its_checkpoints_were_trained_with(tiny_model_dir, tmp_path, caplog):
    from medtune.machine_fit import BATCH_PIN, pin_batch, resolve_recompute

    cfg = load_config(preset="smollm2-135m-medical", overrides=[
        "training.micro_batch_size=auto", "training.device=cpu", "lora.packing=true"], env={})
    first = resolve_recompute(cfg, str(tiny_model_dir), pin=tmp_path / BATCH_PIN)
    assert not (tmp_path / BATCH_PIN).exists()  # the training attempt writes it, with what it trains with
    trained = first.model_copy(update={"training": first.training.model_copy(
        update={"micro_batch_size": 3, "micro_batch_tokens": 2048, "gradient_accumulation": 5})})  # e.g. auto_fit
    pin_batch(trained, tmp_path)
    with caplog.at_level(logging.INFO, logger="medtune.train"):
        resumed = resolve_recompute(cfg, str(tiny_model_dir), pin=tmp_path / BATCH_PIN)
    t = resumed.training
    assert (t.micro_batch_size, t.micro_batch_tokens, t.gradient_accumulation) == (3, 2048, 5)
    assert "2048 tokens: auto: as this run's checkpoints were trained (resumed)" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == [BATCH_PIN]  # no temp file left behind
    # a number in the config is never overridden by the pin
    fixed = load_config(preset="smollm2-135m-medical", overrides=["training.micro_batch_size=2", "training.device=cpu"],
                        env={})
    assert resolve_recompute(fixed, str(tiny_model_dir), pin=tmp_path / BATCH_PIN).training.micro_batch_size == 2
