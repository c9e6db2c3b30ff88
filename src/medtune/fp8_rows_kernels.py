"""The Triton kernel of `medtune.fp8_rows` (imported only where Triton is installed)."""

import triton
import triton.language as tl


@triton.jit
def row_values(x_row, c_ptr, offs, keep, HAS_COL: tl.constexpr):
    # a block of the row in float32, times its columns' factors (HAS_COL)
    v = tl.load(x_row + offs, mask=keep, other=0.0).to(tl.float32)
    if HAS_COL:
        v = v * tl.load(c_ptr + offs, mask=keep, other=0.0).to(tl.float32)
    return v


@triton.jit
def store_e4m3(q_row, offs, keep, v, inv):
    v = tl.minimum(tl.maximum(v * inv, -448.0), 448.0)
    tl.store(q_row + offs, v.to(tl.float8e4nv, fp_downcast_rounding="rtne"), mask=keep)


@triton.jit
def rowwise(x_ptr, q_ptr, s_ptr, c_ptr, stride, COLS: tl.constexpr, HAS_COL: tl.constexpr, GIVEN: tl.constexpr,
            BLOCK: tl.constexpr):  # COLS a constant: one compiled kernel per width
    row = tl.program_id(0).to(tl.int64)
    x_row, q_row = x_ptr + row * stride, q_ptr + row * COLS
    if BLOCK >= COLS:  # the whole row in one block: read once
        offs = tl.arange(0, BLOCK)
        keep = offs < COLS
        v = row_values(x_row, c_ptr, offs, keep, HAS_COL)
        if GIVEN:
            scale = tl.load(s_ptr + row)
        else:
            scale = tl.maximum(tl.max(tl.abs(v), axis=0), 1e-12) / 448.0
            tl.store(s_ptr + row, scale)
        store_e4m3(q_row, offs, keep, v, 1.0 / scale)
    else:  # block by block: the amax, then the cast (the second read mostly from L2)
        if GIVEN:
            scale = tl.load(s_ptr + row)
        else:
            amax = tl.zeros((BLOCK,), dtype=tl.float32)
            for start in range(0, COLS, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                amax = tl.maximum(amax, tl.abs(row_values(x_row, c_ptr, offs, offs < COLS, HAS_COL)))
            scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / 448.0
            tl.store(s_ptr + row, scale)
        inv = 1.0 / scale
        for start in range(0, COLS, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            keep = offs < COLS
            store_e4m3(q_row, offs, keep, row_values(x_row, c_ptr, offs, keep, HAS_COL), inv)


@triton.jit
def member_values(x_ptr, c_ptr, row, stride, COLS: tl.constexpr, BLOCK: tl.constexpr):
    # a group member's row in one block, times its columns' factors
    offs = tl.arange(0, BLOCK)
    keep = offs < COLS
    return row_values(x_ptr + row * stride, c_ptr, offs, keep, True), offs, keep


@triton.jit
def rowwise_group(x1_ptr, x2_ptr, x3_ptr, c1_ptr, c2_ptr, c3_ptr, q_ptr, s_ptr, stride1, stride2, stride3,
                  COLS1: tl.constexpr, COLS2: tl.constexpr, COLS3: tl.constexpr, BLOCK1: tl.constexpr,
                  BLOCK2: tl.constexpr, BLOCK3: tl.constexpr):
    # Two or three rows (a group's gradients; COLS3 = 0: two), each times its columns' factors, as one float8 row
    # of COLS1 + COLS2 + COLS3 values with one scale: each member's part read once and held in registers
    row = tl.program_id(0).to(tl.int64)
    v1, o1, k1 = member_values(x1_ptr, c1_ptr, row, stride1, COLS1, BLOCK1)
    v2, o2, k2 = member_values(x2_ptr, c2_ptr, row, stride2, COLS2, BLOCK2)
    amax = tl.maximum(tl.max(tl.abs(v1), axis=0), tl.max(tl.abs(v2), axis=0))
    if COLS3 > 0:
        v3, o3, k3 = member_values(x3_ptr, c3_ptr, row, stride3, COLS3, BLOCK3)
        amax = tl.maximum(amax, tl.max(tl.abs(v3), axis=0))
    scale = tl.maximum(amax, 1e-12) / 448.0
    tl.store(s_ptr + row, scale)
    inv = 1.0 / scale
    q_row = q_ptr + row * (COLS1 + COLS2 + COLS3)
    store_e4m3(q_row, o1, k1, v1, inv)
    store_e4m3(q_row + COLS1, o2, k2, v2, inv)
    if COLS3 > 0:
        store_e4m3(q_row + COLS1 + COLS2, o3, k3, v3, inv)
