"""A group's input gradients (q/k/v, gate/up) as one float8 GEMM over the members' gradients and weights side by
side (`fp8_base.fp8_input_grad_group`, the bench lever `groupgrad`), on the CPU: PyTorch's float8 GEMM and the
row quantization's reference (the GPU kernels' own checks: test_fp8_rows.py, test_nf4.py)."""

from __future__ import annotations

import pytest
import torch

from medtune import fast_lora, fp8_base, fp8_rows


@pytest.fixture(autouse=True)
def _restore():
    default = fp8_base.GROUP_INPUT_GRAD
    yield
    fp8_base.GROUP_INPUT_GRAD = default


def _members(widths=(48, 16, 16), n_in=64):
    torch.manual_seed(3)
    bases = []
    for width in widths:
        base = torch.nn.Linear(n_in, width, bias=False).to(torch.bfloat16)
        base.weight.requires_grad_(False)
        bases.append(base)
    grads = [(torch.randn(12, w) * (i + 1) ** 2).to(torch.bfloat16) for i, w in enumerate(widths)]
    return grads, bases


@pytest.mark.parametrize("widths", [(48, 16, 16), (40, 40)])
def test_one_gemm_over_the_members_side_by_side(widths):
    grads, bases = _members(widths)
    got = fp8_base.fp8_input_grad_group(grads, bases)
    # by hand: each member's weight scales on its gradient's columns, one row scale over the concatenation, the
    # weights' float8 rows stacked along K
    scales = [fp8_base._fp8_scales(b) for b in bases]
    gq, gs = fp8_rows.rowwise_reference(torch.cat(grads, 1), torch.cat([s.row.reshape(-1) for s in scales]))
    wq = torch.cat([fp8_rows.rowwise_reference(b.weight, row_scale=s.row)[0] for b, s in zip(bases, scales)])
    want = (gq.float() * gs) @ wq.float()
    assert got.shape == (12, 64) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
    # the members' exact 16-bit sum, within e4m3's error, and what each member's own float8 GEMM summed gives
    exact = sum(g.float() @ b.weight.float() for g, b in zip(grads, bases))
    error = (got.float() - exact).norm() / exact.norm()
    assert 1e-4 < error < 0.06, error
    apart = sum(fp8_base.fp8_input_grad(g, b).float() for g, b in zip(grads, bases))
    assert (apart - exact).norm() / exact.norm() < 0.06


def test_the_lever_runs_each_groups_input_gradient_as_one_gemm(monkeypatch):
    """A tiny Llama's step with float8 input gradients (dropout 0): the same loss with the lever on and off (the
    forward is untouched), one grouped GEMM per group in the backward, and every adapter gradient within e4m3's
    error of the per-member path's and not equal to it (the lever ran)."""
    from test_shared_input import MODEL

    namespace: dict = {}
    exec(MODEL.replace(".half()", ".bfloat16()"), namespace)
    monkeypatch.setattr(fast_lora, "fp8_mode", lambda layer, x: "backward")
    calls = []
    group = fp8_base.fp8_input_grad_group
    monkeypatch.setattr(fp8_base, "fp8_input_grad_group", lambda g, b: calls.append(len(g)) or group(g, b))
    assert fp8_base.GROUP_INPUT_GRAD == "narrow"  # the default: q/k/v's input gradients as one GEMM
    fp8_base.GROUP_INPUT_GRAD = "none"
    apart_loss, apart_grads, _ = namespace["one_step"](namespace["tiny_lora"](0.0), True)
    assert calls == []
    # "all": gate/up in both layers, q/k/v in the second (the first layer's reads the frozen embeddings, needing no
    # gradient); "narrow": q/k/v only (the tiny model's k and v are narrower than its hidden size, gate/up wider)
    for mode, want in (("all", [2, 2, 3]), ("narrow", [3])):
        calls.clear()
        fp8_base.GROUP_INPUT_GRAD = mode
        loss, grads, groups = namespace["one_step"](namespace["tiny_lora"](0.0), True)
        assert groups == 4 and sorted(calls) == want, mode
        assert loss == apart_loss
        assert any(not torch.equal(grads[n], apart_grads[n]) for n in grads)
        for name in grads:
            torch.testing.assert_close(grads[name], apart_grads[name], rtol=3e-2,
                                       atol=3e-2 * apart_grads[name].abs().max().item(), msg=f"{mode} {name}")
