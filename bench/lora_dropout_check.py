"""medtune.lora_dropout's kernels on the GPU, in bf16: the same values as PyTorch ops with the reference
mask, and their time against the PyTorch path they replace (native dropout, the A GEMM on the dropped
copy; in the backward the mask drawn again, A's gradient on the copy, the masked input-gradient part
added in two passes). Both masks: one hash per two elements (`PAIRED`, the default) and one per element
(before 2026-11-29), each checked element for element against `reference_keep` and timed in the same
process. One JSON line per shape and mask. With `--sweep`: the forward and input-gradient kernels'
launch settings (`lora_dropout.FORWARD`, `GRAD_X`: token rows per program, warps, stages) timed over a grid,
each checked equal to the default's result; one JSON line per shape with every setting's time."""

from __future__ import annotations

import itertools
import json
import sys

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
        for paired in (True, False):
            ld.PAIRED = paired
            line = check(x, a, dh, gx, p, seed)

            def kernels():
                ld.forward(x, a, p, seed)
                ld.grad_a(x, dh, p, seed)
                ld.add_grad_x(gx, dh, a, p, seed)

            def torch_path():
                d, mask = torch.ops.aten.native_dropout(x, p, True)
                torch.nn.functional.linear(d, a)
                d, mask = torch.ops.aten.native_dropout(x, p, True)
                dh.t().mm(d)
                gx.addcmul_(dh.mm(a), mask, value=1 / (1 - p))

            line.update(kernels_ms=round(timed(kernels), 3), torch_ms=round(timed(torch_path), 3))
            print(json.dumps({"run": "lora_dropout_check", "gpu": torch.cuda.get_device_name(0), "tokens": m, "in": k,
                              "rank": r, "p": p, "paired": paired, **line}), flush=True)
    ld.PAIRED = True


def check(x: torch.Tensor, a: torch.Tensor, dh: torch.Tensor, gx: torch.Tensor, p: float, seed: int) -> dict:
    """The kernels' results against PyTorch ops with `reference_keep`'s mask, and that mask itself read back
    from the input-gradient kernel (an update of 1 everywhere leaves exactly the kept elements non-zero)."""
    m, k = x.shape
    keep = ld.reference_keep(seed, m, k, p).cuda()
    dropped = torch.where(keep, x.float(), 0.0) * ld.keep_scale(p)
    gx2 = gx.clone()
    ld.add_grad_x(gx2, dh, a, p, seed)
    errors = {"forward": rel(ld.forward(x, a, p, seed), dropped @ a.float().T),
              "grad_a": rel(ld.grad_a(x, dh, p, seed), dh.float().T @ dropped),
              "grad_x": rel(gx2, gx.float() + torch.where(keep, dh.float() @ a.float(), 0.0) * ld.keep_scale(p))}
    ones = torch.zeros_like(dh)
    ones[:, 0] = 1
    drawn = ld.grad_x(ones, torch.ones_like(a), p, seed) != 0
    return {"relative_error": {n: round(v, 6) for n, v in errors.items()}, "keep_rate": float(keep.float().mean()),
            "mask_equal": bool(torch.equal(drawn, keep))}


def sweep() -> None:
    torch.manual_seed(0)
    p, r, seed = 0.05, 64, 12345
    grid = [{"BLOCK_M": bm, "num_warps": w, "num_stages": st}
            for bm, w, st in itertools.product((32, 64, 128), (4, 8), (2, 3, 4))]
    for m, k in ((8192, 4096), (8192, 14336)):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(r, k, device="cuda", dtype=torch.bfloat16) * 0.02
        dh = torch.randn(m, r, device="cuda", dtype=torch.bfloat16)
        want_h, want_gx = ld.forward(x, a, p, seed), ld.grad_x(dh, a, p, seed)
        times = {"forward": {}, "grad_x": {}}
        for launch in grid:
            name = "m{BLOCK_M}_w{num_warps}_s{num_stages}".format(**launch)
            try:
                same = torch.equal(ld.forward(x, a, p, seed, launch), want_h) and \
                    torch.equal(ld.grad_x(dh, a, p, seed, launch), want_gx)
                times["forward"][name] = round(timed(lambda: ld.forward(x, a, p, seed, launch)), 4)
                times["grad_x"][name] = round(timed(lambda: ld.grad_x(dh, a, p, seed, launch)), 4)
                if not same:
                    times.setdefault("differs", []).append(name)
            except Exception as e:  # a setting that does not compile (shared memory) is reported, not fatal
                times.setdefault("failed", {})[name] = f"{type(e).__name__}: {str(e)[:120]}"
        best = {kind: min(t, key=t.get) for kind, t in times.items() if kind in ("forward", "grad_x")}
        print(json.dumps({"run": "lora_dropout_sweep", "gpu": torch.cuda.get_device_name(0), "tokens": m, "in": k,
                          "default": {"forward": ld.FORWARD, "grad_x": ld.GRAD_X}, "best": best, **times}), flush=True)


if __name__ == "__main__":
    sweep() if "--sweep" in sys.argv[1:] else main()
