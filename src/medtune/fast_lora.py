"""A leaner forward for PEFT's LoRA linear layers: the adapter's update lands in the base output
inside one GEMM.

PEFT computes `result = base(x).clone(); result = result + lora_B(lora_A(dropout(x))) * scaling`:
for a 4-bit base that is a defensive copy of the base output, then a scaling pass and an addition
pass over it, each a full read and write of a (tokens x out_features) tensor — three memory-bound
kernels per projection, seven projections per layer, again in the recompute and in the backward.
Here the update is `torch.addmm(base_out, h, B.T, alpha=scaling)`: the scaling and the addition
happen in the GEMM's epilogue (accumulated in float32, rounded once, where PEFT rounds three times),
and nothing is copied. The adapter weights stay in float32 for the optimizer; the small (r x in,
out x r) matrices are cast to the activations' dtype, never the large activations to float32.

`medtune.train` installs the fused backward too (`LoraLinear`) wherever the base is a plain or 4-bit
linear and the run is not sharded with FSDP.

Only plain LoRA takes this path (one active adapter, a linear lora_A/lora_B without bias, no DoRA or
other variant, not merged, adapters enabled, no per-row adapter names); anything else calls PEFT's
own forward, so the swap can never change what a configuration means.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from medtune import fp8_rows, lora_dropout, nf4
from medtune.fp8_base import Fp8Base, fp8_forward, fp8_input_grad, fp8_linear


def install(model: torch.nn.Module, backward: bool = False, fp8_base: bool | str = False, keep_mask: bool = False,
            dropout_kernels: bool = True, fp8_input_grad: bool = False, fp8_forward: str = "none") -> int:
    """Give every LoRA linear layer of `model` the fused forward (with `backward`, also the fused
    backward of `LoraLinear`, where the base is a plain or bitsandbytes 4-bit linear; with `fp8_base`,
    a bitsandbytes 4-bit base's two GEMMs in float8, see `Fp8Base`, or with `fp8_base="backward"` and the
    fused backward its input-gradient GEMM only, the forward and so the loss staying bf16); returns how
    many layers took it.
    `keep_mask`: the fused backward keeps each dropout mask (one byte per element) instead of replaying
    it from the saved random-number state, which a CUDA graph cannot do (medtune.layer_graphs).
    `dropout_kernels`: with the fused backward on a GPU, the dropout mask is drawn inside the adapter's
    GEMMs (`medtune.lora_dropout`) instead of by PyTorch's dropout (not with `keep_mask`).
    `fp8_input_grad` (`training.fp8_input_gradients`): with the fused backward, a 4-bit base's input gradient in
    float8 on a card with float8 GEMMs (`fp8_mode`). `fp8_forward` (`training.fp8_forward`): where the input
    gradient runs in float8, the forward's base GEMM too, for "all" such layers, "all_but_down" (the default) or
    "qkv_gate_up" (`forward_in_fp8`)."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and isinstance(module, torch.nn.Module) and _linear(module):
            module.fp8_forward = fp8_forward
            module.projection = path.rsplit(".", 1)[-1]  # q_proj, ..., down_proj: `forward_in_fp8` picks by it
            whole = backward and _plain_or_4bit(module.get_base_layer())
            module.forward = types.MethodType(fused_forward_backward if whole else fused_forward, module)
            four_bit = _four_bit(module.get_base_layer(), bias=False)
            module.fp8_base = fp8_base if fp8_base and four_bit else False
            module.fp8_capable = fp8_input_grad and whole and four_bit
            module.keep_mask = keep_mask
            module.dropout_kernels = dropout_kernels
            count += 1
    return count


def _four_bit(base: torch.nn.Module, bias: bool = True) -> bool:
    """A bitsandbytes 4-bit linear layer (`bias=False`: one without a bias)."""
    import bitsandbytes as bnb  # only here: importing it logs backend warnings on CPUs

    return type(base) is bnb.nn.Linear4bit and (bias or base.bias is None)


def _plain_or_4bit(base: torch.nn.Module) -> bool:
    return type(base) is torch.nn.Linear or _four_bit(base)


def _linear(layer: Any) -> bool:
    return all(isinstance(layer.lora_A[n], torch.nn.Linear) and isinstance(layer.lora_B[n], torch.nn.Linear)
               for n in layer.lora_A)


