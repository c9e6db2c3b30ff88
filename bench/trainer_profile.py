"""Where the Trainer's time goes between GPU kernels: one optimizer step of `medtune.train`'s own
Trainer under torch.profiler, with the Trainer's phases annotated.

`bench/profile_levers.py` times forward + backward alone; through the Trainer the same micro batches
train slower (call u: 13,767 tok/s in the bare loop, 12,038 through the Trainer, same machine). This
callback records one whole optimizer step, from the first micro batch's `on_step_begin` to the next
step's, and reports for each phase (batch fetch and collation, forward, backward, the token count,
gradient clipping, the optimizer, logging) its wall time on the CPU and how long the GPU sat idle
while Python was in it. GPU idle = the step's span minus the union of kernel, copy and memset
intervals; the CPU and GPU timestamps of one trace share a clock.
"""

from __future__ import annotations

import bisect
import functools
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

PHASES = ("get_batch_samples", "compute_loss", "backward", "_track_num_input_tokens", "_clip_grad_norm",
          "optimizer", "_maybe_log_save_evaluate")


def annotate(obj: Any, name: str, label: str) -> None:
    """Wrap obj.name in a profiler range called `label` (an instance attribute: the class is untouched)."""
    original = getattr(obj, name)

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        with torch.profiler.record_function(label):
            return original(*args, **kwargs)

    setattr(obj, name, wrapped)


class TrainerProfile(TrainerCallback):
    """Profiles optimizer step `at` (counted from 0) of `trainer`; `result` holds the summary."""

    def __init__(self, trainer: Any, at: int) -> None:
        self.trainer, self.at = trainer, at
        self.prof: Any = None
        self.result: dict[str, Any] = {}
        for name in PHASES:
            if name == "backward":
                annotate(trainer.accelerator, "backward", "backward")
            elif name != "optimizer":
                annotate(trainer, name, name)
        self.optimizer_range: Any = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.at and self.prof is None:
            sync()
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities, record_shapes=True)
            self.prof.__enter__()
            self.step_range = torch.profiler.record_function("step")
            self.step_range.__enter__()
        elif state.global_step == self.at + 1 and self.prof is not None and not self.result:
            self.step_range.__exit__(None, None, None)
            sync()
            self.prof.__exit__(None, None, None)
            self.result = summarize(self.prof)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.prof is not None and not self.result:
            self.optimizer_range = torch.profiler.record_function("optimizer")
            self.optimizer_range.__enter__()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.optimizer_range is not None:
            self.optimizer_range.__exit__(None, None, None)
            self.optimizer_range = None


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def summarize(prof: Any) -> dict[str, Any]:
    trace = Path(tempfile.mkdtemp()) / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    ranges = [e for e in events if e.get("cat") == "user_annotation" and e.get("ph") == "X"]
    gpu = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                 if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and e.get("ph") == "X")
    step = next(e for e in ranges if e["name"] == "step")
    start, end = step["ts"], step["ts"] + step["dur"]
    busy = merge([(max(a, start), min(b, end)) for a, b in gpu if b > start and a < end])
    idle = gaps(busy, start, end)
    out: dict[str, Any] = {"step_wall_ms": round(step["dur"] / 1e3, 1),
                           "gpu_busy_ms": round(sum(b - a for a, b in busy) / 1e3, 1),
                           "gpu_idle_ms": round(sum(b - a for a, b in idle) / 1e3, 1),
                           "kernels": sum(1 for a, b in gpu if start <= a < end)}
    phases: dict[str, list[float]] = {}
    for e in ranges:
        if e["name"] == "step":
            continue
        span = (e["ts"], e["ts"] + e["dur"])
        entry = phases.setdefault(e["name"], [0.0, 0.0, 0])
        entry[0] += e["dur"] / 1e3
        entry[1] += sum(max(0.0, min(b, span[1]) - max(a, span[0])) for a, b in idle) / 1e3
        entry[2] += 1
    out["phases_cpu_ms_gpu_idle_ms_count"] = {k: [round(v[0], 1), round(v[1], 1), v[2]] for k, v in phases.items()}
    out["largest_gaps_ms"] = sorted((round((b - a) / 1e3, 2) for a, b in idle), reverse=True)[:10]
    out["kernels_ms_count"] = kernel_table([e for e in events if e.get("cat") == "kernel" and e.get("ph") == "X"
                                            and start <= e["ts"] < end])
    out["matmuls_ms_count"] = matmul_table(prof)
    out["ops_self_ms_count"] = op_table(prof)
    out["idle_before_launch_ms_count"] = idle_causes(events, idle)
    return out


