"""The Triton kernels of `medtune.lora_dropout` (imported only where Triton is installed)."""

import triton
import triton.language as tl


@triton.jit
def keep(seed, rows, cols, k, limit):
    # the element's index in uint32 (below 2**32 elements: `usable`), wrapping like the hash itself
    h = rows.to(tl.uint32) * k + cols.to(tl.uint32)
    h = h * tl.full((), 0x9E3779B1, tl.uint32) + seed.to(tl.uint32)
    h ^= h >> 16
    h *= tl.full((), 0x85EBCA6B, tl.uint32)
    h ^= h >> 13
    h *= tl.full((), 0xC2B2AE35, tl.uint32)
    h ^= h >> 16
    return h >= limit.to(tl.uint32)


@triton.jit
def dropped_tile(x_ptr, rows, cols, m, k, stride_x, seed, limit):
    inside = (rows[:, None] < m) & (cols[None, :] < k)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=inside, other=0.0)
    return tl.where(keep(seed, rows[:, None], cols[None, :], k, limit), x, tl.zeros_like(x))


@triton.jit
def forward_kernel(x_ptr, a_ptr, h_ptr, m, seed, limit, scale, stride_x, stride_a, stride_h,
                   K: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    # K (the input width) a constant: the loop bound, one compiled kernel per width
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, R)
    acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        x = dropped_tile(x_ptr, rows, cols, m, K, stride_x, seed, limit)
        a_t = tl.load(a_ptr + ranks[None, :] * stride_a + cols[:, None], mask=cols[:, None] < K, other=0.0)
        acc += tl.dot(x, a_t)
    out = (acc * scale).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + rows[:, None].to(tl.int64) * stride_h + ranks[None, :], out, mask=rows[:, None] < m)


@triton.jit
def grad_a_kernel(x_ptr, dh_ptr, parts_ptr, m, seed, limit, stride_x, stride_dh, K: tl.constexpr,
                  R: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(1)
    ranks = tl.arange(0, R)
    acc = tl.zeros((R, BLOCK_K), dtype=tl.float32)
    for step in range(0, ROWS, BLOCK_M):
        rows = split * ROWS + step + tl.arange(0, BLOCK_M)
        x = dropped_tile(x_ptr, rows, cols, m, K, stride_x, seed, limit)
        dh = tl.load(dh_ptr + rows[:, None].to(tl.int64) * stride_dh + ranks[None, :], mask=rows[:, None] < m,
                     other=0.0)
        acc += tl.dot(tl.trans(dh), x)
    out = parts_ptr + split.to(tl.int64) * R * K + ranks[:, None] * K + cols[None, :]
    tl.store(out, acc, mask=cols[None, :] < K)


@triton.jit
def grad_x_kernel(gx_ptr, dh_ptr, a_ptr, m, seed, limit, scale, stride_gx, stride_dh, stride_a,
                  K: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                  ACCUMULATE: tl.constexpr):
    # ACCUMULATE: add the masked update to gx; else write it (gx read nowhere)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ranks = tl.arange(0, R)
    dh = tl.load(dh_ptr + rows[:, None].to(tl.int64) * stride_dh + ranks[None, :], mask=rows[:, None] < m,
                 other=0.0)
    a = tl.load(a_ptr + ranks[:, None] * stride_a + cols[None, :], mask=cols[None, :] < K, other=0.0)
    update = tl.dot(dh, a) * scale
    inside = (rows[:, None] < m) & (cols[None, :] < K)
    where = gx_ptr + rows[:, None].to(tl.int64) * stride_gx + cols[None, :]
    gx = tl.where(keep(seed, rows[:, None], cols[None, :], K, limit), update, tl.zeros_like(update))
    if ACCUMULATE:
        gx += tl.load(where, mask=inside, other=0.0).to(tl.float32)
    tl.store(where, gx.to(gx_ptr.dtype.element_ty), mask=inside)
