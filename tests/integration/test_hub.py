"""Hub publishing against a local endpoint that speaks the few Hub API calls a push makes.

The endpoint records every request (path, Authorization header, committed files), so the tests assert
on what huggingface_hub actually sent: repo creation (private), one commit with the card, the token
only ever as a header, and never in any file of the run directory.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from medtune.config_io import load_config
from medtune.workflow import run_workflow

CANARY = "hf_CANARYhubTOKEN0123456789abcdef"
REPO = "medlab/smol-medical"


class FakeHub(BaseHTTPRequestHandler):
    calls: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        call = {"path": self.path.split("?")[0], "auth": self.headers.get("Authorization"), "files": {}}
        self.calls.append(call)
        if call["path"] == "/api/repos/create":
            payload = json.loads(body)
            call["payload"] = payload
            self._reply({"url": f"http://{self.headers['Host']}/{payload['organization']}/{payload['name']}"})
        elif call["path"] == "/api/validate-yaml":
            self._reply({"errors": [], "warnings": []})
        elif call["path"].endswith("/preupload/main"):
            files = json.loads(body)["files"]
            self._reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        elif call["path"].endswith("/commit/main"):
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    call["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            self._reply({"commitUrl": f"http://{self.headers['Host']}/{REPO}/commit/c0ffee", "commitOid": "c0ffee" * 6 + "abcd"})
        else:
            self._reply({"error": f"not implemented: {self.path}"}, status=404)

    def _reply(self, data: dict, status: int = 200) -> None:
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants as constants

    FakeHub.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    # huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE once at import; in this process, patch what it read.
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield url
    server.shutdown()


def _commits(calls):
    return [c for c in calls if c["path"].endswith("/commit/main")]


def test_push_adapter_then_merged_without_leaking_the_token(hub, tiny_overrides, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", CANARY)
    cfg = load_config(preset="smollm2-135m-medical",
                      overrides=[*tiny_overrides, "output.run_id=hub", "output.push_to_hub=true",
                                 f"output.hub_model_id={REPO}"])
    run = run_workflow(cfg)
    manifest = json.loads(run.manifest_path.read_text())
    assert manifest["status"] == "succeeded" and manifest["stages"]["hub"]["private"] is True

    create = [c for c in FakeHub.calls if c["path"] == "/api/repos/create"]
    assert create[0]["payload"]["visibility"] == "private" and create[0]["payload"]["name"] == "smol-medical"
    assert {c["auth"] for c in FakeHub.calls} == {f"Bearer {CANARY}"}
    (commit,) = _commits(FakeHub.calls)
    assert commit["path"] == f"/api/models/{REPO}/commit/main"
    assert set(commit["files"]) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    card = commit["files"]["README.md"].decode()
    assert "not a medical device" in card and "Held-out loss" in card

    # `medtune push` of the finished run, in a fresh process configured only through the environment.
    FakeHub.calls = []
    env = {**os.environ, "HF_ENDPOINT": hub, "HF_HUB_OFFLINE": "0", "HF_TOKEN": CANARY}
    proc = subprocess.run([sys.executable, "-m", "medtune", "push", str(run.root), "--set", "output.hub_push_merged=true"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert CANARY not in proc.stdout + proc.stderr
    (commit,) = _commits(FakeHub.calls)
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md",
            "adapters/adapter_config.json", "adapters/README.md"} <= set(commit["files"])
    assert b"vllm" in commit["files"]["README.md"]
    for path in run.root.rglob("*"):
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes(), path


def test_push_without_a_token_is_refused_before_any_work(tiny_overrides, monkeypatch, tmp_path):
    from medtune.cli import main

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    args = ["run", "--preset", "smollm2-135m-medical", *[a for o in tiny_overrides for a in ("--set", o)],
            "--set", "output.push_to_hub=true", "--set", f"output.hub_model_id={REPO}"]
    assert main(args) == 2
    assert not (tmp_path / "outputs").exists()
