"""A decoder layer's two residual additions folded into its o and down projections' GEMMs (a lever under
measurement: bench/gpu_train.py --lever residualfold; off by default until a GPU run shows it pays).

A pre-norm layer (Llama, Mistral, Qwen2) computes `h = x + o(attn(norm(x)))`, then `y = h + down(mlp(norm(h)))`:
each addition reads two (tokens x hidden) tensors and writes a third, 64 MiB each at 8,192 tokens of an 8B model,
twice per layer. With `medtune.fast_lora`'s fused path the adapter's GEMM writes the output first and the base's
GEMM adds into it; starting that first GEMM from the residual (beta = 1) adds it in the epilogue, one read
instead of two reads and a write. The gradient of the residual is the output's, passed on as is.

The layer's forward is swapped at the start of training (`AtTrainStart`, after the lean MLP's), for the layers
whose o projection runs the fused LoRA path and whose MLP runs `medtune.lean_mlp`; a call the swap cannot fold
(no gradients, evaluation, o on PEFT's own path, a layer recomputed in the backward) computes what the layer's own
forward does.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch
from transformers import TrainerCallback

from medtune import fast_lora, lean_mlp

log = logging.getLogger("medtune")

FOLD = False  # bench/gpu_train.py --lever residualfold
LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")  # the same two-addition forward


def install(model: torch.nn.Module) -> int:
    """Give every foldable decoder layer the folding forward; returns how many (idempotent)."""
    count = 0
    for module in model.modules():
        own = vars(module).get("forward")  # a forward set on the instance: CUDA graphs' (layer_graphs) stay
        if own is not None and getattr(own, "__func__", None) is not forward:
            continue
        if type(module).__name__ in LAYERS and _foldable(module):
            if getattr(module.forward, "__func__", None) is not forward:
                module.forward = types.MethodType(forward, module)
            count += 1
    return count


def _foldable(layer: Any) -> bool:
    o = getattr(getattr(layer, "self_attn", None), "o_proj", None)
    mlp = getattr(layer, "mlp", None)
    return (getattr(getattr(o, "forward", None), "__func__", None) is fast_lora.fused_forward_backward
            and getattr(getattr(mlp, "forward", None), "__func__", None) is lean_mlp.forward)


def forward(self: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    # A layer that recomputes its activations (lora.gradient_checkpointing) keeps its own forward: transformers
    # checkpoints the class's forward, which this instance's would bypass
    if args or getattr(self, "gradient_checkpointing", False) or not (FOLD and self.training and torch.is_grad_enabled()):
        return type(self).forward(self, hidden_states, *args, **kwargs)
    o = self.self_attn.o_proj
    o.residual = hidden_states  # taken by o's fused forward (fast_lora.fused_forward_backward) for this call
    try:
        h, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
    finally:
        left = o.__dict__.pop("residual", None)
    if left is not None:  # o ran PEFT's own forward: the addition as the layer's code has it
        h = left + h
    return lean_mlp.forward(self.mlp, self.post_attention_layernorm(h), residual=h)


class AtTrainStart(TrainerCallback):
    """Installs the folding forward when training starts, after `lean_mlp.AtTrainStart`."""

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if FOLD and (count := install(model)):
            log.info("finetune: %d decoder layers add their residuals inside the o and down GEMMs "
                     "(medtune.residual_fold)", count)
