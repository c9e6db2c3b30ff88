"""medtune.attention.FlashGqa on the GPU against what it replaces on PyTorch 2.10/2.11: `varlen_attn` with
the grouped key/value heads repeated to every query head. Llama-3.1-8B's attention (32 query heads, 8
key/value heads, head size 128) over one 8,192-token micro batch of packed examples of the bench data's
lengths, bf16: the same output and gradients (relative error of each tensor), and the time of forward +
backward for each. One JSON line."""

from __future__ import annotations

import json
import random

import torch
from torch.nn.attention.varlen import varlen_attn

from medtune import attention
from kernel_timing import rel, timed


def packed_lengths(total: int, rng: random.Random) -> list[int]:
    lengths = []
    while sum(lengths) < total:
        lengths.append(min(rng.randint(60, 700), total - sum(lengths)))
    return lengths


def attention_inputs(heads: int = 32, shared: int = 8, dim: int = 128):
    """One 8,192-token micro batch of packed examples (seeded): lengths, cumulative lengths, the longest, q,
    k, v (requiring gradients) and an output gradient, bf16 on the GPU."""
    torch.manual_seed(0)
    lengths = packed_lengths(8192, random.Random(0))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    q = torch.randn(8192, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(8192, shared, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    grad = torch.randn(8192, heads, dim, device="cuda", dtype=torch.bfloat16)
    return lengths, cu, max(lengths), q, k, v, grad


def main() -> None:
    lengths, cu, longest, q, k, v, grad = attention_inputs()
    heads, shared = q.shape[1], k.shape[1]
    window = {"window_size": (-1, 0)} if "window_size" in attention._supported() else {"is_causal": True}

    def repeated():
        kr, vr = (t.repeat_interleave(heads // shared, dim=1) for t in (k, v))
        return varlen_attn(q, kr, vr, cu, cu, longest, longest, **window)

    def grouped():
        return attention.FlashGqa.apply(q, k, v, cu, longest, None)

    results = {}
    for name, fn in (("repeated", repeated), ("flash_gqa", grouped)):
        out = fn()
        results[name] = (out.detach(), *torch.autograd.grad(out, (q, k, v), grad))
    line = {"run": "gqacheck", "gpu": torch.cuda.get_device_name(), "tokens": 8192, "examples": len(lengths),
            "rel_err": {n: round(rel(a, b), 6) for n, a, b in zip(("out", "dq", "dk", "dv"),
                                                                  results["flash_gqa"], results["repeated"])}}
    for name, fn in (("repeated", repeated), ("flash_gqa", grouped)):
        line[f"{name}_ms"] = round(timed(lambda: torch.autograd.grad(fn(), (q, k, v), grad)), 3)
    line["speedup"] = round(line["repeated_ms"] / line["flash_gqa_ms"], 3)
    print(json.dumps(line))


if __name__ == "__main__":
    main()
