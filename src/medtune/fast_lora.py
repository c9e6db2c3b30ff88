"""A leaner forward for PEFT's LoRA linear layers: the adapter's update lands in the base output
inside one GEMM.

PEFT computes `result = base(x).clone(); result = result + lora_B(lora_A(dropout(x))) * scaling`:
for a 4-bit base that is a defensive copy of the base output, then a scaling pass and an addition
pass over it, each a full read and write of a (tokens x out_features) tensor — three memory-bound
kernels per projection, seven projections per layer, again in the recompute and in the backward.
Here the update is `torch.addmm(base_out, h, B.T, alpha=scaling)`: the scaling and the addition
happen in the GEMM's epilogue (accumulated in float32, rounded once, where PEFT rounds three times),
and nothing is copied. The adapter weights stay in float32 for the optimizer; the small (r x in,
out x r) matrices are cast to the activations' dtype, never the large activations to float32.

Only plain LoRA takes this path (one active adapter, a linear lora_A/lora_B without bias, no DoRA or
other variant, not merged, adapters enabled, no per-row adapter names); anything else calls PEFT's
own forward, so the swap can never change what a configuration means.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F


def install(model: torch.nn.Module) -> int:
    """Give every LoRA linear layer of `model` the fused forward; returns how many layers took it."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and isinstance(module, torch.nn.Module) and _linear(module):
            module.forward = types.MethodType(fused_forward, module)
            count += 1
    return count


def _linear(layer: Any) -> bool:
    return all(isinstance(layer.lora_A[n], torch.nn.Linear) and isinstance(layer.lora_B[n], torch.nn.Linear)
               for n in layer.lora_A)


def _plain(layer: Any, kwargs: dict[str, Any]) -> str | None:
    """The active adapter's name when the fused path computes exactly what PEFT would, else None."""
    if layer.disable_adapters or layer.merged or kwargs.get("adapter_names") is not None:
        return None
    active = [n for n in layer.active_adapters if n in layer.lora_A]
    if len(active) != 1 or active[0] in layer.lora_variant or layer.lora_B[active[0]].bias is not None:
        return None
    return active[0]


def fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = _plain(self, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    dtype = result.dtype
    h = F.linear(self.lora_dropout[name](x).to(dtype), self.lora_A[name].weight.to(dtype))
    flat = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]),
                       self.lora_B[name].weight.to(dtype).t(), alpha=self.scaling[name])
    return flat.view(result.shape)
