"""CUDA out of memory during training: name the remedies for this run, or fit the batch and retry.

The remedies are the seed's, with this run's numbers: a smaller micro batch with a larger gradient
accumulation that keeps the effective batch (so the optimisation is the same), a shorter
max_seq_length, 4-bit QLoRA, gradient checkpointing. With `training.auto_fit` (the default) a
single-process run applies the first one itself: it halves the micro batch, raises the accumulation
to keep the effective batch, and retries from the last complete checkpoint, down to micro batch 1.
With token-budget micro batches (`training.micro_batch_tokens`) it halves the budget instead, down to
max_seq_length, and doubles the accumulation: the same bound on tokens per optimizer step.
Under torchrun the ranks would have to agree on the new batch, so there the error is reported instead.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import Any

import torch

from medtune.config import MedtuneConfig
from medtune.errors import MedtuneError
from medtune.recompute import with_recompute
from medtune.rundir import RunDir

log = logging.getLogger("medtune.train")


class TrainingOutOfMemory(MedtuneError):
    """The GPU ran out of memory and no smaller batch was tried (or none is left)."""


def smaller_batch(micro: int, accumulation: int) -> tuple[int, int] | None:
    """About half the micro batch, with the accumulation that keeps micro x accumulation; None at 1."""
    if micro <= 1:
        return None
    per_step = micro * accumulation
    new = micro // 2
    while per_step % new:  # e.g. 3 x 5: micro 1 x 15, since no micro batch of 2 keeps 15 exactly
        new -= 1
    return new, per_step // new


def smaller_budget(tokens: int, accumulation: int, max_seq_length: int) -> tuple[int, int] | None:
    """Half the token budget (not below max_seq_length, so every row still fits a bin) with twice the
    accumulation; None when the budget is already max_seq_length."""
    new = max(tokens // 2, max_seq_length)
    return (new, accumulation * 2) if new < tokens else None


def fitted_batch(cfg: MedtuneConfig) -> tuple[int, int] | None:
    """The next smaller micro batch (rows, or tokens with token bins) and its accumulation."""
    t = cfg.training
    if t.micro_batch_tokens:
        return smaller_budget(t.micro_batch_tokens, t.gradient_accumulation, t.max_seq_length)
    return smaller_batch(t.micro_batch_size, t.gradient_accumulation)


def _fitted_fix(cfg: MedtuneConfig, fitted: tuple[int, int], world_size: int) -> str:
    t = cfg.training
    if t.micro_batch_tokens:
        return (f"training.micro_batch_tokens={fitted[0]} with training.gradient_accumulation={fitted[1]} (at most "
                f"{fitted[0] * fitted[1] * world_size} tokens per optimizer step, was "
                f"{t.micro_batch_tokens * t.gradient_accumulation * world_size})")
    effective = t.micro_batch_size * t.gradient_accumulation * world_size
    return (f"training.micro_batch_size={fitted[0]} with training.gradient_accumulation={fitted[1]} "
            f"(the effective batch stays {effective})")


def remedies(cfg: MedtuneConfig, world_size: int) -> str:
    """The fixes for this run, as `--set` overrides with concrete values."""
    t, lora = cfg.training, cfg.lora
    fixes = []
    fitted = fitted_batch(cfg)
    if fitted:
        fixes.append(_fitted_fix(cfg, fitted, world_size))
    if t.max_seq_length >= 64:
        fixes.append(f"training.max_seq_length={t.max_seq_length // 2} (longer rows are truncated; needs a new run)")
    if lora.quantization != "4bit":
        fixes.append("lora.quantization=4bit (QLoRA: the base in a quarter of its 16-bit memory)")
    if not lora.gradient_checkpointing:
        fixes.append("lora.gradient_checkpointing=true (recompute activations: less memory, ~30% slower)")
    if not t.auto_fit and fitted:
        fixes.append("or training.auto_fit=true to let medtune shrink the micro batch itself")
    return "; ".join(fixes) if fixes else "a GPU with more memory, or a smaller base model"


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def train_fitting_memory(cfg: MedtuneConfig, run: RunDir, attempt: Callable[[MedtuneConfig], Any],
                         recompute_auto: bool = False) -> Any:
    """`attempt(cfg)` (one training run, resuming from the last checkpoint), retried with a smaller
    micro batch after each CUDA out-of-memory error while `training.auto_fit` allows it. When
    `recompute_auto` (lora.gradient_checkpointing was `auto`) left some or all layers unrecomputed, the
    first retry recomputes every layer instead, keeping the batch."""
    while True:
        try:
            return attempt(cfg)
        except torch.cuda.OutOfMemoryError as exc:
            what = str(exc).splitlines()[0] if str(exc) else "CUDA out of memory"
        # Outside the except block: the traceback, and the model and optimizer its frames hold, are gone.
        release_memory()
        t = cfg.training
        world = torch.distributed.get_world_size() if _distributed() else 1
        partial = cfg.lora.gradient_checkpointing is False or cfg.lora.recompute_every_n_layers > 1
        if recompute_auto and partial and world == 1:
            log.warning("finetune: out of GPU memory with recompute on %s (lora.gradient_checkpointing=auto); retrying "
                        "with recompute on every layer, same batch, from the last checkpoint",
                        "no layer" if cfg.lora.gradient_checkpointing is False
                        else f"one layer in {cfg.lora.recompute_every_n_layers}")
            run.update_manifest(auto_fit=[*run.manifest().get("auto_fit", []),
                                          {"gradient_checkpointing": True, "recompute_every_n_layers": 1}])
            cfg = with_recompute(cfg, True, 1)
            continue
        fitted = fitted_batch(cfg)
        key = "micro_batch_tokens" if t.micro_batch_tokens else "micro_batch_size"
        unit = " tokens" if t.micro_batch_tokens else ""
        if not (t.auto_fit and fitted and world == 1):
            tried = " (auto_fit is off)" if not t.auto_fit else ""
            raise TrainingOutOfMemory(
                f"training ran out of GPU memory at micro batch {getattr(t, key)}{unit} x accumulation "
                f"{t.gradient_accumulation}{tried} ({what[:120]}); set {remedies(cfg, world)}; apply with "
                f"`medtune run --resume {run.root} --set KEY=VALUE` (the last checkpoint is kept)"
            ) from None
        keeps = f"at most {fitted[0] * fitted[1]} tokens per step" if unit else "same effective batch"
        log.warning("finetune: out of GPU memory at micro batch %d%s; auto_fit retries with micro batch %d%s x "
                    "accumulation %d (%s) from the last checkpoint", getattr(t, key), unit, fitted[0], unit,
                    fitted[1], keeps)
        history = run.manifest().get("auto_fit", [])
        run.update_manifest(auto_fit=[*history, {f"from_{key}": getattr(t, key), key: fitted[0],
                                                 "gradient_accumulation": fitted[1]}])
        cfg = cfg.model_copy(update={"training": t.model_copy(
            update={key: fitted[0], "gradient_accumulation": fitted[1]})})
