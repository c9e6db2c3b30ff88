"""FSDP (`infrastructure.distributed=fsdp`): the base model sharded over the ranks instead of copied.

Composed from transformers' Trainer arguments (`fsdp`, `fsdp_config`), which hand them to
accelerate's FSDP2 plugin (`fully_shard`). FSDP2 shards every parameter on its own (DTensor), so
the frozen base and the trainable LoRA matrices of a decoder layer share one unit, which FSDP1
needed `use_orig_params=True` for. For QLoRA the 4-bit weights are stored in the compute dtype
(`bnb_4bit_quant_storage`): FSDP can only shard floating-point storage, and accelerate leaves
uint8-stored 4-bit weights unsharded on every rank.
"""

from __future__ import annotations

import logging
from typing import Any

from medtune.config import MedtuneConfig

log = logging.getLogger("medtune.train")


def uses_fsdp(cfg: MedtuneConfig) -> bool:
    return cfg.infrastructure.distributed == "fsdp"


def trainer_arguments(cfg: MedtuneConfig) -> dict[str, Any]:
    """TrainingArguments keys for FSDP; none under DDP or for a single process."""
    if not uses_fsdp(cfg):
        return {}
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "reshard_after_forward": True,  # full shard: parameters, gradients and optimizer states
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # one unit per decoder layer (`_no_split_modules`)
            # The model goes to `meta` before sharding and rank 0's host copy is broadcast shard by
            # shard, so no GPU holds more than its shard. accelerate skips this for 4-bit weights,
            # which bitsandbytes quantizes on every rank's own GPU.
            "cpu_ram_efficient_loading": cfg.lora.quantization == "none",
            "state_dict_type": "FULL_STATE_DICT",
            # Gradient checkpointing stays the model's own (non-reentrant, as without FSDP), not FSDP's
            # `activation_checkpointing`: its checkpoint wrapper renames the modules
            # (`_checkpoint_wrapped_module.`) and PEFT 0.21 then finds no adapter keys in the
            # gathered state dict, saving an empty adapter.
        },
        # Liger's fused linear + cross-entropy multiplies by `lm_head.weight` itself, outside the lm_head
        # module's call, so FSDP never gathers that weight for it: on 2 x H200 it stopped with "aten.mm.out
        # got mixed torch.Tensor and DTensor". Under FSDP the loss goes through the lm_head module (logits
        # materialised); Liger's RMSNorm, SwiGLU and RoPE kernels stay.
        "liger_kernel_config": {"fused_linear_cross_entropy": False, "cross_entropy": False},
    }


def load_placement(cfg: MedtuneConfig, place: Any) -> Any:
    """Where from_pretrained puts the base: unquantized under FSDP on the host, whence `fully_shard`
    moves only this rank's shard to its GPU; 4-bit on this rank's GPU, where bitsandbytes quantizes."""
    if uses_fsdp(cfg) and cfg.lora.quantization == "none":
        return "cpu"
    return place


def full_state(trainer: Any) -> dict[str, Any] | None:
    """Under FSDP the model's whole state gathered from every rank's shards onto rank 0's host (a
    collective: every rank calls it), as the Trainer's own `save_model` gathers it; PEFT's
    save_pretrained keeps the adapter's keys. None under DDP, where rank 0 holds the whole model."""
    if not trainer.is_fsdp_enabled:
        return None
    return trainer.accelerator.get_state_dict(trainer.model)


def shard_report(trainer: Any) -> dict[str, Any] | None:
    """How much of the model this rank holds (FSDP2 parameters are DTensors: the whole shape, of
    which `to_local()` is this rank's shard); None when nothing is sharded."""
    from torch.distributed.tensor import DTensor

    sharded = [p for p in trainer.model.parameters() if isinstance(p, DTensor)]
    if not sharded:
        return None
    full = sum(p.numel() for p in sharded)
    local = sum(p.to_local().numel() for p in sharded)
    report = {"strategy": "fsdp", "world_size": trainer.args.world_size, "parameters": full,
              "rank0_parameters": local, "rank0_fraction": round(local / full, 4)}
    log.info("finetune: FSDP full shard over %d ranks: this rank holds %s of %s parameter elements (%.1f%%)",
             report["world_size"], f"{local:,}", f"{full:,}", 100 * local / full)
    return report
