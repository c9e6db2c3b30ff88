"""cuDNN's variable-length attention (`aten._cudnn_attention_forward/_backward` with cumulative sequence
lengths, the path PyTorch's nested tensors take) against `medtune.attention.FlashGqa` (the flash kernels),
at Llama-3.1-8B's attention (32 query heads, 8 key/value heads, head size 128) over one 8,192-token micro
batch of packed examples of the bench data's lengths, bf16, causal: output and gradients (relative error
of each tensor against FlashGqa's) and the time of forward + backward. One JSON line; a probe for a lever,
not a path medtune takes."""

from __future__ import annotations

import json
import random

import torch

from medtune import attention
from gqa_check import packed_lengths
from kernel_timing import rel, timed


def cudnn(q, k, v, cu, longest, grad):
    """Forward, then the backward through autograd's formula for the op (which passes no bias)."""
    out = torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, longest, longest, True, 0.0, True, False)[0]
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), grad))


def main() -> None:
    torch.manual_seed(0)
    lengths = packed_lengths(8192, random.Random(0))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    longest, heads, shared, dim = max(lengths), 32, 8, 128
    q = torch.randn(8192, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(8192, shared, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    grad = torch.randn(8192, heads, dim, device="cuda", dtype=torch.bfloat16)
    line = {"run": "cudnncheck", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "cudnn": torch.backends.cudnn.version(), "tokens": 8192, "examples": len(lengths)}
    out = attention.FlashGqa.apply(q, k, v, cu, longest, None)
    flash = (out.detach(), *torch.autograd.grad(out, (q, k, v), grad))
    line["flash_ms"] = round(timed(lambda: torch.autograd.grad(attention.FlashGqa.apply(q, k, v, cu, longest, None),
                                                               (q, k, v), grad)), 3)
    try:
        got = cudnn(q, k, v, cu, longest, grad)
        line["rel_err"] = {n: round(rel(a, b), 6) for n, a, b in zip(("out", "dq", "dk", "dv"), got, flash)}
        line["cudnn_ms"] = round(timed(lambda: cudnn(q, k, v, cu, longest, grad)), 3)
        line["speedup"] = round(line["flash_ms"] / line["cudnn_ms"], 3)
    except Exception as e:  # what this PyTorch / cuDNN lacks is the finding
        line["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
