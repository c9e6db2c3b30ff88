"""medtune.lora_dropout: LoRA's dropout drawn inside the adapter's GEMMs. The kernels run here under
Triton's CPU interpreter, against the same arithmetic in PyTorch ops with the reference mask (in bf16
on a GPU: bench/lora_dropout_check.py)."""

from __future__ import annotations

import pytest
import torch

from medtune import lora_dropout
from tests_support import needs_triton, run_under_triton_interpreter

KERNEL_CHECK = r"""
import torch
from medtune import lora_dropout as ld

torch.manual_seed(0)
cases = [(100, 80, 16, 0.1, torch.float32, True), (130, 64, 32, 0.05, torch.float32, True),
         (64, 200, 16, 0.3, torch.float16, True),  # bf16: numpy has none (bench/lora_dropout_check.py)
         (50, 75, 16, 0.1, torch.float32, True),
         (70, 90, 16, 0.1, torch.float32, False), (64, 66, 16, 0.3, torch.float16, False)]
for m, k, r, p, dtype, paired in cases:  # k = 80, 90, 66, 75: a last column tile only partly inside
    ld.PAIRED = paired
    x = torch.randn(m, k).to(dtype)
    a = (torch.randn(r, k) * 0.1).to(dtype)
    dh = torch.randn(m, r).to(dtype)
    gx = torch.randn(m, k).to(dtype)
    seed = 1234 + m
    keep = ld.reference_keep(seed, m, k, p)
    scale = ld.keep_scale(p)
    assert abs(scale * (1 - p) - 1) < (2e-5 if paired else 1e-9)  # the drop rate drawn is p's to 2**-16
    dropped = torch.where(keep, x.float(), 0.0) * scale
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    h = ld.forward(x, a, p, seed)
    torch.testing.assert_close(h.float(), dropped @ a.float().T, **tol)
    torch.testing.assert_close(ld.grad_a(x, dh, p, seed), dh.float().T @ dropped, **tol)
    part = torch.where(keep, dh.float() @ a.float(), 0.0) * scale
    torch.testing.assert_close(ld.grad_x(dh, a, p, seed).float(), part, **tol)  # written, not added
    want = gx.float() + part
    ld.add_grad_x(gx, dh, a, p, seed)
    torch.testing.assert_close(gx.float(), want, **tol)

# a group: adapters reading one input, A stacked, each member's mask from its own seed (medtune.shared_input)
ld.PAIRED = True
for m, k, r, p, seeds in ((100, 80, 16, 0.1, (11, 12, 13)), (70, 66, 32, 0.3, (5, 2**31 - 2))):
    group = len(seeds)
    x = torch.randn(m, k)
    a = torch.randn(group * r, k) * 0.1
    dh = torch.randn(m, group * r)
    gx, adds = torch.randn(m, k), tuple(torch.randn(m, k) for _ in range(group - 1))
    tol = dict(rtol=1e-4, atol=1e-4)
    keeps = [ld.reference_keep(s, m, k, p) for s in seeds]
    assert all((keeps[0] != other).any() for other in keeps[1:])  # the members' masks differ
    dropped = [torch.where(keep, x, 0.0) * ld.keep_scale(p) for keep in keeps]
    block = [slice(g * r, (g + 1) * r) for g in range(group)]
    want_h = torch.cat([d @ a[b].T for d, b in zip(dropped, block)], dim=1)
    torch.testing.assert_close(ld.forward(x, a, p, seeds), want_h, **tol)
    want_a = torch.cat([dh[:, b].T @ d for d, b in zip(dropped, block)])
    torch.testing.assert_close(ld.grad_a(x, dh, p, seeds), want_a, **tol)
    part = sum(torch.where(keep, dh[:, b] @ a[b], 0.0) * ld.keep_scale(p) for keep, b in zip(keeps, block))
    torch.testing.assert_close(ld.grad_x(dh, a, p, seeds), part, **tol)
    want = gx + sum(adds) + part
    ld.add_grad_x(gx, dh, a, p, seeds, addends=adds)
    torch.testing.assert_close(gx, want, **tol)
print("ok")
"""


@needs_triton
def test_the_kernels_compute_dropout_with_the_reference_mask():
    run_under_triton_interpreter(KERNEL_CHECK)


@pytest.mark.parametrize("paired", [True, False])
def test_the_mask_keeps_one_minus_p_and_each_seed_draws_another(paired):
    a, b = (lora_dropout.reference_keep(seed, 512, 512, 0.05, paired) for seed in (7, 8))
    assert abs(a.float().mean().item() - 0.95) < 0.002 and abs(b.float().mean().item() - 0.95) < 0.002
    both_dropped = (~a & ~b).float().mean().item()
    assert abs(both_dropped - 0.05 * 0.05) < 0.0008  # independent across seeds
    rows, cols = (~a).float().mean(1), (~a).float().mean(0)  # no row or column stripes
    assert rows.std() < 0.02 and cols.std() < 0.02
    # neighbours (one hash's two halves when paired) and vertical neighbours drop independently
    for first, second in ((a[:, 0::2], a[:, 1::2]), (a[0::2], a[1::2])):
        assert abs((~first & ~second).float().mean().item() - 0.05 * 0.05) < 0.0008


