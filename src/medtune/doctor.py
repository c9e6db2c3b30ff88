"""`medtune doctor`: can this machine run this config? (the seed's setup job, standalone)

A table of what is here — GPUs and driver, CUDA as torch sees it, bitsandbytes' backend, free
disk at the model cache and output roots, apptainer/singularity, sbatch/qsub, whether a Hugging
Face token is set (never its value) — then one verdict line per requirement of the config.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from medtune.config import MedtuneConfig
from medtune.credentials import loose_permission_warnings

Verdict = Literal["ok", "warn", "fail"]
LOW_DISK_GIB = 20  # a 7-8B base plus its 16-bit merge needs about this much


@dataclass(frozen=True)
class Finding:
    requirement: str
    verdict: Verdict
    detail: str


def inspect_machine(cfg: MedtuneConfig) -> dict[str, Any]:
    """What this machine has, as plain data (no secrets)."""
    import torch

    roots = {"model cache": Path(cfg.model.model_cache_dir).expanduser(),
             "output root": Path(cfg.output.output_root).expanduser()}
    return {
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "driver": _driver_version(),
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "bitsandbytes": _bnb_backend(),
        "free_gib": {name: _free_gib(path) for name, path in roots.items()},
        "container_runtime": shutil.which("apptainer") or shutil.which("singularity"),
        "sbatch": shutil.which("sbatch"),
        "qsub": shutil.which("qsub"),
        "hf_token": cfg.model.hf_token is not None,
        "loose_credential_files": loose_permission_warnings(cfg.model.hf_token_file),
    }


def _driver_version() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    proc = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                          capture_output=True, text=True)
    return proc.stdout.splitlines()[0].strip() if proc.returncode == 0 and proc.stdout.strip() else None


def _bnb_backend() -> str | None:
    try:
        from bitsandbytes import cextension
    except ImportError:
        return None
    return str(cextension.BNB_BACKEND)


def _free_gib(path: Path) -> float:
    probe = next((p for p in [path, *path.parents] if p.exists()), Path("/"))
    return round(shutil.disk_usage(probe).free / 2**30, 1)


def judge(cfg: MedtuneConfig, found: dict[str, Any]) -> list[Finding]:
    """One finding per requirement the config makes of the machine."""
    gpus, infra = len(found["gpus"]), cfg.infrastructure
    out = []
    if cfg.training.device == "cuda" or "8bit" in cfg.training.optimizer:
        out.append(Finding("a CUDA GPU (training.device / training.optimizer)", "ok" if gpus else "fail",
                           f"{gpus} visible" if gpus else "none visible; run on a GPU node"))
    if cfg.lora.quantization != "none":
        ok = gpus and found["bitsandbytes"] == "CUDA"
        out.append(Finding(f"bitsandbytes on CUDA for {cfg.lora.quantization} QLoRA", "ok" if ok else "warn",
                           f"backend {found['bitsandbytes']}" if ok else
                           f"backend {found['bitsandbytes']}, {gpus} GPU(s): quantized training on CPU is very slow; "
                           "use a GPU node or lora.quantization=none"))
    if infra.num_gpus != "auto":
        out.append(Finding(f"{infra.num_gpus} GPU(s) (infrastructure.num_gpus)", "ok" if gpus >= infra.num_gpus else "fail",
                           f"{gpus} visible"))
    for name, free in found["free_gib"].items():
        out.append(Finding(f"free disk at the {name}", "ok" if free >= LOW_DISK_GIB else "warn",
                           f"{free} GiB" + ("" if free >= LOW_DISK_GIB else f" (< {LOW_DISK_GIB} GiB; a 7-8B run needs more)")))
    if infra.container.source != "none":
        out.append(Finding(f"apptainer/singularity (container.source {infra.container.source})",
                           "ok" if found["container_runtime"] else "fail",
                           found["container_runtime"] or "not on PATH; `module load apptainer` or source=none"))
    if infra.cluster != "local":
        tool = "sbatch" if infra.cluster == "slurm" else "qsub"
        out.append(Finding(f"{tool} (infrastructure.cluster {infra.cluster})", "ok" if found[tool] else "fail",
                           found[tool] or "not on PATH; run on a login node of the cluster"))
    if cfg.output.push_to_hub or cfg.model.model_source == "huggingface":
        need = "fail" if cfg.output.push_to_hub else "warn"
        out.append(Finding("Hugging Face token (gated models, push_to_hub)", "ok" if found["hf_token"] else need,
                           "set" if found["hf_token"] else "not set; export HF_TOKEN or set model.hf_token_file"))
    for line in found.get("loose_credential_files", []):
        out.append(Finding("credential files readable by you only", "warn", line))
    return out


def machine_rows(found: dict[str, Any]) -> list[tuple[str, str]]:
    free = ", ".join(f"{name} {gib} GiB" for name, gib in found["free_gib"].items())
    return [
        ("GPUs", ", ".join(found["gpus"]) or "none"),
        ("NVIDIA driver", found["driver"] or "not found"),
        ("CUDA (torch)", f"{found['torch_cuda'] or 'CPU build'}, available: {found['cuda_available']}"),
        ("bitsandbytes backend", found["bitsandbytes"] or "not installed"),
        ("free disk", free),
        ("apptainer/singularity", found["container_runtime"] or "not found"),
        ("sbatch / qsub", f"{found['sbatch'] or 'no sbatch'} / {found['qsub'] or 'no qsub'}"),
        ("HF token", "set" if found["hf_token"] else "not set"),
    ]
