"""Preflight checks of paths, the base model's files and free disk: before the run directory exists.

Each check needs no download and no GPU, so a mistake here costs seconds and leaves nothing on disk
(`workflow.preflight` runs them with the stages' own `check_source`s). The disk check estimates the
merged model from the base's parameter count and dtype, so a full disk is refused before training,
not found two hours later by the merge.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path, PurePosixPath

from medtune.config import MedtuneConfig, ModelConfig
from medtune.errors import ConfigError, DataError, EnvironmentProblem, ModelError, RunDirError
from medtune.rundir import RunDir

log = logging.getLogger("medtune")

GIB = 2**30
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def check_paths(cfg: MedtuneConfig) -> None:
    """Output and cache folders creatable, the run id a plain name, a bucket path inside its bucket."""
    run_id = cfg.output.run_id
    if run_id and not RUN_ID.match(run_id):
        raise ConfigError(f"output.run_id {run_id!r} is not a plain name (letters, digits, . _ -, no `/` or "
                          "leading `.`), so the run directory could land outside output.output_root; rename it")
    check_writable(Path(cfg.output.output_root).expanduser(), "output.output_root")
    check_writable(Path(cfg.model.model_cache_dir).expanduser(), "model.model_cache_dir")
    ds = cfg.dataset
    if ds.dataset_source == "bucket":
        inner = PurePosixPath(ds.dataset_bucket_path)
        if inner.is_absolute() or ".." in inner.parts:
            raise DataError(f"dataset.dataset_bucket_path {ds.dataset_bucket_path!r} leaves dataset.dataset_bucket "
                            "(absolute or `..`); give a path relative to the bucket, e.g. data/train.jsonl")


def check_writable(path: Path, key: str) -> None:
    """`path` is a folder this user can write, or can be created as one."""
    try:
        base = next(p for p in [path, *path.parents] if p.exists())
    except PermissionError as exc:  # a parent this user may not enter
        raise RunDirError(f"{key} {path}: no permission to look into {exc.filename}; "
                          f"set {key} to a folder you can write") from None
    if not base.is_dir():
        where = "is a file" if base == path else f"is below the file {base}"
        raise RunDirError(f"{key} {path} {where}, not a folder; set {key} to a folder path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise RunDirError(f"{key} {path} is not writable ({base} is read-only for this user); "
                          f"set {key} to a folder you can write")


def check_model_files(cfg: ModelConfig) -> None:
    """A local model's config.json is readable and its tokenizer has a chat template medtune can use."""
    if cfg.model_source == "local":
        path = Path(cfg.local_model_path).expanduser()
        model_type(path, "model.local_model_path")
        check_chat_template(path, "model.local_model_path")
    elif cfg.model_source == "gguf" and cfg.gguf_path:
        check_gguf(Path(cfg.gguf_path).expanduser())  # model.check_source has made sure the file exists


def model_type(path: Path, key: str) -> str:
    try:
        config = json.loads((path / "config.json").read_text())
    except (ValueError, UnicodeDecodeError):
        raise ModelError(f"{key} {path}/config.json is not valid JSON; copy the model's config.json again") from None
    if not isinstance(config, dict) or not config.get("model_type"):
        raise ModelError(f"{key} {path}/config.json has no model_type; it is not a Hugging Face model config, "
                         "copy the model's own config.json")
    return str(config["model_type"])


def check_chat_template(path: Path, key: str) -> None:
    """The data stage renders rows with the tokenizer's chat template or, without one, its family's
    fallback; an architecture with neither would fail there, after the run directory exists."""
    from transformers import AutoTokenizer

    from medtune.data.templates import template_source

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError for missing or broken files
        raise ModelError(f"{key} {path}: the tokenizer cannot be loaded ({type(exc).__name__}); copy the model's "
                         "tokenizer files (tokenizer.json, tokenizer_config.json) into the folder") from None
    if template_source(tokenizer, str(path)):
        return
    raise ModelError(f"{key} {path}: the tokenizer has no chat template and the architecture "
                     f"({model_type(path, key)}) matches none of medtune's fallback templates (Llama 2/3, Mistral, "
                     "Gemma); use a chat/instruct model or add a chat_template to its tokenizer_config.json")


def check_gguf(path: Path) -> None:
    """The GGUF header and tensor table parse (a memory map: nothing is dequantized here)."""
    from gguf import GGUFReader

    try:
        GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError/IndexError/struct errors on damaged files
        raise ModelError(f"model.gguf_path {path} is not a readable GGUF model ({type(exc).__name__}); "
                         "download the file again and compare its sha256 with the publisher's") from None


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that `path` (or its nearest existing parent) is on."""
    base = next(p for p in [path, *path.parents] if p.exists())
    return shutil.disk_usage(base).free


def merged_bytes(cfg: MedtuneConfig) -> tuple[int, str, int] | None:
    """(bytes, dtype, parameters) of the merged model, or None when the base's shape is not known offline."""
    from medtune.plan import model_shape, parameter_counts

    try:
        shape, source = model_shape(cfg)
    except (ConfigError, KeyError, ValueError):  # no offline config.json, or not a Llama-style one
        return None
    params = parameter_counts(shape, 0, ())["total"]
    dtype = cfg.output.merged_dtype
    if dtype == "auto":
        # `source` is the config.json the shape came from, or a note when it came from medtune's table
        base = json.loads(Path(source).read_text()) if Path(source).is_file() else {}
        dtype = str(base.get("dtype") or base.get("torch_dtype") or "bfloat16")
    return params * DTYPE_BYTES.get(dtype, 2), dtype, params


def check_disk(cfg: MedtuneConfig) -> None:
    """Refuse before training when output.output_root cannot hold the merged model."""
    run_id = cfg.output.run_id
    if not cfg.output.merge_full_weights or (
            run_id and (RunDir.for_run(cfg.output.output_root, run_id).merged / "config.json").is_file()):
        return  # nothing to merge, or merged already (a rerun that only finishes the cleanup)
    estimate = merged_bytes(cfg)
    if estimate is None:
        log.debug("preflight: base model shape unknown offline; free disk is checked by the merge itself")
        return
    need, dtype, params = estimate
    root = Path(cfg.output.output_root).expanduser()
    free = free_bytes(root)
    if free < need:
        raise EnvironmentProblem(
            f"output.output_root {root} has {_size(free)} free but the merged model needs about {_size(need)} "
            f"({params / 1e9:.3g}B parameters in {dtype}); free space there, point output.output_root at a "
            "larger disk, or set output.merge_full_weights=false"
        )


def _size(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"
