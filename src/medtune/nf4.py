"""An nf4 weight dequantized by one Triton kernel, for the fused LoRA path's base GEMMs (the default where
`usable`: `fast_lora.NF4_KERNEL`).

QLoRA dequantizes every 4-bit base weight twice per micro batch, once for the forward's GEMM and once for
the input gradient's. In the Trainer's profile of an 8B step (docs/benchmarks.md, call am) bitsandbytes'
kernel took 71 ms for 1,780 weights: about 2 TB/s by the bytes it reads and writes, on a card with 4.8.
This kernel reads the packed bytes and the block scales and writes the 16-bit weight in one pass, with
bitsandbytes' arithmetic: each weight is the nf4 code of its nibble (the high nibble first) times its
block's scale in float32, rounded once. With nested (double) quantization (the presets' setting) the
block scales are dequantized inside the same kernel, with bitsandbytes' arithmetic too (its 8-bit code's
value times its group's scale, plus the offset, each rounded in float32): bitsandbytes runs a kernel of its
own and an addition for them first, two more launches and their host time per weight, in a forward the host
only just keeps ahead of the GPU (docs/benchmarks.md, call 2026-11-29 s). The CPU tests find the same values
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
FP8_TILE = (64, 128)  # weight rows x columns per program of `fp8_transposed`
# doubly quantized block scales dequantized inside the kernel (`run_nested`); bench/gpu_train.py --ab nestedbybnb
NESTED_IN_KERNEL = True


def usable(base: torch.nn.Module) -> bool:
    """A bitsandbytes nf4 weight on a CUDA device with Triton installed."""
    state = base.weight.quant_state
    return (base.weight.is_cuda and state.quant_type == "nf4" and state.blocksize % 2 == 0
            and _kernel() is not None)


def dequantize(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The weight (out x in) of a bitsandbytes 4-bit layer in `dtype`."""
    state = base.weight.quant_state
    out = torch.empty(tuple(state.shape), dtype=dtype, device=base.weight.device)
    _fill(base, out)
    return out


def fp8_weight(base: torch.nn.Module, inverse: torch.Tensor, fp8: bool = True) -> torch.Tensor:
    """The weight W (out x in) of a bitsandbytes nf4 layer as the float8 e4m3 second operand of the forward's GEMM
    `x @ W.T`: row o times `inverse[o]` (float32, out), clamped to e4m3's range, in one pass from the 4-bit bytes.
    The same bytes as `fp8_transposed`, not transposed. `fp8=False`: the values in float32 before the cast."""
    state = base.weight.quant_state
    assert state.shape[1] % 2 == 0 and inverse.dtype == torch.float32 and inverse.numel() == state.shape[0]
    out = torch.empty(tuple(state.shape), dtype=torch.float8_e4m3fn if fp8 else torch.float32,
                      device=base.weight.device)
    _fill(base, out, inverse.reshape(-1))
    return out


def _fill(base: torch.nn.Module, out: torch.Tensor, inverse: torch.Tensor | None = None) -> None:
    state = base.weight.quant_state
    packed = base.weight.data.view(torch.uint8).reshape(-1)
    if state.nested and NESTED_IN_KERNEL:
        run_nested(packed, _code(state, out.device), state, out, inverse)
    else:
        run(packed, _code(state, out.device), block_scales(state), out, state.blocksize, inverse)


def run(packed: torch.Tensor, code: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, blocksize: int,
        inverse: torch.Tensor | None = None) -> None:
    """Fill `out` (its elements in order) from `packed` (two weights per byte) with `code` and `scales`; with
    `inverse` (float32, one per row of `out`), each row times it and clamped to e4m3's range (`fp8_weight`)."""
    _launch(packed, code, (scales,) * 4, out, blocksize, False, 1, inverse)


def run_nested(packed: torch.Tensor, code: torch.Tensor, state: Any, out: torch.Tensor,
               inverse: torch.Tensor | None = None) -> None:
    """`run` for a doubly quantized weight: the block scales from `state`'s 8-bit codes, their groups' scales
    (`state.state2`) and `state.offset`, computed in the kernel as `block_scales` computes them."""
    _launch(packed, code, _nested(state), out, state.blocksize, True, state.state2.blocksize, inverse)


