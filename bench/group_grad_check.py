"""On a GPU: a group's input gradients as one float8 GEMM over the members side by side
(`fp8_base.fp8_input_grad_group`: q/k/v's default since session 17, `GROUP_INPUT_GRAD = "narrow"`) against each
member's own float8 GEMM, the products summed by the dropout kernel's pass (gate/up's default; q/k/v's before; both
called directly, whatever `GROUP_INPUT_GRAD` says), at the Llama-3.1-8B groups' shapes
(q/k/v: 4,096 + 1,024 + 1,024 outputs; gate/up: 14,336 + 14,336; 8,192 tokens) on random nf4 weights, dropout
0.05. Per group: the grouped quantization kernel's float8 bytes against PyTorch's cast of the concatenation
(scaled alike), both paths' relative error against the float32 product, and each path's GPU time. One JSON line
per group.

    python bench/group_grad_check.py
"""

from __future__ import annotations

import json
import time

import bitsandbytes as bnb
import torch

from kernel_timing import timed
from medtune import fast_lora, fp8_base, fp8_rows, lora_dropout


def nf4_base(n_out: int, n_in: int) -> torch.nn.Module:
    base = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                             quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(n_out, n_in) * 0.02, requires_grad=False, compress_statistics=True,
                                    quant_type="nf4")
    return base.cuda()


def check(name: str, widths: tuple[int, ...], tokens: int = 8192, n_in: int = 4096, rank: int = 64) -> dict:
    torch.manual_seed(0)
    bases = [nf4_base(w, n_in) for w in widths]
    grads = [torch.randn(tokens, w, device="cuda", dtype=torch.bfloat16) * (0.5 + i) for i, w in enumerate(widths)]
    dh = torch.randn(tokens, rank * len(widths), device="cuda", dtype=torch.bfloat16) * 0.01
    a16 = torch.randn(rank * len(widths), n_in, device="cuda", dtype=torch.bfloat16) * 0.02
    seeds = tuple(range(11, 11 + len(widths)))

    def apart() -> torch.Tensor:
        parts = [fp8_base.fp8_input_grad(g, b) for g, b in zip(grads, bases)]
        lora_dropout.add_grad_x(parts[0], dh, a16, 0.05, seeds, addends=tuple(parts[1:]))
        return parts[0]

    def grouped() -> torch.Tensor:
        out = fp8_base.fp8_input_grad_group(grads, bases)
        lora_dropout.add_grad_x(out, dh, a16, 0.05, seeds)
        return out

    exact = sum(g.float() @ fast_lora._base_weight(b, torch.float32) for g, b in zip(grads, bases))
    scales = [fp8_base._fp8_scales(b).row.reshape(-1) for b in bases]
    q, s = fp8_rows.rowwise_fp8_group(grads, scales)
    want_q, want_s = fp8_rows.rowwise_reference(torch.cat(grads, 1), torch.cat(scales))
    base_apart = sum(fp8_base.fp8_input_grad(g, b).float() for g, b in zip(grads, bases))
    base_grouped = fp8_base.fp8_input_grad_group(grads, bases).float()
    return {"check": "group_input_grad", "group": name, "widths": list(widths), "tokens": tokens,
            "quantized_bytes_equal": bool(torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))),
            "scale_rel_max": float(((s - want_s).abs() / want_s).max()),
            "apart_rel_err": float((base_apart - exact).norm() / exact.norm()),
            "grouped_rel_err": float((base_grouped - exact).norm() / exact.norm()),
            "quantize_group_ms": round(timed(lambda: fp8_rows.rowwise_fp8_group(grads, scales)), 4),
            "quantize_apart_ms": round(timed(lambda: [fp8_rows.rowwise_fp8(g, col_scale=c) for g, c in zip(grads, scales)]), 4),
            "apart_ms": round(timed(apart), 4), "grouped_ms": round(timed(grouped), 4)}


def main() -> None:
    common = {"gpu": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d")}
    for name, widths in (("q/k/v", (4096, 1024, 1024)), ("gate/up", (14336, 14336))):
        print(json.dumps({**check(name, widths), **common}), flush=True)


if __name__ == "__main__":
    main()
