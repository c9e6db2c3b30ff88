"""What the kernel checks (bench/*_check.py) share: GPU time per call and the relative error of a tensor."""

from __future__ import annotations

import torch


def timed(fn, repeats: int = 20) -> float:
    """Milliseconds of GPU time per call (CUDA events), after one untimed call."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| over the whole tensor, in float32."""
    return float((a.float() - b.float()).norm() / b.float().norm())
