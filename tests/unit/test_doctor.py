"""`medtune doctor`: verdicts per requirement of the config, and the token's value never shown."""

from __future__ import annotations

import torch

from medtune.cli import main
from medtune.config_io import load_config
from medtune.doctor import judge

GPU_NODE = {"gpus": ["NVIDIA H100 80GB HBM3"] * 2, "driver": "550.54", "torch_cuda": "12.8", "cuda_available": True,
            "bitsandbytes": "CUDA", "free_gib": {"model cache": 500.0, "output root": 12.0},
            "container_runtime": None, "sbatch": "/usr/bin/sbatch", "qsub": None, "hf_token": False}


def _verdicts(*sets: str, **found):
    cfg = load_config(preset="llama3-8b-medical", overrides=list(sets), env={})
    return {f.requirement: f.verdict for f in judge(cfg, {**GPU_NODE, **found})}


def test_verdicts_follow_the_config():
    v = _verdicts()
    assert v["bitsandbytes on CUDA for 4bit QLoRA"] == "ok"
    assert v["free disk at the output root"] == "warn" and v["free disk at the model cache"] == "ok"
    assert v["Hugging Face token (gated models, push_to_hub)"] == "warn"
    assert not any("sbatch" in k or "apptainer" in k for k in v)  # not asked for by this config
    v = _verdicts("infrastructure.cluster=pbs", "infrastructure.container.source=path", "infrastructure.num_gpus=4",
                  "output.push_to_hub=true", "output.hub_model_id=org/m")
    assert v["qsub (infrastructure.cluster pbs)"] == "fail"
    assert v["apptainer/singularity (container.source path)"] == "fail"
    assert v["4 GPU(s) (infrastructure.num_gpus)"] == "fail"
    assert v["Hugging Face token (gated models, push_to_hub)"] == "fail"
    assert _verdicts("training.device=cuda", gpus=[])["a CUDA GPU (training.device / training.optimizer)"] == "fail"
    loose = ["credential file /home/u/.aws/credentials has mode 0644: ...; run `chmod 600 /home/u/.aws/credentials`"]
    assert _verdicts(loose_credential_files=loose)["credential files readable by you only"] == "warn"


def test_doctor_cli_exit_code_and_no_token_value(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "hf_DOCTORcanary123")
    sets = ["--set", f"output.output_root={tmp_path}", "--set", f"model.model_cache_dir={tmp_path}"]
    assert main(["doctor", "--preset", "llama3-8b-medical", *sets, "--set", "training.device=auto"]) == 0
    gpu = torch.cuda.is_available()
    assert main(["doctor", "--preset", "llama3-8b-medical", *sets, "--set", "training.device=cuda"]) == (0 if gpu else 1)
    text = capsys.readouterr().out
    assert "hf_DOCTORcanary123" not in text and "HF token" in text
    assert ("OK   a CUDA GPU" if gpu else "FAIL a CUDA GPU") in text
