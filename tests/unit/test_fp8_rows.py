"""Row-wise float8 quantization: the PyTorch reference, and the Triton kernel's scales against it (under
Triton's CPU interpreter where Triton is installed; its float8 values on a GPU: bench/fp8_rows_check.py)."""

from __future__ import annotations

import torch

from medtune import fp8_rows
from tests_support import needs_triton, run_under_triton_interpreter


def test_rows_come_back_within_e4m3_rounding_and_the_input_is_left_alone():
    torch.manual_seed(0)
    t = torch.randn(6, 40) * torch.logspace(-3, 2, 6).unsqueeze(1)  # rows of very different magnitude
    before = t.clone()
    q, scale = fp8_rows.rowwise_reference(t)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (6, 1)
    assert torch.equal(t, before)
    back = q.float() * scale
    assert ((back - t).abs() <= t.abs() * 2**-4 + scale * 2**-9).all()  # 3 mantissa bits: half a step
    assert torch.allclose(q.float().abs().amax(dim=1), torch.full((6,), fp8_rows.FP8_MAX))


def test_column_factors_and_given_row_scales():
    torch.manual_seed(1)
    t, cols = torch.randn(4, 16), torch.rand(16) + 0.5
    q, scale = fp8_rows.rowwise_reference(t, col_scale=cols)
    want_q, want_scale = fp8_rows.rowwise_reference(t * cols)
    assert torch.equal(q.float(), want_q.float()) and torch.equal(scale, want_scale)
    given = fp8_rows.row_amax_scale(t) * 2
    q2, scale2 = fp8_rows.rowwise_reference(t, row_scale=given)
    assert scale2 is given and q2.float().abs().max() <= fp8_rows.FP8_MAX / 2


def test_off_cuda_the_reference_runs():
    t = torch.randn(3, 32, dtype=torch.bfloat16)
    q, scale = fp8_rows.rowwise_fp8(t)
    want_q, want_scale = fp8_rows.rowwise_reference(t)
    assert torch.equal(q.float(), want_q.float()) and torch.equal(scale, want_scale)


KERNEL_CHECK = """
import torch
from medtune import fp8_rows
torch.manual_seed(0)
kernel = fp8_rows._kernel()


def run(t, c, given, one_block=fp8_rows.ONE_BLOCK):
    rows, cols = t.shape
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    s = given if given is not None else torch.empty(rows, 1)
    fp8_rows.launch(kernel, t, q, s, c, given is not None, one_block)
    return q, s


# one block read once (100, 9000, 64 columns), and rows wider than a block read twice (20000; 9000 forced)
for rows, cols, col, one_block in [(5, 100, False, fp8_rows.ONE_BLOCK), (3, 9000, True, fp8_rows.ONE_BLOCK),
                                   (4, 64, False, fp8_rows.ONE_BLOCK), (2, 20000, True, fp8_rows.ONE_BLOCK),
                                   (3, 9000, True, 1024)]:
    t = (torch.randn(rows, cols) * 3).to(torch.bfloat16)
    c = torch.rand(cols) + 0.5 if col else None
    want_q, want_s = fp8_rows.rowwise_reference(t, c)
    q, s = run(t, c, None, one_block)
    assert torch.allclose(s, want_s, rtol=1e-6), ("scales", rows, cols, one_block)
    # both paths do the same arithmetic: the same float8 bytes as the other path under this interpreter
    other_q, other_s = run(t, c, None, 1 << 20 if one_block < cols else 1024)
    assert torch.equal(q.view(torch.uint8), other_q.view(torch.uint8)) and torch.equal(s, other_s), ("paths", cols)
    given = want_s * 2
    q, s = run(t, c, given, one_block)
    assert s is given and torch.equal(given, want_s * 2), ("given scales", rows, cols)
    # Triton's CPU interpreter rounds float8 casts its own way (1.94 -> 1.0): the values are compared on a
    # GPU, where the cast is the hardware's (bench/fp8_rows_check.py); here only that they are float8 of the
    # right magnitude
    assert q.float().abs().max() <= fp8_rows.FP8_MAX / 2, ("range", rows, cols)
print("ok")
"""


@needs_triton
def test_the_triton_kernel_computes_the_reference():
    run_under_triton_interpreter(KERNEL_CHECK)


