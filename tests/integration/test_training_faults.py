"""Training faults on the tiny model, in process: CUDA out of memory (injected) and NaN divergence.

The OOM is `torch.cuda.OutOfMemoryError` raised from the Trainer's step, which is what PyTorch raises
on a GPU; the divergence is a LoRA weight turned NaN by the optimizer step, which is how a too-high
learning rate or an fp16 overflow reaches the weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from medtune.cli import main
from medtune.config_io import load_config
from medtune import divergence
from medtune.divergence import PATIENCE, TrainingDiverged
from medtune.oom import TrainingOutOfMemory
from medtune.preemption import last_complete_checkpoint
from medtune.workflow import run_workflow
from tests_support import loopback_only

QUICK = ["output.merge_full_weights=false", "evaluation.validation_questions=0", "evaluation.mcq_questions=0",
         "evaluation.safety_probes=false", "training.eval_steps=0", "dataset.eval_fraction=0"]


def _inject_oom(monkeypatch, times: int) -> list[int]:
    """The first `times` training steps raise CUDA OOM; returns the micro batch size each step saw."""
    seen: list[int] = []
    real = transformers.Trainer.training_step

    def step(self, model, inputs, *args, **kwargs):
        seen.append(self.args.per_device_train_batch_size)
        if len(seen) <= times:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "training_step", step)
    return seen


def _cfg(tiny_overrides, run_id: str, *extra: str):
    return load_config(preset="smollm2-135m-medical",
                       overrides=[*tiny_overrides, *QUICK, f"output.run_id={run_id}", *extra])


def test_auto_fit_halves_the_micro_batch_and_keeps_the_effective_batch(tiny_overrides, monkeypatch):
    seen = _inject_oom(monkeypatch, times=2)
    cfg = _cfg(tiny_overrides, "oomfit", "training.micro_batch_size=4", "training.gradient_accumulation=1",
               "training.max_steps=2")
    assert cfg.training.auto_fit  # the default
    run = run_workflow(cfg)
    manifest = json.loads(run.manifest_path.read_text())
    assert manifest["status"] == "succeeded"
    assert manifest["auto_fit"] == [
        {"from_micro_batch_size": 4, "micro_batch_size": 2, "gradient_accumulation": 2},
        {"from_micro_batch_size": 2, "micro_batch_size": 1, "gradient_accumulation": 4},
    ]
    assert seen[:3] == [4, 2, 1] and set(seen[3:]) == {1}
    assert len(seen) == 2 + 2 * 4  # then 2 optimizer steps of 4 micro batches each
    assert manifest["training"]["effective_batch_size"] == 4 and manifest["training"]["steps"] == 2
    assert "auto_fit retries with micro batch 1 x accumulation 4" in run.log_file.read_text()


def test_oom_without_auto_fit_names_the_remedies_for_this_run(tiny_overrides, monkeypatch, capsys):
    _inject_oom(monkeypatch, times=1)
    sets = [*tiny_overrides, *QUICK, "output.run_id=oomstop", "training.micro_batch_size=4",
            "training.gradient_accumulation=3", "training.max_seq_length=128", "training.auto_fit=false"]
    code = main(["run", "--preset", "smollm2-135m-medical", *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]  # the log lines go to stderr too; the error is the last line
    assert line.startswith("error: training ran out of GPU memory at micro batch 4 x accumulation 3 (auto_fit is off)")
    assert "training.micro_batch_size=2 with training.gradient_accumulation=6 (the effective batch stays 12)" in line
    assert "training.max_seq_length=64" in line and "lora.quantization=4bit" in line
    assert "lora.gradient_checkpointing=true" in line and "training.auto_fit=true" in line


def _oom_message(tiny_overrides, monkeypatch, run_id: str, *extra: str) -> str:
    """The error of a run whose first training step runs out of memory and that does not retry."""
    _inject_oom(monkeypatch, times=1)
    with pytest.raises(TrainingOutOfMemory) as caught:
        run_workflow(_cfg(tiny_overrides, run_id, *extra))
    return str(caught.value)


def test_oom_at_micro_batch_1_stops_even_with_auto_fit(tiny_overrides, monkeypatch):
    message = _oom_message(tiny_overrides, monkeypatch, "oom1", "training.micro_batch_size=1",
                           "training.gradient_accumulation=2", "lora.quantization=none",
                           "lora.gradient_checkpointing=true")
    assert "micro batch 1 x accumulation 2" in message and "training.micro_batch_size=" not in message
    assert "gradient_checkpointing" not in message and "lora.quantization=4bit" in message


def test_auto_fit_halves_the_token_budget_and_doubles_the_accumulation(tiny_overrides, monkeypatch):
    seen = _inject_oom(monkeypatch, times=2)
    cfg = _cfg(tiny_overrides, "oombins", "lora.packing=true", "training.micro_batch_tokens=400",
               "training.gradient_accumulation=1", "training.max_steps=1")
    run = run_workflow(cfg)
    manifest = json.loads(run.manifest_path.read_text())
    assert manifest["status"] == "succeeded"
    assert manifest["auto_fit"] == [  # 400 -> 200, then 128 = max_seq_length, the floor (not 100)
        {"from_micro_batch_tokens": 400, "micro_batch_tokens": 200, "gradient_accumulation": 2},
        {"from_micro_batch_tokens": 200, "micro_batch_tokens": 128, "gradient_accumulation": 4},
    ]
    assert set(seen) == {1} and len(seen) == 2 + 4  # one bin per micro batch; then 1 step of 4 bins
    assert manifest["training"]["micro_batch_tokens"] == 128 and manifest["training"]["effective_batch_tokens"] == 512
    assert "auto_fit retries with micro batch 128 tokens x accumulation 4 (at most 512 tokens per step)" \
        in run.log_file.read_text()


def test_oom_with_token_bins_names_the_token_budget_remedy(tiny_overrides, monkeypatch):
    message = _oom_message(tiny_overrides, monkeypatch, "oombinstop", "lora.packing=true",
                           "training.micro_batch_tokens=512", "training.gradient_accumulation=3",
                           "training.auto_fit=false")
    assert message.startswith("training ran out of GPU memory at micro batch 512 tokens x accumulation 3 (auto_fit is "
                              "off)")
    assert "training.micro_batch_tokens=256 with training.gradient_accumulation=6 (at most 1536 tokens per " \
           "optimizer step, was 1536)" in message
    assert "training.micro_batch_size=" not in message and "training.auto_fit=true" in message


def test_auto_recompute_turns_recompute_on_before_shrinking_the_batch(tiny_overrides, monkeypatch):
    """`lora.gradient_checkpointing: auto` chose no recompute (as on a GPU with room: forced here, the CPU
    never chooses it); the first OOM turns recompute on and keeps the token budget."""
    from medtune import recompute

    monkeypatch.setattr(recompute, "resolve",
                        lambda cfg, *_: (recompute.with_recompute(cfg, False, 1), "auto: off (forced by the test)"))
    recomputing: list[bool] = []
    real = transformers.Trainer.training_step

    def step(self, model, inputs, *args, **kwargs):
        recomputing.append(bool(self.model.get_base_model().is_gradient_checkpointing))
        if len(recomputing) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "training_step", step)
    cfg = _cfg(tiny_overrides, "oomrecompute", "lora.gradient_checkpointing=auto", "lora.packing=true",
               "training.micro_batch_tokens=400", "training.gradient_accumulation=1", "training.max_steps=2")
    run = run_workflow(cfg)
    manifest = json.loads(run.manifest_path.read_text())
    assert manifest["status"] == "succeeded"
    assert manifest["auto_fit"] == [{"gradient_checkpointing": True, "recompute_every_n_layers": 1}]
    assert recomputing[0] is False and recomputing[1:] == [True, True]
    train_metrics = manifest["training"]
    assert train_metrics["gradient_checkpointing"] is True and train_metrics["micro_batch_tokens"] == 400
    log = run.log_file.read_text()
    assert "activation recompute (lora.gradient_checkpointing) off: auto: off (forced by the test)" in log
    assert "out of GPU memory with recompute on no layer" in log
    assert "retrying with recompute on every layer, same batch" in log


def _poison_weights_at(monkeypatch, step: int) -> None:
    """The optimizer's `step`-th update turns one LoRA weight into NaN, as an overflowing update does."""
    calls = {"n": 0}
    real = torch.optim.AdamW.step

    def poisoned(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == step:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)


