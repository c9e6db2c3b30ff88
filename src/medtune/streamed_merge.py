"""Shard-by-shard LoRA merge for bases larger than free RAM: W' = W + (alpha / r) * B @ A.

The in-memory merge (PEFT's merge_and_unload) holds one full copy of the base; this one holds one
base shard and the adapter, reading each safetensors shard, folding in the deltas of the modules it
contains, and writing it out under the same name before the next one is read. The merged folder
keeps the base's shard layout. Used for plain LoRA adapters only (no DoRA, per-module rank or alpha
patterns, fan-in/fan-out layers or extra trained modules); anything else goes through PEFT.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

log = logging.getLogger("medtune.merge")

ADAPTER_PREFIX = "base_model.model."


def streamable(adapters: Path, model_path: Path) -> bool:
    """Whether this adapter and base can be merged by plain arithmetic on safetensors shards."""
    cfg = json.loads((adapters / "adapter_config.json").read_text())
    plain = (cfg.get("peft_type") == "LORA" and not cfg.get("use_dora") and not cfg.get("rank_pattern")
             and not cfg.get("alpha_pattern") and not cfg.get("fan_in_fan_out") and not cfg.get("modules_to_save")
             and cfg.get("bias", "none") == "none" and not cfg.get("lora_bias"))
    return plain and (adapters / "adapter_model.safetensors").is_file() and bool(_shards(model_path))


def lora_deltas(adapters: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Base weight name -> (A, B, scale) for every adapted module."""
    from safetensors.torch import load_file

    cfg = json.loads((adapters / "adapter_config.json").read_text())
    tensors = load_file(adapters / "adapter_model.safetensors")
    deltas = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix(ADAPTER_PREFIX).removesuffix(".lora_A.weight")
        b = tensors[f"{ADAPTER_PREFIX}{module}.lora_B.weight"]
        rank = a.shape[0]
        scale = cfg["lora_alpha"] / (math.sqrt(rank) if cfg.get("use_rslora") else rank)
        deltas[f"{module}.weight"] = (a, b, scale)
    unknown = [k for k in tensors if ".lora_A." not in k and ".lora_B." not in k]
    if unknown:
        raise ValueError(f"adapter holds tensors a plain LoRA merge cannot place: {unknown[:3]}")
    return deltas


def merge_shards(adapters: Path, model_path: Path, out: Path, dtype: torch.dtype) -> list[str]:
    """Write the merged shards (and their index) into `out`; returns the shard names."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    deltas = lora_deltas(adapters)
    shards = _shards(model_path)
    total_bytes, merged_count = 0, 0
    for i, shard in enumerate(shards, 1):
        merged = {}
        with safe_open(model_path / shard, framework="pt") as fh:
            for name in fh.keys():
                weight = fh.get_tensor(name)
                if name in deltas:
                    a, b, scale = deltas[name]
                    weight = weight.float().addmm_(b.float(), a.float(), alpha=scale)
                    merged_count += 1
                merged[name] = weight.to(dtype).contiguous()
        total_bytes += sum(t.numel() * t.element_size() for t in merged.values())
        save_file(merged, out / shard, metadata={"format": "pt"})
        del merged
        log.info("merge: shard %d/%d %s written", i, len(shards), shard)
    if merged_count != len(deltas):
        raise ValueError(f"{len(deltas) - merged_count} adapted modules have no weight in the base shards")
    index = model_path / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["metadata"] = {**data.get("metadata", {}), "total_size": total_bytes}
        (out / index.name).write_text(json.dumps(data, indent=2) + "\n")
    return shards


def _shards(model_path: Path) -> list[str]:
    index = model_path / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return ["model.safetensors"] if (model_path / "model.safetensors").is_file() else []
