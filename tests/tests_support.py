"""Paths and helpers the tests share (importable from test modules; conftest holds the fixtures)."""

import functools
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SHARED_DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "medical_mistral_instruct_dataset_short"

# Top-level entries of a finished run directory (the run-directory contract of rundir.py plus the
# resolved config, the data stage's output and the report).
RUN_ARTIFACTS = {"adapters", "merged", "logs", "training.env", "manifest.json", "summary.md", "config.yaml", "data",
                 "report.html"}


def qa_examples(tokenizer) -> list[dict]:
    """Three short medical Q&A rows tokenized as the data stage does: the loss on the answer and its
    end-of-turn token only (for the packing and attention-kernel equivalence tests)."""
    texts = [("What is anaemia?", "A low haemoglobin level."), ("Define tachycardia.", "A resting heart rate above 100."),
             ("Name a statin used after a heart attack.", "Atorvastatin.")]
    out = []
    for q, a in texts:
        prompt = tokenizer(q, add_special_tokens=False)["input_ids"]
        answer = tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return out


@functools.cache
def _private_network_available() -> bool:
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("ip")):
        return False
    return subprocess.run(["unshare", "--net", "--", "ip", "link", "set", "lo", "up"], capture_output=True).returncode == 0


def loopback_only(command: list[str]) -> list[str]:
    """`command` in a private network namespace whose only interface is loopback (as root, CI's case):
    torchrun's TCPStores listen on every interface by design (torch binds `::`/`0.0.0.0`, whatever
    address it is given), and inside the namespace every interface is 127.0.0.1. Elsewhere the
    command is returned unchanged. The process keeps its pid (unshare and sh exec), so signals reach it."""
    if not _private_network_available():
        return command
    return ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command]


# The bucket the `s3` fixture (tests/integration/conftest.py) creates on its moto endpoint.
S3_BUCKET = "medtune-test"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for test servers)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_under_triton_interpreter(code: str) -> None:
    """Run `code` (which prints "ok" when its checks pass) in a fresh interpreter with Triton's CPU
    interpreter switched on: the kernels' arithmetic is checked without a GPU."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="Triton is not installed (GPU installs have it)")
