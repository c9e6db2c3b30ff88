"""What the kernel checks (bench/*_check.py) share: GPU time per call and the relative error of a tensor."""

from __future__ import annotations

import torch


def timed(fn, repeats: int = 20) -> float:
    """Milliseconds of GPU time per call (CUDA events), after one untimed call. The calls are queued behind a
    ~10 ms sleep kernel, so that the host's launch time, which can exceed a small kernel's, is not timed
    (before session 12, 2026-11-29, it could be: a small kernel's time read as its launch's)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    torch.cuda._sleep(20_000_000)  # GPU clock cycles
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| over the whole tensor, in float32."""
    return float((a.float() - b.float()).norm() / b.float().norm())
