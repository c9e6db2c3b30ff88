"""The shipped presets: the seed's GPU recipes (Llama 3.1, Mistral, Gemma, Llama 2) and the embedded
default (SmolLM2-135M + bundled medical Q&A on a CPU). A preset is a partial config merged over the
schema defaults (config.py) and under a config file and `--set` (config_io.load_config)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from medtune.errors import ConfigError

EMBEDDED_PRESET = "smollm2-135m-medical"
DEFAULT_GPU_PRESET = "llama3-8b-medical"


def embedded_dataset_path() -> Path:
    """The medical instruction set shipped in the package (written for medtune)."""
    return Path(__file__).parent / "assets" / "medical_qa"


def _seed_preset(model_id: str, dataset: str) -> dict[str, Any]:
    return {
        "model": {"model_source": "huggingface", "base_model_id": model_id},
        "dataset": {"dataset_source": "huggingface", "dataset_name": dataset, "rerender_prompts": True},
        # A 7-8B model on a CPU would take days: refuse up front instead of starting. One padding-free
        # packed forward of whole rows up to 8,192 tokens per optimizer step (~27 medical rows, the seed
        # took 16 padded ones), recompute only where the card lacks the memory to skip it: 12,023 tok/s on
        # an H200 without recompute, 2.8x the seed recipe with bf16 and packing (docs/benchmarks.md).
        "training": {"device": "cuda", "micro_batch_size": 16, "micro_batch_tokens": 8192, "gradient_accumulation": 1},
        "lora": {"bf16": True, "packing": True, "gradient_checkpointing": "auto"},
    }


PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b-medical": _seed_preset("meta-llama/Llama-3.1-8B-Instruct", "Shekswess/medical_llama3_instruct_dataset"),
    "llama3-8b-medical-quick": _seed_preset("meta-llama/Llama-3.1-8B-Instruct", "Shekswess/medical_llama3_instruct_dataset"),
    "mistral-7b-medical": _seed_preset("mistralai/Mistral-7B-Instruct-v0.2", "Shekswess/medical_mistral_instruct_dataset"),
    "gemma-7b-medical": _seed_preset("google/gemma-7b-it", "Shekswess/medical_gemma_instruct_dataset"),
    "llama2-7b-medical": _seed_preset("meta-llama/Llama-2-7b-chat-hf", "Shekswess/medical_llama2_instruct_dataset"),
    # The embedded default: a 135M model on 2 CPU cores. Short rows, a few larger steps and a higher
    # learning rate make two epochs over ~200 rows useful in a few minutes.
    EMBEDDED_PRESET: {
        "model": {"model_source": "gguf", "base_model_id": "HuggingFaceTB/SmolLM2-135M-Instruct"},
        "dataset": {"dataset_source": "local", "eval_split": "heldout"},
        "training": {
            "num_epochs": 2.0,
            "learning_rate": 1e-3,
            "micro_batch_size": 4,
            "gradient_accumulation": 2,
            "max_seq_length": 384,
            "logging_steps": 5,
            "save_steps": 25,
            "eval_steps": 20,
            "warmup_ratio": 0.05,
        },
        "lora": {"lora_r": 16, "lora_alpha": 32, "quantization": "none", "gradient_checkpointing": False, "bf16": True},
    },
}
PRESETS["llama3-8b-medical-quick"]["dataset"]["max_samples"] = 500
PRESETS["llama3-8b-medical-quick"]["training"]["num_epochs"] = 1.0

PRESET_DESCRIPTIONS: dict[str, str] = {
    "llama3-8b-medical": "Llama 3.1 8B Instruct, QLoRA, the seed's Llama 3 medical dataset (GPU).",
    "llama3-8b-medical-quick": "As llama3-8b-medical with 500 samples and 1 epoch: a smoke test on a GPU.",
    "mistral-7b-medical": "Mistral 7B Instruct, QLoRA, the seed's Mistral medical dataset (GPU).",
    "gemma-7b-medical": "Gemma 7B IT, QLoRA, the seed's Gemma medical dataset (GPU, gated: needs HF_TOKEN).",
    "llama2-7b-medical": "Llama 2 7B chat, QLoRA, the seed's Llama 2 medical dataset (GPU, gated).",
    EMBEDDED_PRESET: "Embedded SmolLM2-135M-Instruct + bundled medical Q&A: runs on a laptop CPU, offline, in minutes.",
}


def preset_dict(name: str) -> dict[str, Any]:
    """The preset's overrides as a fresh nested dict (with runtime paths filled in)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)} (see `medtune presets`)")
    data = copy.deepcopy(PRESETS[name])
    data.setdefault("model", {})["model_config"] = name
    if name == EMBEDDED_PRESET:
        data["dataset"]["local_dataset_path"] = str(embedded_dataset_path())
    return data


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A new dict: `override` merged into `base` section by section (neither is modified)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