def idle_causes(events: list[dict[str, Any]], idle: list[tuple[float, float]], top: int = 25) -> dict[str, list[float]]:
    """What the host was doing when the GPU sat idle: each gap is charged to the launch of the kernel that
    ended it (matched by correlation id), named by the innermost three host ops around that launch
    ("op < enclosing op"). {name: [idle ms, gaps]}, the `top` largest."""
    launches = {e["args"]["correlation"]: e["ts"] for e in events
                if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    kernels = sorted((e["ts"], e["args"].get("correlation")) for e in events
                     if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and e.get("ph") == "X")
    ops = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                 if e.get("cat") in ("cpu_op", "user_annotation") and e.get("ph") == "X")
    starts = [o[0] for o in ops]
    table: dict[str, list[float]] = {}
    for a, b in idle:
        at = bisect.bisect_left(kernels, (b,))
        if at == len(kernels) or kernels[at][1] not in launches:
            continue
        t = launches[kernels[at][1]]
        around = [o for o in ops[max(0, bisect.bisect_right(starts, t) - 4000):bisect.bisect_right(starts, t)]
                  if o[1] >= t]
        name = " < ".join(o[2][:50] for o in sorted(around, reverse=True)[:3]) or "(no host op)"
        entry = table.setdefault(name, [0.0, 0])
        entry[0] += (b - a) / 1e3
        entry[1] += 1
    ranked = sorted(table.items(), key=lambda kv: -kv[1][0])[:top]
    return {name: [round(ms, 2), n] for name, (ms, n) in ranked}


def kernel_table(kernels: list[dict[str, Any]], top: int = 40) -> dict[str, list[float]]:
    """GPU time by kernel name over the step, the `top` largest: {name (first 90 characters): [ms, launches]},
    and "(all others)" for the rest."""
    table: dict[str, list[float]] = {}
    for e in kernels:
        entry = table.setdefault(e["name"][:90], [0.0, 0])
        entry[0] += e["dur"] / 1e3
        entry[1] += 1
    ranked = sorted(table.items(), key=lambda kv: -kv[1][0])
    out = {name: [round(ms, 2), n] for name, (ms, n) in ranked[:top]}
    rest = ranked[top:]
    out["(all others)"] = [round(sum(v[0] for _, v in rest), 2), sum(v[1] for _, v in rest)]
    return out


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_mm")


def matmul_table(prof: Any, top: int = 30) -> dict[str, list[float]]:
    """GPU time of the matmul ops by input shapes over the profiled span: {"op shapes": [ms, calls]}."""
    return _shape_table(prof, lambda key: key in MATMULS, "device_time_total", "cuda_time_total", top)


def op_table(prof: Any, top: int = 30) -> dict[str, list[float]]:
    """GPU time of the other ops by input shapes, each op's own kernels only (not its children's), so that an
    elementwise kernel of the kernel table can be traced to the op and tensor sizes that launched it."""
    return _shape_table(prof, lambda key: key not in MATMULS, "self_device_time_total", "self_cuda_time_total", top)


def _shape_table(prof: Any, keep: Any, attribute: str, legacy: str, top: int) -> dict[str, list[float]]:
    rows = []
    for avg in prof.key_averages(group_by_input_shape=True):
        us = getattr(avg, attribute, None) or getattr(avg, legacy, 0.0)
        if keep(avg.key) and us > 0:
            rows.append((f"{avg.key} {avg.input_shapes}"[:160], us / 1e3, avg.count))
    rows.sort(key=lambda r: -r[1])
    return {name: [round(ms, 2), n] for name, ms, n in rows[:top]}


def merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def gaps(busy: list[tuple[float, float]], start: float, end: float) -> list[tuple[float, float]]:
    out, at = [], start
    for a, b in busy:
        if a > at:
            out.append((at, a))
        at = max(at, b)
    if end > at:
        out.append((at, end))
    return out