def test_the_paired_mask_is_one_hash_split_in_two_halves():
    """Column 2j takes the low 16 bits of pair j's hash and column 2j + 1 the high ones: the element-wise
    mask of the pairs' counter, compared at the 16-bit threshold, seen through each half."""
    seed, p = 11, 0.3
    paired = lora_dropout.reference_keep(seed, 6, 10, p, True)
    h = lora_dropout._reference_mix(seed, torch.arange(30, dtype=torch.int64).reshape(6, 5))
    limit = lora_dropout.threshold(p, True)
    assert limit == round(0.3 * 65536)
    assert torch.equal(paired[:, 0::2], (h & 0xFFFF) >= limit) and torch.equal(paired[:, 1::2], (h >> 16) >= limit)
    # an odd width: each row still starts a new pair, the last pair's second half unused
    assert torch.equal(lora_dropout.reference_keep(seed, 6, 9, p, True), paired[:, :9])


def test_seeds_follow_torch_manual_seed():
    torch.manual_seed(3)
    first = [lora_dropout.new_seed() for _ in range(3)]
    torch.manual_seed(3)
    assert [lora_dropout.new_seed() for _ in range(3)] == first and len(set(first)) == 3


@needs_triton
def test_the_kernels_compile_once_whatever_the_token_count_and_seed():
    """Triton specialises integer arguments on divisibility by 16; a seed or token count that happens to be
    one would compile another variant inside a training step (seconds on an H200: docs/benchmarks.md,
    machines twenty-nine and thirty)."""
    from medtune import lora_dropout_kernels as kernels

    for kernel in (kernels.forward_kernel, kernels.grad_a_kernel, kernels.grad_x_kernel):
        assert {"m", "seed0", "seed1", "seed2"} <= set(kernel.do_not_specialize)


def test_the_kernels_are_only_used_where_they_apply():
    x, a = torch.randn(8, 32, dtype=torch.bfloat16), torch.randn(16, 32, dtype=torch.bfloat16)
    assert not lora_dropout.usable(x, a, 0.05)  # not on CUDA


LAYER_CHECK = r"""
import torch
from medtune import fast_lora, lora_dropout as ld

ld.usable = lambda x, a, p: True  # the interpreter runs the kernels on CPU tensors, in float32 here
torch.manual_seed(0)
base = torch.nn.Linear(48, 40, bias=False)
a = (torch.randn(16, 48) * 0.1).requires_grad_()
b = (torch.randn(40, 16) * 0.1).requires_grad_()
x = torch.randn(2, 30, 48, requires_grad=True)
p, s = 0.2, 2.0
torch.manual_seed(5)
out = fast_lora.LoraLinear.apply(x, a, b, base, s, p, False, "kernel")
grad = torch.randn_like(out)
out.backward(grad)
got = (out.detach(), x.grad.clone(), a.grad.clone(), b.grad.clone())
for t in (x, a, b):
    t.grad = None
torch.manual_seed(5)
keep = ld.reference_keep(ld.new_seed(), 60, 48, p).reshape(2, 30, 48)  # the seed the layer drew
ref = base(x) + (torch.where(keep, x, 0.0) * ld.keep_scale(p)) @ a.T @ b.T * s
ref.backward(grad)
for name, g, w in zip(("out", "x", "a", "b"), got, (ref.detach(), x.grad, a.grad, b.grad)):
    torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=name)
print("ok")
"""


@needs_triton
def test_the_fused_lora_node_with_the_kernels_gives_autograds_gradients_for_the_same_mask():
    run_under_triton_interpreter(LAYER_CHECK)


ACCUMULATE_CHECK = r"""
import torch
from medtune import fast_lora, lora_dropout as ld

ld.usable = lambda x, a, p: True
fast_lora.ACCUMULATE_IN_BASE = True  # the adapter's part first, the base's GEMMs adding into it
torch.manual_seed(0)
base = torch.nn.Linear(48, 40, bias=False).half()  # the interpreter has no bf16: float16 activations and base
a = (torch.randn(16, 48) * 0.1).requires_grad_()
b = (torch.randn(40, 16) * 0.1).requires_grad_()
x = torch.randn(2, 30, 48).half().requires_grad_()
p, s = 0.2, 2.0
assert fast_lora.accumulates(x, base, False)
torch.manual_seed(5)
out = fast_lora.LoraLinear.apply(x, a, b, base, s, p, False, "kernel")
grad = torch.randn_like(out)
out.backward(grad)
got = (out.detach(), x.grad.clone(), a.grad.clone(), b.grad.clone())
torch.manual_seed(5)
keep = ld.reference_keep(ld.new_seed(), 60, 48, p).reshape(2, 30, 48)
xf, w = x.detach().float().requires_grad_(), base.weight.float()
af, bf = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
ref = xf @ w.T + (torch.where(keep, xf, 0.0) * ld.keep_scale(p)) @ af.T @ bf.T * s
ref.backward(grad.float())
for name, g, want in zip(("out", "x", "a", "b"), got, (ref.detach(), xf.grad, af.grad, bf.grad)):
    torch.testing.assert_close(g.float(), want, rtol=2e-2, atol=2e-2, msg=name)
print("ok")
"""


@needs_triton
def test_the_kernels_write_the_adapters_input_gradient_for_the_base_gemm_to_add_into():
    """`fast_lora.ACCUMULATE_IN_BASE` with the kernels: `grad_x_kernel` writes the masked part (reads no
    gradient), the base's GEMM accumulates into it; outputs and gradients as float32 autograd's."""
    run_under_triton_interpreter(ACCUMULATE_CHECK)