@needs_triton
def test_the_kernel_compiles_for_hopper_in_both_paths():
    """Cross-compiled for sm_90 with Triton's own ptxas, no GPU needed: the one-block path (a row read once) and
    the block-by-block path both cast by round-to-nearest-even with saturation, as the GPU checks assume
    (bench/fp8_rows_check.py: the same bytes as PyTorch's cast)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from medtune import fp8_rows_kernels

    signature = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "c_ptr": "*fp32", "stride": "i64"}
    for block in (4096, 1024):
        constants = {"COLS": 4096, "HAS_COL": False, "GIVEN": False, "BLOCK": block}
        ptx = triton.compile(ASTSource(fn=fp8_rows_kernels.rowwise,
                                       signature={**signature, **{n: "constexpr" for n in constants}},
                                       constexprs=constants), target=GPUTarget("cuda", 90, 32)).asm["ptx"]
        assert "cvt.rn.satfinite.e4m3x2.f32" in ptx, block


def test_a_group_is_quantized_as_its_concatenation_with_one_scale_per_row():
    """`rowwise_fp8_group` (a group's input gradients side by side): off CUDA, exactly the reference on
    `torch.cat` of the members and of their column factors; the members' rows share one scale, the largest."""
    torch.manual_seed(2)
    ts = [torch.randn(5, 24), torch.randn(5, 8) * 1e-3, torch.randn(5, 8) * 10]
    cols = [torch.rand(24) + 0.5, torch.rand(8) + 0.5, torch.rand(8) + 0.5]
    q, scale = fp8_rows.rowwise_fp8_group(ts, cols)
    want_q, want_scale = fp8_rows.rowwise_reference(torch.cat(ts, 1), torch.cat(cols))
    assert q.shape == (5, 40) and torch.equal(q.float(), want_q.float()) and torch.equal(scale, want_scale)
    alone = [fp8_rows.rowwise_reference(t, c)[1] for t, c in zip(ts, cols)]
    assert torch.equal(scale, torch.maximum(torch.maximum(alone[0], alone[1]), alone[2]))
    back = q[:, 24:32].float() * scale  # the small member keeps e4m3's relative precision under the large one's scale
    small = ts[1] * cols[1]
    assert ((back - small).abs() <= small.abs() * 2**-4 + scale * 2**-9).all()


GROUP_KERNEL_CHECK = """
import torch
from medtune import fp8_rows
torch.manual_seed(0)
group, single = fp8_rows._group_kernel(), fp8_rows._kernel()
# three members (q/k/v-like widths, one past a power of two) and two (gate/up-like, 9000 columns each)
for rows, widths in [(5, (100, 30, 30)), (3, (64, 16, 16)), (2, (9000, 9000)), (4, (200, 70))]:
    ts = [(torch.randn(rows, w) * 3 * (i + 1)).to(torch.bfloat16) for i, w in enumerate(widths)]
    cols = [torch.rand(w) + 0.5 for w in widths]
    q = torch.empty(rows, sum(widths), dtype=torch.float8_e4m3fn)
    s = torch.empty(rows, 1)
    fp8_rows.launch_group(group, ts, cols, q, s)
    want_q, want_s = fp8_rows.rowwise_reference(torch.cat(ts, 1), torch.cat(cols))
    assert torch.allclose(s, want_s, rtol=1e-6), ("scales", widths)
    # the same arithmetic as the one-member kernel on the concatenated row: the same float8 bytes under this
    # interpreter (whose float8 rounding is its own; the values against PyTorch's cast are checked on a GPU)
    cat_q = torch.empty_like(q)
    cat_s = torch.empty_like(s)
    fp8_rows.launch(single, torch.cat(ts, 1), cat_q, cat_s, torch.cat(cols), False)
    assert torch.equal(q.view(torch.uint8), cat_q.view(torch.uint8)) and torch.equal(s, cat_s), ("bytes", widths)
print("ok")
"""


@needs_triton
def test_the_group_kernel_computes_what_the_row_kernel_computes_on_the_concatenated_row():
    run_under_triton_interpreter(GROUP_KERNEL_CHECK)


@needs_triton
def test_the_group_kernel_compiles_for_hopper_with_two_and_three_members():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from medtune import fp8_rows_kernels

    pointers = {f"x{i}_ptr": "*bf16" for i in (1, 2, 3)} | {f"c{i}_ptr": "*fp32" for i in (1, 2, 3)}
    signature = {**pointers, "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "stride1": "i64", "stride2": "i64", "stride3": "i64"}
    for widths in ((4096, 1024, 1024), (14336, 14336, 0)):
        blocks = [1 << (w - 1).bit_length() if w else 1 for w in widths]
        constants = {"COLS1": widths[0], "COLS2": widths[1], "COLS3": widths[2],
                     "BLOCK1": blocks[0], "BLOCK2": blocks[1], "BLOCK3": blocks[2]}
        ptx = triton.compile(ASTSource(fn=fp8_rows_kernels.rowwise_group,
                                       signature={**signature, **{n: "constexpr" for n in constants}},
                                       constexprs=constants), target=GPUTarget("cuda", 90, 32)).asm["ptx"]
        assert "cvt.rn.satfinite.e4m3x2.f32" in ptx, widths
