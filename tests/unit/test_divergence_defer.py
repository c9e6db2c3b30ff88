"""medtune.divergence.StopOnDivergence reading each step's NaN flags one step late (`DEFER`), driven step by
step on the CPU: what is reported, when training stops, and that a saving step never keeps a bad state."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from medtune import divergence


def drive(monkeypatch, defer: bool, bad_weights_at: int | None = None, bad_loss_from: int | None = None,
          save_every: int = 100, max_steps: int = 8) -> tuple[divergence.StopOnDivergence, list[dict]]:
    """Steps 1.. until the callback stops training; returns it and each step's (step, stop, save) after it."""
    monkeypatch.setattr(divergence, "DEFER", defer)
    model = torch.nn.Linear(2, 2)
    stop = divergence.StopOnDivergence()
    args = SimpleNamespace(world_size=1)
    stop.on_train_begin(args, None, None, model=model)
    seen = []
    for step in range(1, max_steps + 1):
        loss = torch.tensor(float("nan") if bad_loss_from is not None and step >= bad_loss_from else 1.0)
        stop._on_forward(model, (), {"loss": loss})
        if step == bad_weights_at:
            with torch.no_grad():
                model.weight.view(-1)[0] = float("nan")
        control = SimpleNamespace(should_save=step % save_every == 0 or step == max_steps, should_training_stop=False)
        stop.on_step_end(args, SimpleNamespace(global_step=step, max_steps=max_steps), control)
        seen.append({"step": step, "stop": control.should_training_stop, "save": control.should_save})
        if control.should_training_stop:
            break
    stop.on_train_end(args, None, SimpleNamespace(should_save=False, should_training_stop=False))
    return stop, seen


def test_read_at_once_the_bad_step_itself_stops(monkeypatch):
    stop, seen = drive(monkeypatch, defer=False, bad_weights_at=3)
    assert stop.diverged == {"step": 3, "what": "the LoRA weights"} and seen[-1] == {"step": 3, "stop": True, "save": False}


def test_read_a_step_late_the_next_step_stops_and_the_bad_step_is_reported(monkeypatch):
    stop, seen = drive(monkeypatch, defer=True, bad_weights_at=3)
    assert stop.diverged == {"step": 3, "what": "the LoRA weights"}
    assert [s["stop"] for s in seen] == [False, False, False, True]


@pytest.mark.parametrize("bad_at", [3, 4])
def test_a_saving_step_reads_at_once_so_no_bad_state_is_saved(monkeypatch, bad_at):
    """Saves at step 4: a NaN at 3 (pending) or at 4 (its own) is read before the save and cancels it."""
    stop, seen = drive(monkeypatch, defer=True, bad_weights_at=bad_at, save_every=4)
    assert stop.diverged["step"] == bad_at
    assert seen[-1] == {"step": 4, "stop": True, "save": False}
    assert all(not s["save"] for s in seen)


def test_a_nan_loss_counts_its_patience_in_order_when_read_late(monkeypatch):
    stop, seen = drive(monkeypatch, defer=True, bad_loss_from=2)
    last_bad = 2 + divergence.PATIENCE - 1
    assert stop.diverged == {"step": last_bad, "what": f"the loss ({divergence.PATIENCE} steps in a row)"}
    assert seen[-1]["step"] == last_bad + 1 and seen[-1]["stop"]


def test_flags_still_pending_when_training_ends_are_read(monkeypatch):
    """Another callback stops training after a deferred step: the end of training reads its flags."""
    monkeypatch.setattr(divergence, "DEFER", True)
    model = torch.nn.Linear(2, 2)
    stop = divergence.StopOnDivergence()
    args = SimpleNamespace(world_size=1)
    stop.on_train_begin(args, None, None, model=model)
    with torch.no_grad():
        model.weight.view(-1)[0] = float("nan")
    stop.on_step_end(args, SimpleNamespace(global_step=1, max_steps=8),
                     SimpleNamespace(should_save=False, should_training_stop=False))
    assert stop.diverged is None  # pending
    stop.on_train_end(args, None, SimpleNamespace(should_save=False, should_training_stop=False))
    assert stop.diverged == {"step": 1, "what": "the LoRA weights"}
