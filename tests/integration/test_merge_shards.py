"""Merged weights in shards: a small `output.max_shard_size` gives several files that reload exactly."""

from __future__ import annotations

import json

import pytest
import torch

from medtune.config import OutputConfig
from medtune.merge import merge
from medtune.rundir import RunDir


@pytest.fixture
def run_with_adapter(tiny_model_dir, tmp_path) -> RunDir:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run = RunDir(tmp_path / "medical-finetune-shards").create()
    run.update_manifest(run_id="shards", config={"model": {"model_source": "local", "local_model_path": str(tiny_model_dir)}})
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)  # a trained-looking adapter: B is zero only at initialisation
    model.save_pretrained(run.adapters)
    return run


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_small_shard_size_gives_shards_that_reload(run_with_adapter, tiny_model_dir, fmt):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = run_with_adapter
    cfg = OutputConfig(max_shard_size="200KB", merged_save_format=fmt, merged_dtype="float32")
    result = merge(cfg, run, str(tiny_model_dir))
    suffix = ".safetensors" if fmt == "safetensors" else ".bin"
    shards = sorted(p.name for p in run.merged.glob(f"*{suffix}"))
    assert len(shards) >= 3 and all("-of-" in s for s in shards), shards
    index = json.loads(next(run.merged.glob(f"*{suffix}.index.json")).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert all((run.merged / s).stat().st_size < 260_000 for s in shards)
    assert result["format"] == fmt and (run.merged / "README.md").is_file()

    merged = AutoModelForCausalLM.from_pretrained(run.merged, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(run.adapters))
    ids = torch.tensor([[1, 5, 9, 42, 77, 100, 3]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-4, rtol=1e-4)
        with adapted.disable_adapter():
            assert not torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-3)
