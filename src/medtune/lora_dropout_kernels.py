"""The Triton kernels of `medtune.lora_dropout` (imported only where Triton is installed)."""

import triton
import triton.language as tl


@triton.jit
def mix(h, seed):
    # murmur3's 32-bit finalizer over the counter (an odd multiple of it, plus the seed), in uint32
    h = h * tl.full((), 0x9E3779B1, tl.uint32) + seed.to(tl.uint32)
    h ^= h >> 16
    h *= tl.full((), 0x85EBCA6B, tl.uint32)
    h ^= h >> 13
    h *= tl.full((), 0xC2B2AE35, tl.uint32)
    h ^= h >> 16
    return h


@triton.jit
def keep_tile(seed, rows, start, k, limit, BLOCK_K: tl.constexpr, PAIRED: tl.constexpr):
    """Which elements of the tile (rows, start .. start + BLOCK_K) are kept. PAIRED: one hash per two
    neighbouring columns (2j, 2j + 1), its low 16 bits deciding the first, its high 16 bits the second;
    else one hash per element. `start` and BLOCK_K are even; the counter wraps like the hash (`usable`)."""
    if PAIRED:
        pairs = start // 2 + tl.arange(0, BLOCK_K // 2)
        h = mix(rows[:, None].to(tl.uint32) * ((k + 1) // 2) + pairs[None, :].to(tl.uint32), seed)
        low = (h & 0xFFFF) >= limit.to(tl.uint32)
        high = (h >> 16) >= limit.to(tl.uint32)
        return tl.interleave(low, high)
    cols = start + tl.arange(0, BLOCK_K)
    return mix(rows[:, None].to(tl.uint32) * k + cols[None, :].to(tl.uint32), seed) >= limit.to(tl.uint32)


@triton.jit
def dropped_tile(x_ptr, rows, start, m, k, stride_x, seed, limit, BLOCK_K: tl.constexpr, PAIRED: tl.constexpr):
    cols = start + tl.arange(0, BLOCK_K)
    inside = (rows[:, None] < m) & (cols[None, :] < k)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=inside, other=0.0)
    return tl.where(keep_tile(seed, rows, start, k, limit, BLOCK_K, PAIRED), x, tl.zeros_like(x))


@triton.jit
def member_seed(g, seed0, seed1, seed2):
    # the seed of a group's member g (0, 1 or 2; `medtune.lora_dropout`'s `seeds`)
    return tl.where(g == 0, seed0, tl.where(g == 1, seed1, seed2))


# `m` (the micro batch's tokens) and the seeds vary from call to call: Triton would otherwise compile another
# variant the first time either is a multiple of 16, a stall of seconds inside a training step.
# G: the members of a group of adapters reading the same input (`medtune.shared_input`), each with its own
# rank-R block of `a` and its own seed; 1 for one adapter. Their programs are neighbours in the launch order,
# so an input tile read from memory for the first is still in L2 for the others.
@triton.jit(do_not_specialize=["m", "seed0", "seed1", "seed2"])
def forward_kernel(x_ptr, a_ptr, h_ptr, m, seed0, seed1, seed2, limit, scale, stride_x, stride_a, stride_h,
                   K: tl.constexpr, R: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                   PAIRED: tl.constexpr):
    # K (the input width) a constant: the loop bound, one compiled kernel per width
    g = tl.program_id(0) % G
    seed = member_seed(g, seed0, seed1, seed2)
    rows = (tl.program_id(0) // G) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, R)
    a_ptr += g * R * stride_a
    acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        x = dropped_tile(x_ptr, rows, start, m, K, stride_x, seed, limit, BLOCK_K, PAIRED)
        a_t = tl.load(a_ptr + ranks[None, :] * stride_a + cols[:, None], mask=cols[:, None] < K, other=0.0)
        acc += tl.dot(x, a_t)
    out = (acc * scale).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + rows[:, None].to(tl.int64) * stride_h + g * R + ranks[None, :], out, mask=rows[:, None] < m)


@triton.jit(do_not_specialize=["m", "seed0", "seed1", "seed2"])
def grad_a_kernel(x_ptr, dh_ptr, parts_ptr, m, seed0, seed1, seed2, limit, stride_x, stride_dh, K: tl.constexpr,
                  R: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_K: tl.constexpr, PAIRED: tl.constexpr):
    g = tl.program_id(0) % G
    seed = member_seed(g, seed0, seed1, seed2)
    start = (tl.program_id(0) // G) * BLOCK_K
    cols = start + tl.arange(0, BLOCK_K)
    split = tl.program_id(1)
    ranks = tl.arange(0, R)
    acc = tl.zeros((R, BLOCK_K), dtype=tl.float32)
    for step in range(0, ROWS, BLOCK_M):
        rows = split * ROWS + step + tl.arange(0, BLOCK_M)
        x = dropped_tile(x_ptr, rows, start, m, K, stride_x, seed, limit, BLOCK_K, PAIRED)
        dh = tl.load(dh_ptr + rows[:, None].to(tl.int64) * stride_dh + g * R + ranks[None, :],
                     mask=rows[:, None] < m, other=0.0)
        acc += tl.dot(tl.trans(dh), x)
    out = parts_ptr + split.to(tl.int64) * G * R * K + (g * R + ranks[:, None]) * K + cols[None, :]
    tl.store(out, acc, mask=cols[None, :] < K)


@triton.jit(do_not_specialize=["m", "seed0", "seed1", "seed2"])
def grad_x_kernel(gx_ptr, add1_ptr, add2_ptr, dh_ptr, a_ptr, m, seed0, seed1, seed2, limit, scale, stride_gx,
                  stride_dh, stride_a, K: tl.constexpr, R: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_K: tl.constexpr, ACCUMULATE: tl.constexpr, ADDENDS: tl.constexpr, PAIRED: tl.constexpr):
    # gx = (ACCUMULATE: gx +) the ADDENDS (0-2) tensors laid out as gx + each member's masked update; in fp32,
    # one rounding. Without ACCUMULATE gx is written only.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    start = tl.program_id(1) * BLOCK_K
    cols = start + tl.arange(0, BLOCK_K)
    ranks = tl.arange(0, R)
    inside = (rows[:, None] < m) & (cols[None, :] < K)
    offsets = rows[:, None].to(tl.int64) * stride_gx + cols[None, :]
    gx = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for g in tl.static_range(G):
        dh = tl.load(dh_ptr + rows[:, None].to(tl.int64) * stride_dh + g * R + ranks[None, :],
                     mask=rows[:, None] < m, other=0.0)
        a = tl.load(a_ptr + (g * R + ranks[:, None]) * stride_a + cols[None, :], mask=cols[None, :] < K, other=0.0)
        update = tl.dot(dh, a) * scale
        if g == 0:  # g a constant here: the seed chosen when compiling
            seed = seed0
        elif g == 1:
            seed = seed1
        else:
            seed = seed2
        gx += tl.where(keep_tile(seed, rows, start, K, limit, BLOCK_K, PAIRED), update, tl.zeros_like(update))
    if ACCUMULATE:
        gx += tl.load(gx_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    if ADDENDS >= 1:
        gx += tl.load(add1_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    if ADDENDS >= 2:
        gx += tl.load(add2_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    tl.store(gx_ptr + offsets, gx.to(gx_ptr.dtype.element_ty), mask=inside)
