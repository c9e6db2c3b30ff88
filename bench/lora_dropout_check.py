"""medtune.lora_dropout's kernels on the GPU, in bf16: the same values as PyTorch ops with the reference
mask, and their time against the PyTorch path they replace (native dropout, the A GEMM on the dropped
copy; in the backward the mask drawn again, A's gradient on the copy, the masked input-gradient part
added in two passes). One JSON line per shape."""

from __future__ import annotations

import json

import torch

from medtune import lora_dropout as ld
from kernel_timing import rel, timed


def main() -> None:
    torch.manual_seed(0)
    p, r, seed = 0.05, 64, 12345
    for m, k in ((8192, 4096), (8192, 14336)):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(r, k, device="cuda", dtype=torch.bfloat16) * 0.02
        dh = torch.randn(m, r, device="cuda", dtype=torch.bfloat16)
        gx = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        keep = ld.reference_keep(seed, m, k, p).cuda()
        dropped = torch.where(keep, x.float(), 0.0) / (1 - p)
        h = ld.forward(x, a, p, seed)
        ga = ld.grad_a(x, dh, p, seed)
        gx2 = gx.clone()
        ld.add_grad_x(gx2, dh, a, p, seed)
        want_gx = gx.float() + torch.where(keep, dh.float() @ a.float(), 0.0) / (1 - p)
        errors = {"forward": rel(h, dropped @ a.float().T), "grad_a": rel(ga, dh.float().T @ dropped),
                  "grad_x": rel(gx2, want_gx), "keep_rate": float(keep.float().mean())}
        del dropped, keep, want_gx

        def kernels():
            ld.forward(x, a, p, seed)
            ld.grad_a(x, dh, p, seed)
            ld.add_grad_x(gx2, dh, a, p, seed)

        def torch_path():
            d, mask = torch.ops.aten.native_dropout(x, p, True)
            torch.nn.functional.linear(d, a)
            d, mask = torch.ops.aten.native_dropout(x, p, True)
            dh.t().mm(d)
            gx2.addcmul_(dh.mm(a), mask, value=1 / (1 - p))

        print(json.dumps({"run": "lora_dropout_check", "gpu": torch.cuda.get_device_name(0), "tokens": m, "in": k,
                          "rank": r, "p": p, "relative_error": {n: round(v, 6) for n, v in errors.items()},
                          "kernels_ms": round(timed(kernels), 3), "torch_ms": round(timed(torch_path), 3)}), flush=True)


if __name__ == "__main__":
    main()
