"""Stage 6, merge: fold the adapter into a 16-bit copy of the base and save a servable folder.

The base is always reloaded unquantized (the seed merges into the 4-bit training model, so its
"merged" output is a re-quantized 4-bit checkpoint). The folder gets the tokenizer (with its chat
template) and a generation config whose stop tokens include the end-of-turn token, which is what
`vllm serve <run>/merged` needs to stop answers where the model was trained to stop.

When the merged model would not fit in free RAM, a plain LoRA adapter is folded in shard by shard
(streamed_merge.py), holding one base shard at a time; otherwise PEFT's merge_and_unload runs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from medtune.chat import stop_token_ids
from medtune.config import OutputConfig
from medtune.modelcard import write_card
from medtune.rundir import RunDir, atomic_dir
from medtune.streamed_merge import merge_shards, streamable

log = logging.getLogger("medtune.merge")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def base_dtype(model_path: str) -> torch.dtype:
    config = json.loads((Path(model_path) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return DTYPES.get(name, torch.float32)


def merge(cfg: OutputConfig, run: RunDir, model_path: str) -> dict[str, Any]:
    from transformers import AutoTokenizer

    dtype = base_dtype(model_path) if cfg.merged_dtype == "auto" else DTYPES[cfg.merged_dtype]
    tokenizer = AutoTokenizer.from_pretrained(run.tokenizer_source(model_path))
    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    streamed = cfg.merged_save_format == "safetensors" and streamable(run.adapters, Path(model_path)) \
        and _merged_bytes(model_path, dtype) > ram_budget()
    with atomic_dir(run.merged) as tmp:
        if streamed:
            log.info("merge: the base does not fit in free RAM; merging shard by shard in %s", dtype)
            _merge_streamed(run, Path(model_path), tmp, dtype, stops, pad)
        else:
            log.info("merge: loading the base in %s (unquantized) and folding in the adapter", dtype)
            _merge_in_memory(cfg, run, model_path, tmp, dtype, stops, pad)
        tokenizer.save_pretrained(str(tmp))
        write_card(tmp, "merged", run.manifest(), run.tokenizer_source(model_path))
    files = sorted(p.name for p in run.merged.iterdir())
    log.info("merge: wrote %s (%s)", run.merged, ", ".join(files))
    return {"dtype": str(dtype).removeprefix("torch."), "format": cfg.merged_save_format, "files": files,
            "method": "streamed" if streamed else "in_memory"}


def ram_budget() -> int:
    """Bytes an in-memory merge may use: most of what is free now."""
    import psutil

    return int(psutil.virtual_memory().available * 0.8)


def _merged_bytes(model_path: str, dtype: torch.dtype) -> int:
    weights = list(Path(model_path).glob("*.safetensors")) or list(Path(model_path).glob("*.bin"))
    ratio = dtype.itemsize / base_dtype(model_path).itemsize
    return int(sum(p.stat().st_size for p in weights) * ratio)


def _merge_in_memory(cfg: OutputConfig, run: RunDir, model_path: str, out: Path, dtype: torch.dtype,
                     stops: list[int], pad: int | None) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # On a GPU the load and the merge (one add per adapted matrix) are much faster; the saved
    # weights are the same.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, device_map={"": device})
    merged = PeftModel.from_pretrained(base, str(run.adapters)).merge_and_unload()
    merged.generation_config.eos_token_id = stops
    if merged.generation_config.pad_token_id is None:
        merged.generation_config.pad_token_id = pad
    merged.save_pretrained(str(out), max_shard_size=cfg.max_shard_size)
    if cfg.merged_save_format == "bin":
        _resave_as_bin(merged, out, cfg.max_shard_size)


def _merge_streamed(run: RunDir, model_path: Path, out: Path, dtype: torch.dtype, stops: list[int],
                    pad: int | None) -> None:
    from transformers import AutoConfig, GenerationConfig

    merge_shards(run.adapters, model_path, out, dtype)
    config = AutoConfig.from_pretrained(model_path)
    config.dtype = dtype
    config.save_pretrained(out)
    try:
        generation = GenerationConfig.from_pretrained(model_path)
    except OSError:  # a base without generation_config.json
        generation = GenerationConfig.from_model_config(config)
    generation.eos_token_id = stops
    if generation.pad_token_id is None:
        generation.pad_token_id = pad
    generation.save_pretrained(out)


def _resave_as_bin(model: Any, folder: Path, max_shard_size: str) -> None:
    """transformers 5 writes only safetensors; `bin` (for old serving stacks) swaps in torch pickles."""
    from huggingface_hub import save_torch_state_dict

    for path in [*folder.glob("*.safetensors"), *folder.glob("*.safetensors.index.json")]:
        path.unlink()
    save_torch_state_dict(model.state_dict(), folder, max_shard_size=max_shard_size, safe_serialization=False)
