"""Shared fixtures: a tiny random Llama with a ChatML tokenizer, built offline once per session."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import ModuleType

import pytest

ASSETS = Path(__file__).parent / "assets"
TINY_DATA = ASSETS / "tiny_medical.jsonl"
SHARED_DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "medical_mistral_instruct_dataset_short"

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _load_bench_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def bench_script():
    """Imports a script of bench/ (not a package) as a module, for its tests: `bench_script("gpu_train")`."""
    return _load_bench_script


def _train_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rows = [json.loads(line) for line in TINY_DATA.read_text().splitlines()]
    corpus = [f"{r['instruction']} {r['input']} {r['output']}" for r in rows] * 4
    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(out)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama (+ tokenizer, chat template) saved as a local model folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    _train_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out)
    return out


@pytest.fixture
def tiny_overrides(tiny_model_dir: Path, tmp_path: Path) -> list[str]:
    """--set overrides for a fast CPU run of the whole workflow on the tiny model and tiny data."""
    return [
        "model.model_source=local",
        f"model.local_model_path={tiny_model_dir}",
        f"model.model_cache_dir={tmp_path / 'models'}",
        "dataset.dataset_source=local",
        f"dataset.local_dataset_path={TINY_DATA}",
        "dataset.dataset_format=jsonl",
        "dataset.eval_split=",
        "dataset.eval_fraction=0.2",
        "training.max_steps=6",
        "training.micro_batch_size=2",
        "training.gradient_accumulation=1",
        "training.learning_rate=0.01",
        "training.max_seq_length=128",
        "training.save_steps=3",
        "training.logging_steps=1",
        "lora.quantization=none",
        "lora.lora_r=4",
        "lora.lora_alpha=8",
        "lora.gradient_checkpointing=false",
        "lora.bf16=false",
        "evaluation.validation_questions=1",
        "evaluation.max_new_tokens=12",
        "evaluation.mcq_questions=4",
        "evaluation.probe_max_new_tokens=8",
        "training.eval_steps=3",
        f"output.output_root={tmp_path / 'outputs'}",
        "output.merged_dtype=float32",
    ]


SLOW_STEPS = """
import time, transformers
_step = transformers.Trainer.training_step
def _slow(self, *args, **kwargs):
    time.sleep(0.25)
    return _step(self, *args, **kwargs)
transformers.Trainer.training_step = _slow
"""


@pytest.fixture
def slow_steps(tmp_path: Path) -> Path:
    """A folder for PYTHONPATH whose sitecustomize slows every optimizer step by 0.25 s in each Python
    process started with it (torchrun ranks and Slurm jobs included): tests act while training runs."""
    hooks = tmp_path / "slow-steps"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_STEPS)
    return hooks