def _plain(layer: Any, kwargs: dict[str, Any]) -> str | None:
    """The active adapter's name when the fused path computes exactly what PEFT would, else None."""
    if layer.disable_adapters or layer.merged or kwargs.get("adapter_names") is not None:
        return None
    active = [n for n in layer.active_adapters if n in layer.lora_A]
    if len(active) != 1 or active[0] in layer.lora_variant or layer.lora_B[active[0]].bias is not None:
        return None
    return active[0]


def fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = _plain(self, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    result = Fp8Base.apply(x, self.base_layer) if getattr(self, "fp8_base", False) is True and not (args or kwargs) \
        else self.base_layer(x, *args, **kwargs)
    dtype = result.dtype
    h = F.linear(self.lora_dropout[name](x).to(dtype), self.lora_A[name].weight.to(dtype))
    flat = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]),
                       self.lora_B[name].weight.to(dtype).t(), alpha=self.scaling[name])
    return flat.view(result.shape)


def fused_forward_backward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = _plain(self, kwargs)
    if name is None or args or kwargs:
        return type(self).forward(self, x, *args, **kwargs)
    drop = self.lora_dropout[name]
    p = drop.p if isinstance(drop, torch.nn.Dropout) and drop.training else 0.0
    return LoraLinear.apply(x, self.lora_A[name].weight, self.lora_B[name].weight, self.base_layer,
                            self.scaling[name], p, fp8_mode(self, x), dropout_mode(self))


