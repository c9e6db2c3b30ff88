"""Decoder layers replayed as CUDA graphs during training (`training.cuda_graphs`; measured with
bench/profile_levers.py `*_graphed` and bench/gpu_train.py `--set training.cuda_graphs=true`).

A QLoRA micro batch of an 8B model launches ~7,700 kernels; measured on an H200 (2026-11-28, call v)
the GPU sat idle for 18 % of the step while Python and autograd issued them. A CUDA graph launches a
layer's whole forward (and, separately, its whole backward) as one call.
`torch.cuda.make_graphed_callables` captures each layer once, on one static shape: exactly `tokens`
tokens in one packed row, at most `slots - 1` examples, none longer than `max_len`. A micro batch of
another shape, a forward without gradients (evaluation) or a non-packed batch runs the layer eagerly,
so nothing changes meaning; the token-bin collator's bins fill the static shape when padded to it
(`pad_packed`).

What the graphs bake in: the layer's modules in training mode (dropout draws fresh masks on each
replay: PyTorch's generator is graph-safe), `max_len` as the attention kernel's longest example, and
the padded example boundaries (unused slots repeat the last boundary: empty examples, which the
varlen kernel skips).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from transformers import TrainerCallback

from medtune.errors import ConfigError

log = logging.getLogger("medtune")
REAL_TOKENS = "medtune_real_tokens"  # the padded batch's real token count, taken off before the model sees it


class _Call(torch.nn.Module):
    """A decoder layer as a function of tensors only, what `make_graphed_callables` captures."""

    def __init__(self, layer: torch.nn.Module, max_len: int):
        super().__init__()
        self.layer, self.max_len = layer, max_len

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
        # the class's forward: the instance's may already be a GraphedLayer (whose eager path calls this one)
        return type(self.layer).forward(
            self.layer, hidden, attention_mask=None, position_ids=None, position_embeddings=(cos, sin),
            cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=self.max_len, max_length_k=self.max_len)


class GraphedLayer:
    """A decoder layer's forward (set as its instance attribute, so the module tree, the parameter names and
    with them every checkpoint and adapter file stay as they are): replays the layer's graphs on the
    captured shape, else runs the layer's own forward."""

    def __init__(self, layer: torch.nn.Module, graphed: Any, tokens: int, slots: int, max_len: int):
        self.layer, self.graphed = layer, graphed
        self.tokens, self.slots, self.max_len = tokens, slots, max_len
        self.trained = [p for p in layer.parameters() if p.requires_grad]

    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        cu = kwargs.get("cu_seq_lens_q")
        if args or not self.replays(hidden_states, cu, kwargs):
            return type(self.layer).forward(self.layer, hidden_states, *args, **kwargs)
        # The graph hands back its parameter gradients in static buffers, which the next replay rewrites.
        # Into an empty .grad autograd would move the buffer itself (no copy), and the next micro batch
        # of a gradient accumulation would overwrite it: with .grad already there it adds into it.
        for p in self.trained:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        cos, sin = kwargs["position_embeddings"]
        return self.graphed(hidden_states, cos, sin, pad_boundaries(cu, self.slots))

    def replays(self, hidden: torch.Tensor, cu: torch.Tensor | None, kwargs: dict[str, Any]) -> bool:
        return (torch.is_grad_enabled() and self.layer.training and cu is not None
                and kwargs.get("attention_mask") is None and kwargs.get("position_embeddings") is not None
                and tuple(hidden.shape[:2]) == (1, self.tokens) and cu.numel() <= self.slots
                and int(kwargs.get("max_length_q") or 0) <= self.max_len)


def pad_boundaries(cu: torch.Tensor, slots: int) -> torch.Tensor:
    """`cu` (example starts plus the end) grown to `slots` entries by repeating the end: empty examples."""
    cu = cu.to(torch.int32)
    return torch.cat([cu, cu[-1:].expand(slots - cu.numel())]) if cu.numel() < slots else cu


