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


def test_streamed_merge_matches_the_in_memory_merge(run_with_adapter, tiny_model_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import medtune.merge as merge_stage
    from medtune.chat import stop_token_ids

    run = run_with_adapter
    cfg = OutputConfig(max_shard_size="200KB", merged_dtype="float32")
    assert merge(cfg, run, str(tiny_model_dir))["method"] == "in_memory"
    expected = {k: v for p in run.merged.glob("*.safetensors") for k, v in load_file(p).items()}

    monkeypatch.setattr(merge_stage, "ram_budget", lambda: 0)  # as if the base were larger than free RAM
    result = merge(cfg, run, str(tiny_model_dir))
    assert result["method"] == "streamed"
    got = {k: v for p in run.merged.glob("*.safetensors") for k, v in load_file(p).items()}
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5)
    generation = json.loads((run.merged / "generation_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert generation["eos_token_id"] == stop_token_ids(tokenizer) and tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tokenizer)
    assert json.loads((run.merged / "config.json").read_text())["dtype"] == "float32"
    AutoModelForCausalLM.from_pretrained(run.merged)  # loads as a normal folder
    assert (run.merged / "README.md").is_file() and (run.merged / "tokenizer.json").is_file()
