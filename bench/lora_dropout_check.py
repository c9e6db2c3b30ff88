"""medtune.lora_dropout's kernels on the GPU, in bf16: the same values as PyTorch ops with the reference
mask, and their time against the PyTorch path they replace (native dropout, the A GEMM on the dropped
copy; in the backward the mask drawn again, A's gradient on the copy, the masked input-gradient part
added in two passes). Both masks: one hash per two elements (`PAIRED`, the default) and one per element
(before 2026-11-29), each checked element for element against `reference_keep` and timed in the same
process. One JSON line per shape and mask. With `--sweep`: the forward and input-gradient kernels'
launch settings (`lora_dropout.FORWARD`, `GRAD_X`: token rows per program, warps, stages) timed over a grid,
each checked equal to the default's result; one JSON line per shape with every setting's time. With `--group`:
a group of adapters reading one input (`medtune.shared_input`: q/k/v, gate/up) in one launch per kernel against
one launch per adapter and the sums autograd adds; one JSON line per group size."""

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


def group() -> None:
    """The kernels over a group of G adapters (A stacked, a seed each) against each adapter's own launches: the
    forward and A's gradient must give the same bytes (the same per-member arithmetic); the input gradient,
    the members' base input gradients (`addends`) summed with their masked parts in float32 and rounded once,
    against float32 PyTorch with `reference_keep`'s masks, and against the per-adapter path (each part added
    to its own base gradient, then the parts summed as autograd does)."""
    torch.manual_seed(0)
    p, r, m, k = 0.05, 64, 8192, 4096
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    for size in (3, 2):
        seeds = tuple(range(101, 101 + size))
        a = torch.randn(size * r, k, device="cuda", dtype=torch.bfloat16) * 0.02
        dh = torch.randn(m, size * r, device="cuda", dtype=torch.bfloat16)
        bases = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(size)]
        blocks = [slice(g * r, (g + 1) * r) for g in range(size)]
        alone_h = torch.cat([ld.forward(x, a[b], p, s) for b, s in zip(blocks, seeds)], dim=1)
        alone_a = torch.cat([ld.grad_a(x, dh[:, b].contiguous(), p, s) for b, s in zip(blocks, seeds)])
        gx = bases[0].clone()
        ld.add_grad_x(gx, dh, a, p, seeds, addends=tuple(bases[1:]))
        keeps = [ld.reference_keep(s, m, k, p).cuda() for s in seeds]
        want = sum(t.float() for t in bases) + sum(torch.where(keep, dh[:, b].float() @ a[b].float(), 0.0)
                                                    for keep, b in zip(keeps, blocks)) * ld.keep_scale(p)

        def alone():
            parts = [t.clone() for t in bases]  # stands for the base GEMMs' outputs, written anyway
            for part, b, s in zip(parts, blocks, seeds):
                ld.forward(x, a[b], p, s)
                ld.grad_a(x, dh[:, b], p, s)
                ld.add_grad_x(part, dh[:, b], a[b], p, s)
            total = parts[0]
            for part in parts[1:]:
                total = total + part  # autograd's sum of the members' input gradients
            return total

        def grouped():
            total = bases[0].clone()
            ld.forward(x, a, p, seeds)
            ld.grad_a(x, dh, p, seeds)
            ld.add_grad_x(total, dh, a, p, seeds, addends=tuple(bases[1:]))
            return total

        print(json.dumps({
            "run": "lora_dropout_group", "gpu": torch.cuda.get_device_name(0), "tokens": m, "in": k, "rank": r,
            "members": size, "p": p,
            "forward_equal": bool(torch.equal(ld.forward(x, a, p, seeds), alone_h)),
            "grad_a_equal": bool(torch.equal(ld.grad_a(x, dh, p, seeds), alone_a)),
            "grad_x_relative_error": round(rel(gx, want), 6), "alone_relative_error": round(rel(alone(), want), 6),
            "alone_ms": round(timed(alone), 3), "grouped_ms": round(timed(grouped), 3)}), flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    sweep() if "--sweep" in args else group() if "--group" in args else main()
