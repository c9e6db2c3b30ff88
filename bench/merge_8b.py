"""Benchmark: medtune's merge stage on a Llama-3.1-8B-shaped model (random weights).

    python bench/merge_8b.py make  WORK   # random bf16 base in 5GB shards + a random r=64 adapter (GPU)
    python bench/merge_8b.py merge WORK   # medtune.merge.merge into 5GB bf16 shards, reload, spot-check
    python bench/merge_8b.py stream WORK  # the same through the shard-by-shard path (as if RAM were short)

`merge` runs in its own process so its peak RSS is the merge's alone. Prints one JSON line per mode.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                tie_word_embeddings=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make(work: Path) -> dict:
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    start = time.perf_counter()
    base_dir, run = work / "base", work / "medical-finetune-bench"
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["medical question answer"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<|begin_of_text|>", "<|eot_id|>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                            unk_token="<unk>").save_pretrained(base_dir)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_8B, dtype="bfloat16")).to(torch.bfloat16)
    model.save_pretrained(base_dir, max_shard_size="5GB")
    peft_model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, target_modules=TARGETS))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    peft_model.save_pretrained(run / "adapters")
    return {"mode": "make", "seconds": round(time.perf_counter() - start, 1),
            "base_gb": round(sum(p.stat().st_size for p in base_dir.glob("*.safetensors")) / 1e9, 2)}


def merge_and_reload(work: Path, stream: bool) -> dict:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    import medtune.merge
    from medtune.config import OutputConfig
    from medtune.merge import merge
    from medtune.rundir import RunDir

    if stream:
        medtune.merge.ram_budget = lambda: 0

    run = RunDir(work / "medical-finetune-bench")
    start = time.perf_counter()
    info = merge(OutputConfig(max_shard_size="5GB", merged_dtype="bfloat16"), run, str(work / "base"))
    merge_s = time.perf_counter() - start
    merge_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    shards = sorted(run.merged.glob("*.safetensors"))

    start = time.perf_counter()
    merged = AutoModelForCausalLM.from_pretrained(run.merged, dtype=torch.bfloat16, device_map={"": "cuda"})
    reload_s = time.perf_counter() - start
    # Spot check one projection against W + scale * B @ A, computed independently from the files.
    key = "model.layers.7.self_attn.q_proj.weight"
    base_file = json.loads((work / "base" / "model.safetensors.index.json").read_text())["weight_map"][key]
    with safe_open(work / "base" / base_file, "pt") as fh:
        w = fh.get_tensor(key).cuda().float()
    with safe_open(run.adapters / "adapter_model.safetensors", "pt") as fh:
        prefix = "base_model.model.model.layers.7.self_attn.q_proj"
        a, b = fh.get_tensor(f"{prefix}.lora_A.weight").cuda().float(), fh.get_tensor(f"{prefix}.lora_B.weight").cuda().float()
    expected = (w + (16 / 64) * b @ a).bfloat16()
    got = merged.get_parameter(key)
    ids = torch.randint(0, 300, (1, 64), device="cuda")
    with torch.no_grad():
        finite = bool(torch.isfinite(merged(ids).logits).all())
    return {"mode": info["method"], "merge_seconds": round(merge_s, 1), "merge_peak_rss_gib": round(merge_rss, 1),
            "shards": [f"{p.name} {p.stat().st_size / 1e9:.2f} GB" for p in shards], "dtype": info["dtype"],
            "reload_seconds": round(reload_s, 1), "spot_check_max_diff": float((got.float() - expected.float()).abs().max()),
            "forward_finite": finite, "gpu": torch.cuda.get_device_name(0)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["make", "merge", "stream"])
    parser.add_argument("work", type=Path)
    args = parser.parse_args()
    print(json.dumps(make(args.work) if args.mode == "make" else merge_and_reload(args.work, args.mode == "stream")),
          flush=True)
