"""LoRA projections that read one input, run as one group: q, k and v (the attention's input), gate and
up (the MLP's).

PEFT, and `fast_lora.LoraLinear`, run each projection on its own. With LoRA dropout drawn inside the
adapters' GEMMs (`medtune.lora_dropout`), each of q, k and v reads the whole (tokens x hidden) input in its
forward kernel and again for its A gradient, and in the backward each writes its own input gradient, which
the dropout kernel reads and writes once more to add the adapter's part, and autograd then sums the three:
at the Llama-3.1-8B shape ~15 passes over a (tokens x 4,096) tensor per layer where 7 do (9 where 5 for
gate and up). Here the group's first projection computes every member's output in one autograd node
(`SharedLora`), and the other members' calls on the same input tensor return theirs:

  forward   one kernel launch for the members' dropped-input GEMMs (A stacked); a member's programs run
            next to each other, so an input tile read from memory for q is still in L2 for k and v
  backward  one launch for the A gradients; the input gradient written once: the members' base input
            gradients summed with their masked adapter parts in one pass (float32, rounded once), or the
            adapters' parts written first and each base GEMM accumulating into them

Each member keeps its own dropout mask, drawn from its own seed, in the order PEFT's calls draw them (q, k,
v), so a grouped run draws the masks an ungrouped one would: the same numbers up to summation order. The
model's code is unchanged: it still calls q_proj(x), k_proj(x), v_proj(x). Groups form only on the default
GPU path (dropout in the kernels or none, 16-bit activations that the base's GEMMs accumulate into, the
input gradient in bf16 or float8); anything else runs each projection as before.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from typing import Any

import torch

from medtune import fast_lora, fp8_base, lora_dropout
from medtune.fp8_base import fp8_input_grad

log = logging.getLogger("medtune")

# The projections of a module that read the same input, in the order the model calls them.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# Groups run as one node; False: each projection alone (bench/gpu_train.py --ab noshared). Read at each call.
SHARED_INPUT = True


class Group:
    """A module's projections that read one input, and the outputs computed for the members not yet called."""

    def __init__(self, names: tuple[str, ...], members: tuple[torch.nn.Module, ...]):
        self.names, self.members = names, members
        self.pending: tuple[torch.Tensor, dict[torch.nn.Module, torch.Tensor]] | None = None
        self.stale = 0  # outputs computed and never asked for, in a row (see `forward`)
        self.off = False


def install(model: torch.nn.Module) -> int:
    """Group the projections of every module in `GROUPS` whose members all run `fast_lora`'s fused backward;
    returns how many groups there are (idempotent)."""
    count = 0
    for module in model.modules():
        for names in GROUPS:
            members = tuple(getattr(module, n, None) for n in names)
            if all(_fused(m) for m in members):
                group = Group(names, members)
                for member in members:
                    member.shared_group = group
                    member.forward = types.MethodType(forward, member)
            count += all(_grouped(m) for m in members)
    return count


def _fused(module: Any) -> bool:
    return getattr(getattr(module, "forward", None), "__func__", None) is fast_lora.fused_forward_backward


def _grouped(module: Any) -> bool:
    return getattr(getattr(module, "forward", None), "__func__", None) is forward


def forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A grouped projection's forward: its output from the group's node when the first member computed it for
    this very input, else the whole group's node when this is the first member, else the projection alone."""
    group = self.shared_group
    if group.pending is not None:
        source, outputs = group.pending
        if source is x and self in outputs and not (args or kwargs):
            out = outputs.pop(self)
            if not outputs:
                group.pending, group.stale = None, 0
            return out
        if self is group.members[0]:
            # the first member called again before the others asked for their outputs: once (a step that
            # failed half way, an out-of-memory retry) it is dropped; twice in a row, this model does not call
            # the group on one input, and grouping would compute outputs nobody reads
            group.pending, group.stale = None, group.stale + 1
            if group.stale >= 2:
                group.off = True
                log.warning("finetune: %s run one by one: the model does not call them on one input",
                            "/".join(group.names))
    if self is group.members[0] and not (args or kwargs):
        spec = _spec(group, x)
        if spec is not None:
            weights = [w for m, name in zip(group.members, spec.names) for w in
                       (m.lora_A[name].weight, m.lora_B[name].weight)]
            outputs = SharedLora.apply(x, spec, *weights)
            group.pending = (x, dict(zip(group.members[1:], outputs[1:])))
            return outputs[0]
    return fast_lora.fused_forward_backward(self, x, *args, **kwargs)


@dataclass(frozen=True)
class Spec:
    """What a group's node needs besides tensors: per member the adapter's name, base and scaling; the shared
    dropout rate; how the base GEMMs run (`fast_lora.fp8_mode`: False, "backward" or "both")."""

    names: tuple[str, ...]
    bases: tuple[torch.nn.Module, ...]
    scalings: tuple[float, ...]
    p: float
    fp8: bool | str


