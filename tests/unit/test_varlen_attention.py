"""The fast path's attention (packed rows + PyTorch's variable-length FlashAttention) must compute the
same loss and gradients as the plain path (padded rows + SDPA). PyTorch's flash kernel is CUDA-only,
so on CPU `varlen_attn` is replaced by a reference that runs SDPA once per packed example: what is
tested is medtune's side — the boundaries handed over by the collator, the head layouts, grouped-query
attention, and that transformers routes the packed batch through the kernel without a mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from medtune import attention
from medtune.config_io import load_config
from medtune.errors import ConfigError
from medtune.train import make_collator
from tests_support import qa_examples

TOLERANCE = 1e-5  # float32 on CPU
CALLS: list[int] = []


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                     enable_gqa=False, is_causal=None, **_):
    """SDPA per example: (tokens, heads, dim) in and out, like torch's varlen_attn."""
    assert window_size == (-1, 0) or is_causal, "medtune must ask for causal attention"
    assert enable_gqa or k.shape[1] == q.shape[1], "grouped-query heads must be declared or expanded"
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max())
    CALLS.append(len(cu_q) - 1)
    out = []
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
        out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                  enable_gqa=enable_gqa).transpose(0, 1))
    return torch.cat(out)


def legacy_varlen(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False):
    """The PyTorch 2.10 signature: no `scale`, no `enable_gqa`, causality as a flag."""
    return reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=is_causal)


FLASH_HEADS: list[tuple[int, int]] = []  # (query heads, key/value heads) as the flash ops saw them


def flash_forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, return_debug_mask, *, scale=None):
    """`aten._flash_attention_forward`'s varlen form: (out, logsumexp, rng state, unused, debug mask)."""
    assert dropout_p == 0.0 and is_causal and not return_debug_mask and cu_k is cu_q and max_k == max_q
    FLASH_HEADS.append((q.shape[1], k.shape[1]))
    out = reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, enable_gqa=True, is_causal=True)
    return out, torch.zeros(q.shape[1], q.shape[0]), torch.tensor([7, 9]), torch.empty(0), torch.empty(0)


def flash_backward(grad, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, rng, unused, *,
                   scale=None):
    """`aten._flash_attention_backward`: gradients of q, k, v (k and v with their own, fewer, heads)."""
    assert rng.tolist() == [7, 9] and lse.shape == (q.shape[1], q.shape[0]) and is_causal and dropout_p == 0.0
    assert grad.is_contiguous()
    FLASH_HEADS.append((q.shape[1], k.shape[1]))
    with torch.enable_grad():
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        again = reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, enable_gqa=True, is_causal=True)
    return torch.autograd.grad(again, (q, k, v), grad)


@pytest.fixture
def fake_kernel(monkeypatch):
    def use(fn):
        import torch.nn.attention.varlen as varlen

        monkeypatch.setattr(varlen, "varlen_attn", fn)
        monkeypatch.setattr(attention, "_flash_ops", lambda: (flash_forward, flash_backward))
        FLASH_HEADS.clear()
        monkeypatch.setattr(attention, "flash_capable", lambda: True)  # the stand-in kernel runs anywhere
        attention._supported.cache_clear()
        CALLS.clear()
    yield use
    attention._supported.cache_clear()


