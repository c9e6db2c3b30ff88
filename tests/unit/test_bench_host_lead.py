"""bench/host_lead.py: the GPU's lead over the host, from events on a simulated GPU timeline (CPU only)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest


class Timeline:
    """A host clock and a GPU queue: work enqueued at host time t starts when both the host has issued it and
    the GPU has finished what came before."""

    def __init__(self):
        self.host = 0.0  # seconds
        self.gpu_free = 0.0

    def launch(self, host_s: float, gpu_s: float) -> None:
        self.host += host_s
        self.gpu_free = max(self.gpu_free, self.host) + gpu_s

    def event(self):
        timeline = self

        class Event:
            def record(self):
                self.at = max(timeline.gpu_free, timeline.host)

            def elapsed_time(self, other):
                return (other.at - self.at) * 1000.0

        return Event()

    def sync(self) -> None:
        self.host = max(self.host, self.gpu_free)


def test_the_lead_is_the_work_still_queued_when_the_host_gets_there(bench_script):
    host_lead = bench_script("host_lead")
    t = Timeline()
    model = SimpleNamespace(compute_loss=lambda: t.launch(0.010, 0.100), accelerator=None)
    model.accelerator = SimpleNamespace(backward=lambda: t.launch(0.020, 0.200))
    lead = host_lead.HostLead(model, warm=1, event=t.event, sync=t.sync, clock=lambda: t.host, sm_clock=lambda: 1980)
    args, state = SimpleNamespace(max_steps=3), SimpleNamespace(global_step=0)
    for step in range(3):
        state.global_step = step
        lead.on_step_begin(args, state, None)
        for _ in range(2):  # two micro batches: the host issues 30 ms of launches for 300 ms of GPU work
            model.compute_loss()
            model.accelerator.backward()
        if step == 2:
            t.launch(2.0, 0.0)  # 2 s of host work before the optimizer, past the 1.2 s queued: the GPU runs dry
        lead.on_optimizer_step(args, state, None)
        state.global_step = step + 1
        lead.on_step_end(args, state, None)
    result = lead.result["host_lead"]
    first, second = result["steps"]
    assert [first["step"], second["step"]] == [1, 2]  # the warm-up step is not sampled
    assert first["start"] == [0.0]  # right after the reference: nothing queued
    assert first["forward"] == pytest.approx([100.0, 370.0])  # 100 ms of work issued at +10 ms: reached at +110
    assert first["backward"] == pytest.approx([280.0, 550.0])
    assert second["start"] == pytest.approx([550.0])  # still queued from step 1
    assert second["optimizer"] == pytest.approx([0.0])  # the GPU waited for the host
    assert result["marks_under_1ms"] == 2 and result["min_ms"] == pytest.approx(0.0)
    assert result["sm_clock_mhz"] == [1980, 1980] and result["marks"] == 12


def test_nothing_is_reported_before_the_timed_steps(bench_script):
    host_lead = bench_script("host_lead")
    t = Timeline()
    model = SimpleNamespace(compute_loss=lambda: None, accelerator=SimpleNamespace(backward=lambda: None))
    lead = host_lead.HostLead(model, warm=5, event=t.event, sync=t.sync, clock=lambda: t.host, sm_clock=lambda: None)
    state = SimpleNamespace(global_step=0)
    lead.on_step_begin(SimpleNamespace(max_steps=3), state, None)
    model.compute_loss()
    lead.on_train_end(None, state, None)
    assert lead.result == {} and lead.marks == []


def test_each_layers_forward_and_backward_start_is_marked_by_index(bench_script):
    """`layers`: a mark at each layer's forward start and at its backward start (its output's gradient), summed
    up per layer index. Here the host issues 5 ms per layer for 1 ms of GPU work, and 50 ms more after each
    forward: the lead falls by 4 ms per layer in the forward and the backward starts 50 ms ahead."""
    import torch

    host_lead = bench_script("host_lead")
    t = Timeline()
    layers = [torch.nn.Linear(3, 3) for _ in range(2)]
    for layer in layers:
        layer.register_forward_pre_hook(lambda module, args: t.launch(0.005, 0.001))
    trainer = SimpleNamespace(compute_loss=lambda: None, accelerator=SimpleNamespace(backward=lambda: None))
    lead = host_lead.HostLead(trainer, warm=0, event=t.event, sync=t.sync, clock=lambda: t.host,
                              sm_clock=lambda: None, layers=layers)
    args, state = SimpleNamespace(max_steps=1), SimpleNamespace(global_step=0)
    lead.on_step_begin(args, state, None)
    for _ in range(3):  # micro batches
        out = layers[1](layers[0](torch.ones(1, 3, requires_grad=True)))
        t.launch(0.0, 0.050)  # 50 ms of work queued at once: the backward starts with it ahead
        out.sum().backward()
    state.global_step = 1
    lead.on_step_end(args, state, None)
    result = lead.result["host_lead"]
    assert result["layer_fwd"]["marks"] == 6 and result["layer_bwd"]["marks"] == 6
    # micro batch 1 starts on an idle GPU (1 ms queued at each layer); 2 and 3 start on the 50 ms and more
    assert result["layer_fwd"]["min_ms"] == pytest.approx([1.0, 1.0])
    assert result["layer_fwd"]["median_ms"] == pytest.approx([47.0, 43.0])
    assert result["layer_bwd"]["min_ms"] == pytest.approx([51.0, 51.0])
    assert result["layer_bwd"]["median_ms"] == pytest.approx([93.0, 93.0])
    assert result["layer_fwd"]["under_1ms"] == 0
    assert result["marks"] == 1  # the step start (the Trainer's forward and backward are not called here)
