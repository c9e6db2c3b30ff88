"""LoRA's input dropout drawn inside the adapter's own GEMMs, on the GPU.

With dropout, the fused LoRA backward (`fast_lora.LoraLinear`) still runs PyTorch's dropout as separate
kernels: in the forward a dropped copy of the input and a mask are written and the A GEMM reads the
copy; in the backward the mask is drawn again (the generator state forked and restored on the host),
the copy written again for A's gradient, and the input gradient's LoRA part is a full (tokens x in)
product masked and added in two more passes. On an H200 that is 12 % of a Llama-3.1-8B QLoRA step at
dropout 0.05 (docs/benchmarks.md, calls ai and aj). Here three Triton kernels draw the mask on the fly
from a counter-based hash of (seed, element index), so nothing but the input is read and nothing
masked is written:

  forward   h = (x * keep / (1 - p)) @ A.T
  backward  grad_A = dh.T @ (x * keep / (1 - p))          (split over tokens, partial sums added)
            grad_x += keep / (1 - p) * (dh @ A)           (in the epilogue of the small GEMM)

The hash is murmur3's 32-bit finalizer over a counter. With `PAIRED` (the default) one hash decides two
neighbouring columns of a row, its low 16 bits the first and its high 16 bits the second, each kept
when its half is at least round(p * 2**16): half the hashing (the three kernels 1.15x faster on an H200,
a step +2 %: docs/benchmarks.md). Otherwise one hash per element, kept when it is at least p * 2**32.
Either way the kept values are scaled by 1 / (1 - the drop rate drawn), so the update's expectation is
exact; the rate drawn is p to 2**-16 (p = 0.05: 3,277 / 65,536 = 0.050003).
The seed is drawn from PyTorch's CPU generator for each projection call:
`torch.manual_seed` reproduces it, and activation checkpointing, which restores that generator before
recomputing, draws the same one. The masks are not PyTorch's dropout masks (another generator), so a
run with this path matches PEFT's in distribution, not mask for mask; `reference_keep` is the same hash
in PyTorch ops, the tests' reference.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

MIX = (0x9E3779B1, 0x85EBCA6B, 0xC2B2AE35)  # the index's odd multiplier, then murmur3 fmix32's two
RANKS = (16, 32, 64, 128)  # LoRA ranks the kernels take (a power of two, at least tl.dot's 16)
BM, BK = 64, 64
SPLIT_ROWS = 1024  # tokens per program of grad_a's split: 8 splits x 64 column blocks for 8,192 x 4,096
# Launch settings of the forward and input-gradient kernels (token rows per program, warps, pipeline stages);
# Triton's defaults, measured on an H200 in call ak. bench/lora_dropout_check.py --sweep times alternatives
# and names those whose results differ from these bit for bit (the mask never does: it hashes the element's
# own row and column; the sums' rounding may).
FORWARD = {"BLOCK_M": BM, "num_warps": 4, "num_stages": 3}
GRAD_X = {"BLOCK_M": BM, "num_warps": 4, "num_stages": 3}
# One hash per two neighbouring elements; False: one per element, the kernels before 2026-11-29
# (bench/gpu_train.py --ab elementhash). Read at each call: a forward and its backward must agree.
PAIRED = True


def usable(x: torch.Tensor, a: torch.Tensor, p: float) -> bool:
    """The kernels apply: an Ampere or newer GPU (measured on Hopper), 16-bit activations and adapter, a
    rank they take, p below 1/2, and fewer than 2**32 elements (the hash's counter)."""
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and a.dtype == x.dtype and 0 < p < 0.5
            and a.shape[0] in RANKS and x.numel() < 2**32 and x.stride(-1) == 1 and _ampere(x.device.index)
            and _kernels() is not None)


@functools.cache
def _ampere(index: int | None) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 0)


def new_seed() -> int:
    """A seed from PyTorch's CPU generator (no device sync; checkpointing restores that generator)."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def threshold(p: float, paired: bool | None = None) -> int:
    """The hash (or its 16-bit half, `paired`; default `PAIRED`) at which an element is kept."""
    paired = PAIRED if paired is None else paired
    return round(p * 2**16) if paired else int(p * 2**32)


def keep_scale(p: float, paired: bool | None = None) -> float:
    """1 / (1 - the drop rate the threshold draws): the kept values' scale, unbiased."""
    paired = PAIRED if paired is None else paired
    return 1.0 / (1.0 - threshold(p, paired) / 2.0 ** (16 if paired else 32))


def _seeds(seeds: int | tuple[int, ...]) -> tuple[int, int, int, int]:
    """(the group's size G, its three seed arguments): the kernels take up to three adapters at once."""
    group = (seeds,) if isinstance(seeds, int) else tuple(seeds)
    assert 1 <= len(group) <= 3, "a group is one to three adapters reading one input"
    padded = group + (0,) * (3 - len(group))
    return len(group), padded[0], padded[1], padded[2]


