"""The tokenized-examples cache: a second run on the same inputs skips rendering and tokenizing.

The key covers everything that changes the examples: the input files' sha256, the tokenizer's files
and which template renders them, the dataset settings, the sequence length, the shuffle seed and the
medtune version. An entry is written through a temp name and a rename, so a killed run never
leaves a half entry that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from medtune import __version__
from medtune.checksums import file_sha256
from medtune.config import MedtuneConfig

log = logging.getLogger("medtune.data")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "config.json")


def cache_key(cfg: MedtuneConfig, provenance: dict[str, Any], model_path: str, template: str) -> str:
    tokenizer = {name: file_sha256(Path(model_path) / name) for name in TOKENIZER_FILES
                 if (Path(model_path) / name).is_file()}
    material = {
        "medtune": __version__,
        "input": provenance.get("files", {}),
        "tokenizer": tokenizer,
        "template": template,
        "dataset": cfg.dataset.model_dump(mode="json"),
        "max_seq_length": cfg.training.max_seq_length,
        "seed": cfg.training.seed,
        "validation_questions": cfg.evaluation.validation_questions,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]


def restore(root: Path, key: str, out: Path) -> dict[str, Any] | None:
    """Copy a complete cache entry into `out` and return its report; None on a miss."""
    entry = root / key
    if not (entry / "data_report.json").is_file():
        return None
    for item in entry.iterdir():
        dest = out / item.name
        shutil.copytree(item, dest) if item.is_dir() else shutil.copy2(item, dest)
    return json.loads((entry / "data_report.json").read_text())


def store(root: Path, key: str, folder: Path) -> None:
    """Keep a copy of a finished data folder; a cache that cannot be written only costs speed."""
    entry = root / key
    tmp = root / f".{key}.tmp-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(folder, tmp)
        if entry.exists():
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, entry)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("data: could not write the data cache %s (%s); the next run tokenizes again", entry, exc.strerror)
