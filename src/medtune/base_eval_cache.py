"""The base model's eval loss, computed once per (model, eval data, precision) and kept in the model cache.

Evaluating the untouched base costs a full pass over the held-out split; reruns and new runs on the
same model and data reuse it. The key covers what changes the number: the model folder's config and
weight files (name, size, mtime), the tokenized eval split's content, quantization, compute dtype,
device and batch size. The cache is a small JSON file next to the cached models.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from medtune.rundir import write_text

log = logging.getLogger("medtune.train")

CACHE_FILE = "medtune-base-eval.json"


def eval_key(model_path: str, eval_path: Path, settings: dict[str, Any]) -> str:
    digest = hashlib.sha256()
    model = Path(model_path)
    digest.update((model / "config.json").read_bytes())
    for weight in sorted([*model.glob("*.safetensors"), *model.glob("*.bin")]):
        stat = weight.stat()
        digest.update(f"{weight.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    for arrow in sorted(eval_path.glob("*.arrow")):
        digest.update(arrow.read_bytes())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def lookup(cache_dir: str, key: str) -> dict[str, Any] | None:
    path = Path(cache_dir).expanduser() / CACHE_FILE
    try:
        return json.loads(path.read_text()).get(key)
    except (OSError, json.JSONDecodeError):
        return None


def store(cache_dir: str, key: str, value: dict[str, Any]) -> None:
    folder = Path(cache_dir).expanduser()
    path = folder / CACHE_FILE
    try:
        folder.mkdir(parents=True, exist_ok=True)
        data = json.loads(path.read_text()) if path.is_file() else {}
        data[key] = value
        write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    except (OSError, json.JSONDecodeError) as exc:  # a cache that cannot be written only costs time
        log.warning("finetune: base eval cache %s not written (%s)", path, exc)
