"""`lora.gradient_checkpointing: auto` — recompute activations only as far as memory requires.

Without recompute an 8B LoRA step does ~30% less arithmetic (33.5 instead of 48.5 GFLOP per token) but
keeps every layer's activations: on one H200 (QLoRA, Llama-3.1-8B shape) 8,192-token micro batches
trained at 15,339 tok/s in 36.0 GiB without recompute (the default path since 2026-11-29 04:10),
16,384-token ones at 9,121 tok/s in 16.0 GiB with it (an earlier path; docs/benchmarks.md). Which one a card can take is known before loading anything: with
token-bounded micro batches (`training.micro_batch_tokens`) the largest micro batch is the budget
itself, and medtune's memory model (plan_memory, within -2 % ... +8 % of every measured single-GPU
peak) prices it. Between the two, transformers can recompute only every n-th decoder layer
(`lora.recompute_every_n_layers`): `auto` takes the largest n that fits, so a card just short of the
no-recompute peak (~40-43 GiB free for an 8B) recomputes some layers instead of all. Row-count micro
batches have no such bound (a micro batch of long rows can hold 15x the tokens of a short one), so `auto` recomputes every layer
for them, on CPUs and under FSDP.
"""

from __future__ import annotations

from medtune.config import MedtuneConfig
from medtune.plan import memory_gib
from medtune.plan_memory import MicroBatch, Shape
from medtune.sharding import uses_fsdp

HEADROOM = 0.9  # share of the free GPU memory the estimated peak may take (allocator fragmentation, spikes)


def resolve(cfg: MedtuneConfig, shape: Shape | None, device: str, free_gib: float | None) -> tuple[MedtuneConfig, str]:
    """`cfg` with `lora.gradient_checkpointing` a bool (and `recompute_every_n_layers` chosen), and why; a
    bool setting is returned as it is. `shape` None (no config.json to read) or `free_gib` None (no GPU)
    recompute every layer."""
    if cfg.lora.gradient_checkpointing != "auto":
        return cfg, "set in the config"
    t = cfg.training
    if device != "cuda" or not t.micro_batch_tokens or uses_fsdp(cfg) or not free_gib \
            or shape is None:
        return with_recompute(cfg, True, 1), "auto: every layer (skipped only on a CUDA GPU with token-bounded " \
                                             "micro batches, without FSDP)"
    budget, limit = t.micro_batch_tokens, HEADROOM * free_gib

    def peak(option: MedtuneConfig) -> float:
        return memory_gib(option, shape, "cuda", MicroBatch(budget))["total"]

    where = f"the {budget}-token micro batches, {HEADROOM:.0%} of the GPU's {free_gib:.1f} GiB free = {limit:.1f} GiB"
    without = with_recompute(cfg, False, 1)
    if (need := peak(without)) <= limit:
        return without, f"auto: off, an estimated {need:.1f} GiB without recompute fits {where}"
    for every in every_n_candidates(shape.layers):
        partial = with_recompute(cfg, True, every)
        if (need := peak(partial)) <= limit:
            layers = -(-shape.layers // every)
            return partial, (f"auto: {layers} of {shape.layers} layers (one in {every}), an estimated {need:.1f} GiB "
                             f"fits {where}")
    full = with_recompute(cfg, True, 1)
    return full, f"auto: every layer, {peak(full):.1f} GiB estimated for {where}"


def every_n_candidates(layers: int) -> list[int]:
    """Recompute intervals from the fewest recomputed layers to all but one in two (1 = every layer, the
    fallback), e.g. 16, 8, 4, 2 for 32 layers."""
    return sorted({layers // k for k in (2, 4, 8, 16, 32) if layers // k > 1}, reverse=True)


def with_recompute(cfg: MedtuneConfig, on: bool, every: int) -> MedtuneConfig:
    return cfg.model_copy(update={"lora": cfg.lora.model_copy(
        update={"gradient_checkpointing": on, "recompute_every_n_layers": every})})
