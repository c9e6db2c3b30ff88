"""The Triton kernels of `medtune.nf4` (imported only where Triton is installed)."""

import triton
import triton.language as tl


@triton.jit
def block_scale(scales_ptr, code2_ptr, absmax2_ptr, offset_ptr, block, inside, NESTED: tl.constexpr,
                SCALES_PER_SCALE2: tl.constexpr):
    # The float32 scale of each weight's block. Doubly quantized (NESTED): its 8-bit code's value times its
    # group's float32 scale, plus the offset, rounded after each operation as bitsandbytes computes it (the
    # kernels are launched without fused multiply-add)
    if NESTED:
        scale_code = tl.load(scales_ptr + block, mask=inside, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + scale_code) * tl.load(absmax2_ptr + block // SCALES_PER_SCALE2, mask=inside,
                                                         other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(scales_ptr + block, mask=inside, other=0.0)
    return scale


@triton.jit
def dequantize_kernel(packed_ptr, code_ptr, scales_ptr, code2_ptr, absmax2_ptr, offset_ptr, inverse_ptr, out_ptr,
                      n_bytes, half_in, BLOCK: tl.constexpr, BYTES_PER_SCALE: tl.constexpr, NESTED: tl.constexpr,
                      SCALES_PER_SCALE2: tl.constexpr, ROW_SCALE: tl.constexpr):
    # BLOCK packed bytes per program: 2 * BLOCK weights, the high nibble first (bitsandbytes' layout).
    # ROW_SCALE: each weight of row o (half_in bytes per row) also times inverse[o] and clamped to e4m3's range,
    # as `fp8_transposed_kernel` computes it (the forward's float8 weight: the same bytes, not transposed)
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = j < n_bytes
    byte = tl.load(packed_ptr + j, mask=inside, other=0).to(tl.int32)
    scale = block_scale(scales_ptr, code2_ptr, absmax2_ptr, offset_ptr, j // BYTES_PER_SCALE, inside, NESTED,
                        SCALES_PER_SCALE2)
    high = tl.load(code_ptr + (byte >> 4)) * scale  # float32, rounded once to the output dtype
    low = tl.load(code_ptr + (byte & 15)) * scale
    if ROW_SCALE:
        inverse = tl.load(inverse_ptr + j // half_in, mask=inside, other=0.0)
        high = tl.minimum(tl.maximum(high * inverse, -448.0), 448.0)
        low = tl.minimum(tl.maximum(low * inverse, -448.0), 448.0)
    values = tl.interleave(high, low)
    e = tl.program_id(0).to(tl.int64) * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + e, values.to(out_ptr.dtype.element_ty), mask=e < 2 * n_bytes)


@triton.jit
def fp8_transposed_kernel(packed_ptr, code_ptr, scales_ptr, code2_ptr, absmax2_ptr, offset_ptr, inverse_ptr,
                          out_ptr, n_out, n_in, ld, NESTED: tl.constexpr, BYTES_PER_SCALE: tl.constexpr,
                          SCALES_PER_SCALE2: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
                          FP8: tl.constexpr, ROW_BLOCKS: tl.constexpr):
    # One tile of the weight W (BLOCK_O rows, BLOCK_I columns) from its nf4 bytes, each row o times inverse[o],
    # written transposed: out[i, o] (`ld` elements from one i to the next: n_out, or more where W's columns are a
    # slice of a group's concatenated operand), float8 e4m3 (FP8) or float32 (the interpreter's tests: its float8 rounding
    # is not the GPU's). In float32 and rounded after each product: weight, then times the row's inverse scale.
    # ROW_BLOCKS: the scale blocks start at each row's start and a tile's row holds whole blocks
    # (`nf4.fp8_transposed`): each block's scale computed once and broadcast over its bytes, else per byte
    o = tl.program_id(0).to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    pair = tl.program_id(1).to(tl.int64) * (BLOCK_I // 2) + tl.arange(0, BLOCK_I // 2)
    rows = o < n_out
    inside = rows[:, None] & (pair < n_in // 2)[None, :]
    j = o[:, None] * (n_in // 2) + pair[None, :]  # the byte of columns 2 * pair and 2 * pair + 1
    byte = tl.load(packed_ptr + j, mask=inside, other=0).to(tl.int32)
    if ROW_BLOCKS:
        NB: tl.constexpr = BLOCK_I // 2 // BYTES_PER_SCALE
        first = (o[:, None] * (n_in // 2) + tl.program_id(1).to(tl.int64) * (BLOCK_I // 2)) // BYTES_PER_SCALE
        blocks = first + tl.arange(0, NB)[None, :]
        in_row = (tl.program_id(1) * NB + tl.arange(0, NB)) * BYTES_PER_SCALE < n_in // 2
        each = block_scale(scales_ptr, code2_ptr, absmax2_ptr, offset_ptr, blocks, rows[:, None] & in_row[None, :],
                           NESTED, SCALES_PER_SCALE2)
        scale = tl.reshape(tl.broadcast_to(each[:, :, None], (BLOCK_O, NB, BYTES_PER_SCALE)), (BLOCK_O, BLOCK_I // 2))
    else:
        scale = block_scale(scales_ptr, code2_ptr, absmax2_ptr, offset_ptr, j // BYTES_PER_SCALE, inside, NESTED,
                            SCALES_PER_SCALE2)
    inverse = tl.load(inverse_ptr + o, mask=rows, other=0.0)[:, None]
    high = tl.load(code_ptr + (byte >> 4)) * scale * inverse
    low = tl.load(code_ptr + (byte & 15)) * scale * inverse
    values = tl.minimum(tl.maximum(tl.interleave(high, low), -448.0), 448.0)
    i = tl.program_id(1).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    where = out_ptr + i[:, None] * ld + o[None, :]
    keep = (i < n_in)[:, None] & rows[None, :]
    if FP8:
        tl.store(where, tl.trans(values).to(tl.float8e4nv), mask=keep)
    else:
        tl.store(where, tl.trans(values), mask=keep)
