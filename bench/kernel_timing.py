"""What the kernel checks (bench/*_check.py) share: GPU and host time per call, the relative error of a tensor."""

from __future__ import annotations

import time

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


def host_ms(fn, repeats: int = 10, sleep_cycles: int = 4_000_000_000) -> tuple[float, bool]:
    """Milliseconds of host time per call, the calls queued behind a long sleep kernel (~2 s at 2 GHz), and
    whether a call waited for the GPU: then the calls' host time covers the sleep, which a launch that only
    queues work never does."""
    fn()
    torch.cuda.synchronize()
    start_gpu = torch.cuda.Event(enable_timing=True)
    start_gpu.record()
    torch.cuda._sleep(sleep_cycles)
    slept = torch.cuda.Event(enable_timing=True)
    slept.record()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    return host * 1e3 / repeats, host * 1e3 >= start_gpu.elapsed_time(slept)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| over the whole tensor, in float32."""
    return float((a.float() - b.float()).norm() / b.float().norm())
