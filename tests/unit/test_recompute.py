"""`lora.gradient_checkpointing: auto`: recompute only as far as the memory model says the card needs."""

from __future__ import annotations

import pytest

from medtune.config_io import load_config
from medtune.plan import recipe
from medtune.plan_memory import MicroBatch, estimate
from medtune.plan_tables import KNOWN_SHAPES
from medtune.recompute import every_n_candidates, resolve

LLAMA_8B = KNOWN_SHAPES["meta-llama/Llama-3.1-8B-Instruct"]


def _cfg(*sets: str):
    return load_config(preset="llama3-8b-medical", overrides=list(sets), env={})


def test_the_gpu_presets_leave_it_to_auto_with_token_bins():
    cfg = _cfg()
    assert cfg.lora.gradient_checkpointing == "auto" and cfg.training.micro_batch_tokens == 8192


@pytest.mark.parametrize("free_gib, on, every", [
    (139.8, False, 1), (79.6, False, 1), (50.0, False, 1),  # H200, H100, 48 GB: the no-recompute peak (39.1 GiB) fits
    (43.0, True, 16), (42.0, True, 8), (39.4, True, 4), (30.0, True, 2),  # between: recompute as few layers as fit
    (22.0, True, 1),                                        # 24 GB cards: every layer
])
def test_auto_recomputes_as_few_layers_as_fit(free_gib, on, every):
    # 8,192-token QLoRA micro batches with the fused LoRA backward and the lean MLP: estimated 39.1 GiB with the
    # runtime without recompute (46.25 GiB measured before the lean MLP, bench/results/2026-11-28-h200-z.jsonl
    # bins_nogc_fbw_short).
    resolved, why = resolve(_cfg(), LLAMA_8B, "cuda", free_gib)
    assert (resolved.lora.gradient_checkpointing, resolved.lora.recompute_every_n_layers) == (on, every)
    assert f"{free_gib:.1f} GiB free" in why and why.startswith("auto: ")
    assert ("39.1 GiB without recompute" in why) is (not on)
    if on and every > 1:
        assert f"{-(-32 // every)} of 32 layers (one in {every})" in why


def test_the_choice_is_the_fastest_that_fits():
    """Every option recomputing fewer layers than the chosen one is estimated above the limit."""
    free = 42.0
    resolved, _ = resolve(_cfg(), LLAMA_8B, "cuda", free)
    chosen = resolved.lora.recompute_every_n_layers
    batch = MicroBatch(8192)

    def peak(*sets):
        return estimate(LLAMA_8B, recipe(_cfg(*sets), "cuda"), batch)["total"] + 1.0  # + the CUDA runtime

    assert peak(f"lora.recompute_every_n_layers={chosen}", "lora.gradient_checkpointing=true") <= 0.9 * free
    for fewer in (n for n in every_n_candidates(32) if n > chosen):
        assert peak(f"lora.recompute_every_n_layers={fewer}", "lora.gradient_checkpointing=true") > 0.9 * free
    assert peak("lora.gradient_checkpointing=false") > 0.9 * free


def test_partial_recompute_sits_between_none_and_all():
    batch = MicroBatch(8192)
    gib = {n: estimate(LLAMA_8B, recipe(_cfg("lora.gradient_checkpointing=true", f"lora.recompute_every_n_layers={n}"),
                                        "cuda"), batch)["activations"] for n in (1, 2, 4, 16)}
    none = estimate(LLAMA_8B, recipe(_cfg("lora.gradient_checkpointing=false"), "cuda"), batch)["activations"]
    assert gib[1] < gib[2] < gib[4] < gib[16] < none
    assert every_n_candidates(32) == [16, 8, 4, 2] and every_n_candidates(2) == []


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
def test_auto_recomputes_every_layer_without_a_known_bound(sets, device, free_gib, shape):
    resolved, why = resolve(_cfg(*sets), shape, device, free_gib)
    assert (resolved.lora.gradient_checkpointing, resolved.lora.recompute_every_n_layers) == (True, 1)
    assert why.startswith("auto: every layer")


@pytest.mark.parametrize("setting", [True, False])
def test_an_explicit_setting_is_kept(setting):
    cfg = _cfg(f"lora.gradient_checkpointing={str(setting).lower()}", "lora.recompute_every_n_layers=4")
    resolved, why = resolve(cfg, LLAMA_8B, "cuda", 139.8)
    assert resolved is cfg and why == "set in the config"


def test_training_recomputes_only_the_chosen_layers(tiny_model_dir, tmp_path):
    from medtune.train import load_for_training

    cfg = load_config(preset="smollm2-135m-medical", env={}, overrides=[
        "model.model_source=local", f"model.local_model_path={tiny_model_dir}", f"output.output_root={tmp_path}",
        "lora.gradient_checkpointing=true", "lora.recompute_every_n_layers=2"])
    model = load_for_training(cfg, str(tiny_model_dir), "cpu")
    assert [layer.gradient_checkpointing for layer in model.get_base_model().model.layers] == [True, False]
