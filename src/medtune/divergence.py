"""NaN/inf during training: stop within a few steps, keep the last good checkpoint, name the cause.

Two signals, checked once per optimizer step: the LoRA weights themselves (a non-finite weight means
the run is lost: stop now), and the training loss (non-finite for `PATIENCE` optimizer steps in a
row: with fp16 the grad scaler skips the update of a step that overflowed, so one bad step can be
harmless, three are not). No checkpoint is saved once either is seen, so the newest checkpoint on
disk is one taken before the divergence. The loss is read from the model's forward outputs on the
device and the flag is fetched once per step, next to the preemption check.

Fetching the flags is a host-GPU sync: the host waits until the GPU has run everything queued, so the
next step starts on an idle GPU. With `DEFER` (single process), a step's flags are copied to the host
without waiting and read one step later, when the copy is long done; a step that saves a checkpoint, or
the last step, still reads its own flags at once (and the pending ones), so no diverged state is saved.
A divergence is then acted on one step later, and reported with the step it happened at.
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
# Read a step's NaN flags one step late, without a sync (single process; not on steps that save). Off until
# measured on a GPU: bench/gpu_train.py --ab deferdivergence
DEFER = False
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
        self._pending: tuple[int, Any] | None = None  # (step, read its flags) under DEFER

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._hook = model.register_forward_hook(self._on_forward)

    def _on_forward(self, module: Any, inputs: Any, output: Any) -> None:
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if module.training and loss is not None:
            bad = ~torch.isfinite(loss.detach()).all()  # stays on the device: no sync per micro batch
            self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        norm = torch.nn.utils.get_total_norm(self._params)
        if isinstance(norm, DTensor):  # FSDP: each rank holds a shard; the norm over all of them is one collective
            norm = norm.full_tensor()
        bad_weights = ~torch.isfinite(norm)
        bad_loss = self._bad_loss if self._bad_loss is not None else torch.zeros_like(bad_weights)
        self._bad_loss = None
        pending, self._pending = self._pending, None
        if pending is not None:
            self._judge(pending[0], *pending[1](), control)
        if DEFER and args.world_size == 1 and not control.should_save and state.global_step < state.max_steps \
                and self.diverged is None:
            self._pending = (state.global_step, _read_later(torch.stack([bad_weights, bad_loss.to(bad_weights.dtype)])))
            return
        self._judge(state.global_step, any_rank(bad_weights, args), any_rank(bad_loss, args), control)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._pending is not None:  # training stopped before the next step end read it
            step, read = self._pending
            self._pending = None
            self._judge(step, *read(), control)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _judge(self, step: int, weights: bool, loss: bool, control: Any) -> None:
        self._bad_steps = self._bad_steps + 1 if loss else 0
        if self.diverged is None and (weights or self._bad_steps >= PATIENCE):
            what = "the LoRA weights" if weights else f"the loss ({PATIENCE} steps in a row)"
            self.diverged = {"step": step, "what": what}
            control.should_save = False  # never checkpoint the diverged state
            control.should_training_stop = True
            log.error("finetune: %s became NaN/inf at step %d; stopping without saving", what, step)


def _read_later(flags: torch.Tensor) -> Any:
    """Starts copying `flags` to the host without waiting for the GPU; returns a function that reads them (by
    the next step the copy has long been done, so its wait costs nothing)."""
    if not flags.is_cuda:
        return lambda: tuple(bool(f) for f in flags)
    host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
    host.copy_(flags, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def read() -> tuple[bool, ...]:
        done.synchronize()
        return tuple(bool(f) for f in host)

    return read


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
