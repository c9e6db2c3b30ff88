"""CPU lever: float32 vs bfloat16 (base weights + autocast) for LoRA steps on the embedded model.

Usage: .venv/bin/python bench/cpu_precision.py MODEL_DIR   (e.g. the converted SmolLM2 folder in
~/pw/models/gguf--SmolLM2-135M-Instruct.Q4_1--*). Prints tokens/s per mode, two rounds each.
"""

import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tokens_per_second(model_dir: str, dtype: torch.dtype, autocast: bool, steps: int = 3) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size - 1, (4, 160), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return steps * ids.numel() / (time.perf_counter() - start)


if __name__ == "__main__":
    for _ in range(2):
        print(f"float32:              {tokens_per_second(sys.argv[1], torch.float32, False):.0f} tok/s")
        print(f"bfloat16 + autocast:  {tokens_per_second(sys.argv[1], torch.bfloat16, True):.0f} tok/s")
