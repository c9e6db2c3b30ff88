"""Estimates (not measurements): per-GPU training memory of FSDP, from `medtune plan`'s own model.

    python bench/fsdp_memory.py > table.md

Llama-3.1-8B and -70B with the llama3-8b-medical preset's LoRA (r=64 on all seven projections, AdamW)
and one 2048-token micro batch with gradient checkpointing (fixed here, whatever the preset's batch), QLoRA and unquantized bf16, on 1 GPU (DDP: the whole base on each) and sharded over 2, 4
and 8 with infrastructure.distributed=fsdp. Prints the Markdown table docs/scale-out.md carries.
"""

from __future__ import annotations

from medtune.config_io import load_config
from medtune.plan import make_plan

MODELS = {"Llama-3.1-8B": "meta-llama/Llama-3.1-8B-Instruct", "Llama-3.1-70B": "meta-llama/Llama-3.1-70B-Instruct"}
RECIPES = {"QLoRA (nf4)": ["lora.quantization=4bit"], "LoRA bf16": ["lora.quantization=none", "lora.bf16=true"]}
GPUS = (1, 2, 4, 8)


def per_gpu(model_id: str, recipe: list[str], gpus: int) -> str:
    sharding = ["infrastructure.distributed=fsdp", f"infrastructure.num_gpus={gpus}"] if gpus > 1 else []
    batch = ["training.micro_batch_tokens=0", "training.micro_batch_size=1", "lora.packing=false",
             "lora.gradient_checkpointing=true"]
    cfg = load_config(preset="llama3-8b-medical", overrides=[f"model.base_model_id={model_id}", *recipe, *sharding,
                                                                 *batch, "model.model_cache_dir=/nonexistent"])
    plan = make_plan(cfg, gpu="H100-80GB", rows=10_000)
    cell = f"{plan['memory_gib']['total']:.1f}"
    if plan["fsdp"] and plan["fsdp"]["load_peak_gib"]:
        cell += f" (load {plan['fsdp']['load_peak_gib']:.1f})"
    return cell


def main() -> None:
    print("| base | recipe | " + " | ".join("1 GPU (DDP)" if n == 1 else f"FSDP {n} GPUs" for n in GPUS) + " |")
    print("|---|---|" + "---:|" * len(GPUS))
    for name, model_id in MODELS.items():
        for recipe, overrides in RECIPES.items():
            print(f"| {name} | {recipe} | " + " | ".join(per_gpu(model_id, overrides, n) for n in GPUS) + " |")


if __name__ == "__main__":
    main()