@pytest.mark.parametrize("defer", [False, True], ids=["read-at-once", "read-a-step-late"])
def test_nan_weights_stop_training_and_keep_the_checkpoint_before(tiny_overrides, monkeypatch, defer):
    """With `divergence.DEFER` step 5's flags are read at step 6, which saves a checkpoint: read before the save,
    they stop it; the divergence is reported at step 5 either way."""
    monkeypatch.setattr(divergence, "DEFER", defer)
    _poison_weights_at(monkeypatch, step=5)
    cfg = _cfg(tiny_overrides, f"nan{int(defer)}", "training.max_steps=12", "training.save_steps=2",
               "training.save_total_limit=2")
    with pytest.raises(TrainingDiverged) as caught:
        run_workflow(cfg)
    root = Path(cfg.output.output_root) / f"medical-finetune-nan{int(defer)}"
    message = str(caught.value)
    assert "the LoRA weights became NaN/inf at step 5" in message
    assert "learning rate 0.01 is high for LoRA: try training.learning_rate=0.001" in message
    assert "checkpoint-4, is kept" in message
    checkpoints = root / "checkpoints"
    assert last_complete_checkpoint(checkpoints).name == "checkpoint-4"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4", "micro_batch.json"]
    state = json.loads((checkpoints / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    weights = load_file(checkpoints / "checkpoint-4" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["divergence"]["step"] == 5
    assert manifest["divergence"]["checkpoint_kept"] == "checkpoint-4"
    assert not (root / "adapters").exists()


def test_nan_loss_stops_after_patience_steps(tiny_overrides, monkeypatch):
    """A NaN loss with finite weights (what fp16's skipped steps look like) stops after PATIENCE steps."""
    steps = {"n": 0}

    def forward_hook(module, inputs, output):
        if module.training and steps["n"] >= 3:
            output["loss"] = output["loss"] * float("nan")
        return output

    class Count(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            model.register_forward_hook(forward_hook, prepend=True)  # before medtune's

        def on_step_end(self, args, state, control, **kwargs):
            steps["n"] = state.global_step

    # Zero the NaN gradients before the update, so only the loss is non-finite (as with fp16's grad scaler).
    real_step = torch.optim.AdamW.step

    def skip_nan(self, *args, **kwargs):
        if any(p.grad is not None and not torch.isfinite(p.grad).all() for g in self.param_groups for p in g["params"]):
            return None
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", skip_nan)
    real_init = transformers.Trainer.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.add_callback(Count())

    monkeypatch.setattr(transformers.Trainer, "__init__", init)
    cfg = _cfg(tiny_overrides, "nanloss", "training.max_steps=12", "training.save_steps=100")
    with pytest.raises(TrainingDiverged, match=rf"the loss \({PATIENCE} steps in a row\) became NaN/inf at step "
                                               rf"{3 + PATIENCE}.*no checkpoint had been saved yet"):
        run_workflow(cfg)


POISON_RANK_1 = """
import os, torch
if os.environ.get("RANK") == "1":
    _step, _calls = torch.optim.AdamW.step, [0]
    def _poisoned(self, *args, **kwargs):
        out = _step(self, *args, **kwargs)
        _calls[0] += 1
        if _calls[0] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out
    torch.optim.AdamW.step = _poisoned
"""


@pytest.mark.e2e
def test_nan_on_one_rank_stops_both_at_the_same_step(tiny_overrides, tmp_path):
    """Under torchrun the ranks agree every step: rank 1's NaN stops rank 0 too (no rank left waiting),
    and the parent `medtune run` prints the rank's one-line error."""
    hooks = tmp_path / "poison"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(POISON_RANK_1)
    sets = [*tiny_overrides, "output.run_id=nan2", "infrastructure.cpu_processes=2", "training.max_steps=8",
            "training.save_steps=2", "training.gradient_accumulation=1", "evaluation.validation_questions=0"]
    command = [sys.executable, "-m", "medtune", "run", "--preset", "smollm2-135m-medical",
               *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(loopback_only(command), env=env, capture_output=True, text=True, timeout=600)
    line = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and line.startswith("error: training diverged: the LoRA weights became NaN/inf "
                                                    "at step 3; likely cause: learning rate 0.01"), done.stderr[-3000:]
    root = Path(next(o for o in tiny_overrides if o.startswith("output.output_root=")).partition("=")[2]) \
        / "medical-finetune-nan2"
    assert "checkpoint-2, is kept" in line
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["divergence"]["step"] == 3 and manifest["status"] == "failed"
    assert last_complete_checkpoint(root / "checkpoints").name == "checkpoint-2"
    log = (root / "logs" / "finetune.log").read_text()
    assert "step 3/8 loss" in log and "step 4/8" not in log  # rank 0 stopped at rank 1's step
