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
