"""A frozen 4-bit base projection's GEMMs in float8 (e4m3) for `medtune.fast_lora`'s fused LoRA path.

The default path (`training.fp8_input_gradients`, on Ada/Hopper or newer) runs only the input gradient's GEMM
`g @ W` in float8 (`fp8_input_grad`): the forward, the loss and the adapters' gradients stay 16-bit. Its weight
operand is written transposed in float8 straight from the nf4 bytes by one kernel (`nf4.fp8_transposed`), with a
fixed per-output-channel scale moved onto the gradient's columns (`fp8_rows`). `fp8_forward` runs the forward's
GEMM in float8 too, on the same weight bytes not transposed (`nf4.fp8_weight`) and the input's float8 rows
(`training.fp8_forward`: q/k/v and gate/up by default). `Fp8Base` (both GEMMs in float8, as its own autograd
node, no adapter) is a bench lever only: its forward drifted the loss (docs/benchmarks.md, machine seventeen).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from medtune import fast_lora, fp8_rows, nf4


class Fp8Base(torch.autograd.Function):
    """`x @ W.T` for a frozen bitsandbytes nf4 weight with both of its GEMMs in float8 (a lever under
    measurement, bench/gpu_train.py --fp8-base; not a config option). The weight stays nf4 in memory: each
    call writes it in e4m3 from its 4-bit bytes and quantizes the activations, one scale per row of each operand
    (per token, per output channel: `fp8_forward`; the backward reuses the weight's scales, moved onto the
    gradient's columns: `fp8_input_grad`), and `torch._scaled_mm` multiplies them at float8 rate (Hopper and
    newer) with a bf16 result. Nothing of the input is kept for the backward: the weight is frozen."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, base: torch.nn.Module) -> torch.Tensor:
        ctx.base, ctx.shape, ctx.dtype = base, x.shape, x.dtype
        return fp8_linear(x, base)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        dx = fp8_input_grad(grad.reshape(-1, grad.shape[-1]), ctx.base)
        return dx.view(ctx.shape).to(ctx.dtype), None


def fp8_linear(x: torch.Tensor, base: torch.nn.Module) -> torch.Tensor:
    """`x @ W.T` in float8, one scale per token and per output channel (`fp8_forward`); bf16 out."""
    y = fp8_forward(fp8_rows.rowwise_fp8(x.reshape(-1, x.shape[-1])), base, torch.bfloat16)
    return y.view(*x.shape[:-1], y.shape[-1])


def fp8_input_grad(grad: torch.Tensor, base: torch.nn.Module) -> torch.Tensor:
    """`grad @ W` (tokens x out times out x in) in float8 with the forward's quantized weight: for
    W = diag(s) Wq, `grad @ W = (grad * s) @ Wq`, the column scaling done inside the gradient's quantization.
    The GEMM wants Wq column-major, (in x out) in memory: with `FP8_TRANSPOSED` an nf4 weight is written that
    way by one kernel from its 4-bit bytes (`nf4.fp8_transposed`); otherwise it is dequantized to bf16,
    quantized, and copied transposed, three passes that cost more than the float8 GEMM saved
    (docs/benchmarks.md, machines seventeen and twenty-seven)."""
    scales = _fp8_scales(base)
    wt = _transposed_weight(base, scales)
    gq, gs = fp8_rows.rowwise_fp8(grad, col_scale=scales.row.reshape(-1))
    return torch._scaled_mm(gq, wt.t(), scale_a=gs, scale_b=scales.unit, out_dtype=grad.dtype)


# A group's input gradients (q/k/v, gate/up: `medtune.shared_input`) as one float8 GEMM over the concatenated
# gradients and weights (`fp8_input_grad_group`): "none" (each member's own GEMM), "narrow" (the default: only the
# groups with a member narrower than the input, i.e. q/k/v under grouped-query attention, whose k and v alone are
# small GEMMs) or "all". On an H200 q/k/v's grouped GEMM took 0.476 ms against 0.592 apart, gate/up's 1.848 against
# 1.765 (docs/benchmarks.md, call bd); bench/gpu_train.py --lever groupgrad / --ab groupqkv
GROUP_INPUT_GRAD = "narrow"


def groups_input_grad(bases: list[torch.nn.Module] | tuple[torch.nn.Module, ...]) -> bool:
    """Whether a group with these members' frozen bases runs its input gradients as one GEMM (`GROUP_INPUT_GRAD`)."""
    if GROUP_INPUT_GRAD == "all":
        return True
    return GROUP_INPUT_GRAD == "narrow" and any(b.out_features < b.in_features for b in bases)


