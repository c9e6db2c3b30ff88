"""The numbers in the OOM and divergence messages, and what counts as a full disk."""

from __future__ import annotations

import errno
from types import SimpleNamespace

import pytest

from medtune.config_io import load_config
from medtune.diskspace import is_disk_full
from medtune.divergence import diverged_error
from medtune.oom import remedies, smaller_batch


@pytest.mark.parametrize(("micro", "accumulation", "expected"), [
    (8, 2, (4, 4)), (2, 16, (1, 32)), (3, 5, (1, 15)), (6, 1, (3, 2)), (1, 16, None),
])
def test_smaller_batch_keeps_the_effective_batch(micro, accumulation, expected):
    assert smaller_batch(micro, accumulation) == expected
    if expected:
        assert expected[0] * expected[1] == micro * accumulation


def test_remedies_name_this_runs_numbers():
    cfg = load_config(preset="smollm2-135m-medical", overrides=[
        "training.micro_batch_size=8", "training.gradient_accumulation=2", "training.max_seq_length=4096",
        "lora.quantization=none", "lora.gradient_checkpointing=false"])
    text = remedies(cfg, world_size=2)
    assert "training.micro_batch_size=4 with training.gradient_accumulation=4 (the effective batch stays 32)" in text
    assert "training.max_seq_length=2048" in text and "lora.quantization=4bit" in text
    assert "lora.gradient_checkpointing=true" in text and "auto_fit" not in text  # auto_fit is on by default


def test_remedies_leave_out_what_the_run_already_does():
    cfg = load_config(preset="smollm2-135m-medical", overrides=[
        "training.micro_batch_size=1", "lora.quantization=4bit", "lora.gradient_checkpointing=true"])
    text = remedies(cfg, world_size=1)
    assert "micro_batch_size" not in text and "quantization" not in text and "gradient_checkpointing" not in text
    assert "training.max_seq_length=" in text


@pytest.mark.parametrize(("fp16", "lr", "expected"), [
    (True, 2e-4, "fp16 overflow: set lora.bf16=true"),
    (False, 5e-2, "learning rate 0.05 is high for LoRA: try training.learning_rate=0.005"),
    (False, 2e-4, "try training.learning_rate=5e-05, or a lower training.max_grad_norm (now 1)"),
])
def test_divergence_names_the_likely_cause(fp16, lr, expected):
    args = SimpleNamespace(fp16=fp16, max_grad_norm=1.0)
    message = str(diverged_error({"step": 7, "what": "the loss (3 steps in a row)"}, args, lr, "/r/checkpoints/checkpoint-6"))
    assert message.startswith("training diverged: the loss (3 steps in a row) became NaN/inf at step 7; likely cause: ")
    assert expected in message and "checkpoint-6, is kept" in message and "\n" not in message


def test_what_counts_as_a_full_disk():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing "
                                     "file data/0: file write failed"))
    wrapped = ValueError("save failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert is_disk_full(wrapped)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(RuntimeError("CUDA error: an illegal memory access was encountered"))