def capture(model: torch.nn.Module, tokens: int, max_len: int, slots: int,
            dtype: torch.dtype = torch.bfloat16) -> int:
    """Capture every decoder layer of `model` (a PEFT-wrapped or plain Llama-family causal LM, on CUDA,
    in training mode, under `dtype` autocast as the Trainer runs it) for micro batches of exactly
    `tokens` packed tokens; returns how many layers were captured. Call after every change of the
    layers' code paths (LoRA forward, dropout): the graphs keep the kernels captured."""
    inner = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    layers = inner.layers
    device = next(layers[0].parameters()).device
    hidden_size = model.config.hidden_size
    first = inner.embed_tokens(torch.zeros(1, 1, dtype=torch.long, device=device))
    positions = (torch.arange(tokens, device=device) % max_len).unsqueeze(0)
    cu = pad_boundaries(torch.arange(0, tokens + 1, max_len, device=device), slots)
    samples = []
    with torch.autocast(device.type, dtype=dtype, cache_enabled=False):  # graphs cannot hold autocast's cache
        cos, sin = inner.rotary_emb(first, position_ids=positions)
        for i in range(len(layers)):
            hidden = torch.randn(1, tokens, hidden_size, device=device, dtype=first.dtype) * 0.02
            samples.append((hidden.requires_grad_(i > 0 or first.requires_grad), cos, sin, cu))
        calls = tuple(_Call(layer, max_len) for layer in layers)
        graphed = torch.cuda.make_graphed_callables(calls, tuple(samples), num_warmup_iters=2)
    for layer, call in zip(layers, graphed):
        layer.forward = GraphedLayer(layer, call, tokens, slots, max_len)
    return len(layers)


def release(model: torch.nn.Module) -> int:
    """Give the layers their own forward back (the graphs and their memory go with the last reference)."""
    inner = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    count = 0
    for layer in inner.layers:
        if isinstance(vars(layer).get("forward"), GraphedLayer):
            del layer.forward
            count += 1
    return count


def pad_packed(batch: dict[str, Any], tokens: int, max_len: int, pad_id: int) -> dict[str, Any]:
    """A packed one-row micro batch grown to exactly `tokens` tokens by examples of padding, none longer
    than `max_len` (label -100: they add no loss and no gradient; their own causal attention keeps them
    apart from the real examples)."""
    n = batch["input_ids"].shape[1]
    if n >= tokens:
        return batch
    lengths = [min(max_len, tokens - start) for start in range(n, tokens, max_len)]
    ids, labels, positions = batch["input_ids"], batch["labels"], batch["position_ids"]
    out = dict(batch)
    out["input_ids"] = torch.cat([ids, ids.new_full((1, tokens - n), pad_id)], dim=1)
    out["labels"] = torch.cat([labels, labels.new_full((1, tokens - n), -100)], dim=1)
    pad_positions = torch.cat([torch.arange(k, device=positions.device) for k in lengths])
    out["position_ids"] = torch.cat([positions, pad_positions.unsqueeze(0)], dim=1)
    cu = batch["cu_seq_lens_q"]
    ends = [n + sum(lengths[:i + 1]) for i in range(len(lengths))]
    out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = torch.cat([cu, cu.new_tensor(ends)])
    out["max_length_q"] = out["max_length_k"] = max(int(batch["max_length_q"]), *lengths)
    return out


def wanted(setting: bool | str, device: str, world_size: int, recompute: bool) -> bool:
    """Whether this run replays graphs: `auto` where they apply, `true` there or a one-line error."""
    applies = device == "cuda" and world_size == 1 and not recompute
    if setting is True and not applies:
        raise ConfigError("training.cuda_graphs=true needs one CUDA process without recompute (this run: "
                           f"{device}, {world_size} process(es), recompute {'on' if recompute else 'off'}); "
                           "set training.cuda_graphs=auto or false")
    return bool(setting) and applies


def slots_for(rows_per_bin: int, tokens: int, max_len: int) -> int:
    """Example boundaries a padded bin can need: its rows, the padding examples, the end; rounded up."""
    return 8 * math.ceil((rows_per_bin + math.ceil(tokens / max_len) + 1) / 8)


class CaptureAtStart(TrainerCallback):
    """Captures the layers when training starts: after the Trainer has put Liger's kernels in, so the
    graphs hold the kernels the eager run would launch."""

    def __init__(self, tokens: int, max_len: int, slots: int, dtype: torch.dtype):
        self.tokens, self.max_len, self.slots, self.dtype = tokens, max_len, slots, dtype

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        model.train()
        count = capture(model, self.tokens, self.max_len, self.slots, self.dtype)
        log.info("finetune: %d decoder layers captured as CUDA graphs for %d-token micro "
                 "batches (%d example slots)", count, self.tokens, self.slots)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        release(model)  # evaluation, merging and a later attempt run the layers' own forward
