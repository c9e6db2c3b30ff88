"""How far the GPU runs behind the host, through the Trainer, without a profiler (`bench/gpu_train.py
--host-lead`).

A profiled step showed 56.8 us of GPU work per token where the unprofiled run took 65.0 (docs/benchmarks.md,
call 2026-11-29 r), but a profiler slows the host itself, so its idle gaps say little. Here the GPU's own clock
is read through CUDA events: once, at the first timed step, the host waits for the GPU and records a
reference event; after that, at each mark (a micro batch's forward and backward returning to the Trainer,
the optimizer step, a step's start), an event is recorded and the host's clock read. After training,

  lead = (GPU time at which the mark's event ran) - (host time at which it was recorded), both since the reference

is how much queued work the GPU still had when the host got there. With `layers` (the decoder layers), also at
each layer's forward start and at its backward start (when its output's gradient is computed), summarised
by layer index over all timed micro batches (`layer_fwd`, `layer_bwd`: median and minimum lead per layer):
whether the forward runs dry layer after layer (the host slower than the GPU there) or only at one point. A lead near 0 means the GPU had run dry
and waited for the host at that point; a lead of hundreds of ms means the host was far ahead. Nothing is
synchronised between the reference and the end. Also read at each step's end, where NVML is installed: the SM
clock (MHz), to see whether the card slows under sustained load.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any, Callable

import torch
from transformers import TrainerCallback


class HostLead(TrainerCallback):
    """Marks after each forward (`compute_loss`), backward and optimizer step of the timed steps (from
    `warm`); `result["host_lead"]`: per timed step, the lead in ms at each mark, and its summary."""

    def __init__(self, trainer: Any, warm: int, event: Callable[[], Any] | None = None,
                 sync: Callable[[], None] | None = None, clock: Callable[[], float] = time.perf_counter,
                 sm_clock: Callable[[], int | None] | None = None, layers: list[Any] = ()) -> None:
        self.warm, self.clock = warm, clock
        self.event = event or (lambda: torch.cuda.Event(enable_timing=True))
        self.sync = sync or torch.cuda.synchronize
        self.sm_clock = sm_clock or _sm_clock
        self.reference: tuple[float, Any] | None = None
        self.marks: list[tuple[int, str, float, Any]] = []
        self.clocks: list[int | None] = []
        self.step = -1
        self.result: dict[str, Any] = {}
        _after(trainer, "compute_loss", lambda: self.mark("forward"))
        _after(trainer.accelerator, "backward", lambda: self.mark("backward"))
        for index, layer in enumerate(layers):
            layer.register_forward_pre_hook(lambda module, args, i=index: self.mark(f"layer_fwd {i}"))
            layer.register_forward_hook(lambda module, args, out, i=index: self._on_backward(out, i))

    def _on_backward(self, out: Any, index: int) -> None:
        hidden = out[0] if isinstance(out, tuple) else out
        if self.reference is not None and not self.result and hidden.requires_grad:
            hidden.register_hook(lambda grad: self.mark(f"layer_bwd {index}"))

    def mark(self, label: str) -> None:
        if self.reference is not None and not self.result:
            event = self.event()
            event.record()
            self.marks.append((self.step, label, self.clock(), event))

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step
        if state.global_step == self.warm and self.reference is None:
            self.sync()
            event = self.event()
            event.record()
            self.reference = (self.clock(), event)
        self.mark("start")

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.mark("optimizer")

    def on_step_end(self, args, state, control, **kwargs):
        if self.reference is not None and not self.result:
            self.clocks.append(self.sm_clock())
        if state.global_step == args.max_steps:
            self.finish()

    def on_train_end(self, args, state, control, **kwargs):
        self.finish()

    def finish(self) -> None:
        if self.reference is None or self.result:
            return
        self.sync()
        host0, gpu0 = self.reference
        steps: dict[int, dict[str, list[float]]] = {}
        by_layer: dict[str, dict[int, list[float]]] = {}
        for step, label, host, event in self.marks:
            lead = round(gpu0.elapsed_time(event) - (host - host0) * 1000.0, 1)
            if label.startswith("layer_"):
                kind, index = label.split()
                by_layer.setdefault(kind, {}).setdefault(int(index), []).append(lead)
            else:
                steps.setdefault(step, {}).setdefault(label, []).append(lead)
        leads = [lead for step in steps.values() for values in step.values() for lead in values]
        layer_summary = {kind: {"median_ms": [round(statistics.median(v[i]), 1) for i in sorted(v)],
                                "min_ms": [min(v[i]) for i in sorted(v)],
                                "under_1ms": sum(lead < 1.0 for i in v for lead in v[i]),
                                "marks": sum(len(v[i]) for i in v)} for kind, v in by_layer.items()}
        self.result = {"host_lead": {
            **layer_summary,
            "steps": [{"step": s, **labels} for s, labels in sorted(steps.items())],
            "min_ms": min(leads) if leads else None,
            "median_ms": round(statistics.median(leads), 1) if leads else None,
            "marks_under_1ms": sum(lead < 1.0 for lead in leads), "marks": len(leads),
            "sm_clock_mhz": self.clocks}}


def _after(obj: Any, name: str, then: Callable[[], None]) -> None:
    """Call `then` each time obj.name returns (an instance attribute: the class is untouched)."""
    original = getattr(obj, name)

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        then()
        return out

    setattr(obj, name, wrapped)


def _sm_clock() -> int | None:
    try:
        return int(torch.cuda.clock_rate())
    except Exception:  # no NVML (pynvml) on this machine: the clock is simply not reported
        return None
