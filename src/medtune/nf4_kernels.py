"""The Triton kernel of `medtune.nf4` (imported only where Triton is installed)."""

import triton
import triton.language as tl


@triton.jit
def dequantize_kernel(packed_ptr, code_ptr, absmax_ptr, out_ptr, n_bytes, BLOCK: tl.constexpr,
                      BYTES_PER_SCALE: tl.constexpr):
    # BLOCK packed bytes per program: 2 * BLOCK weights, the high nibble first (bitsandbytes' layout)
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = j < n_bytes
    byte = tl.load(packed_ptr + j, mask=inside, other=0).to(tl.int32)
    scale = tl.load(absmax_ptr + j // BYTES_PER_SCALE, mask=inside, other=0.0)
    high = tl.load(code_ptr + (byte >> 4)) * scale  # float32, rounded once to the output dtype
    low = tl.load(code_ptr + (byte & 15)) * scale
    values = tl.interleave(high, low)
    e = tl.program_id(0).to(tl.int64) * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + e, values.to(out_ptr.dtype.element_ty), mask=e < 2 * n_bytes)


@triton.jit
def dequantize_nested_kernel(packed_ptr, code_ptr, scale_codes_ptr, code2_ptr, absmax2_ptr, offset_ptr, out_ptr,
                             n_bytes, BLOCK: tl.constexpr, BYTES_PER_SCALE: tl.constexpr,
                             SCALES_PER_SCALE2: tl.constexpr):
    # As dequantize_kernel, with the block scales themselves quantized (double quantization): each scale is
    # its 8-bit code's value times its group's float32 scale, plus the offset, in float32 and rounded after
    # each operation as bitsandbytes does (launched without fused multiply-add)
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = j < n_bytes
    byte = tl.load(packed_ptr + j, mask=inside, other=0).to(tl.int32)
    block = j // BYTES_PER_SCALE
    scale_code = tl.load(scale_codes_ptr + block, mask=inside, other=0).to(tl.int32)
    scale = tl.load(code2_ptr + scale_code) * tl.load(absmax2_ptr + block // SCALES_PER_SCALE2, mask=inside, other=0.0)
    scale = scale + tl.load(offset_ptr)
    high = tl.load(code_ptr + (byte >> 4)) * scale
    low = tl.load(code_ptr + (byte & 15)) * scale
    values = tl.interleave(high, low)
    e = tl.program_id(0).to(tl.int64) * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + e, values.to(out_ptr.dtype.element_ty), mask=e < 2 * n_bytes)
