"""medtune.shared_input: q/k/v and gate/up run as one node each. A tiny Llama trained one step grouped and
ungrouped from the same seed draws the same dropout masks, so loss and every adapter gradient agree; the
dropout kernels run under Triton's CPU interpreter (float16: the interpreter has no bf16)."""

from __future__ import annotations

import logging

import pytest
import torch

from tests_support import needs_triton, run_under_triton_interpreter

MODEL = r"""
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from medtune import fast_lora, shared_input


def tiny_lora(dropout, recompute=False):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).half()
    if recompute:  # as medtune.train switches it on: each decoder layer's forward run again in the backward
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lora)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: no gradient would reach A or the input through it
            torch.nn.init.normal_(param, std=0.2)
    assert fast_lora.install(model, backward=True) == 14
    assert shared_input.install(model) == 4 and shared_input.install(model) == 4  # idempotent
    return model


def one_step(model, grouped, seed=5):
    shared_input.SHARED_INPUT = grouped
    model.train()
    model.zero_grad()
    calls = []
    apply = shared_input.SharedLora.apply
    shared_input.SharedLora.apply = lambda *a: calls.append(1) or apply(*a)
    try:
        ids = torch.arange(40).reshape(2, 20) % 96
        torch.manual_seed(seed)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    finally:
        shared_input.SharedLora.apply = apply
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, len(calls)


def agree(dropout, tol, recompute=False):
    # one step grouped (with `recompute`: the layers' forwards run again in the backward, the group's seeds
    # drawn again from the restored generator) against one step ungrouped without recompute
    model = tiny_lora(dropout, recompute)
    loss, grads, calls = one_step(model, True)
    assert calls == (8 if recompute else 4)  # two groups per layer ran as one node each (again in the recompute)
    ref_loss, ref_grads, ref_calls = one_step(tiny_lora(dropout), False)
    assert ref_calls == 0
    assert abs(loss - ref_loss) < tol * abs(ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) == 28
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=tol, atol=tol * ref_grads[name].abs().max().item(),
                                   msg=name)
    other_loss, other_grads, _ = one_step(model, True, seed=6)  # another seed: other masks (none without dropout)
    return other_loss != loss or any(not torch.equal(other_grads[n], grads[n]) for n in grads)
"""

GROUPED_CHECK = MODEL + r"""
from medtune import lora_dropout as ld

ld.usable = lambda x, a, p: True  # the interpreter runs the kernels on CPU tensors
assert agree(0.2, 2e-2)  # the masks follow the seed
agree(0.2, 2e-2, recompute=True)

# the float8 input gradient's path (its GEMMs summed with the adapters' parts in one pass), the GEMMs
# themselves stood in by their bf16 equivalent: float8 GEMMs need a Hopper GPU (bench/gpu_train.py)
stand_in = lambda g, base: g.mm(base.weight.to(g.dtype))
fast_lora.fp8_mode = lambda layer, x: "backward"
fast_lora.fp8_input_grad = shared_input.fp8_input_grad = stand_in
agree(0.2, 2e-2)
print("ok")
"""


@needs_triton
def test_grouped_projections_draw_the_same_masks_and_give_the_same_gradients():
    run_under_triton_interpreter(GROUPED_CHECK)


def test_without_dropout_the_group_computes_what_each_projection_would():
    namespace: dict = {}
    exec(MODEL, namespace)
    namespace["agree"](0.0, 1e-2)


def test_a_model_that_does_not_call_the_group_on_one_input_runs_each_projection(caplog):
    from medtune import shared_input

    namespace: dict = {}
    exec(MODEL, namespace)
    model = namespace["tiny_lora"](0.0)
    attention = model.base_model.model.model.layers[0].self_attn
    q, k, v = attention.q_proj, attention.k_proj, attention.v_proj
    group = q.shared_group
    torch.manual_seed(1)
    x, y = torch.randn(2, 5, 64).half(), torch.randn(2, 5, 64).half()
    shared_input.SHARED_INPUT = True
    with caplog.at_level(logging.WARNING, logger="medtune"):
        for _ in range(3):  # once may be a step that failed half way; twice in a row is the model's code
            outputs = q(x), k(y), v(y)  # k and v on another input: q's node computed theirs for x in vain
        assert group.off and "q_proj/k_proj/v_proj run one by one" in caplog.text
    again = q(x), k(y), v(y)
    assert group.pending is None  # no longer computed ahead
    shared_input.SHARED_INPUT = False
    alone = q(x), k(y), v(y)
    for got, before, want in zip(again, outputs, alone):
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(before, want)


def test_groups_form_only_where_every_member_runs_the_fused_backward():
    from medtune import fast_lora, shared_input

    namespace: dict = {}
    exec(MODEL.replace("assert fast_lora.install(model, backward=True) == 14\n", "")
         .replace("assert shared_input.install(model) == 4 and shared_input.install(model) == 4  # idempotent\n", ""),
         namespace)
    model = namespace["tiny_lora"](0.0)
    fast_lora.install(model, backward=False)  # the fused forward only
    assert shared_input.install(model) == 0


@pytest.fixture(autouse=True)
def _restore_switch():
    from medtune import shared_input

    yield
    shared_input.SHARED_INPUT = True
