"""On a GPU: medtune.fp8_rows' Triton kernel against its PyTorch reference (the float8 values and scales,
and the time of each), and the float8 GEMM against the bf16 one at the 8B model's projection shapes,
the forward's layout and the backward's (`fp8_base.fp8_linear`, `fp8_input_grad`). One JSON line each.

    python bench/fp8_rows_check.py
"""

from __future__ import annotations

import json
import time

import torch

from kernel_timing import timed  # GPU time only (before session 12 this script timed on the host)
from medtune import fp8_rows


def kernel_vs_reference(rows: int, cols: int, col: bool) -> dict:
    t = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16) * 3
    c = torch.rand(cols, device="cuda") + 0.5 if col else None
    q, s = fp8_rows.rowwise_fp8(t, c)
    want_q, want_s = fp8_rows.rowwise_reference(t, c)
    differ = q.float() != want_q.float()
    one_block = fp8_rows.ONE_BLOCK
    try:  # the same kernel reading each row twice (amax, then cast), as before rows were read once
        fp8_rows.ONE_BLOCK = 0
        q2, s2 = fp8_rows.rowwise_fp8(t, c)
        twice_ms = timed(lambda: fp8_rows.rowwise_fp8(t, c))
    finally:
        fp8_rows.ONE_BLOCK = one_block
    return {"check": "rowwise_fp8", "shape": [rows, cols], "col_scale": col,
            "scale_rel_max": float(((s - want_s).abs() / want_s).max()),
            "values_differing": float(differ.float().mean()),
            "kernel_ms": round(timed(lambda: fp8_rows.rowwise_fp8(t, c)), 3),
            "read_twice_ms": round(twice_ms, 3),
            "read_twice_equal": bool(torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)),
            "reference_ms": round(timed(lambda: fp8_rows.rowwise_reference(t, c)), 3)}


def gemm(tokens: int, n_in: int, n_out: int) -> dict:
    x = torch.randn(tokens, n_in, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16) * 0.02
    g = torch.randn(tokens, n_out, device="cuda", dtype=torch.bfloat16)
    ws = fp8_rows.row_amax_scale(w)
    wq, _ = fp8_rows.rowwise_fp8(w, row_scale=ws)
    xq, xs = fp8_rows.rowwise_fp8(x)
    gq, gs = fp8_rows.rowwise_fp8(g, col_scale=ws.reshape(-1))
    ones = torch.ones(1, n_in, device="cuda")
    wt = wq.t().contiguous().t()
    flop = 2 * tokens * n_in * n_out
    fwd16 = timed(lambda: x @ w.t())
    fwd8 = timed(lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t(), out_dtype=torch.bfloat16))
    bwd16 = timed(lambda: g @ w)
    bwd8 = timed(lambda: torch._scaled_mm(gq, wt, scale_a=gs, scale_b=ones, out_dtype=torch.bfloat16))
    y8 = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t(), out_dtype=torch.bfloat16).float()
    dx8 = torch._scaled_mm(gq, wt, scale_a=gs, scale_b=ones, out_dtype=torch.bfloat16).float()
    y, dx = (x @ w.t()).float(), (g @ w).float()
    return {"check": "gemm", "tokens": tokens, "in": n_in, "out": n_out,
            "fwd_bf16_tflops": round(flop / fwd16 / 1e9), "fwd_fp8_tflops": round(flop / fwd8 / 1e9),
            "bwd_bf16_tflops": round(flop / bwd16 / 1e9), "bwd_fp8_tflops": round(flop / bwd8 / 1e9),
            "fwd_rel_err": float((y8 - y).norm() / y.norm()), "bwd_rel_err": float((dx8 - dx).norm() / dx.norm()),
            "transpose_ms": round(timed(lambda: wq.t().contiguous()), 3)}


def main() -> None:
    common = {"gpu": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d")}
    for rows, cols, col in [(8192, 4096, False), (8192, 14336, False), (8192, 4096, True), (14336, 4096, False),
                            (4096, 14336, False)]:
        print(json.dumps({**kernel_vs_reference(rows, cols, col), **common}), flush=True)
    for n_in, n_out in [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]:
        print(json.dumps({**gemm(8192, n_in, n_out), **common}), flush=True)


if __name__ == "__main__":
    main()
