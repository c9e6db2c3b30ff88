"""cuDNN's variable-length attention (`aten._cudnn_attention_forward/_backward` with cumulative sequence
lengths, the path PyTorch's nested tensors take) against `medtune.attention.FlashGqa` (the flash kernels),
at Llama-3.1-8B's attention (32 query heads, 8 key/value heads, head size 128) over one 8,192-token micro
batch of packed examples of the bench data's lengths, bf16, causal: output and gradients (relative error
of each tensor against FlashGqa's) and the time of forward + backward. One JSON line; a probe for a lever,
not a path medtune takes."""

from __future__ import annotations

import json

import torch

from medtune import attention
from gqa_check import attention_inputs
from kernel_timing import rel, timed


def cudnn(q, k, v, cu, longest, grad):
    """Forward, then the backward through autograd's formula for the op (which passes no bias)."""
    out = torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, longest, longest, True, 0.0, True, False)[0]
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), grad))


def main() -> None:
    lengths, cu, longest, q, k, v, grad = attention_inputs()
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
