"""`lora.gradient_checkpointing: auto`: recompute off only where the memory model says the card has room."""

from __future__ import annotations

import pytest

from medtune.config_io import load_config
from medtune.plan_tables import KNOWN_SHAPES
from medtune.recompute import resolve

LLAMA_8B = KNOWN_SHAPES["meta-llama/Llama-3.1-8B-Instruct"]


def _cfg(*sets: str):
    return load_config(preset="llama3-8b-medical", overrides=list(sets), env={})


def test_the_gpu_presets_leave_it_to_auto_with_token_bins():
    cfg = _cfg()
    assert cfg.lora.gradient_checkpointing == "auto" and cfg.training.micro_batch_tokens == 8192


@pytest.mark.parametrize("free_gib, on", [(139.8, False), (79.6, False), (70.0, True), (39.4, True), (22.0, True)])
def test_auto_skips_recompute_where_the_no_recompute_peak_fits(free_gib, on):
    # 8,192-token QLoRA micro batches: measured 63.29 GiB peak without recompute on an H200
    # (bench/results/2026-11-28-h200-n.jsonl bins_nogc); estimated 64.4 GiB with the runtime.
    resolved, why = resolve(_cfg(), LLAMA_8B, "cuda", free_gib)
    assert resolved.lora.gradient_checkpointing is on
    assert why.startswith(f"auto: {'on' if on else 'off'}") and "64.4 GiB" in why and f"{free_gib:.1f} GiB free" in why


def test_a_smaller_budget_fits_a_smaller_card():
    resolved, why = resolve(_cfg("training.micro_batch_tokens=4096"), LLAMA_8B, "cuda", 79.6)
    assert resolved.lora.gradient_checkpointing is False  # measured 35.78 GiB (bins_nogc4k)
    assert "4096-token" in why


@pytest.mark.parametrize("sets, device, free_gib, shape", [
    ((), "cpu", None, LLAMA_8B),                                          # not a GPU
    (("training.micro_batch_tokens=0",), "cuda", 139.8, LLAMA_8B),        # row micro batches: no token bound
    (("infrastructure.distributed=fsdp", "infrastructure.num_gpus=2"), "cuda", 139.8, LLAMA_8B),
    ((), "cuda", 139.8, None),                                            # no config.json to size the model
])
def test_auto_keeps_recompute_on_without_a_known_bound(sets, device, free_gib, shape):
    resolved, why = resolve(_cfg(*sets), shape, device, free_gib)
    assert resolved.lora.gradient_checkpointing is True and why.startswith("auto: on")


@pytest.mark.parametrize("setting", [True, False])
def test_an_explicit_setting_is_kept(setting):
    cfg = _cfg(f"lora.gradient_checkpointing={str(setting).lower()}")
    resolved, why = resolve(cfg, LLAMA_8B, "cuda", 139.8)
    assert resolved is cfg and why == "set in the config"
