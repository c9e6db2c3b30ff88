"""medtune.nf4: the nf4 weight dequantized by one Triton kernel, run here under Triton's CPU interpreter
against bitsandbytes' own dequantize (float32 and float16 outputs; the interpreter has no bf16; on a GPU
in bf16: bench/nf4_check.py)."""

from __future__ import annotations

from tests_support import needs_triton, run_under_triton_interpreter

KERNEL_CHECK = r"""
import bitsandbytes as bnb
import torch
from medtune import nf4

torch.manual_seed(0)
# bitsandbytes' CPU kernel agrees with its flat layout (blocks of 64 consecutive weights, the high nibble
# first, as its CUDA kernel) for rows of whole blocks: those shapes are compared with it bit for bit
for shape, nested in (((48, 64), True), ((40, 128), False), ((96, 192), True)):
    for dtype in (torch.float32, torch.float16):
        weight = torch.randn(*shape, dtype=dtype) * 0.05
        packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, quant_type="nf4",
                                                     compress_statistics=nested)
        assert state.nested == nested
        want = bnb.functional.dequantize_4bit(packed, state)
        out = torch.empty(tuple(state.shape), dtype=dtype)
        nf4.run(packed.view(torch.uint8).reshape(-1), nf4._code(state, out.device), nf4.block_scales(state), out,
                state.blocksize)
        assert want.dtype == out.dtype and want.shape == out.shape
        assert torch.equal(out, want), (shape, nested, dtype, (out.float() - want.float()).abs().max())
        if nested:  # the block scales dequantized inside the kernel
            inside = torch.full_like(out, float("nan"))
            nf4.run_nested(packed.view(torch.uint8).reshape(-1), nf4._code(state, out.device), state, inside)
            assert torch.equal(inside, want), (shape, dtype, (inside.float() - want.float()).abs().max())
# double quantization over more than one group of 256 block scales, a partial program at the end and
# scales whose offset is not small against them
weight = torch.randn(300, 320) * 0.05 + torch.linspace(0, 0.4, 320)
packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
assert state.nested and state.absmax.numel() > 2 * state.state2.blocksize
want = bnb.functional.dequantize_4bit(packed, state)
out = torch.empty(300, 320)
nf4.run_nested(packed.view(torch.uint8).reshape(-1), nf4._code(state, out.device), state, out)
assert torch.equal(out, want), (out - want).abs().max()
scales = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
assert torch.equal(nf4.block_scales(state), scales)
# blocks across rows: against the layout written out in PyTorch ops, and close to the weight itself
weight = torch.randn(40, 96) * 0.05
packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, quant_type="nf4")
raw = packed.view(torch.uint8).reshape(-1).long()
nibbles = torch.stack([raw >> 4, raw & 15], 1).reshape(-1)
scales = nf4.block_scales(state)
want = (nf4._code(state, "cpu")[nibbles] * scales[torch.arange(weight.numel()) // 64]).reshape(40, 96)
out = torch.empty(40, 96)
nf4.run(raw.to(torch.uint8), nf4._code(state, "cpu"), scales, out, 64)
assert torch.equal(out, want)
assert (out - weight).norm() / weight.norm() < 0.12  # nf4's own error (~9 %)
print("ok")
"""


@needs_triton
def test_the_kernel_dequantizes_as_bitsandbytes_does_bit_for_bit():
    run_under_triton_interpreter(KERNEL_CHECK)


def test_the_kernel_is_used_only_on_a_gpu():
    import bitsandbytes as bnb
    import torch

    from medtune import nf4

    base = bnb.nn.Linear4bit(64, 48, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(48, 64, dtype=torch.bfloat16), requires_grad=False,
                                    quant_type="nf4").to("cpu")
    assert not nf4.usable(base)


