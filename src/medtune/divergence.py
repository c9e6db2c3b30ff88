"""NaN/inf during training: stop within a few steps, keep the last good checkpoint, name the cause.

Two signals, checked once per optimizer step: the LoRA weights themselves (a non-finite weight means
the run is lost: stop now), and the training loss (non-finite for `PATIENCE` optimizer steps in a
row: with fp16 the grad scaler skips the update of a step that overflowed, so one bad step can be
harmless, three are not). No checkpoint is saved once either is seen, so the newest checkpoint on
disk is one taken before the divergence. The loss is read from the model's forward outputs on the
device and the flag is fetched once per step, next to the preemption check.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback

from medtune.errors import MedtuneError
from medtune.preemption import any_rank

log = logging.getLogger("medtune.train")

PATIENCE = 3
HIGH_LORA_LR = 1e-3  # LoRA runs use 1e-4 .. 3e-4; well above that, divergence is the usual outcome


class TrainingDiverged(MedtuneError):
    """The loss or the LoRA weights became NaN/inf; training stopped without saving the bad state."""


class StopOnDivergence(TrainerCallback):
    def __init__(self) -> None:
        self.diverged: dict[str, Any] | None = None
        self._bad_loss: torch.Tensor | None = None
        self._bad_steps = 0
        self._params: list[torch.Tensor] = []
        self._hook: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._hook = model.register_forward_hook(self._on_forward)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _on_forward(self, module: Any, inputs: Any, output: Any) -> None:
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if module.training and loss is not None:
            bad = ~torch.isfinite(loss.detach()).all()  # stays on the device: no sync per micro batch
            self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        norm = torch.nn.utils.get_total_norm(self._params)
        if isinstance(norm, DTensor):  # FSDP: each rank holds a shard; the norm over all of them is one collective
            norm = norm.full_tensor()
        weights = any_rank(~torch.isfinite(norm), args)
        loss = any_rank(self._bad_loss if self._bad_loss is not None else False, args)
        self._bad_loss = None
        self._bad_steps = self._bad_steps + 1 if loss else 0
        if self.diverged is None and (weights or self._bad_steps >= PATIENCE):
            what = "the LoRA weights" if weights else f"the loss ({PATIENCE} steps in a row)"
            self.diverged = {"step": state.global_step, "what": what}
            control.should_save = False  # never checkpoint the diverged state
            control.should_training_stop = True
            log.error("finetune: %s became NaN/inf at step %d; stopping without saving", what, state.global_step)


def diverged_error(info: dict[str, Any], args: Any, learning_rate: float, checkpoint: str | None) -> TrainingDiverged:
    """The one-line error: where, the likely cause with its fix, and the checkpoint that was kept."""
    causes = []
    if args.fp16:
        causes.append("fp16 overflow: set lora.bf16=true (bfloat16 has float32's range; A100/H100/L40 and newer "
                      "support it) or lower the learning rate")
    if learning_rate > HIGH_LORA_LR:
        causes.append(f"learning rate {learning_rate:g} is high for LoRA: try training.learning_rate="
                      f"{learning_rate / 10:g}")
    if not causes:
        causes.append(f"too high a learning rate for this data: try training.learning_rate={learning_rate / 4:g}, "
                      f"or a lower training.max_grad_norm (now {args.max_grad_norm:g})")
    kept = f"the last checkpoint before it, {checkpoint}, is kept" if checkpoint else "no checkpoint had been saved yet"
    return TrainingDiverged(f"training diverged: {info['what']} became NaN/inf at step {info['step']}; likely cause: "
                            f"{'; '.join(causes)}; {kept}; start a new run with the fix")
