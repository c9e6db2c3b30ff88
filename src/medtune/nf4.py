"""An nf4 weight dequantized by one Triton kernel, for the fused LoRA path's base GEMMs (the default where
`usable`: `fast_lora.NF4_KERNEL`).

QLoRA dequantizes every 4-bit base weight twice per micro batch, once for the forward's GEMM and once for
the input gradient's. In the Trainer's profile of an 8B step (docs/benchmarks.md, call am) bitsandbytes'
kernel took 71 ms for 1,780 weights: about 2 TB/s by the bytes it reads and writes, on a card with 4.8.
This kernel reads the packed bytes and the block scales and writes the 16-bit weight in one pass, with
bitsandbytes' arithmetic: each weight is the nf4 code of its nibble (the high nibble first) times its
block's scale in float32, rounded once. With nested (double) quantization the block scales are
dequantized first by bitsandbytes itself, as its own dequantize does. The CPU tests find the same values
bit for bit (Triton's interpreter against bitsandbytes' CPU kernel). On an H200 (bench/nf4_check.py) it
equals the CUDA kernel bit for bit on all four Llama-3.1-8B projection shapes and is faster on the MLP's
(1.05-1.08x), slower on the attention's; through the Trainer an 8B QLoRA step ran 1.1 % and 2.8 % faster
with it in two calls (ABBA, docs/benchmarks.md).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

BLOCK = 1024  # packed bytes per program


def usable(base: torch.nn.Module) -> bool:
    """A bitsandbytes nf4 weight on a CUDA device with Triton installed."""
    state = base.weight.quant_state
    return (base.weight.is_cuda and state.quant_type == "nf4" and state.blocksize % 2 == 0
            and _kernel() is not None)


def dequantize(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The weight (out x in) of a bitsandbytes 4-bit layer in `dtype`."""
    state = base.weight.quant_state
    out = torch.empty(tuple(state.shape), dtype=dtype, device=base.weight.device)
    run(base.weight.data.view(torch.uint8).reshape(-1), _code(state, out.device), block_scales(state), out,
        state.blocksize)
    return out


def run(packed: torch.Tensor, code: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, blocksize: int) -> None:
    """Fill `out` (its elements in order) from `packed` (two weights per byte) with `code` and `scales`."""
    n_bytes = packed.numel()
    assert out.numel() == 2 * n_bytes and out.is_contiguous()
    _kernel()[(-(-n_bytes // BLOCK),)](packed, code, scales, out, n_bytes, BLOCK=BLOCK,
                                       BYTES_PER_SCALE=blocksize // 2)


def block_scales(state: Any) -> torch.Tensor:
    """The float32 scale of every block, as bitsandbytes' `dequantize_4bit` computes them."""
    if not state.nested:
        return state.absmax
    import bitsandbytes as bnb

    scales = bnb.functional.dequantize_blockwise(state.absmax, state.state2)
    scales += state.offset
    return scales.float()


def _code(state: Any, device: torch.device) -> torch.Tensor:
    code = getattr(state, "code", None)
    if code is None:
        import bitsandbytes as bnb

        code = bnb.functional.get_4bit_type(state.quant_type, device=device)
    return code.to(device=device, dtype=torch.float32)


@functools.cache
def _kernel() -> Any:
    try:
        from medtune.nf4_kernels import dequantize_kernel
    except ImportError:  # no Triton
        return None
    return dequantize_kernel
