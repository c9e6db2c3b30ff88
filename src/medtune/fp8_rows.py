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


def rowwise_fp8_group(ts: list[torch.Tensor], col_scales: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two or three tensors of the same rows (rows x cols_i, contiguous rows), each times its `col_scales[i]`, side by
    side as one float8 e4m3 tensor (rows x sum of cols_i) with one float32 scale per row, (rows, 1): what
    `rowwise_fp8` gives for `torch.cat(ts, 1)` and `torch.cat(col_scales)`, without that 16-bit copy (the
    concatenated input-gradient GEMM of a group, `medtune.fp8_base.fp8_input_grad_group`). On a GPU one kernel
    reads each row's members once, each member at most `ONE_BLOCK` columns."""
    kernel = _group_kernel()
    usable = (kernel is not None and len(ts) in (2, 3) and all(t.device.type == "cuda" and t.stride(-1) == 1 for t in ts)
              and all(t.shape[1] <= ONE_BLOCK for t in ts))
    if not usable:
        return rowwise_reference(torch.cat(ts, 1), col_scale=torch.cat(col_scales))
    rows, widths = ts[0].shape[0], [t.shape[1] for t in ts]
    q = torch.empty((rows, sum(widths)), dtype=torch.float8_e4m3fn, device=ts[0].device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=ts[0].device)
    launch_group(kernel, ts, col_scales, q, scale)
    return q, scale


def launch_group(kernel, ts: list[torch.Tensor], col_scales: list[torch.Tensor], q: torch.Tensor,
                 scale: torch.Tensor) -> None:
    """One program per row, every member in one block (`rowwise_fp8_group`); a missing third member has 0 columns."""
    third = len(ts) == 3
    x, c = [*ts, ts[0]][:3], [*col_scales, col_scales[0]][:3]
    widths = [t.shape[1] for t in ts] + ([] if third else [0])
    blocks = [1 << (w - 1).bit_length() if w else 1 for w in widths]
    warps = 16 if sum(blocks) >= 16384 else 8 if sum(blocks) >= 4096 else 4
    kernel[(ts[0].shape[0],)](*x, *c, q, scale, *(t.stride(0) for t in x), COLS1=widths[0], COLS2=widths[1],
                              COLS3=widths[2], BLOCK1=blocks[0], BLOCK2=blocks[1], BLOCK3=blocks[2], num_warps=warps)


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
def _kernels():
    try:
        from medtune import fp8_rows_kernels
    except ImportError:  # no Triton
        return None
    return fp8_rows_kernels


def _kernel():
    return None if _kernels() is None else _kernels().rowwise


def _group_kernel():
    return None if _kernels() is None else _kernels().rowwise_group