LAYER_CHECK = r"""
import bitsandbytes as bnb
import torch
from medtune import fast_lora, nf4

nf4.usable = lambda base: True  # the interpreter runs the kernel on CPU tensors (float16: it has no bf16)
calls, kernel = [], nf4.run_nested
nf4.run_nested = lambda *args: calls.append(1) or kernel(*args)
torch.manual_seed(0)
base = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float16, quant_type="nf4")
base.weight = bnb.nn.Params4bit(torch.randn(64, 128, dtype=torch.float16) * 0.05, requires_grad=False,
                                quant_type="nf4").to("cpu")
a = (torch.randn(16, 128) * 0.1).requires_grad_()
b = (torch.randn(64, 16) * 0.1).requires_grad_()
x = torch.randn(2, 30, 128, dtype=torch.float16, requires_grad=True)
grad = torch.randn(2, 30, 64, dtype=torch.float16)
results = []
for on in (False, True):
    fast_lora.NF4_KERNEL = on
    for t in (x, a, b):
        t.grad = None
    out = fast_lora.LoraLinear.apply(x, a, b, base, 2.0, 0.0, False, "replay")
    out.backward(grad)
    results.append((out.detach(), x.grad.clone(), a.grad.clone(), b.grad.clone()))
assert len(calls) == 2  # with NF4_KERNEL: the forward's weight and the input gradient's
for name, off, on in zip(("out", "x", "a", "b"), *results):
    assert torch.equal(off, on), name
print("ok")
"""


@needs_triton
def test_the_lora_layer_computes_the_same_with_the_kernels_weight():
    """`fast_lora.NF4_KERNEL`: the forward's base GEMM and the input gradient's on the kernel's weight give
    the same outputs and gradients as bitsandbytes' dequantize, bit for bit."""
    run_under_triton_interpreter(LAYER_CHECK)


FP8_CHECK = r"""
import bitsandbytes as bnb
import torch
from medtune import nf4

torch.manual_seed(0)
# each block's scale once per tile row (the in-width a multiple of 64: 256, 384) and per byte (200, 96)
# (192: a tile's second block past the row's end)
cases = (((70, 200), True), ((64, 256), False), ((130, 96), True), ((70, 256), True), ((130, 384), True),
         ((66, 384), False), ((40, 192), True))
assert [nf4.row_blocks(n_in, 64) for (_, n_in), _ in cases] == [False, True, False, True, True, True, True]
for (n_out, n_in), nested in cases:
    weight = torch.randn(n_out, n_in) * 0.05 + torch.linspace(0, 0.2, n_in)
    base = bnb.nn.Linear4bit(n_in, n_out, bias=False, compress_statistics=nested, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=nested, quant_type="nf4").to("cpu")
    packed, state = base.weight.data, base.weight.quant_state
    assert state.nested == nested
    # the reference in float32 PyTorch ops: nf4 code times block scale, then times the row's inverse scale
    raw = packed.view(torch.uint8).reshape(-1).long()
    nibbles = torch.stack([raw >> 4, raw & 15], 1).reshape(-1)
    scales = nf4.block_scales(state)
    w = (nf4._code(state, "cpu")[nibbles] * scales[torch.arange(n_out * n_in) // 64]).reshape(n_out, n_in)
    inverse = (448.0 / w.abs().amax(1)).float() * torch.linspace(0.5, 1.2, n_out)  # some rows past e4m3's range
    want = (w * inverse[:, None]).clamp(-448.0, 448.0).t().contiguous()
    got = nf4.fp8_transposed(base, inverse, fp8=False)
    assert got.shape == (n_in, n_out) and got.is_contiguous()
    assert torch.equal(got, want), ((n_out, n_in), nested, (got - want).abs().max())
    # into a column slice of a wider operand (a group's concatenated weights): the same values, nothing else touched
    wide = torch.full((n_in, n_out + 40), -1.0)
    nf4.fp8_transposed(base, inverse, fp8=False, out=wide[:, 24:24 + n_out])
    assert torch.equal(wide[:, 24:24 + n_out], want), ("slice", (n_out, n_in))
    assert (wide[:, :24] == -1).all() and (wide[:, 24 + n_out:] == -1).all(), ("outside the slice", (n_out, n_in))
    # the forward's operand: the same values, not transposed (the dequantizing kernel with each row's scale)
    rows = nf4.fp8_weight(base, inverse, fp8=False)
    assert rows.shape == (n_out, n_in) and torch.equal(rows, want.t()), ((n_out, n_in), nested)
    if not nested:  # the block scales given dequantized (nf4.NESTED_IN_KERNEL off) give them too
        nf4.NESTED_IN_KERNEL = False
        assert torch.equal(nf4.fp8_weight(base, inverse, fp8=False), rows)
        nf4.NESTED_IN_KERNEL = True
    assert got.abs().max() == 448.0
print("ok")
"""