def forward(x: torch.Tensor, a: torch.Tensor, p: float, seed: int | tuple[int, ...],
            launch: dict[str, int] | None = None) -> torch.Tensor:
    """`dropout(x) @ a.T` for x (tokens x in), a (r x in). With a group's seeds (G of them), a is the G adapters'
    A matrices stacked (G*r x in) and column block g of the result (tokens x G*r) is adapter g's, its input
    dropped with its own mask. `launch`: `FORWARD` unless given."""
    m, k = x.shape
    group, *seeds = _seeds(seed)
    r = a.shape[0] // group
    launch = launch or FORWARD
    h = torch.empty((m, group * r), dtype=x.dtype, device=x.device)
    _kernels()["forward"][(group * triton_cdiv(m, launch["BLOCK_M"]),)](
        x, a, h, m, *seeds, threshold(p), keep_scale(p), x.stride(0), a.stride(0), h.stride(0),
        K=k, R=r, G=group, BLOCK_K=BK, PAIRED=PAIRED, **launch)
    return h


def grad_a(x: torch.Tensor, dh: torch.Tensor, p: float, seed: int | tuple[int, ...]) -> torch.Tensor:
    """`dh.T @ dropout(x)` (r x in, float32) with the forward's mask; for a group, dh's column block g with
    adapter g's mask, stacked (G*r x in)."""
    m, k = x.shape
    group, *seeds = _seeds(seed)
    r = dh.shape[1] // group
    splits = triton_cdiv(m, SPLIT_ROWS)
    parts = torch.empty((splits, group * r, k), dtype=torch.float32, device=x.device)
    _kernels()["grad_a"][(group * triton_cdiv(k, BK), splits)](
        x, dh, parts, m, *seeds, threshold(p), x.stride(0), dh.stride(0), K=k, R=r, G=group, ROWS=SPLIT_ROWS,
        BLOCK_M=BM, BLOCK_K=BK, PAIRED=PAIRED)
    return parts.sum(0).mul_(keep_scale(p))


def add_grad_x(grad_x: torch.Tensor, dh: torch.Tensor, a: torch.Tensor, p: float, seed: int | tuple[int, ...],
               launch: dict[str, int] | None = None, addends: tuple[torch.Tensor, ...] = ()) -> None:
    """`grad_x += sum(addends) + dropout-mask / (1 - p) * (dh @ a)` in place, with the forward's mask (for a
    group, the sum over its adapters of column block g of dh times adapter g's A, each masked with its own
    mask); summed in float32, rounded once. `addends`: up to two tensors laid out as grad_x (the other
    projections' base input gradients). `launch`: `GRAD_X` unless given."""
    _grad_x(grad_x, dh, a, p, seed, True, launch or GRAD_X, addends)


def grad_x(dh: torch.Tensor, a: torch.Tensor, p: float, seed: int | tuple[int, ...],
           launch: dict[str, int] | None = None) -> torch.Tensor:
    """`dropout-mask / (1 - p) * (dh @ a)` (tokens x in), with the forward's mask (a group's: summed over its
    adapters, as `add_grad_x`): written, nothing read but dh and a (the base's input gradient can then be
    accumulated into it by its own GEMM)."""
    out = torch.empty((dh.shape[0], a.shape[1]), dtype=dh.dtype, device=dh.device)
    _grad_x(out, dh, a, p, seed, False, launch or GRAD_X)
    return out


def _grad_x(grad_x: torch.Tensor, dh: torch.Tensor, a: torch.Tensor, p: float, seed: int | tuple[int, ...],
            accumulate: bool, launch: dict[str, int], addends: tuple[torch.Tensor, ...] = ()) -> None:
    m, k = grad_x.shape
    group, *seeds = _seeds(seed)
    assert len(addends) <= 2 and all(t.shape == grad_x.shape and t.stride() == grad_x.stride() for t in addends)
    extra = tuple(addends) + (grad_x,) * (2 - len(addends))  # unread placeholders
    _kernels()["grad_x"][(triton_cdiv(m, launch["BLOCK_M"]), triton_cdiv(k, BK))](
        grad_x, *extra, dh, a, m, *seeds, threshold(p), keep_scale(p), grad_x.stride(0), dh.stride(0), a.stride(0),
        K=k, R=a.shape[0] // group, G=group, BLOCK_K=BK, ACCUMULATE=accumulate, ADDENDS=len(addends),
        PAIRED=PAIRED, **launch)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def reference_keep(seed: int, rows: int, cols: int, p: float, paired: bool | None = None) -> torch.Tensor:
    """The kernels' mask in PyTorch ops (int64 arithmetic, low 32 bits kept): True where kept. `paired`:
    default `PAIRED`."""
    paired = PAIRED if paired is None else paired
    if paired:
        pairs = (cols + 1) // 2
        h = _reference_mix(seed, torch.arange(rows * pairs, dtype=torch.int64).reshape(rows, pairs))
        halves = torch.stack((h & 0xFFFF, h >> 16), dim=-1).reshape(rows, 2 * pairs)[:, :cols]
        return halves >= threshold(p, True)
    return _reference_mix(seed, torch.arange(rows * cols, dtype=torch.int64).reshape(rows, cols)) >= threshold(p, False)


def _reference_mix(seed: int, h: torch.Tensor) -> torch.Tensor:
    low = 0xFFFFFFFF
    h = (h * MIX[0] + seed) & low
    h ^= h >> 16
    h = (h * MIX[1]) & low
    h ^= h >> 13
    h = (h * MIX[2]) & low
    h ^= h >> 16
    return h


@functools.cache
def _kernels() -> dict[str, Any] | None:
    try:
        from medtune import lora_dropout_kernels as k
    except ImportError:  # no Triton
        return None
    return {"forward": k.forward_kernel, "grad_a": k.grad_a_kernel, "grad_x": k.grad_x_kernel}