def fp8_input_grad_group(grads: list[torch.Tensor], bases: list[torch.nn.Module]) -> torch.Tensor:
    """`sum_m grads[m] @ W_m` (tokens x in) for projections that read one input, as one float8 GEMM over
    K = the members' widths side by side: `[g_1 s_1 | g_2 s_2 | ...] @ [Wq_1; Wq_2; ...]` (each member's weight
    scales moved onto its gradient's columns, as `fp8_input_grad` does). The GEMM sums the members inside its
    accumulator: no product per member written in 16 bits and read back to be added. The gradients share one
    scale per token (their concatenated row's amax), where `fp8_input_grad` gives each member its own; e4m3 keeps
    its relative precision over ~17 binades below that amax, so a member whose values are far smaller than
    another's rounds the same."""
    scales = [_fp8_scales(b) for b in bases]
    widths = [g.shape[1] for g in grads]
    wt = torch.empty((bases[0].in_features, sum(widths)), dtype=torch.float8_e4m3fn, device=grads[0].device)
    start = 0
    for base, s, width in zip(bases, scales, widths):  # each member's weight into its columns of the one operand
        _transposed_weight(base, s, out=wt[:, start:start + width])
        start += width
    gq, gs = fp8_rows.rowwise_fp8_group(grads, [s.row.reshape(-1) for s in scales])
    return torch._scaled_mm(gq, wt.t(), scale_a=gs, scale_b=scales[0].unit, out_dtype=grads[0].dtype)


def fp8_forward(xq: tuple[torch.Tensor, torch.Tensor], base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """`x @ W.T` (tokens x out, `dtype`) from x's float8 rows and their scales (`fp8_rows.rowwise_fp8`): the weight
    in float8 with the frozen per-output-channel scales the input gradient uses (`_fp8_scales`), written from the
    nf4 bytes by one kernel (`nf4.fp8_weight`) where it can be, both scales applied in the GEMM's epilogue."""
    scales = _fp8_scales(base)
    if fast_lora._four_bit(base, bias=False) and nf4.usable(base):
        weight = nf4.fp8_weight(base, scales.inverse)
    else:
        weight = _fp8_weight(base)[0]
    return torch._scaled_mm(xq[0], weight.t(), scale_a=xq[1], scale_b=scales.row.t(), out_dtype=dtype)


# The input gradient's float8 weight written transposed from the nf4 bytes by one kernel (`fp8_input_grad`)
FP8_TRANSPOSED = True


def _transposed_weight(base: torch.nn.Module, scales: "Fp8Scales", out: torch.Tensor | None = None) -> torch.Tensor:
    """The input gradient's float8 weight operand, (in x out) with rows contiguous (into `out` where given): with
    `FP8_TRANSPOSED` written by one kernel from an nf4 weight's bytes, else dequantized, quantized and transposed."""
    if FP8_TRANSPOSED and fast_lora._four_bit(base, bias=False) and nf4.usable(base):
        return nf4.fp8_transposed(base, scales.inverse, out=out)
    wt = _fp8_weight(base)[0].t()
    return wt.contiguous() if out is None else out.copy_(wt)


class Fp8Scales(NamedTuple):
    row: torch.Tensor  # (out, 1): the frozen weight's float8 scale per output channel
    inverse: torch.Tensor  # (out,): 1 / row, as `fp8_rows.rowwise_fp8` multiplies by it
    unit: torch.Tensor  # (1, in): ones, the input gradient GEMM's weight scale (`row` goes onto the gradient)


def _fp8_scales(base: torch.nn.Module) -> Fp8Scales:
    """A frozen base weight's float8 scales, computed from its dequantized weight on the first call and kept."""
    if getattr(base, "fp8_scales", None) is None:
        row = fp8_rows.row_amax_scale(fast_lora._base_weight(base, torch.bfloat16))
        n_in = base.in_features
        base.fp8_scales = Fp8Scales(row, (1.0 / row).reshape(-1),
                                    torch.ones(1, n_in, dtype=torch.float32, device=row.device))
    return base.fp8_scales


def _fp8_weight(base: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen base weight dequantized (as bitsandbytes does) and quantized to float8 rows, one scale per
    output channel; the scales are computed on the first call and kept, the weight being frozen."""
    w = fast_lora._base_weight(base, torch.bfloat16)
    return fp8_rows.rowwise_fp8(w, row_scale=_fp8_scales(base).row)