def _launch(packed: torch.Tensor, code: torch.Tensor, scales: tuple[torch.Tensor, ...], out: torch.Tensor,
            blocksize: int, nested: bool, scales_per_scale2: int, inverse: torch.Tensor | None) -> None:
    n_bytes = packed.numel()
    assert out.numel() == 2 * n_bytes and out.is_contiguous()
    half_in = out.shape[-1] // 2
    assert inverse is None or (out.dim() == 2 and out.shape[-1] % 2 == 0 and inverse.numel() == out.shape[0])
    _kernel()[(-(-n_bytes // BLOCK),)](packed, code, *scales, code if inverse is None else inverse, out, n_bytes,
                                       half_in, BLOCK=BLOCK, BYTES_PER_SCALE=blocksize // 2,
                                       NESTED=nested, SCALES_PER_SCALE2=scales_per_scale2,
                                       ROW_SCALE=inverse is not None, enable_fp_fusion=False)


def _nested(state: Any) -> tuple[torch.Tensor, ...]:
    """The kernels' scale arguments of a doubly quantized state: 8-bit codes, their code book, group scales,
    offset."""
    assert state.offset.dtype == state.state2.absmax.dtype == torch.float32
    return state.absmax, state.state2.code, state.state2.absmax, state.offset


def fp8_transposed(base: torch.nn.Module, inverse: torch.Tensor, fp8: bool = True,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """The weight W (out x in) of a bitsandbytes nf4 layer as the float8 e4m3 second operand of the input
    gradient's GEMM: row o times `inverse[o]` (float32, out), clamped to e4m3's range, written transposed
    (in x out, contiguous) in one pass from the 4-bit bytes, no 16-bit copy between. `fp8=False`: the same
    values in float32 before the cast (the CPU tests; Triton's interpreter rounds float8 differently).
    `out`: write into this (in x out) view instead, rows contiguous, e.g. a column slice of a group's
    concatenated operand (`fp8_base.fp8_input_grad_group`)."""
    state = base.weight.quant_state
    n_out, n_in = state.shape
    assert n_in % 2 == 0 and inverse.dtype == torch.float32 and inverse.numel() == n_out
    if out is None:
        out = torch.empty((n_in, n_out), dtype=torch.float8_e4m3fn if fp8 else torch.float32, device=base.weight.device)
    assert out.shape == (n_in, n_out) and out.stride(1) == 1 and out.dtype == (torch.float8_e4m3fn if fp8 else torch.float32)
    nested = bool(state.nested)
    scales = _nested(state) if nested else (state.absmax,) * 4
    _kernels().fp8_transposed_kernel[(-(-n_out // FP8_TILE[0]), -(-n_in // FP8_TILE[1]))](
        base.weight.data.view(torch.uint8).reshape(-1), _code(state, out.device), *scales,
        inverse.reshape(-1), out, n_out, n_in, out.stride(0), NESTED=nested, BYTES_PER_SCALE=state.blocksize // 2,
        SCALES_PER_SCALE2=state.state2.blocksize if nested else 1, BLOCK_O=FP8_TILE[0], BLOCK_I=FP8_TILE[1], FP8=fp8,
        ROW_BLOCKS=ROW_BLOCKS and row_blocks(n_in, state.blocksize), enable_fp_fusion=False)
    return out


def row_blocks(n_in: int, blocksize: int) -> bool:
    """`fp8_transposed` computes each scale block's scale once per tile: the blocks start at every row's start
    (`n_in` a multiple of the block size) and a tile's row holds whole blocks."""
    return n_in % blocksize == 0 and FP8_TILE[1] % blocksize == 0


# fp8_transposed: one scale per block and tile row, broadcast (False: one per byte, the kernel before session 12;
# bench/gpu_train.py --ab scaleperbyte)
ROW_BLOCKS = True


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
def _kernels() -> Any:
    try:
        from medtune import nf4_kernels
    except ImportError:  # no Triton
        return None
    return nf4_kernels


def _kernel() -> Any:
    kernels = _kernels()
    return None if kernels is None else kernels.dequantize_kernel
