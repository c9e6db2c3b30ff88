"""Validation of the delivered model: the merged folder loads, matches adapter-on-base, and answers.

- logits of `merged/` vs the base with `adapters/` applied, on held-out conversations: max |diff|
  and top-1 agreement (the merged weights are rounded to their saved dtype, so agreement, not
  bit-equality, is the criterion for 16-bit merges);
- greedy answers of the base and the tuned model to held-out medical questions, and whether each
  answer ended on the end-of-turn token (a tuned model that never stops is a failed fine-tune).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from medtune.config import EvaluationConfig
from medtune.rundir import RunDir

log = logging.getLogger("medtune.evaluate")

FALLBACK_QUESTION = [{"role": "user", "content": "What are the warning signs of a stroke?"}]


def validate(cfg: EvaluationConfig, run: RunDir, model_path: str) -> dict[str, Any]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # float32 on CPU keeps the comparison about the merge, not about CPU half-precision kernels.
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(str(run.merged))
    questions = _questions(run)
    texts = [tokenizer.apply_chat_template(q["messages"] + [{"role": "assistant", "content": q["reference"]}],
                                           tokenize=False) for q in questions if q.get("reference")]
    texts = texts or [tokenizer.apply_chat_template(FALLBACK_QUESTION, tokenize=False, add_generation_prompt=True)]

    merged = AutoModelForCausalLM.from_pretrained(str(run.merged), dtype=dtype, device_map={"": device}).eval()
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, device_map={"": device})
    adapted = PeftModel.from_pretrained(base, str(run.adapters)).eval()
    agreement = _compare_logits(merged, adapted, tokenizer, texts, device)
    passed = agreement["top1_agreement"] >= cfg.merge_top1_min
    log.info("validate: merged vs adapter-on-base logits: max |diff| %.4g, top-1 agreement %.4f (%s, min %.2f)",
             agreement["max_abs_diff"], agreement["top1_agreement"], "ok" if passed else "FAILED", cfg.merge_top1_min)

    answers = []
    stops = merged.generation_config.eos_token_id
    for q in questions:
        prompt = tokenizer.apply_chat_template(q["messages"], tokenize=False, add_generation_prompt=True)
        tuned = generate_answer(merged, tokenizer, prompt, cfg.max_new_tokens, stops, device)
        with adapted.disable_adapter():
            before = generate_answer(adapted, tokenizer, prompt, cfg.max_new_tokens, stops, device)
        answers.append({"question": q["messages"][-1]["content"], "reference": q.get("reference", ""),
                        "base": before, "tuned": tuned})
    stopped = sum(a["tuned"]["stopped"] for a in answers)
    log.info("validate: tuned model stopped on its end-of-turn token in %d of %d answers", stopped, len(answers))
    return {"merge_check": {**agreement, "min_top1": cfg.merge_top1_min, "passed": passed},
            "answers": answers, "tuned_stopped": stopped}


def _questions(run: RunDir) -> list[dict[str, Any]]:
    path = run.data / "validation.json"
    return json.loads(path.read_text()) if path.is_file() else []


@torch.no_grad()
def _compare_logits(merged: Any, adapted: Any, tokenizer: Any, texts: list[str], device: str) -> dict[str, float]:
    max_diff, agree, total = 0.0, 0, 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
        a = merged(ids).logits.float()
        b = adapted(ids).logits.float()
        max_diff = max(max_diff, (a - b).abs().max().item())
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        total += ids.numel()
    return {"max_abs_diff": max_diff, "top1_agreement": agree / total, "positions": total}


@torch.no_grad()
def generate_answer(model: Any, tokenizer: Any, prompt: str, max_new: int, stops: list[int] | int, device: str,
                    seed: int | None = None, temperature: float = 0.7) -> dict[str, Any]:
    """Greedy answer, or (with `seed`) one sampled answer that the same seed reproduces."""
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(device)
    sampling: dict[str, Any] = {"do_sample": False}
    if seed is not None:
        torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": 0.95, "top_k": 0}
    out = model.generate(**ids, max_new_tokens=max_new, eos_token_id=stops,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **sampling)
    new = out[0, ids.input_ids.shape[1]:].tolist()
    stop_set = set(stops if isinstance(stops, list) else [stops])
    return {"text": tokenizer.decode(new, skip_special_tokens=True).strip(), "tokens": len(new),
            "stopped": bool(new) and new[-1] in stop_set}
