"""The model card carries the provenance a reviewer needs, from manifest.json alone."""

from __future__ import annotations

from medtune.config import MedtuneConfig
from medtune.config_io import to_dict
from medtune.modelcard import NOT_A_DEVICE, chat_template_of, render_card

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _manifest() -> dict:
    cfg = to_dict(MedtuneConfig())
    return {
        "run_id": "r1", "medtune_version": "0.1.0", "seed": 42, "config": cfg,
        "provenance": {"medtune_git": {"commit": "abcdef1234567890", "dirty": True},
                       "base_model_files": {"model.safetensors": "1" * 64, "config.json": "2" * 64}},
        "environment": {"platform": "Linux-x86_64", "cpu_count": 2, "ram_gib": 23.0,
                        "gpus": [{"name": "NVIDIA H100", "memory_gib": 79.1}], "libraries": {"peft": "0.21.2"}},
        "stages": {"model": {"source": "huggingface", "repo_id": "meta-llama/Llama-3.1-8B-Instruct"},
                   "data": {"seconds": 1.5, "report": {
                       "train_examples": 190, "eval_examples": 30, "train_tokens": 9000, "trained_tokens": 4000,
                       "row_format": "alpaca", "truncated": 0, "dropped": 1,
                       "input": {"files": {"/data/train.jsonl": "a" * 64, "/data/heldout.jsonl": "b" * 64}}}},
                   "finetune": {"seconds": 321.0}, "merge": {"seconds": 12.0, "dtype": "bfloat16", "format": "safetensors"}},
        "training": {"base_eval_loss": 2.5, "eval_loss": 1.25, "eval_loss_reduction": 0.5, "steps": 40,
                     "train_loss": 1.1},
        "validation": {"merge_check": {"top1_agreement": 1.0, "max_abs_diff": 0.01, "positions": 500},
                       "tuned_stopped": 1,
                       "answers": [{"question": "What is sepsis?", "reference": "A dysregulated response.",
                                    "base": {"text": "base says"}, "tuned": {"text": "tuned says"}}]},
    }


def test_card_has_every_fact():
    card = render_card("merged", _manifest(), TEMPLATE)
    cfg = MedtuneConfig()
    assert card.startswith("---\nlibrary_name: transformers\nbase_model: meta-llama/Llama-3.1-8B-Instruct\n")
    assert "revision `main`" in card and f"| model.safetensors | `{'1' * 64}` |" in card
    assert f"| train.jsonl | `{'a' * 64}` |" in card and "190 training rows and 30 held-out rows" in card
    assert TEMPLATE in card and "sha256 `" in card
    for key, value in cfg.training.model_dump().items():
        assert f"| training.{key} |" in card, key
    for key in cfg.lora.model_dump():
        assert f"| lora.{key} |" in card, key
    assert "base model **2.5000** → fine-tuned **1.2500** (50.0% lower)" in card
    assert "*Fine-tuned:* tuned says" in card and "*Base:* base says" in card
    assert "NVIDIA H100 (79.1 GiB)" in card and "finetune 321.0 s" in card
    assert "git abcdef123456, uncommitted changes" in card and "seed 42" in card
    assert card.count(NOT_A_DEVICE) == 2 and "not for clinical decision-making" in card
    assert "## Intended use" in card and "## Limitations" in card


def test_adapter_card_shows_peft_usage_and_survives_a_bare_manifest():
    card = render_card("adapters", {"config": to_dict(MedtuneConfig())}, None)
    assert "library_name: peft" in card and "PeftModel.from_pretrained" in card
    assert "No evaluation results were recorded" in card and NOT_A_DEVICE in card


def test_chat_template_read_from_either_place(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "T1"}')
    assert chat_template_of(tmp_path) == "T1"
    (tmp_path / "chat_template.jinja").write_text("T2")
    assert chat_template_of(tmp_path) == "T2"
