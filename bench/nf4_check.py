"""medtune.nf4's kernel on the GPU against bitsandbytes' dequantize, in bf16, on Llama-3.1-8B's projection
shapes quantized as the presets load them (nf4, blocksize 64, double quantization): equal bit for bit, and
the time of each, also of the kernel with the block scales dequantized by bitsandbytes first (`scales_apart_ms`,
the path before 2026-11-29 05:40), and of the input gradient's float8 weight written transposed by one kernel
(`nf4.fp8_transposed`: equal to PyTorch's ops on the same float32 values, and its time against the three passes
it replaces), and the forward's float8 weight (`nf4.fp8_weight`: the same bytes not transposed; its time against
the bf16 dequantize it replaces). One JSON line per shape."""

from __future__ import annotations

import json

import torch

from kernel_timing import timed
from medtune import fp8_rows, nf4

SHAPES = {"q_proj/o_proj": (4096, 4096), "k_proj/v_proj": (1024, 4096), "gate_proj/up_proj": (14336, 4096),
          "down_proj": (4096, 14336)}


def main() -> None:
    import bitsandbytes as bnb

    torch.manual_seed(0)
    for name, (n_out, n_in) in SHAPES.items():
        base = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                                 quant_type="nf4")
        base.weight = bnb.nn.Params4bit(torch.randn(n_out, n_in, dtype=torch.bfloat16) * 0.02, requires_grad=False,
                                        compress_statistics=True, quant_type="nf4")
        base = base.cuda()
        state = base.weight.quant_state
        assert nf4.usable(base)
        want = bnb.functional.dequantize_4bit(base.weight.data, state)
        got = nf4.dequantize(base, state.dtype)
        bnb_ms = timed(lambda: bnb.functional.dequantize_4bit(base.weight.data, state))
        kernel_ms = timed(lambda: nf4.dequantize(base, state.dtype))
        nf4.NESTED_IN_KERNEL = False  # the block scales dequantized by bitsandbytes first (before 2026-11-29 05:40)
        apart = nf4.dequantize(base, state.dtype)
        apart_ms = timed(lambda: nf4.dequantize(base, state.dtype))
        nf4.NESTED_IN_KERNEL = True
        # the input gradient's float8 weight, transposed, from the nf4 bytes in one kernel, against PyTorch's ops on
        # the same float32 values (the cast included) and against the three passes it replaces
        inverse = (1.0 / fp8_rows.row_amax_scale(want)).reshape(-1)
        w32 = (nf4.fp8_transposed(base, torch.ones_like(inverse), fp8=False)).t()
        fp8_want = (w32 * inverse[:, None]).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).t().contiguous()
        fp8_got = nf4.fp8_transposed(base, inverse)
        fp8_ms = timed(lambda: nf4.fp8_transposed(base, inverse))
        nf4.ROW_BLOCKS = False  # each byte's block scale computed on its own (before session 12)
        per_byte = nf4.fp8_transposed(base, inverse)
        per_byte_ms = timed(lambda: nf4.fp8_transposed(base, inverse))
        nf4.ROW_BLOCKS = True
        scale = fp8_rows.row_amax_scale(want)
        three_ms = timed(lambda: fp8_rows.rowwise_fp8(nf4.dequantize(base, state.dtype), row_scale=scale)[0].t().contiguous())
        rows = nf4.fp8_weight(base, inverse)
        rows_ms = timed(lambda: nf4.fp8_weight(base, inverse))
        fp8_fields = {"fp8_equal": torch.equal(fp8_got.view(torch.uint8), fp8_want.view(torch.uint8)),
                      "fp8_rows_equal": torch.equal(rows.view(torch.uint8), fp8_want.t().contiguous().view(torch.uint8)),
                      "fp8_rows_ms": round(rows_ms, 4),
                      "fp8_w32_equal_bnb": torch.equal(w32.to(torch.bfloat16), want),
                      "fp8_transposed_ms": round(fp8_ms, 4), "fp8_three_pass_ms": round(three_ms, 4),
                      "fp8_scale_per_byte_ms": round(per_byte_ms, 4),
                      "fp8_scale_per_byte_equal": torch.equal(per_byte.view(torch.uint8), fp8_got.view(torch.uint8))}
        traffic = n_out * n_in * (0.5 + 2)  # packed bytes read, bf16 written
        print(json.dumps({"run": "nf4_check", "gpu": torch.cuda.get_device_name(), "shape": name, "out": n_out,
                          "in": n_in, "equal": torch.equal(got, want),
                          "equal_scales_apart": torch.equal(apart, want), "scales_apart_ms": round(apart_ms, 4),
                          "max_abs_diff": float((got.float() - want.float()).abs().max()),
                          "bnb_ms": round(bnb_ms, 4), "kernel_ms": round(kernel_ms, 4),
                          "speedup": round(bnb_ms / kernel_ms, 3), "kernel_tb_s": round(traffic / kernel_ms / 1e9, 2),
                          "bnb_tb_s": round(traffic / bnb_ms / 1e9, 2), **fp8_fields}), flush=True)


if __name__ == "__main__":
    main()
