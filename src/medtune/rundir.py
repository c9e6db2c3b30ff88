"""The run directory contract: where every artifact lives, and how it is written.

    <output_root>/medical-finetune-<RUN_ID>/
      adapters/  merged/  logs/finetune.log  training.env  manifest.json  summary.md
      config.yaml (the resolved config, secrets removed)   data/  checkpoints/ (working state; micro_batch.json:
      the micro batch they are trained with, which a resumed `micro_batch_size: auto` run keeps)

Every stage writes through a temporary sibling and an atomic rename, so a killed stage leaves the
previous complete state and a rerun of the same command picks up where it stopped. Stages hand off
through manifest.json (`stages.<name>`), never by importing each other.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medtune.errors import RunDirError

log = logging.getLogger("medtune")

RUN_PREFIX = "medical-finetune-"
ARTIFACTS = ("adapters", "merged", "logs", "training.env", "manifest.json", "summary.md")


def new_run_id() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S")


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def for_run(cls, output_root: str | Path, run_id: str) -> RunDir:
        return cls(Path(output_root).expanduser().resolve() / f"{RUN_PREFIX}{run_id}")

    @property
    def run_id(self) -> str:
        return self.root.name.removeprefix(RUN_PREFIX)

    adapters = property(lambda self: self.root / "adapters")
    merged = property(lambda self: self.root / "merged")
    logs = property(lambda self: self.root / "logs")
    log_file = property(lambda self: self.root / "logs" / "finetune.log")
    training_env = property(lambda self: self.root / "training.env")
    manifest_path = property(lambda self: self.root / "manifest.json")
    summary = property(lambda self: self.root / "summary.md")
    config_yaml = property(lambda self: self.root / "config.yaml")
    data = property(lambda self: self.root / "data")
    checkpoints = property(lambda self: self.root / "checkpoints")

    def tokenizer_source(self, model_path: str) -> str:
        """The tokenizer the data stage rendered with (its chat template included, also a fallback
        template the base lacked), else the base's own: what training, merge and evaluation load."""
        used = self.data / "tokenizer"
        return str(used) if (used / "tokenizer_config.json").is_file() else model_path

    def create(self) -> RunDir:
        refuse_world_writable_umask()
        try:
            self.logs.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(
                f"cannot create run directory {self.root} ({exc.strerror}); set output.output_root to a writable folder"
            ) from None
        return self

    # --- manifest: the hand-off between stages ----------------------------------------------------

    def digests(self) -> Callable[[Path], str]:
        """sha256 of this run's files for the report and the upload, remembered in the model cache by
        path, size and modification time: the merged weights (16 GB for an 8B model) are read once."""
        from medtune.checksums import cached_sha256, file_sha256

        cache = self.manifest().get("config", {}).get("model", {}).get("model_cache_dir")
        if not cache:
            return file_sha256
        return lambda path: cached_sha256(path, Path(cache).expanduser())

    def manifest(self) -> dict[str, Any]:
        if not self.manifest_path.is_file():
            return {}
        return json.loads(self.manifest_path.read_text())

    def update_manifest(self, **sections: Any) -> dict[str, Any]:
        data = self.manifest()
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        write_text(self.manifest_path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
        return data

    def stage(self, name: str) -> dict[str, Any]:
        """What a finished stage recorded ({} when it has not finished)."""
        return self.manifest().get("stages", {}).get(name, {})

    def finish_stage(self, name: str, seconds: float, **info: Any) -> None:
        self.update_manifest(stages={name: {"status": "done", "seconds": round(seconds, 2), **info}})


def refuse_world_writable_umask() -> None:
    """Outputs get the user's umask, except that no one else may write them: a umask that leaves
    others' write bit (e.g. 000) gets it added, for this process and its children."""
    current = os.umask(0o022)
    os.umask(current | 0o002)
    if not current & 0o002:
        log.warning("umask %03o would make the run's outputs writable by every user; using %03o",
                    current, current | 0o002)


def write_text(path: Path, text: str) -> None:
    """Write a file through a temp name + rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temp folder; on success it replaces `final` in one rename, on error it is removed."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    follow_umask(tmp)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def follow_umask(folder: Path) -> None:
    """Give every file and folder under `folder` the mode the user's umask gives new files: some
    writers (safetensors, through a private temp file) create their files 0600 whatever the umask."""
    umask = os.umask(0o022)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        executable = path.is_dir() or path.stat().st_mode & 0o100
        os.chmod(path, (0o777 if executable else 0o666) & ~umask)


def remove_stale_temps(root: Path) -> None:
    """Temp folders left by a killed stage (`.<name>.tmp-<pid>`, or `.<name>.old-<pid>` when it was
    killed between atomic_dir's two renames) are garbage: the stage reruns."""
    for path in [*root.glob(".*.tmp-*"), *root.glob(".*.old-*")]:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


@contextlib.contextmanager
def timed(label: str) -> Iterator[dict[str, float]]:
    box = {"seconds": 0.0}
    start = time.perf_counter()
    try:
        yield box
    finally:
        box["seconds"] = time.perf_counter() - start
        log.debug("%s took %.1fs", label, box["seconds"])
