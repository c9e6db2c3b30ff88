"""Row-wise float8 (e4m3) quantization in one kernel: `t ~= q * scale`, one float32 scale per row.

`medtune.fp8_base` multiplies an nf4 base projection in float8 on Hopper. In PyTorch ops each
quantization is five passes over the tensor (abs, amax, a float32 copy, a division, the cast); measured on an
H200 (docs/benchmarks.md, call z) they cost more than the float8 GEMMs saved (-19 %). The Triton kernel
here (`medtune.fp8_rows_kernels`) reads a row once when it fits one block (up to `ONE_BLOCK` columns: every
Llama-3.1-8B projection's width), keeping it in registers between the amax and the cast; a wider row is read
twice (the second time mostly from L2). It writes the float8 row once. It can also multiply each column by a
given factor first (`col_scale`), which moves a weight's per-output-channel scale onto the gradient in the
backward: `g @ W = (g * s) @ Wq` for `W = diag(s) Wq`, so the backward reuses the forward's quantized weight.

Without Triton or off CUDA the same arithmetic runs in PyTorch ops (`rowwise_reference`).
"""

from __future__ import annotations

import functools

import torch

FP8_MAX = 448.0  # the largest float8 e4m3 value


def rowwise_fp8(t: torch.Tensor, col_scale: torch.Tensor | None = None,
                row_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`t` (rows x cols, contiguous rows), times `col_scale` (cols,) if given, as float8 e4m3 with one
    float32 scale per row, shaped (rows, 1). `row_scale` (rows, 1): use these scales instead of the amax
    (a frozen weight's, computed once)."""
    kernel = _kernel()
    if kernel is None or t.device.type != "cuda" or t.stride(-1) != 1:
        return rowwise_reference(t, col_scale, row_scale)
    rows, cols = t.shape
    q = torch.empty((rows, cols), dtype=torch.float8_e4m3fn, device=t.device)
    scale = row_scale if row_scale is not None else torch.empty((rows, 1), dtype=torch.float32, device=t.device)
    launch(kernel, t, q, scale, col_scale, row_scale is not None)
    return q, scale


# Rows up to this many columns are read once, held in registers (16 warps: 32 float32 values per thread)
ONE_BLOCK = 16384
LOOP_BLOCK = 4096


def launch(kernel, t: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, col_scale: torch.Tensor | None,
           given: bool, one_block: int | None = None) -> None:
    """One program per row; a row of at most `one_block` (`ONE_BLOCK`) columns in one block, read once."""
    rows, cols = t.shape
    block = 1 << (cols - 1).bit_length()
    block = block if block <= (ONE_BLOCK if one_block is None else one_block) else LOOP_BLOCK
    warps = 16 if block >= 8192 else 8 if block >= 2048 else 4
    kernel[(rows,)](t, q, scale, col_scale if col_scale is not None else scale, t.stride(0), COLS=cols,
                    HAS_COL=col_scale is not None, GIVEN=given, BLOCK=block, num_warps=warps)


def rowwise_reference(t: torch.Tensor, col_scale: torch.Tensor | None = None,
                      row_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's arithmetic in PyTorch ops (CPUs, and the tests' reference)."""
    x = t.to(torch.float32, copy=True) if col_scale is None else t.float() * col_scale.float()
    scale = row_scale if row_scale is not None else \
        x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return x.mul_(1.0 / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def row_amax_scale(t: torch.Tensor) -> torch.Tensor:
    """The per-row scale `rowwise_fp8` would compute for `t`: a frozen weight's, to compute once."""
    return t.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX


@functools.cache
def _kernel():
    try:
        from medtune import fp8_rows_kernels
    except ImportError:  # no Triton
        return None
    return fp8_rows_kernels.rowwise
