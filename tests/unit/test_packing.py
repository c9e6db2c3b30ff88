"""Padding-free packing must not let an example attend to its neighbour: on the tiny model, the loss
of a packed micro batch equals the loss of the same examples padded side by side."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from medtune.config_io import load_config
from medtune.train import load_for_training, make_collator
from tests_support import qa_examples

TOLERANCE = 1e-5  # float32 on CPU; cross-attention between examples moves the loss by far more (see below)



def config(tiny_model_dir, packing: bool):
    return load_config(preset="smollm2-135m-medical", overrides=[
        "model.model_source=local", f"model.local_model_path={tiny_model_dir}", "lora.quantization=none",
        "lora.bf16=false", "lora.gradient_checkpointing=false", "lora.lora_r=4", f"lora.packing={str(packing).lower()}"])


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    """The model exactly as training loads it (LoRA attached, use_cache off), in eval mode for determinism."""
    torch.manual_seed(0)
    model = load_for_training(config(tiny_model_dir, True), str(tiny_model_dir), "cpu").eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def collate(model_dir, tokenizer, packing: bool, feats):
    return make_collator(config(model_dir, packing), tokenizer, "cpu")([dict(f) for f in feats])


def test_packed_loss_equals_unpacked_loss(model_and_tokenizer, tiny_model_dir):
    model, tokenizer = model_and_tokenizer
    feats = qa_examples(tokenizer)
    padded = collate(tiny_model_dir, tokenizer, False, feats)
    packed = collate(tiny_model_dir, tokenizer, True, feats)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert packed["position_ids"][0].tolist() == [i for f in feats for i in range(len(f["input_ids"]))]
    with torch.no_grad():
        loss_padded = model(**padded).loss.item()
        loss_packed = model(**packed).loss.item()
        # the negative control: the same packed row without position restarts is one long sequence
        leaky = model(input_ids=packed["input_ids"], labels=packed["labels"]).loss.item()
    assert abs(loss_packed - loss_padded) < TOLERANCE, (loss_packed, loss_padded)
    assert abs(leaky - loss_padded) > 100 * TOLERANCE, (leaky, loss_padded)


def test_a_packed_training_run_on_the_tiny_model(tiny_overrides):
    """The whole finetune stage with lora.packing=true on the tiny model: it trains and delivers an adapter."""
    from medtune.workflow import run_workflow

    cfg = load_config(preset="smollm2-135m-medical", overrides=[*tiny_overrides, "lora.packing=true",
                                                                "output.merge_full_weights=false",
                                                                "evaluation.validation_questions=0"])
    run = run_workflow(cfg)
    manifest = run.manifest()
    assert manifest["status"] == "succeeded" and manifest["training"]["steps"] == cfg.training.max_steps
    assert (run.adapters / "adapter_model.safetensors").is_file()
    assert len(manifest["stages"]["data"]["input_sha256"]) == 64  # the input data's digest, in manifest.json