@needs_triton
def test_the_float8_weight_is_written_transposed_and_scaled_per_row():
    """`nf4.fp8_transposed`: the nf4 weight times each row's inverse scale, clamped, transposed, as PyTorch's
    float32 ops give it (nested and plain block scales, tiles cut at both edges); `nf4.fp8_weight`, the
    forward's operand, the same values not transposed. The float8 cast itself is checked on a GPU
    (bench/nf4_check.py): Triton's interpreter rounds float8 differently."""
    run_under_triton_interpreter(FP8_CHECK)


@needs_triton
def test_the_kernels_compile_for_hopper_without_fused_multiply_add(monkeypatch):
    """Bit for bit bitsandbytes' values rests on two things the CPU interpreter cannot show: each product
    rounded on its own (the kernels launched with `enable_fp_fusion=False`: no `fma` in the PTX) and float8 by
    round-to-nearest-even with saturation. Cross-compiled for sm_90 with Triton's own ptxas, no GPU needed; and
    every launch in `medtune.nf4` passes the option."""
    import re

    import bitsandbytes as bnb
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from medtune import nf4, nf4_kernels

    scales = {"packed_ptr": "*u8", "code_ptr": "*fp32", "scales_ptr": "*u8", "code2_ptr": "*fp32",
              "absmax2_ptr": "*fp32", "offset_ptr": "*fp32"}
    kernels = [
        (nf4_kernels.dequantize_kernel, {**scales, "inverse_ptr": "*fp32", "out_ptr": "*bf16", "n_bytes": "i64",
                                         "half_in": "i32"},
         {"BLOCK": 1024, "BYTES_PER_SCALE": 32, "NESTED": True, "SCALES_PER_SCALE2": 256, "ROW_SCALE": False}),
        (nf4_kernels.dequantize_kernel, {**scales, "inverse_ptr": "*fp32", "out_ptr": "*fp8e4nv", "n_bytes": "i64",
                                         "half_in": "i32"},
         {"BLOCK": 1024, "BYTES_PER_SCALE": 32, "NESTED": True, "SCALES_PER_SCALE2": 256, "ROW_SCALE": True}),
        (nf4_kernels.fp8_transposed_kernel, {**scales, "inverse_ptr": "*fp32", "out_ptr": "*fp8e4nv", "n_out": "i32",
                                             "n_in": "i32", "ld": "i32"},
         {"NESTED": True, "BYTES_PER_SCALE": 32, "SCALES_PER_SCALE2": 256, "BLOCK_O": 64, "BLOCK_I": 128, "FP8": True,
          "ROW_BLOCKS": True}),
    ]
    for fn, signature, constants in kernels:
        signature = {**signature, **{name: "constexpr" for name in constants}}
        ptx = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants),
                             target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False}).asm["ptx"]
        assert not re.search(r"\bfma\.r[nzmp]", ptx) and re.search(r"\bmul\.(rn\.)?f32", ptx), fn.__name__
        assert ("cvt.rn.satfinite.e4m3x2.f32" in ptx) == (signature["out_ptr"] == "*fp8e4nv"), fn.__name__

    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(kwargs)

    monkeypatch.setattr(nf4, "_kernels", lambda: type("K", (), {"dequantize_kernel": Recorder(),
                                                                "fp8_transposed_kernel": Recorder()}))
    base = bnb.nn.Linear4bit(64, 32, bias=False, compress_statistics=True, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, compress_statistics=True,
                                    quant_type="nf4").to("cpu")
    state = base.weight.quant_state
    packed, code = base.weight.data.view(torch.uint8).reshape(-1), nf4._code(state, "cpu")
    nf4.run(packed, code, nf4.block_scales(state), torch.empty(32, 64), 64)
    nf4.run_nested(packed, code, state, torch.empty(32, 64))
    nf4.fp8_transposed(base, torch.ones(32))
    nf4.fp8_weight(base, torch.ones(32))
    assert len(launches) == 4 and all(k["enable_fp_fusion"] is False for k in launches)
