"""medtune.residual_fold (a lever, off by default): a decoder layer's residual additions inside the o and down
projections' GEMMs. A tiny bf16 Llama's training step folded and unfolded: the same loss and gradients to bf16
rounding, both additions taken by the GEMMs; without gradients, and with the adapters off, exactly the layer's
own forward."""

from __future__ import annotations

import pytest
import torch

from medtune import fast_lora, lean_mlp, residual_fold


@pytest.fixture(autouse=True)
def _restore():
    yield
    residual_fold.FOLD = False


def _model(namespace, recompute=False):
    model = namespace["tiny_lora"](0.1, recompute)
    assert lean_mlp.install(model) == 2
    for module in model.modules():
        if hasattr(module, "act_fn") and hasattr(module, "gated_act"):
            module.gated_act = lean_mlp._Act(module.act_fn, False)
    assert residual_fold.install(model) == 2 and residual_fold.install(model) == 2  # idempotent
    return model


def test_the_folded_step_trains_as_the_layers_own_additions(monkeypatch):
    from test_shared_input import MODEL

    namespace: dict = {}
    exec(MODEL.replace(".half()", ".bfloat16()"), namespace)
    taken = []
    for node in (fast_lora.LoraLinear, lean_mlp.GatedDown):
        apply = node.apply
        monkeypatch.setattr(node, "apply", lambda *a, _apply=apply: taken.append(a[-1] is not None) or _apply(*a))
    ref_loss, ref_grads, _ = namespace["one_step"](_model(namespace), True)
    assert taken and not any(taken)  # FOLD off: the layers' own forward, nothing handed to the GEMMs
    taken.clear()
    residual_fold.FOLD = True
    loss, grads, _ = namespace["one_step"](_model(namespace), True)
    assert taken.count(True) == 4  # per layer: o and down took the residual
    assert loss == pytest.approx(ref_loss, rel=1e-2)
    assert grads.keys() == ref_grads.keys() and len(grads) == 28
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=3e-2, atol=3e-2 * ref_grads[name].abs().max().item(),
                                   msg=name)
    # a layer recomputed in the backward keeps its own forward (transformers checkpoints the class's): the recompute
    # still happens (every projection runs twice) and nothing is folded
    taken.clear()
    again_loss, _, _ = namespace["one_step"](_model(namespace, recompute=True), True)
    assert len(taken) == 28 and not any(taken) and again_loss == pytest.approx(ref_loss, rel=1e-2)


def test_without_gradients_or_adapters_the_layer_runs_its_own_forward():
    from test_shared_input import MODEL

    namespace: dict = {}
    exec(MODEL.replace(".half()", ".bfloat16()"), namespace)
    ids = torch.arange(40).reshape(2, 20) % 96
    model = _model(namespace)
    model.train()  # dropout 0.1 draws its masks: the same seed before each forward
    torch.manual_seed(0)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    residual_fold.FOLD = True
    torch.manual_seed(0)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    torch.manual_seed(0)
    with model.disable_adapter():  # o and down on PEFT's own path: the layer adds both residuals itself
        off = model(input_ids=ids).logits
    residual_fold.FOLD = False
    torch.manual_seed(0)
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids).logits, off, rtol=0, atol=0)
    assert not any("residual" in vars(m) for m in model.modules())  # nothing left behind on a projection
