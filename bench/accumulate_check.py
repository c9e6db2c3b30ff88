"""`fast_lora.ACCUMULATE_IN_BASE` at the GEMM level, on the GPU in bf16: each Llama-3.1-8B projection shape
for one 8,192-token micro batch (LoRA r=64, dropout 0.05 drawn by `medtune.lora_dropout`'s kernels), the
base's product first and the adapter's added by a small GEMM or kernel (the default), against the adapter's
part first and the base's GEMM accumulating into it. Time per projection, forward and input gradient, and
each path's relative error against float32. One JSON line per shape."""

from __future__ import annotations

import json

import torch

from kernel_timing import rel, timed
from medtune import lora_dropout as ld

SHAPES = {"q_proj/o_proj": (4096, 4096), "k_proj/v_proj": (4096, 1024), "gate_proj/up_proj": (4096, 14336),
          "down_proj": (14336, 4096)}
TOKENS, RANK, P, SCALE, SEED = 8192, 64, 0.05, 0.25, 4321


def main() -> None:
    torch.manual_seed(0)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    for name, (n_in, n_out) in SHAPES.items():
        x, g = torch.randn(TOKENS, n_in, **bf16), torch.randn(TOKENS, n_out, **bf16)
        w = torch.randn(n_out, n_in, **bf16) * n_in ** -0.5
        a, b = torch.randn(RANK, n_in, **bf16) * 0.02, torch.randn(n_out, RANK, **bf16) * 0.02
        h, dh = ld.forward(x, a, P, SEED), torch.randn(TOKENS, RANK, **bf16)

        def forward_default():
            return torch.addmm(x @ w.t(), h, b.t(), alpha=SCALE)

        def forward_accumulate():
            return torch.addmm(h.new_empty(TOKENS, n_out), h, b.t(), beta=0, alpha=SCALE).addmm_(x, w.t())

        def input_grad_default():
            gx = g @ w
            ld.add_grad_x(gx, dh, a, P, SEED)
            return gx

        def input_grad_accumulate():
            return ld.grad_x(dh, a, P, SEED).addmm_(g, w)

        keep = ld.reference_keep(SEED, TOKENS, n_in, P).cuda()
        want_y = x.float() @ w.float().t() + SCALE * h.float() @ b.float().t()
        want_gx = g.float() @ w.float() + torch.where(keep, dh.float() @ a.float(), 0.0) * ld.keep_scale(P)
        line = {"run": "accumulate_check", "gpu": torch.cuda.get_device_name(), "shape": name, "in": n_in,
                "out": n_out, "tokens": TOKENS}
        for label, fn, want in (("forward_default", forward_default, want_y),
                                ("forward_accumulate", forward_accumulate, want_y),
                                ("input_grad_default", input_grad_default, want_gx),
                                ("input_grad_accumulate", input_grad_accumulate, want_gx)):
            line[f"{label}_ms"] = round(timed(fn), 4)
            line[f"{label}_rel_err"] = round(rel(fn(), want), 6)
        line["forward_speedup"] = round(line["forward_default_ms"] / line["forward_accumulate_ms"], 3)
        line["input_grad_speedup"] = round(line["input_grad_default_ms"] / line["input_grad_accumulate_ms"], 3)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
