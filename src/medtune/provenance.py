"""Where a run's inputs came from, for manifest.json and the model card: code, base weights, seed."""

from __future__ import annotations

import json
import logging
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from medtune.checksums import cached_sha256

log = logging.getLogger("medtune.provenance")

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "config.json", "tokenizer.json", "tokenizer_config.json")


def medtune_revision() -> dict[str, Any] | None:
    """The git commit medtune runs from: an editable checkout, or pip's record of a `git+` install."""
    source = Path(__file__).resolve().parents[2]
    if (source / ".git").exists():
        try:
            commit = _git(source, "rev-parse", "HEAD")
            dirty = bool(_git(source, "status", "--porcelain", "--untracked-files=no"))
            return {"commit": commit, "dirty": dirty, "source": "git checkout"}
        except (OSError, subprocess.CalledProcessError):
            log.debug("no git revision for %s", source)
    try:
        direct = json.loads(metadata.distribution("medtune").read_text("direct_url.json") or "{}")
    except metadata.PackageNotFoundError:
        return None
    vcs = direct.get("vcs_info")
    return {"commit": vcs["commit_id"], "dirty": False, "source": direct.get("url")} if vcs else None


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=10).stdout.strip()


def model_fingerprint(model_path: str, cache_dir: Path) -> dict[str, str]:
    """sha256 of the base model's weight, config and tokenizer files: the revision, whatever the source
    (digests remembered in `cache_dir` while a file's size and modification time stay the same)."""
    root = Path(model_path)
    files = sorted({p for pattern in WEIGHT_PATTERNS for p in root.glob(pattern) if p.is_file()})
    return {p.name: cached_sha256(p, cache_dir) for p in files}
