"""What the largest micro batch of an epoch holds, from the dataset's length distribution.

medtune.train samples with transformers' LengthGroupedSampler: the shuffled rows are cut into
megabatches of `mult` optimizer steps (mult = min(rows // (4 × rows per step), 50)), each megabatch
is sorted longest first, and the megabatch holding the longest row is put first. So the epoch's first
micro batch is its largest: the longest row plus `micro_batch_size - 1` rows from the top
micro_batch_size / megabatch fraction of the lengths. Packed, that is the sum of their tokens;
padded, every row is padded to the longest.

With token bins (`training.micro_batch_tokens`) every micro batch is a bin of whole rows holding at
most the budget, and the bins are nearly full (token_bins.MEASURED_FILL), so the budget is the largest
micro batch and the number of bins is the data's tokens over budget x fill.

Lengths are known as quantile knots [(q, tokens)]: the data report's p50/p90/p95/p99/max, or the same
points of a local sample; between knots the quantile function is taken as linear.
"""

from __future__ import annotations

import math
from typing import Any

from medtune.config import MedtuneConfig
from medtune.plan_memory import MicroBatch
from medtune.token_bins import MEASURED_FILL

QUANTILES = (0.5, 0.9, 0.95, 0.99, 1.0)


def knots_from_lengths(lengths: list[float]) -> list[tuple[float, float]]:
    ordered = sorted(lengths)
    return [(q, ordered[int(q * (len(ordered) - 1))]) for q in QUANTILES]


def mean_above(knots: list[tuple[float, float]], q0: float) -> float:
    """Mean length of the rows above quantile q0 (flat below the first knot)."""
    points = ([(0.0, knots[0][1])] if knots[0][0] > 0 else []) + list(knots)
    area = 0.0
    for (qa, la), (qb, lb) in zip(points, points[1:]):
        lo = max(qa, q0)
        if qb <= lo:
            continue
        at_lo = la + (lb - la) * (lo - qa) / (qb - qa)
        area += (qb - lo) * (at_lo + lb) / 2
    return area / (1 - q0) if q0 < 1 else knots[-1][1]


def first_micro_batch_rows(knots: list[tuple[float, float]], rows: int, micro_batch: int, accumulation: int,
                           max_len: int) -> tuple[float, float]:
    """(tokens of the epoch's first micro batch, its longest row), rows capped at max_len."""
    step = micro_batch * accumulation
    mult = max(1, min(rows // (step * 4), 50))
    top = min(1.0, micro_batch / (mult * step))
    capped = [(q, min(max_len, length)) for q, length in knots]
    longest = capped[-1][1]
    return longest + (micro_batch - 1) * mean_above(capped, 1 - top), longest


def planned_micro_batch(cfg: MedtuneConfig, data: dict[str, Any], device: str) -> MicroBatch:
    """The epoch's largest micro batch; without a length distribution, rows of the mean length (packed)
    or of max_seq_length (padded). Padded rows are rounded up to 8 on GPUs, as the collator pads."""
    t = cfg.training
    mb = t.micro_batch_size
    knots = data.get("length_quantiles")
    mean = min(t.max_seq_length, max(1, round(data["tokens"] / max(1, data["rows"]))))
    if t.micro_batch_tokens:
        return MicroBatch(tokens=t.micro_batch_tokens, rows=max(1, round(t.micro_batch_tokens / mean)), layout="packed")
    if knots:
        tokens, longest = first_micro_batch_rows(knots, data["rows"], mb, t.gradient_accumulation, t.max_seq_length)
    else:
        tokens, longest = mb * mean, t.max_seq_length
    if cfg.lora.packing:
        return MicroBatch(tokens=round(tokens), rows=mb, layout="packed")
    longest = int(longest)
    if device == "cuda":
        longest = -(-longest // 8) * 8
    return MicroBatch(tokens=mb * longest, rows=mb, layout="padded")


def steps_per_epoch(cfg: MedtuneConfig, data: dict[str, Any], world_size: int) -> int:
    """Optimizer steps in one epoch: rows / (micro batch x accumulation), or with token bins the bins
    (tokens / (budget x fill)) over accumulation x world size."""
    t = cfg.training
    if t.micro_batch_tokens:
        bins = math.ceil(data["tokens"] / (t.micro_batch_tokens * MEASURED_FILL))
        return math.ceil(bins / (t.gradient_accumulation * world_size))
    return math.ceil(data["rows"] / (t.micro_batch_size * t.gradient_accumulation))
