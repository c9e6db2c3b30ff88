"""The forward's base GEMMs in float8 (`training.fp8_forward`), on the CPU: PyTorch's float8 GEMM and the row
quantization's reference (the GPU's kernels: tests/unit/test_nf4.py, test_fp8_rows.py, bench/nf4_check.py).
A LoRA layer's output is the product of x's float8 rows and the weight's frozen float8 rows plus the adapter's
update; its gradients are the 16-bit forward's, bit for bit; a group quantizes its input once and computes what
each projection alone computes; the setting picks the projections that read the normalized hidden state."""

from __future__ import annotations

import pytest
import torch

from medtune import fast_lora, fp8_rows, shared_input


@pytest.fixture(autouse=True)
def _restore():
    yield
    fast_lora.FP8_FORWARD = None


def _layer_outputs(on: bool):
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48, bias=False).to(torch.bfloat16)
    base.weight.requires_grad_(False)
    a = (torch.randn(16, 64) * 0.1).requires_grad_()
    b = (torch.randn(48, 16) * 0.1).requires_grad_()
    x = torch.randn(2, 10, 64, dtype=torch.bfloat16, requires_grad=True)
    out = fast_lora.LoraLinear.apply(x, a, b, base, 2.0, 0.0, "both" if on else "backward", "kernel")
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


def test_the_setting_picks_the_projections_and_only_training_forwards_take_it(monkeypatch):
    """`install` names each projection; `fp8_mode` gives those that read the normalized hidden state "both" under
    "qkv_gate_up", those and o under "all_but_down" (the default), every capable layer under "all", none under "none"
    (and `FP8_FORWARD`, the bench's override, wins); without gradients (evaluation) "backward" only; `forward_rows` quantizes only for "both"."""
    from types import SimpleNamespace

    from test_shared_input import MODEL

    namespace: dict = {}
    exec(MODEL.replace("assert fast_lora.install(model, backward=True) == 14",
                       "assert fast_lora.install(model, backward=True, fp8_forward=SETTING) == 14"), namespace)
    cuda = SimpleNamespace(is_cuda=True, device=SimpleNamespace(index=0))
    monkeypatch.setattr(fast_lora, "float8_gemms", lambda index: True)
    normalized = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    for setting, want in (("qkv_gate_up", normalized), ("all_but_down", normalized | {"o_proj"}),
                          ("all", set(NAMES)), ("none", set())):
        namespace["SETTING"] = setting
        layer = namespace["tiny_lora"](0.0).base_model.model.model.layers[1]
        projections = {**{n: getattr(layer.self_attn, n) for n in NAMES[:4]}, **{n: getattr(layer.mlp, n) for n in NAMES[4:]}}
        for module in projections.values():
            module.fp8_capable = True  # as `install` marks a 4-bit base without bias
        assert {n for n, m in projections.items() if fast_lora.fp8_mode(m, cuda) == "both"} == want, setting
        assert {fast_lora.fp8_mode(m, cuda) for n, m in projections.items() if n not in want} <= {"backward"}
        fast_lora.FP8_FORWARD = "all"
        assert all(fast_lora.fp8_mode(m, cuda) == "both" for m in projections.values())
        fast_lora.FP8_FORWARD = frozenset({"o_proj"})  # the bench's override by projection names
        assert {n for n, m in projections.items() if fast_lora.fp8_mode(m, cuda) == "both"} == {"o_proj"}
        fast_lora.FP8_FORWARD = None
        with torch.no_grad():
            assert {fast_lora.fp8_mode(m, cuda) for m in projections.values()} == {"backward"}
    x2 = torch.randn(4, 8, dtype=torch.bfloat16)
    assert fast_lora.forward_rows(x2, "both")[0].dtype == torch.float8_e4m3fn
    assert all(fast_lora.forward_rows(x2, mode) is None for mode in (False, True, "backward"))


NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_a_group_quantizes_its_input_once_and_computes_what_each_projection_would(monkeypatch):
    from test_shared_input import MODEL

    namespace: dict = {}
    exec(MODEL.replace(".half()", ".bfloat16()"), namespace)
    monkeypatch.setattr(fast_lora, "fp8_mode", lambda layer, x: "both" if fast_lora.forward_in_fp8(layer) else "backward")
    calls = []
    rows = fast_lora.forward_rows
    def counted(x2, fp8):
        xq = rows(x2, fp8)
        calls.append(xq is not None)
        return xq

    monkeypatch.setattr(fast_lora, "forward_rows", counted)
    fast_lora.FP8_FORWARD = "all"
    loss, grads, groups = namespace["one_step"](namespace["tiny_lora"](0.0), True)
    assert groups == 4 and calls == [True] * 8  # per layer: q/k/v once, o, gate/up once, down
    calls.clear()
    alone, alone_grads, _ = namespace["one_step"](namespace["tiny_lora"](0.0), False)
    assert calls == [True] * 14  # each of the 7 projections of 2 layers quantizes its input
    assert loss == pytest.approx(alone, rel=1e-3)
    for name in grads:
        torch.testing.assert_close(grads[name], alone_grads[name], rtol=2e-2,
                                   atol=2e-2 * alone_grads[name].abs().max().item(), msg=name)
    fast_lora.FP8_FORWARD = "none"
    sixteen, _, _ = namespace["one_step"](namespace["tiny_lora"](0.0), True)
    assert sixteen != loss and sixteen == pytest.approx(loss, rel=2e-2)  # the forward ran in float8
    # "qkv_gate_up": only the normalized inputs (q/k/v, gate/up: one quantization per group) in float8
    fast_lora.FP8_FORWARD = "qkv_gate_up"
    calls.clear()
    normalized, _, _ = namespace["one_step"](namespace["tiny_lora"](0.0), True)
    assert calls == [True, False, True, False] * 2  # per layer: q/k/v, o, gate/up, down
    assert len({sixteen, normalized, loss}) == 3
    calls.clear()
    namespace["one_step"](namespace["tiny_lora"](0.0), False)  # each projection alone: the same choice per projection
    assert calls == [True, True, True, False, True, True, False] * 2
