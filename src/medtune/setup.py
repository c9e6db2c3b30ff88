"""Stage 1, setup: what this machine is, written into the manifest, and a refusal when it can't run the config."""

from __future__ import annotations

import logging
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil
import torch

from medtune.config import MedtuneConfig
from medtune.preflight import free_bytes
from medtune.errors import EnvironmentProblem
from medtune.rundir import RunDir

log = logging.getLogger("medtune.setup")

LIBRARIES = ("medtune", "torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes",
             "huggingface_hub", "safetensors", "gguf", "pydantic")


def environment_report(paths: list[Path]) -> dict[str, Any]:
    """GPUs, CUDA, CPU, RAM, free disk and library versions."""
    gpus = visible_gpus()
    disk = {str(path): round(free_bytes(path) / 2**30, 1) for path in paths}
    return {
        "host": platform.node(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cuda": torch.version.cuda,
        "gpus": gpus,
        "free_disk_gib": disk,
        "libraries": {name: _version(name) for name in LIBRARIES},
    }


def visible_gpus() -> list[dict[str, Any]]:
    """Name, memory and bfloat16 support of each visible CUDA GPU (the probe tests replace)."""
    return [
        {"name": torch.cuda.get_device_name(i),
         "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
         "bf16": torch.cuda.is_bf16_supported()}
        for i in range(torch.cuda.device_count())
    ]


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def check_environment(cfg: MedtuneConfig, report: dict[str, Any]) -> None:
    """Refuse before any download when the config needs hardware this machine lacks."""
    gpus = report["gpus"]
    if cfg.training.device == "cuda" and not gpus:
        raise EnvironmentProblem(
            "training.device is `cuda` but no CUDA GPU is visible; run on a GPU node or set training.device=auto"
        )
    if "8bit" in cfg.training.optimizer and not gpus:
        raise EnvironmentProblem(
            f"training.optimizer `{cfg.training.optimizer}` needs a CUDA GPU; use training.optimizer=adamw_torch on CPU"
        )
    quantized = cfg.lora.quantization != "none"
    if gpus and (quantized or "8bit" in cfg.training.optimizer) and report["libraries"].get("bitsandbytes") is None:
        need = f"lora.quantization={cfg.lora.quantization}" if quantized else f"training.optimizer={cfg.training.optimizer}"
        raise EnvironmentProblem(
            f"{need} needs bitsandbytes, which is not installed; `pip install bitsandbytes==0.50.2` "
            "(or reinstall medtune), or set lora.quantization=none and training.optimizer=adamw_torch"
        )
    if gpus and cfg.lora.bf16 and not all(g["bf16"] for g in gpus):
        raise EnvironmentProblem(
            f"lora.bf16 is true but {gpus[0]['name']} has no bfloat16 support; set lora.bf16=false (float16)"
        )


def setup(cfg: MedtuneConfig, run: RunDir) -> dict[str, Any]:
    cache = Path(cfg.model.model_cache_dir).expanduser()
    report = environment_report([run.root, cache])
    gpus = report["gpus"]
    log.info("environment: %s, %d CPUs, %.0f GiB RAM, %s", report["platform"], report["cpu_count"],
             report["ram_gib"], ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in gpus) or "no GPU")
    if not gpus:
        bf16 = cfg.lora.bf16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        log.info("no GPU: training runs on the CPU in %s", "bfloat16 (native CPU support)" if bf16 else "float32")
    check_environment(cfg, report)
    return report
