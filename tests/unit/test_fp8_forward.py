"""The forward's base GEMMs in float8 (`fast_lora.FP8_FORWARD`), on the CPU: PyTorch's float8 GEMM and the row
quantization's reference (the GPU's kernels: tests/unit/test_nf4.py, test_fp8_rows.py, bench/nf4_check.py).
A LoRA layer's output is the product of x's float8 rows and the weight's frozen float8 rows plus the adapter's
update; its gradients are the 16-bit forward's, bit for bit; a group quantizes its input once and computes what
each projection alone computes."""

from __future__ import annotations

import pytest
import torch

from medtune import fast_lora, fp8_rows, shared_input


@pytest.fixture(autouse=True)
def _restore():
    yield
    fast_lora.FP8_FORWARD = False


def _layer_outputs(on: bool):
    fast_lora.FP8_FORWARD = on
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48, bias=False).to(torch.bfloat16)
    base.weight.requires_grad_(False)
    a = (torch.randn(16, 64) * 0.1).requires_grad_()
    b = (torch.randn(48, 16) * 0.1).requires_grad_()
    x = torch.randn(2, 10, 64, dtype=torch.bfloat16, requires_grad=True)
    out = fast_lora.LoraLinear.apply(x, a, b, base, 2.0, 0.0, "backward", "kernel")
    out.backward(torch.randn_like(out))
    return base, x, a, b, out.detach()


def test_the_float8_forward_is_the_scaled_float8_product_plus_the_update():
    base, x, a, b, out = _layer_outputs(True)
    _, x16, a16, b16, out16 = _layer_outputs(False)
    x2 = x.detach().reshape(-1, 64)
    xq, xs = fp8_rows.rowwise_reference(x2)
    row = fp8_rows.row_amax_scale(base.weight)  # the weight's frozen per-output-channel scales
    wq, _ = fp8_rows.rowwise_reference(base.weight, row_scale=row)
    update = 2.0 * (x2.float() @ a.detach().t()).bfloat16().float() @ b.detach().bfloat16().float().t()
    want = (xq.float() * xs) @ (wq.float() * row).t() + update
    torch.testing.assert_close(out.reshape(-1, 48).float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    # float8, not the 16-bit product: within e4m3's error of it
    error = (out.float() - out16.float()).norm() / out16.float().norm()
    assert 1e-3 < error < 0.08, error
    # the backward does not read the forward's output: the same gradients, bit for bit
    for got, want16 in ((x.grad, x16.grad), (a.grad, a16.grad), (b.grad, b16.grad)):
        assert torch.equal(got, want16)


def test_only_layers_whose_input_gradient_runs_in_float8_take_it():
    fast_lora.FP8_FORWARD = True
    x2 = torch.randn(4, 8, dtype=torch.bfloat16)
    assert fast_lora.forward_rows(x2, False) is None and fast_lora.forward_rows(x2, True) is None
    assert fast_lora.forward_rows(x2, "backward")[0].dtype == torch.float8_e4m3fn
    fast_lora.FP8_FORWARD = "groups"
    assert fast_lora.forward_rows(x2, "backward") is None and fast_lora.forward_rows(x2, "backward", True) is not None
    fast_lora.FP8_FORWARD = False
    assert fast_lora.forward_rows(x2, "backward") is None


def test_a_group_quantizes_its_input_once_and_computes_what_each_projection_would(monkeypatch):
    from test_shared_input import MODEL

    namespace: dict = {}
    exec(MODEL.replace(".half()", ".bfloat16()"), namespace)
    monkeypatch.setattr(fast_lora, "fp8_mode", lambda layer, x: "backward")
    calls = []
    rows = fast_lora.forward_rows
    def counted(x2, fp8, group=False):
        xq = rows(x2, fp8, group)
        calls.append(xq is not None)
        return xq

    monkeypatch.setattr(fast_lora, "forward_rows", counted)
    fast_lora.FP8_FORWARD = True
    loss, grads, groups = namespace["one_step"](namespace["tiny_lora"](0.0), True)
    assert groups == 4 and calls == [True] * 8  # per layer: q/k/v once, o, gate/up once, down
    calls.clear()
    alone, alone_grads, _ = namespace["one_step"](namespace["tiny_lora"](0.0), False)
    assert calls == [True] * 14  # each of the 7 projections of 2 layers quantizes its input
    assert loss == pytest.approx(alone, rel=1e-3)
    for name in grads:
        torch.testing.assert_close(grads[name], alone_grads[name], rtol=2e-2,
                                   atol=2e-2 * alone_grads[name].abs().max().item(), msg=name)
    fast_lora.FP8_FORWARD = False
    sixteen, _, _ = namespace["one_step"](namespace["tiny_lora"](0.0), True)
    assert sixteen != loss and sixteen == pytest.approx(loss, rel=2e-2)  # the forward ran in float8
    # "groups": only the groups' inputs (q/k/v, gate/up) in float8, o and down 16-bit
    fast_lora.FP8_FORWARD = "groups"
    calls.clear()
    groups_only, _, _ = namespace["one_step"](namespace["tiny_lora"](0.0), True)
    assert calls.count(True) == 4 and len(calls) == 8  # 2 layers x (q/k/v, gate/up) quantized; o, down not
    assert len({sixteen, groups_only, loss}) == 3
    calls.clear()
    namespace["one_step"](namespace["tiny_lora"](0.0), False)
    assert not any(calls)  # each projection alone: no group, 16-bit
