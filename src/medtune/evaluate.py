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

    stops = merged.generation_config.eos_token_id
    prompts = [tokenizer.apply_chat_template(q["messages"], tokenize=False, add_generation_prompt=True)
               for q in questions]
    tuned = generate_answers(merged, tokenizer, prompts, cfg.max_new_tokens, stops, device)
    with adapted.disable_adapter():
        before = generate_answers(adapted, tokenizer, prompts, cfg.max_new_tokens, stops, device)
    answers = [{"question": q["messages"][-1]["content"], "reference": q.get("reference", ""), "base": b, "tuned": t}
               for q, b, t in zip(questions, before, tuned)]
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


BATCH = 16  # prompts per generate call: their KV caches together stay small beside the model


@torch.no_grad()
def generate_answers(model: Any, tokenizer: Any, prompts: list[str], max_new: int, stops: list[int] | int,
                     device: str, seed: int | None = None, temperature: float = 0.7) -> list[dict[str, Any]]:
    """The answers to `prompts`, generated together (left-padded, up to `BATCH` at a time): N answers take
    as many decoding steps as the longest of them, not the sum. A step's cost is mostly the host's per
    layer and projection (an 8B model with an unmerged adapter decoded one prompt at ~86 ms per token on
    an H200, docs/benchmarks.md), about the same for sixteen rows as for one. Greedy, or (with `seed`)
    sampled, reproducibly for the same seed and prompts."""
    answers: list[dict[str, Any]] = []
    for start in range(0, len(prompts), BATCH):
        answers += _generate_batch(model, tokenizer, prompts[start:start + BATCH], max_new, stops, device, seed,
                                   temperature)
    return answers


def _generate_batch(model: Any, tokenizer: Any, prompts: list[str], max_new: int, stops: list[int] | int,
                    device: str, seed: int | None, temperature: float) -> list[dict[str, Any]]:
    rows = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    sampling: dict[str, Any] = {"do_sample": False}
    if seed is not None:
        torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": 0.95, "top_k": 0}
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, eos_token_id=stops,
                         pad_token_id=pad, **sampling)
    stop_set = set(stops if isinstance(stops, list) else [stops])
    answers = []
    for row in out[:, width:].tolist():
        # a finished row is padded while the others go on: it ends at its first stop token
        end = next((i + 1 for i, t in enumerate(row) if t in stop_set), len(row))
        new = row[:end]
        answers.append({"text": tokenizer.decode(new, skip_special_tokens=True).strip(), "tokens": len(new),
                        "stopped": bool(new) and new[-1] in stop_set})
    return answers