class LoraLinear(torch.autograd.Function):
    """Base projection + LoRA update as one autograd node. The forward is `fused_forward`'s; the
    backward writes the input's gradient once: the base's `g @ W` (bitsandbytes' own dequantize for a
    4-bit base), then the LoRA branch added into it in place (`addmm_` without dropout, `addcmul_` with
    the dropout mask), where autograd would materialise the branch's gradient, mask it and add it.

    With dropout nothing per projection is kept of the input: PEFT keeps each projection's dropped copy
    and its mask (q, k and v: three copies of one input), here the input itself is kept (one tensor,
    shared by the projections that read it) with the random-number state the mask was drawn from, and
    the backward draws the same mask again (as activation checkpointing replays dropout). On a GPU the
    mask is drawn inside the adapter's GEMMs instead, from a seed (`medtune.lora_dropout`), and no
    dropped copy is written in either pass."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, base: torch.nn.Module,
                scaling: float, p: float, fp8: bool | str = False, mode: str = "replay") -> torch.Tensor:
        ctx.accumulate = accumulates(x, base, fp8 is True)  # "backward": the forward's GEMM stays bf16
        out, (h, a16, b16, mask), ctx.draw = lora_forward(x, a, b, base, scaling, p, fp8, mode, ctx.accumulate)
        ctx.save_for_backward(x, h, a16, b16, mask)
        ctx.base, ctx.scaling, ctx.p, ctx.fp8, ctx.dtypes = base, scaling, p, fp8, (x.dtype, a.dtype, b.dtype)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, *kept = ctx.saved_tensors
        grad_x, grad_a, grad_b = lora_backward(ctx, grad, x, *kept, ctx.needs_input_grad[0])
        return grad_x, grad_a, grad_b, None, None, None, None, None


# The input gradient's GEMM in float8 for the layers `install` made capable (`fp8_mode`); bench/gpu_train.py
# --ab bf16inputgrad switches it off and on (the default since 2026-11-29 06:20: +2.2 %, docs/benchmarks.md)
FP8_INPUT_GRAD = True


def fp8_mode(layer: Any, x: torch.Tensor) -> bool | str:
    """How the fused backward runs a layer's base GEMMs: `install`'s `fp8_base`, else with `FP8_INPUT_GRAD`
    "backward" (the input gradient in float8) where `install` made the layer capable (`fp8_input_grad`, a 4-bit
    base without bias) on an Ada/Hopper or newer GPU, or "both" (the forward's too: `forward_in_fp8`)."""
    mode = getattr(layer, "fp8_base", False)
    if mode or not FP8_INPUT_GRAD or not getattr(layer, "fp8_capable", False) or not x.is_cuda:
        return mode
    if not float8_gemms(x.device.index):
        return False
    # without gradients (evaluation, generation) the forward stays 16-bit, as the merged model computes it
    return "both" if forward_in_fp8(layer) and torch.is_grad_enabled() else "backward"


# `training.fp8_forward`'s settings: the projections whose forward runs in float8 (None: every one). "qkv_gate_up":
# those that read the normalized hidden state (RMSNorm's output); "all_but_down" (the default): o too, whose input
# (attention's output) has the smallest largest-value-over-RMS of the four inputs (1.93 % from the plain path's
# losses); with down too ("all") the 8B's losses drifted 2.2 %, beyond the 2 % tolerance (docs/benchmarks.md,
# machines forty-nine and fifty-five)
_NORMALIZED = frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"})
FP8_FORWARD_PROJECTIONS: dict[str, frozenset[str] | None] = {
    "none": frozenset(), "qkv_gate_up": _NORMALIZED, "all_but_down": _NORMALIZED | {"o_proj"}, "all": None}
# The bench's override of the setting: a setting's name or a set of projection names; None: the setting
# (bench/gpu_train.py --lever fp8forward, fp8groups, fp8witho, nofp8forward)
FP8_FORWARD: str | frozenset[str] | None = None


def forward_in_fp8(layer: Any) -> bool:
    """Whether a layer whose input gradient runs in float8 runs its forward's base GEMM in float8 too
    (`install`'s `fp8_forward`, or `FP8_FORWARD`)."""
    setting = FP8_FORWARD or getattr(layer, "fp8_forward", "none")
    names = setting if isinstance(setting, frozenset) else FP8_FORWARD_PROJECTIONS[setting]
    return names is None or getattr(layer, "projection", None) in names


@functools.cache
def float8_gemms(index: int | None) -> bool:
    """The CUDA device `index` has float8 GEMMs (Ada, Hopper or newer)."""
    return torch.cuda.get_device_capability(index) >= (8, 9)


def dropout_mode(layer: Any) -> str:
    """How `lora_forward` draws a layer's dropout mask (`install`'s keep_mask and dropout_kernels)."""
    if getattr(layer, "keep_mask", False):
        return "keep"
    return "kernel" if getattr(layer, "dropout_kernels", False) else "replay"


def lora_forward(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, base: torch.nn.Module, scaling: float, p: float,
                 fp8: bool | str, mode: str,
                 accumulate: bool = False) -> tuple[torch.Tensor, tuple[Any, ...], torch.Tensor | int | None]:
    """`LoraLinear`'s forward: (output, what the backward keeps besides the input, how the dropout mask is
    drawn again: a generator state, or the seed of `medtune.lora_dropout`'s kernels). `mode`: "kernel"
    (those kernels where they apply, else as "replay"), "replay" (PyTorch's dropout, drawn again from the
    saved generator state) or "keep" (PyTorch's dropout, the mask kept: for CUDA graphs). `accumulate`: the
    base's GEMM adds into the adapter's part (`accumulates`)."""
    result = None if accumulate else fp8_linear(x, base) if fp8 is True else _base_product(x, base)
    dtype = x.dtype if result is None else result.dtype
    a16, b16 = adapter_weight(a, dtype), adapter_weight(b, dtype)
    x2, mask = x.reshape(-1, x.shape[-1]), None
    if p > 0 and mode == "kernel" and lora_dropout.usable(x2, a16, p):
        draw: torch.Tensor | int | None = lora_dropout.new_seed()
        h = lora_dropout.forward(x2, a16, p, draw)
    else:
        draw = _rng_state(x.device) if p > 0 and mode != "keep" else None
        dropped, mask = torch.ops.aten.native_dropout(x2, p, True) if p > 0 else (x2, None)
        h = F.linear(dropped.to(dtype), a16)
    kept = (h, a16, b16, mask if mode == "keep" else None)
    if result is None:
        flat = accumulated(x2, h, b16, base, scaling, forward_rows(x2, fp8))
        return flat.view(*x.shape[:-1], flat.shape[1]), kept, draw
    flat = torch.addmm(result.reshape(-1, result.shape[-1]), h, b16.t(), alpha=scaling)
    return flat.view(result.shape), kept, draw


def accumulated(x2: torch.Tensor, h: torch.Tensor, b16: torch.Tensor, base: torch.nn.Module, scaling: float,
                xq: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """`base(x2) + scaling * h @ b16.T` (tokens x out) where the base's GEMMs accumulate (`accumulates`): the
    adapter's update first, written; then the base's GEMM adds its product into it (beta = 1). With x2's float8
    rows `xq` (`forward_rows`) the base's GEMM runs in float8, which cannot accumulate: the adapter's update is
    added into its product instead, by the small GEMM's epilogue."""
    if xq is not None:
        return fp8_forward(xq, base, x2.dtype).addmm_(h, b16.t(), alpha=scaling)
    weight = _base_weight(base, x2.dtype)
    flat = torch.addmm(h.new_empty(h.shape[0], weight.shape[0]), h, b16.t(), beta=0, alpha=scaling)
    return flat.addmm_(x2, weight.t())


def forward_rows(x2: torch.Tensor, fp8: bool | str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """x2's float8 rows and scales (one per token) for the forward's base GEMMs where they run in float8 (`fp8_mode`
    "both"), else None: the forward in 16 bits."""
    return fp8_rows.rowwise_fp8(x2) if fp8 == "both" else None


# The adapter weights' 16-bit copies are made once per optimizer step (`StepCasts`); bench/gpu_train.py --ab castpercall
CAST_ONCE_PER_STEP = True
# what `StepCasts` keeps: id(weight) -> (weight, its version, dtype, copy); None outside an optimizer step
_casts: dict[int, tuple[torch.Tensor, int, torch.dtype, torch.Tensor]] | None = None


def adapter_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight.to(dtype)` for `LoraLinear`'s GEMMs (float32 adapter weights, 16-bit activations). Within an
    optimizer step (`StepCasts`) the copy is made at the first micro batch and reused by the others and by
    every backward: the same values, one cast instead of one per projection and micro batch (in an 8B step
    of 4 micro batches, 1,792 casts, each a kernel launch and its host time). A copy is reused only for the
    same tensor, unchanged since (its version counter), in the same dtype; never inside a CUDA graph's
    capture (the graph would read a copy that the next step replaces)."""
    if _casts is None or not CAST_ONCE_PER_STEP or weight.dtype == dtype or _capturing(weight):
        return weight.to(dtype)
    kept = _casts.get(id(weight))
    if kept is not None and kept[0] is weight and kept[1] == weight._version and kept[2] == dtype:
        return kept[3]
    copy = weight.to(dtype)
    _casts[id(weight)] = (weight, weight._version, dtype, copy)
    return copy


def _capturing(weight: torch.Tensor) -> bool:
    return weight.is_cuda and torch.cuda.is_current_stream_capturing()


class StepCasts(TrainerCallback):
    """Keeps `adapter_weight`'s copies from an optimizer step's first micro batch until just before the
    optimizer changes the weights (which an 8-bit optimizer does through raw pointers, unseen by version
    counters): the copies never outlive the values they were made from."""

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        global _casts
        _casts = {}

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        global _casts
        _casts = None

    on_train_end = on_pre_optimizer_step


# The base's GEMMs add into the adapter's part (`accumulates`); bench/gpu_train.py --ab noaccumulate
ACCUMULATE_IN_BASE = True
# medtune.nf4's kernel dequantizes 4-bit bases where it can (`nf4.usable`); bench/gpu_train.py --ab nonf4kernel
NF4_KERNEL = True


def _base_product(x: torch.Tensor, base: torch.nn.Module) -> torch.Tensor:
    """`base(x)`. With `NF4_KERNEL`, a 4-bit base's weight comes from `medtune.nf4`'s kernel, then one GEMM in
    its compute dtype: what bitsandbytes' forward computes for training-sized inputs (dequantize, linear)."""
    if NF4_KERNEL and _four_bit(base, bias=False) and nf4.usable(base):
        dtype = base.compute_dtype or x.dtype
        weight = nf4.dequantize(base, base.weight.quant_state.dtype).to(dtype)  # as `_base_weight`, checked once
        return F.linear(x.to(dtype), weight).to(x.dtype)
    return base(x)


def accumulates(x: torch.Tensor, base: torch.nn.Module, fp8: bool | str) -> bool:
    """Whether the base projection's GEMMs accumulate into the adapter's part (`ACCUMULATE_IN_BASE`):
    forward `y = addmm(s * h @ B.T, x, W.T)` and backward `dx = addmm(lora part, g, W)`, instead of the base's
    product first and the adapter's added to it by a small GEMM that reads and writes the whole output, a
    pass over memory per projection and direction. The large GEMM reads the addend in its epilogue, while it
    is still compute-bound. Only where the result is what the base computes anyway: 16-bit activations in the
    base's compute dtype (no other autocast dtype), no bias, no float8."""
    if not ACCUMULATE_IN_BASE or fp8 or x.dtype not in (torch.bfloat16, torch.float16) or base.bias is not None:
        return False
    if not _plain_or_4bit(base):
        return False
    compute = base.compute_dtype if _four_bit(base) else base.weight.dtype
    device = x.device.type
    return compute == x.dtype and (not torch.is_autocast_enabled(device) or torch.get_autocast_dtype(device) == x.dtype)


def lora_backward(ctx: Any, grad: torch.Tensor, x: torch.Tensor, h: torch.Tensor, a16: torch.Tensor,
                  b16: torch.Tensor, mask: torch.Tensor | None,
                  need_x: bool) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """`LoraLinear`'s backward from its input `x` and what `lora_forward` kept (`ctx` carries base,
    scaling, p, fp8, draw, the dtypes and whether the base's GEMMs accumulate, `accumulates`): the
    gradients of x (when `need_x`), A and B."""
    x_dtype, a_dtype, b_dtype = ctx.dtypes
    x2 = x.reshape(-1, x.shape[-1])
    g = grad.reshape(-1, grad.shape[-1]).to(h.dtype)
    # As autograd differentiates addmm(result, h, B.T, alpha=s) and linear(dropped, A):
    dh = g.mm(b16).mul_(ctx.scaling)
    grad_b = h.t().mm(g).mul_(ctx.scaling).t().to(b_dtype)
    kernels = isinstance(ctx.draw, int)  # the mask drawn inside medtune.lora_dropout's kernels
    if kernels:
        grad_a = lora_dropout.grad_a(x2, dh, ctx.p, ctx.draw).to(a_dtype)
    else:
        if mask is not None:
            dropped = torch.ops.aten.native_dropout_backward(x2, mask, 1.0 / (1.0 - ctx.p))
        elif ctx.p > 0:
            with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else [],
                                       device_type=x.device.type):
                _set_rng_state(x.device, ctx.draw)
                dropped, mask = torch.ops.aten.native_dropout(x2, ctx.p, True)
        else:
            dropped = x2
        grad_a = dh.t().mm(dropped.to(h.dtype)).to(a_dtype)
        del dropped
    grad_x = None
    if need_x and ctx.accumulate and not ctx.fp8:
        # the adapter's part written first, then the base's input gradient accumulated into it by its GEMM
        if kernels:
            grad_x = lora_dropout.grad_x(dh, a16, ctx.p, ctx.draw)
        else:
            grad_x = dh.mm(a16) if mask is None else torch.mul(dh.mm(a16), mask).mul_(1.0 / (1.0 - ctx.p))
        grad_x.addmm_(g, _base_weight(ctx.base, g.dtype))
        grad_x = grad_x.view(*grad.shape[:-1], grad_x.shape[-1]).to(x_dtype)
    elif need_x:
        grad_x = fp8_input_grad(g, ctx.base) if ctx.fp8 else g.mm(_base_weight(ctx.base, g.dtype))
        if kernels:
            lora_dropout.add_grad_x(grad_x, dh, a16, ctx.p, ctx.draw)
        elif mask is None:
            grad_x.addmm_(dh, a16)
        else:
            grad_x.addcmul_(dh.mm(a16), mask, value=1.0 / (1.0 - ctx.p))
        grad_x = grad_x.view(*grad.shape[:-1], grad_x.shape[-1]).to(x_dtype)
    return grad_x, grad_a, grad_b


def _rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _base_weight(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The frozen base weight (out x in) as the input gradient's matmul uses it: bitsandbytes' 4-bit
    backward dequantizes the same way (`MatMul4Bit.backward`); with `NF4_KERNEL`, `medtune.nf4`'s kernel
    computes the same values."""
    import bitsandbytes as bnb

    if isinstance(base, bnb.nn.Linear4bit):  # before nn.Linear: Linear4bit subclasses it
        state = base.weight.quant_state
        if NF4_KERNEL and nf4.usable(base):
            return nf4.dequantize(base, state.dtype).to(dtype)
        return bnb.functional.dequantize_4bit(base.weight.data, state).to(dtype)
    return base.weight.to(dtype)
