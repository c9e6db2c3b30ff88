"""Stage 6, merge: fold the adapter into a 16-bit copy of the base and save a servable folder.

The base is always reloaded unquantized (the seed merges into the 4-bit training model, so its
"merged" output is a re-quantized 4-bit checkpoint). The folder gets the tokenizer (with its chat
template) and a generation config whose stop tokens include the end-of-turn token, which is what
`vllm serve <run>/merged` needs to stop answers where the model was trained to stop.
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

log = logging.getLogger("medtune.merge")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def base_dtype(model_path: str) -> torch.dtype:
    config = json.loads((Path(model_path) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return DTYPES.get(name, torch.float32)


def merge(cfg: OutputConfig, run: RunDir, model_path: str) -> dict[str, Any]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = base_dtype(model_path) if cfg.merged_dtype == "auto" else DTYPES[cfg.merged_dtype]
    log.info("merge: loading the base in %s (unquantized) and folding in the adapter", dtype)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, device_map={"": "cpu"})
    merged = PeftModel.from_pretrained(base, str(run.adapters)).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    merged.generation_config.eos_token_id = stop_token_ids(tokenizer)
    if merged.generation_config.pad_token_id is None:
        merged.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    with atomic_dir(run.merged) as tmp:
        merged.save_pretrained(str(tmp), max_shard_size=cfg.max_shard_size)
        if cfg.merged_save_format == "bin":
            _resave_as_bin(merged, tmp, cfg.max_shard_size)
        tokenizer.save_pretrained(str(tmp))
        write_card(tmp, "merged", run.manifest(), model_path)
    files = sorted(p.name for p in run.merged.iterdir())
    log.info("merge: wrote %s (%s)", run.merged, ", ".join(files))
    return {"dtype": str(dtype).removeprefix("torch."), "format": cfg.merged_save_format, "files": files}


def _resave_as_bin(model: Any, folder: Path, max_shard_size: str) -> None:
    """transformers 5 writes only safetensors; `bin` (for old serving stacks) swaps in torch pickles."""
    from huggingface_hub import save_torch_state_dict

    for path in [*folder.glob("*.safetensors"), *folder.glob("*.safetensors.index.json")]:
        path.unlink()
    save_torch_state_dict(model.state_dict(), folder, max_shard_size=max_shard_size, safe_serialization=False)
