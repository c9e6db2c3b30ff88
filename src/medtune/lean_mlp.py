"""A gated MLP (`down(act(gate(x)) * up(x))`, Llama, Mistral, Gemma) whose backward keeps less.

With the fused LoRA backward (`medtune.fast_lora.LoraLinear`) the down projection keeps its input,
`act(gate) * up`, for its adapter's gradient, while the activation's own backward already keeps
`gate` and `up`: at the Llama-3.1-8B shape that is 14,336 16-bit values per token per layer kept
twice over, 7 GiB of an 8,192-token micro batch. `GatedDown` is the activation and the down
projection as one autograd node: it keeps `gate` and `up` only and computes `act(gate) * up` again in
the backward (one elementwise pass over the layer's widest tensor), as Unsloth's LoRA MLP does. The
numbers are the ones autograd computes: the product is recomputed by the same kernel, so it is the
same tensor, and the dropout mask is drawn again from the same random-number state.

The MLP's forward is swapped when training starts (`AtTrainStart`): after the Trainer has put
Liger's SwiGLU in, whose kernels then compute the product and its backward here.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch
from transformers import TrainerCallback

from medtune import fast_lora

log = logging.getLogger("medtune")


def install(model: torch.nn.Module) -> int:
    """Give every gated MLP whose down projection runs the fused LoRA backward the lean forward;
    returns how many took it (idempotent)."""
    count = 0
    for module in model.modules():
        down = getattr(module, "down_proj", None)
        if (all(hasattr(module, n) for n in ("gate_proj", "up_proj", "act_fn")) and down is not None
                and getattr(down.forward, "__func__", None) is fast_lora.fused_forward_backward):
            if getattr(module.forward, "__func__", None) is not forward:
                # Liger's SwiGLU forward in place (the Trainer's `use_liger_kernel`): its kernels here too
                liger = getattr(module.forward, "__qualname__", "").startswith("LigerSwiGLUMLP.")
                module.gated_act = _Act(module.act_fn, liger)  # built once, not per forward
                module.forward = types.MethodType(forward, module)
            count += 1
    return count


class AtTrainStart(TrainerCallback):
    """Installs the lean forward when training starts, after the Trainer's Liger patches (which
    replace the MLP's forward) and before any CUDA graph is captured."""

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        count = install(model)
        if count:
            log.info("finetune: %d gated MLPs keep gate and up only for the backward (medtune.lean_mlp)", count)


def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    down = self.down_proj
    name = fast_lora._plain(down, {})
    act = self.gated_act
    if not torch.is_grad_enabled():
        return down(act.forward(gate, up))
    if name is None:  # PEFT's own path (adapter disabled, merged, ...): autograd keeps what it keeps
        return down(self.act_fn(gate) * up)
    drop = down.lora_dropout[name]
    p = drop.p if isinstance(drop, torch.nn.Dropout) and drop.training else 0.0
    return GatedDown.apply(gate, up, down.lora_A[name].weight, down.lora_B[name].weight, down.base_layer,
                           down.scaling[name], p, fast_lora.fp8_mode(down, gate), fast_lora.dropout_mode(down), act)


class _Act:
    """`act(gate) * up` and its backward: Liger's Triton kernels where Liger patched the MLP, on a GPU
    (the backward writes the gradients over gate and up, which nothing reads again), else autograd on
    the module's own activation."""

    def __init__(self, act_fn: Any, liger: bool):
        self.act_fn, self.liger = act_fn, liger

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.liger and gate.is_cuda:
            from liger_kernel.ops.swiglu import swiglu_forward

            return swiglu_forward(gate.contiguous(), up.contiguous())[2]
        return self.act_fn(gate) * up

    def backward(self, gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.liger and gate.is_cuda:
            from liger_kernel.ops.swiglu import swiglu_backward

            return swiglu_backward(gate.contiguous(), up.contiguous(), grad.contiguous())
        with torch.enable_grad():
            g, u = gate.detach().requires_grad_(), up.detach().requires_grad_()
            return torch.autograd.grad(self.act_fn(g) * u, (g, u), grad)


class GatedDown(torch.autograd.Function):
    """`down(act(gate) * up)` with the down projection's LoRA (`fast_lora.lora_forward`), keeping
    gate and up instead of their product."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                base: torch.nn.Module, scaling: float, p: float, fp8: bool | str, mode: str, act: _Act) -> torch.Tensor:
        product = act.forward(gate, up)
        ctx.accumulate = fast_lora.accumulates(product, base, fp8 is True)
        out, kept, ctx.draw = fast_lora.lora_forward(product, a, b, base, scaling, p, fp8, mode, ctx.accumulate)
        ctx.save_for_backward(gate, up, *kept)
        ctx.base, ctx.scaling, ctx.p, ctx.fp8, ctx.act = base, scaling, p, fp8, act
        ctx.dtypes = (product.dtype, a.dtype, b.dtype)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        gate, up, *kept = ctx.saved_tensors
        product = ctx.act.forward(gate, up)  # the forward's kernel on the same inputs: the same tensor
        grad_product, grad_a, grad_b = fast_lora.lora_backward(ctx, grad, product, *kept, True)
        del product
        grad_gate, grad_up = ctx.act.backward(gate, up, grad_product)
        return grad_gate, grad_up, grad_a, grad_b, None, None, None, None, None, None
