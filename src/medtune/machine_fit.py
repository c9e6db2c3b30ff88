"""What this machine decides for a run before training starts: the device, `training.micro_batch_size: auto` and
`lora.gradient_checkpointing: auto` from the model's shape and the GPU's memory (`batch_auto`, `recompute`), and the
micro batch a resumed run must keep (`pin_batch`)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from medtune import batch_auto, recompute
from medtune.config import MedtuneConfig
from medtune.plan import shape_from_config

log = logging.getLogger("medtune.train")  # the finetune stage's lines


def pick_device(cfg: MedtuneConfig) -> str:
    return "cuda" if cfg.training.device != "cpu" and torch.cuda.is_available() else "cpu"


def resolve_recompute(cfg: MedtuneConfig, model_path: str, pin: Path | None = None) -> MedtuneConfig:
    """`cfg` with `training.micro_batch_size: auto` and `lora.gradient_checkpointing: auto` decided for
    this machine's GPU (logged). A resumed run keeps the micro batch its checkpoints were trained with
    (`pin`, written by each training attempt): another budget would make other bins, and the Trainer's
    skip over the batches already trained would no longer line up with them."""
    device = pick_device(cfg)
    config_json = Path(model_path) / "config.json"
    shape = shape_from_config(json.loads(config_json.read_text())) if config_json.is_file() else None
    if cfg.training.micro_batch_size == "auto":
        if pin is not None and pin.is_file():
            kept = json.loads(pin.read_text())
            cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update=kept)})
            why = "auto: as this run's checkpoints were trained (resumed)"
        else:
            cfg, why = batch_auto.resolve(cfg, shape, device, batch_memory_gib() if device == "cuda" else None)
        t = cfg.training
        log.info("finetune: micro batch (training.micro_batch_size) %s: %s",
                 f"{t.micro_batch_tokens} tokens" if t.micro_batch_tokens else
                 f"{t.micro_batch_size} row{'s' if t.micro_batch_size > 1 else ''}", why)
    resolved, why = recompute.resolve(cfg, shape, device, free_gpu_gib() if device == "cuda" else None)
    log.info("finetune: activation recompute (lora.gradient_checkpointing) %s: %s",
             "on" if resolved.lora.gradient_checkpointing else "off", why)
    return resolved


def batch_memory_gib() -> float:
    """What `micro_batch_size: auto` sizes against: this GPU's free memory; under torchrun the card's
    total less 1 GiB (CUDA context, NCCL), the same figure on every rank of identical cards, so every
    rank picks the same micro batch (free memory differs by a little from rank to rank)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory / 2**30 - 1
    return free_gpu_gib()


def free_gpu_gib() -> float:
    """Free memory on this process's GPU (under torchrun: LOCAL_RANK's), before anything is loaded."""
    return torch.cuda.mem_get_info(int(os.environ.get("LOCAL_RANK", "0")))[0] / 2**30


BATCH_PIN = "micro_batch.json"  # in the checkpoints folder: the micro batch the checkpoints were trained with


def pin_batch(cfg: MedtuneConfig, folder: Path) -> None:
    """Record the micro batch this attempt trains with (after `auto` and any out-of-memory halving)."""
    t = cfg.training
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{BATCH_PIN}.{os.environ.get('RANK', '0')}.{os.getpid()}"  # every rank writes the same, each its own temp
    tmp.write_text(json.dumps({"micro_batch_size": t.micro_batch_size, "micro_batch_tokens": t.micro_batch_tokens,
                               "gradient_accumulation": t.gradient_accumulation}))
    os.replace(tmp, folder / BATCH_PIN)