def _spec(group: Group, x: torch.Tensor) -> Spec | None:
    """The group's `Spec` when one node computes what its members would each compute, else None."""
    if not SHARED_INPUT or group.off:
        return None
    names, ps, fp8s, kernels = [], set(), set(), True
    for member in group.members:
        name = fast_lora._plain(member, {})
        if name is None or not fast_lora.accumulates(x, member.base_layer, False):
            return None
        drop = member.lora_dropout[name]
        ps.add(drop.p if isinstance(drop, torch.nn.Dropout) and drop.training else 0.0)
        fp8s.add(fast_lora.fp8_mode(member, x))
        kernels = kernels and fast_lora.dropout_mode(member) == "kernel"  # not masks kept or replayed
        names.append(name)
    ranks = {m.lora_A[n].weight.shape[0] for m, n in zip(group.members, names)}
    if len(ps) != 1 or len(fp8s) != 1 or len(ranks) != 1 or True in fp8s:
        return None
    p = ps.pop()
    first = group.members[0]
    a16 = fast_lora.adapter_weight(first.lora_A[names[0]].weight, x.dtype)
    if p > 0 and not (kernels and lora_dropout.usable(x.reshape(-1, x.shape[-1]), a16, p)):
        return None
    return Spec(tuple(names), tuple(m.base_layer for m in group.members),
                tuple(m.scaling[n] for m, n in zip(group.members, names)), p, fp8s.pop())


class SharedLora(torch.autograd.Function):
    """The members' `base(x) + scaling * dropout(x) @ A.T @ B.T` as one node (`Spec`; weights: each member's
    A then B). Kept for the backward: the input, the stacked dropped-input products h, the stacked 16-bit A
    and each B; each member's mask is drawn again from its seed."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, spec: Spec, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        dtype = x.dtype
        a16 = torch.cat([fast_lora.adapter_weight(a, dtype) for a in weights[0::2]])
        b16 = [fast_lora.adapter_weight(b, dtype) for b in weights[1::2]]
        x2 = x.reshape(-1, x.shape[-1])
        # one seed per member, drawn in the members' order as their own calls would draw them
        seeds = tuple(lora_dropout.new_seed() for _ in spec.bases) if spec.p > 0 else None
        h = lora_dropout.forward(x2, a16, spec.p, seeds) if seeds else x2.mm(a16.t())
        rank = a16.shape[0] // len(spec.bases)
        xq = fast_lora.forward_rows(x2, spec.fp8)  # the input's float8 rows, once for the group
        outputs = []
        for g, (base, b, scaling) in enumerate(zip(spec.bases, b16, spec.scalings)):
            flat = fast_lora.accumulated(x2, h[:, g * rank:(g + 1) * rank], b, base, scaling, xq)
            outputs.append(flat.view(*x.shape[:-1], flat.shape[1]))
        ctx.save_for_backward(x, h, a16, *b16)
        ctx.spec, ctx.seeds, ctx.dtypes = spec, seeds, [w.dtype for w in weights]
        return tuple(outputs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, h, a16, *b16 = ctx.saved_tensors
        spec, seeds = ctx.spec, ctx.seeds
        rank = a16.shape[0] // len(b16)
        x2 = x.reshape(-1, x.shape[-1])
        gs = [grad.reshape(-1, grad.shape[-1]).to(h.dtype) for grad in grads]
        # as autograd differentiates each member's addmm(result, h_g, B_g.T, alpha=s_g) and linear(dropped_g, A_g)
        dh = torch.cat([g.mm(b).mul_(s) for g, b, s in zip(gs, b16, spec.scalings)], dim=1)
        weight_grads: list[torch.Tensor] = []
        grad_a = lora_dropout.grad_a(x2, dh, spec.p, seeds) if seeds else dh.t().mm(x2)
        for i, (g, s) in enumerate(zip(gs, spec.scalings)):
            block = slice(i * rank, (i + 1) * rank)
            weight_grads.append(grad_a[block].to(ctx.dtypes[2 * i]))
            weight_grads.append(h[:, block].t().mm(g).mul_(s).t().to(ctx.dtypes[2 * i + 1]))
        grad_x = _input_grad(spec, seeds, gs, dh, a16) if ctx.needs_input_grad[0] else None
        return (None if grad_x is None else grad_x.view(x.shape).to(x.dtype), None, *weight_grads)


def _input_grad(spec: Spec, seeds: tuple[int, ...] | None, gs: list[torch.Tensor], dh: torch.Tensor,
                a16: torch.Tensor) -> torch.Tensor:
    """The input's gradient: the members' base input gradients plus their masked adapter parts, written once."""
    if spec.fp8:
        if fp8_base.groups_input_grad(spec.bases):  # one float8 GEMM over the members side by side sums their parts
            grad_x, others = fp8_base.fp8_input_grad_group(gs, list(spec.bases)), ()
        else:
            # the float8 GEMMs cannot accumulate: their products are summed with the adapters' parts in one pass
            parts = [fp8_input_grad(g, base) for g, base in zip(gs, spec.bases)]
            grad_x, others = parts[0], tuple(parts[1:])
        if seeds:
            lora_dropout.add_grad_x(grad_x, dh, a16, spec.p, seeds, addends=others)
        else:
            for other in others:
                grad_x.add_(other)
            grad_x.addmm_(dh, a16)
        return grad_x
    # the adapters' parts first (stacked: dh @ A sums the members' products), the base GEMMs accumulating into them
    grad_x = lora_dropout.grad_x(dh, a16, spec.p, seeds) if seeds else dh.mm(a16)
    for g, base in zip(gs, spec.bases):
        grad_x.addmm_(g, fast_lora._base_weight(base, g.dtype))
    return grad_x
