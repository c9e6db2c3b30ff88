"""`lora.gradient_checkpointing: auto` — recompute activations only when memory requires it.

Without recompute an 8B LoRA step does ~30% less arithmetic (33.5 instead of 48.5 GFLOP per token) but
keeps every layer's activations: on one H200 (QLoRA, Llama-3.1-8B shape) 8,192-token micro batches
trained at 12,023 tok/s in 63.3 GiB without recompute, 16,384-token ones at 9,121 tok/s in 16.0 GiB
with it (docs/benchmarks.md). Which one a
card can take is known before loading anything: with token-bounded micro batches
(`training.micro_batch_tokens`) the largest micro batch is the budget itself, and medtune's memory
model (plan_memory, within -2 % ... +6 % of every measured single-GPU peak) prices it. Row-count micro
batches have no such bound (a micro batch of long rows can hold 15x the tokens of a short one), so
`auto` keeps recompute on for them, on CPUs and under FSDP.
"""

from __future__ import annotations

from medtune.config import MedtuneConfig
from medtune.plan import memory_gib
from medtune.plan_memory import MicroBatch, Shape

HEADROOM = 0.9  # share of the free GPU memory the estimated peak may take (allocator fragmentation, spikes)


def resolve(cfg: MedtuneConfig, shape: Shape | None, device: str, free_gib: float | None) -> tuple[MedtuneConfig, str]:
    """`cfg` with `lora.gradient_checkpointing` a bool, and why; a bool setting is returned as it is.
    `shape` None (no config.json to read) or `free_gib` None (no GPU) keep recompute on."""
    setting = cfg.lora.gradient_checkpointing
    if setting != "auto":
        return cfg, "set in the config"
    t = cfg.training
    if device != "cuda" or not t.micro_batch_tokens or cfg.infrastructure.distributed == "fsdp" or not free_gib \
            or shape is None:
        return _with(cfg, True), "auto: on (off only on a CUDA GPU with token-bounded micro batches, without FSDP)"
    without = _with(cfg, False)
    peak = memory_gib(without, shape, "cuda", MicroBatch(t.micro_batch_tokens))["total"]
    if peak <= HEADROOM * free_gib:
        return without, (f"auto: off, the {t.micro_batch_tokens}-token micro batches peak at an estimated "
                         f"{peak:.1f} GiB without recompute, within {HEADROOM:.0%} of the GPU's {free_gib:.1f} GiB free")
    return _with(cfg, True), (f"auto: on, without recompute the {t.micro_batch_tokens}-token micro batches would "
                              f"peak at an estimated {peak:.1f} GiB, above {HEADROOM:.0%} of the GPU's {free_gib:.1f} GiB free")


def _with(cfg: MedtuneConfig, on: bool) -> MedtuneConfig:
    return cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"gradient_checkpointing": on})})
