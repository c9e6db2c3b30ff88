"""Micro batches as bins of whole rows under a token budget (`training.micro_batch_tokens`).

With `lora.packing` a micro batch of N rows is concatenated into one padding-free row, but medical rows
vary 50..2048 tokens, so N rows hold anywhere from a few thousand to tens of thousands of tokens: memory
swings with the draw, and under DDP every rank waits at each all-reduce for the rank that drew the
longest micro batch. Here the rows are packed once, before training, into bins of at most the budget
(best-fit decreasing: deterministic, every row exactly once), and each bin is one micro batch.

Every bin but the last opened one holds more than `budget - longest row` tokens: a row goes to a new
bin only when it fits in no open bin, and rows come longest first, so an earlier bin's free space is
smaller than the row that opened any later bin. Ranks that draw such bins therefore differ by less than
one row's tokens per micro batch (tests/unit/test_token_bins.py checks this on the Trainer's rank split).
The bins are a pure function of the row lengths and the budget, so a resumed run sees the same bins in
the same (seeded) order.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from medtune.errors import ConfigError

if TYPE_CHECKING:
    from medtune.config import TrainingConfig

# Mean fill (tokens / budget) of the bins other than the last, measured by `pack` on the 1,800-row
# medical sample ../shared/datasets/medical_mistral_instruct_dataset_short (each row's rendered `prompt`
# at ~4 characters per token, capped at 2048; mean 256 tokens): 0.998, 0.999, 0.9993, 0.9999 at budgets
# 2048, 4096, 8192, 16384, and the bin count equalled the lower bound ceil(tokens / budget) at each.
MEASURED_FILL = 0.998
BIN_ROWS = "bin_rows"  # the bins dataset's column of row indices


def pack(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Row indices grouped into bins of at most `budget` tokens, by best-fit decreasing: rows longest
    first (ties: lower index first), each into the open bin it fills most tightly (ties: the earlier bin),
    else into a new bin. Bins come in the order they were opened; each bin's indices in ascending order."""
    if lengths and max(lengths) > budget:
        raise ValueError(f"a row of {max(lengths)} tokens does not fit a bin of {budget}")
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, bin number), sorted: the tightest fit is a bisect away
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        size = lengths[index]
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            room, number = free.pop(at)
        else:
            room, number = budget, len(bins)
            bins.append([])
        bins[number].append(index)
        bisect.insort(free, (room - size, number))
    return [sorted(b) for b in bins]


def bins_dataset(train_ds: Any, budget: int) -> Any:
    """One row per bin of `train_ds` (which has a `length` column): its row indices and token count."""
    from datasets import Dataset

    lengths = list(train_ds["length"])
    if lengths and max(lengths) > budget:  # data prepared under a longer max_seq_length, then resumed
        raise ConfigError(f"training.micro_batch_tokens={budget} is below the longest prepared training row "
                          f"({max(lengths)} tokens); set it to at least {max(lengths)}")
    bins = pack(lengths, budget)
    return Dataset.from_dict({BIN_ROWS: bins, "bin_tokens": [sum(lengths[i] for i in b) for b in bins]})


class BinCollator:
    """Expands each bin into its rows' features and hands them to the packing collator, so a bin becomes
    exactly the padding-free micro batch those rows would have made (position ids, `cu_seq_lens`,
    first-label masking per example). Evaluation batches are rows, not bins: they pass straight through."""

    def __init__(self, rows: Any, packing_collator: Any, pad_to: tuple[int, int, int] | None = None) -> None:
        """`pad_to` = (tokens, max_len, pad_id): every bin grows to exactly `tokens` (CUDA graphs replay one
        shape), its real token count under `layer_graphs.REAL_TOKENS`."""
        self.rows, self.packing_collator, self.pad_to = rows, packing_collator, pad_to

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if not (features and BIN_ROWS in features[0]):
            return self.packing_collator(features)
        columns = self.rows[[i for b in features for i in b[BIN_ROWS]]]  # one Arrow read, not one per row
        batch = self.packing_collator([dict(zip(columns, values)) for values in zip(*columns.values())])
        if self.pad_to is None:
            return batch
        from medtune import layer_graphs

        real = int(batch["input_ids"].numel())
        batch = layer_graphs.pad_packed(batch, *self.pad_to)
        batch[layer_graphs.REAL_TOKENS] = real
        return batch


def mean_rows(bins: Any) -> float:
    """Rows per bin, on average: the micro batch in rows that the metrics report."""
    return sum(len(r) for r in bins[BIN_ROWS]) / max(1, len(bins))


def batch_metrics(t: TrainingConfig, world_size: int, train_ds: Any = None) -> dict[str, int]:
    """`effective_batch_size` is rows per optimizer step: exact for micro batches of rows; with token bins
    (whose row counts vary) the mean rows per bin x accumulation x world size, and `effective_batch_tokens`
    is the bound on tokens per optimizer step."""
    if not t.micro_batch_tokens:
        return {"world_size": world_size,
                "effective_batch_size": t.micro_batch_size * t.gradient_accumulation * world_size}
    return {"world_size": world_size,
            "effective_batch_size": round(mean_rows(train_ds) * t.gradient_accumulation * world_size),
            "micro_batch_tokens": t.micro_batch_tokens,
            "effective_batch_tokens": t.micro_batch_tokens * t.gradient_accumulation * world_size}


def batch_line(t: TrainingConfig, metrics: dict[str, int]) -> str:
    """The log's line for `batch_metrics`."""
    world = metrics["world_size"]
    if not t.micro_batch_tokens:
        return (f"effective batch {metrics['effective_batch_size']} = micro batch {t.micro_batch_size} x accumulation "
                f"{t.gradient_accumulation} x world size {world}")
    return (f"effective batch ≤ {metrics['effective_batch_tokens']} tokens = {t.micro_batch_tokens}-token micro "
            f"batches x accumulation {t.gradient_accumulation} x world size {world} "
            f"(~{metrics['effective_batch_size']} rows per step)")
