"""Variable-length (padding-free) attention for packed micro batches, on PyTorch's own flash kernel.

With `lora.packing` the collator concatenates a micro batch's examples into one row and hands the
model the example boundaries (`cu_seq_lens_q/k`, `max_length_q/k`). `varlen_attention` feeds them to
`torch.nn.attention.varlen.varlen_attn` (FlashAttention inside PyTorch: no flash-attn wheel to
build, no mask materialised, no recompilation when the packed length changes), so each example
attends causally to itself only. It is registered with transformers' AttentionInterface under
`VARLEN`; without a mask function registered for that name, transformers builds no attention mask.
Grouped-query attention (fewer key/value heads than query heads, as Llama 3 and Mistral have) goes to
`varlen_attn(enable_gqa=True)` where PyTorch has it, else (2.10, 2.11) to the same flash kernels
through `FlashGqa`. With `FLASH4` (off by default, a bench lever until measured on a GPU) and FlashAttention 4
installed (`pip install flash-attn-4`: CuTe DSL kernels for Hopper and Blackwell), the same packed call goes to
`flash_attn.cute.flash_attn_varlen_func` on Hopper or newer GPUs; it shares each key/value head among its group
of query heads itself.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

VARLEN = "medtune_varlen"
# FlashAttention 4 for the packed attention where installed, on Hopper or newer (bench/gpu_train.py --ab fa4)
FLASH4 = False


def flash_capable() -> bool:
    """PyTorch's FlashAttention kernels need an Ampere or newer GPU (compute capability 8.0+)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def register() -> str:
    """Make `attn_implementation=VARLEN` loadable; idempotent."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention)
    return VARLEN


def boundaries(kwargs: dict[str, Any], batch: int, length: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Cumulative example starts and the longest example: from the collator's flash kwargs, else from
    `position_ids` restarting at 0, else every row is one example."""
    if kwargs.get("cu_seq_lens_q") is not None:
        return kwargs["cu_seq_lens_q"].to(device=device, dtype=torch.int32), int(kwargs["max_length_q"])
    position_ids = kwargs.get("position_ids")
    if position_ids is not None:
        flat = position_ids.reshape(-1)
        starts = torch.nonzero(flat == 0).reshape(-1)
        ends = torch.cat([starts[1:], torch.tensor([flat.numel()], device=flat.device)])
        cu = torch.cat([starts, ends[-1:]]).to(device=device, dtype=torch.int32)
        return cu, int((ends - starts).max())  # note: a GPU-CPU sync, once per layer without flash kwargs
    cu = torch.arange(0, (batch + 1) * length, length, device=device, dtype=torch.int32)
    return cu, length


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: q/k/v as (batch, heads, seq, head_dim); returns
    (batch, seq, heads, head_dim). Causal within each packed example."""
    if attention_mask is not None:
        raise ValueError("medtune_varlen attention takes packed rows without padding; got an attention mask")
    if dropout:
        raise ValueError("medtune_varlen attention has no attention dropout")
    batch, heads, length, dim = query.shape
    cu, longest = boundaries(kwargs, batch, length, query.device)
    q, k, v = (t.transpose(1, 2).reshape(batch * length, t.shape[1], dim) for t in (query, key, value))
    out = _varlen(q, k, v, cu, longest, scaling)
    return out.reshape(batch, length, heads, dim), None


@functools.cache
def _supported() -> frozenset[str]:
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int,
            scale: float | None) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    if FLASH4 and _hopper(q.device) and (flash4 := _flash4()) is not None:
        return flash4(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest,
                      softmax_scale=scale, causal=True)[0]
    params, extra = _supported(), {}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" not in params:  # PyTorch 2.10/2.11: varlen_attn cannot say so, the flash kernels can
            return FlashGqa.apply(q, k, v, cu, longest, scale)
        extra["enable_gqa"] = True
    if "scale" in params:
        extra["scale"] = scale
    elif scale is not None and abs(scale - q.shape[-1] ** -0.5) > 1e-9:
        raise ValueError("this PyTorch's varlen_attn has no `scale`; use attn_implementation=sdpa for this model")
    # PyTorch 2.10 spells causality `is_causal`; later versions a (left, right) window.
    extra.update({"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True})
    return varlen_attn(q, k, v, cu, cu, longest, longest, **extra)


def _hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


@functools.cache
def _flash4() -> Any | None:
    """FlashAttention 4's variable-length function (returns the output and the log-sum-exp), or None where
    `flash_attn.cute` or its compiler's libraries cannot be imported."""
    try:
        from flash_attn.cute import flash_attn_varlen_func
    except Exception:  # not installed, or its CUDA libraries missing: PyTorch's kernels then
        return None
    return flash_attn_varlen_func


class FlashGqa(torch.autograd.Function):
    """Causal variable-length FlashAttention with fewer key/value heads than query heads, for PyTorch
    versions whose `varlen_attn` has no `enable_gqa` (2.10, 2.11). It calls the same flash kernels as
    `varlen_attn` (`aten._flash_attention_forward/_backward`), which share each key/value head among its
    group of query heads themselves, as `enable_gqa` does in later versions. So no copy of k and v
    repeated to every head is written, in the forward or again for the backward (Llama-3.1-8B on an H200:
    the attention's forward + backward 1.18x faster for 8,192 tokens, the step's GPU time −1.6 %), and
    none is kept under activation recompute either. Same results as the repeated path (bench/gqa_check.py:
    output, dk, dv equal; dq to 3e-6)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int,
                scale: float | None) -> torch.Tensor:
        forward, _ = _flash_ops()
        out, lse, rng, unused, _mask = forward(q, k, v, cu, cu, longest, longest, 0.0, True, False, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, cu, rng, unused)
        ctx.longest, ctx.scale = longest, scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse, cu, rng, unused = ctx.saved_tensors
        _, backward = _flash_ops()
        dq, dk, dv = backward(grad.contiguous(), q, k, v, out, lse, cu, cu, ctx.longest, ctx.longest, 0.0, True,
                              rng, unused, scale=ctx.scale)
        return dq, dk, dv, None, None, None


def _flash_ops() -> tuple[Any, Any]:
    """PyTorch's flash kernels (CUDA only; the CPU tests put a reference in their place)."""
    return torch.ops.aten._flash_attention_forward, torch.ops.aten._flash_attention_backward
