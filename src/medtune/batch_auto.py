"""`training.micro_batch_size: auto` — the largest micro batch the GPU's memory takes.

Decided before anything is loaded, from the model's shape and medtune's memory model (plan_memory,
the estimate `medtune plan` prints and `lora.gradient_checkpointing: auto` uses), with the same
headroom: the estimated peak may take 90 % of the memory.

With `lora.packing` the micro batch becomes a token budget (`training.micro_batch_tokens`, bins of
whole rows): the larger of 4 and 2 × `max_seq_length` that fits **without** recompute, else the
largest of 8, 4, 2, 1 × that fits with it (`gradient_checkpointing: auto` may then still recompute
only some layers). That order is what was measured on H200s (docs/benchmarks.md): 8,192-token bins
without recompute trained at 12,038-12,590 tok/s, 4,096-token ones at 8,608-10,511 (9,479 with the
fused LoRA backward), 16,384-token bins with recompute at 8,891-9,525. A single `max_seq_length`
without recompute is not offered: half the GEMM rows of the 4,096-token bins, which were only at par
with recompute. Without packing it is a row count (16, 8, 4, 2 or 1 rows of `max_seq_length`
tokens, the worst case a draw can make). The gradient accumulation stays as configured, so the tokens
per optimizer step grow with the card; the choice and the estimate are logged and recorded in the
manifest. Without a CUDA GPU per process to size against (CPUs, FSDP, no config.json to read the
shape from) `auto` is one row.
"""

from __future__ import annotations

from medtune.config import MedtuneConfig
from medtune.plan import memory_gib
from medtune.plan_memory import MicroBatch, Shape
from medtune.recompute import HEADROOM, with_recompute
from medtune.sharding import uses_fsdp

BUDGETS = (4, 2)                   # packed budgets without recompute, in max_seq_length
BUDGETS_RECOMPUTE = (8, 4, 2, 1)   # with recompute
ROWS = (16, 8, 4, 2, 1)            # padded rows


def resolve(cfg: MedtuneConfig, shape: Shape | None, device: str, memory: float | None) -> tuple[MedtuneConfig, str]:
    """`cfg` with `training.micro_batch_size` (and with packing `micro_batch_tokens`) a number, and why.
    `memory` is the GiB the estimate may be measured against (free memory of this GPU, or the card's)."""
    t = cfg.training
    if t.micro_batch_size != "auto":
        return cfg, "set in the config"
    if device != "cuda" or shape is None or not memory or uses_fsdp(cfg):
        unsized = "sized to memory only on a CUDA GPU, without FSDP, with the model's config.json"
        if t.micro_batch_tokens:
            return with_batch(cfg, 1, t.micro_batch_tokens), \
                f"auto: {t.micro_batch_tokens}-token micro batches as set in training.micro_batch_tokens, " \
                f"evaluation batches of 1 row ({unsized})"
        return with_batch(cfg, 1, 0), f"auto: 1 row ({unsized})"
    limit, length = HEADROOM * memory, t.max_seq_length
    where = f"{HEADROOM:.0%} of {memory:.1f} GiB = {limit:.1f} GiB"
    recompute = cfg.lora.gradient_checkpointing
    if cfg.lora.packing:
        tries = [(k * length, False) for k in BUDGETS] if recompute in ("auto", False) else []
        tries += [(k * length, True) for k in BUDGETS_RECOMPUTE] if recompute in ("auto", True) else []
        for budget, on in tries:
            option = with_recompute(with_batch(cfg, 1, budget), on, 1)
            need = memory_gib(option, shape, "cuda", MicroBatch(budget))["total"]
            if need <= limit:
                how = "with recompute" if on else "without recompute"
                return with_batch(cfg, max(1, budget // length), budget), \
                    f"auto: {budget}-token micro batches, an estimated {need:.1f} GiB {how} fits {where}"
        return with_batch(cfg, 1, length), f"auto: {length}-token micro batches, the smallest; none is estimated " \
                                           f"to fit {where}"
    on = recompute is not False  # row micro batches recompute under `auto` (recompute.py)
    for rows in ROWS:
        option = with_recompute(with_batch(cfg, rows, 0), on, 1)
        need = memory_gib(option, shape, "cuda", MicroBatch(rows * length, rows, "padded"))["total"]
        if need <= limit:
            return with_batch(cfg, rows, 0), f"auto: {rows} rows of up to {length} tokens, an estimated " \
                                             f"{need:.1f} GiB fits {where}"
    return with_batch(cfg, 1, 0), f"auto: 1 row, the smallest; none is estimated to fit {where}"


def with_batch(cfg: MedtuneConfig, rows: int, budget: int) -> MedtuneConfig:
    return cfg.model_copy(update={"training": cfg.training.model_copy(
        update={"micro_batch_size": rows, "micro_batch_tokens": budget})})