def packed_and_padded(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    feats = qa_examples(tok)
    base = ["model.model_source=local", f"model.local_model_path={tiny_model_dir}", "lora.quantization=none"]
    packed_cfg = load_config(overrides=[*base, "lora.packing=true", "training.device=cuda"], env={})
    plain_cfg = load_config(overrides=base, env={})
    # "cuda" only steers the collator's choice here: it returns CPU tensors either way.
    packed = make_collator(packed_cfg, tok, "cuda")([dict(f) for f in feats])
    padded = make_collator(plain_cfg, tok, "cpu")([dict(f) for f in feats])
    return packed, padded


def loss_and_grads(model_dir, attn, batch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()


@pytest.mark.parametrize("kernel", [reference_varlen, legacy_varlen], ids=["torch>=2.11", "torch-2.10"])
def test_packed_varlen_loss_and_grads_equal_padded_sdpa(tiny_model_dir, fake_kernel, kernel):
    fake_kernel(kernel)
    packed, padded = packed_and_padded(tiny_model_dir)
    assert packed["cu_seq_lens_q"].tolist()[-1] == packed["input_ids"].shape[1] and "attention_mask" not in packed
    loss_fast, grad_fast = loss_and_grads(tiny_model_dir, attention.register(), packed)
    loss_plain, grad_plain = loss_and_grads(tiny_model_dir, "sdpa", padded)
    if kernel is legacy_varlen:  # no enable_gqa: the flash ops are called with the 2 shared heads, not 4 copies
        assert FLASH_HEADS == [(4, 2)] * 4, FLASH_HEADS  # forward and backward of both layers
        assert CALLS == [3] * 4, CALLS  # three examples each time
    else:
        assert CALLS == [3, 3], CALLS  # both layers went through the kernel, three examples each
    assert abs(loss_fast - loss_plain) < TOLERANCE, (loss_fast, loss_plain)
    torch.testing.assert_close(grad_fast, grad_plain, atol=1e-6, rtol=1e-4)


FLASH4_CALLS: list[dict] = []


def fake_flash4(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    """`flash_attn.cute.flash_attn_varlen_func`'s keywords: (out, lse), grouped heads taken unrepeated."""
    assert causal and cu_seqlens_k is cu_seqlens_q and max_seqlen_k == max_seqlen_q
    FLASH4_CALLS.append({"heads": (q.shape[1], k.shape[1]), "examples": len(cu_seqlens_q) - 1})
    out = reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=softmax_scale,
                           enable_gqa=True, is_causal=True)
    return out, torch.zeros(q.shape[1], q.shape[0])


@pytest.mark.parametrize("flash4", [True, False], ids=["FLASH4", "off"])
def test_flash_attention_4_takes_the_packed_call_where_switched_on(tiny_model_dir, fake_kernel, monkeypatch, flash4):
    fake_kernel(legacy_varlen)  # without FLASH4: PyTorch's flash ops through FlashGqa
    monkeypatch.setattr(attention, "FLASH4", flash4)
    monkeypatch.setattr(attention, "_hopper", lambda device: True)
    monkeypatch.setattr(attention, "_flash4", lambda: fake_flash4)
    FLASH4_CALLS.clear()
    packed, padded = packed_and_padded(tiny_model_dir)
    loss_fast, grad_fast = loss_and_grads(tiny_model_dir, attention.register(), packed)
    loss_plain, grad_plain = loss_and_grads(tiny_model_dir, "sdpa", padded)
    if flash4:  # both layers, the 2 key/value heads unrepeated, three examples each; PyTorch's kernels unused
        assert FLASH4_CALLS == [{"heads": (4, 2), "examples": 3}] * 2 and not FLASH_HEADS, (FLASH4_CALLS, FLASH_HEADS)
    else:
        assert not FLASH4_CALLS and FLASH_HEADS == [(4, 2)] * 4
    assert abs(loss_fast - loss_plain) < TOLERANCE, (loss_fast, loss_plain)
    torch.testing.assert_close(grad_fast, grad_plain, atol=1e-6, rtol=1e-4)


def test_flash_attention_4_is_not_used_without_hopper_or_the_package(monkeypatch):
    monkeypatch.setattr(attention, "FLASH4", True)
    assert not attention._hopper(torch.device("cpu"))
    attention._flash4.cache_clear()
    monkeypatch.setitem(__import__("sys").modules, "flash_attn.cute", None)  # an import of it fails
    try:
        assert attention._flash4() is None
    finally:
        attention._flash4.cache_clear()


def test_boundaries_without_flash_kwargs_come_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    cu, longest = attention.boundaries({"position_ids": pos}, 1, 9, torch.device("cpu"))
    assert cu.tolist() == [0, 3, 5, 9] and longest == 4
    cu, longest = attention.boundaries({}, 2, 5, torch.device("cpu"))  # unpacked rows without padding
    assert cu.tolist() == [0, 5, 10] and longest == 5


def test_a_padded_batch_is_refused_rather_than_attending_to_padding(tiny_model_dir, fake_kernel):
    fake_kernel(reference_varlen)
    q = torch.zeros(1, 4, 3, 16)
    with pytest.raises(ValueError, match="without padding"):
        attention.varlen_attention(None, q, q, q, torch.ones(1, 3, dtype=torch.bool))


def test_varlen_needs_packing():
    with pytest.raises(ConfigError, match="lora.packing=true"):
        load_config(overrides=["training.attn_implementation=varlen"], env={})


@pytest.mark.parametrize("capability,expected", [((9, 0), attention.VARLEN), ((8, 0), attention.VARLEN),
                                                  ((7, 5), "sdpa")])
def test_auto_picks_varlen_only_where_pytorch_has_flash_attention(monkeypatch, tiny_model_dir, capability, expected):
    from medtune.train import attention_kernel

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cfg = load_config(overrides=["model.model_source=local", f"model.local_model_path={tiny_model_dir}",
                                 "lora.packing=true", "training.device=cuda"], env={})
    assert attention_kernel(cfg, "cuda") == expected
    unpacked = load_config(overrides=["model.model_source=local", f"model.local_model_path={tiny_model_dir}",
                                      "training.device=cuda", "lora.packing=false"], env={})
    assert attention_kernel(unpacked, "cuda") == "sdpa"


def test_asking_for_varlen_on_an_older_gpu_is_one_clear_error(monkeypatch, tiny_model_dir):
    from medtune.errors import EnvironmentProblem
    from medtune.train import attention_kernel

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    cfg = load_config(overrides=["model.model_source=local", f"model.local_model_path={tiny_model_dir}",
                                 "lora.packing=true", "training.device=cuda", "training.attn_implementation=varlen"],
                      env={})
    with pytest.raises(EnvironmentProblem, match="Ampere or newer"):
        attention_kernel(cfg, "cuda")
