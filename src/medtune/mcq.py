"""Multiple-choice medical QA scored by log-likelihood: does the tuned model prefer the right option?

Each question is asked with the model's chat template; every option is appended as the assistant's
answer ("B. Hyperkalaemia") and scored by the log-probability of its tokens. The prediction is the
option with the highest total log-probability (`accuracy`) and, as in lm-eval's `acc_norm`, the
highest log-probability per character (`accuracy_norm`, which removes the bias to short options).

Row shapes: MedQA style (`question`, `options` as {"A": ...} or a list, `answer_idx` letter or
`answer` letter/text) and MedMCQA style (`question`, `opa`..`opd`, `cop` as 0-based index).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from medtune.errors import DataError

LETTERS = "ABCDEFGHIJ"
MEDMCQA_OPTIONS = ("opa", "opb", "opc", "opd")


def builtin_mcq_path() -> Path:
    """medtune's own sample: short general-medicine questions written for this project."""
    return Path(__file__).parent / "assets" / "eval" / "mcq_sample.jsonl"


def has_mcq_columns(columns: list[str]) -> bool:
    names = set(columns)
    medqa = "question" in names and "options" in names and bool(names & {"answer_idx", "answer"})
    medmcqa = "question" in names and names.issuperset(MEDMCQA_OPTIONS) and "cop" in names
    return medqa or medmcqa


def normalize(row: dict[str, Any]) -> dict[str, Any]:
    """{"question", "options": [text...], "answer": index} from a MedQA- or MedMCQA-style row."""
    if "options" in row:
        opts = row["options"]
        keys = sorted(opts) if isinstance(opts, dict) else list(LETTERS[: len(opts)])
        texts = [str(opts[k]) for k in keys] if isinstance(opts, dict) else [str(o) for o in opts]
        answer = str(row.get("answer_idx") or row.get("answer") or "").strip()
        if answer.upper() in keys:
            index = keys.index(answer.upper())
        elif answer in texts:
            index = texts.index(answer)
        else:
            raise DataError(f"multiple-choice row {row.get('question', '')[:40]!r}: answer {answer!r} is neither an "
                            "option letter nor an option text; fix `answer_idx`/`answer`")
    else:
        texts = [str(row[k]) for k in MEDMCQA_OPTIONS]
        index = int(row["cop"])
        if not 0 <= index < len(texts):
            raise DataError(f"multiple-choice row: cop={index} is not 0-3 (MedMCQA's 0-based option index)")
    return {"question": str(row["question"]).strip(), "options": texts, "answer": index}


def load_mcq_file(path: Path, limit: int) -> list[dict[str, Any]]:
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read multiple-choice file {path} ({exc}); give a JSONL file, one question per line") from None
    if rows and not has_mcq_columns(list(rows[0])):
        raise DataError(f"{path}: rows need question + options + answer_idx (MedQA) or opa..opd + cop (MedMCQA)")
    return [normalize(r) for r in rows[:limit]]


def prompt_for(item: dict[str, Any]) -> list[dict[str, str]]:
    lines = [item["question"], ""] + [f"{LETTERS[i]}. {text}" for i, text in enumerate(item["options"])]
    lines += ["", "Answer with the letter and the text of the correct option."]
    return [{"role": "user", "content": "\n".join(lines)}]


@torch.no_grad()
def option_logprobs(model: Any, tokenizer: Any, item: dict[str, Any], device: str) -> list[float]:
    """Summed log-probability of each option's tokens after the question (one padded batch)."""
    prompt = tokenizer.apply_chat_template(prompt_for(item), tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    answers = [tokenizer(f"{LETTERS[i]}. {t}", add_special_tokens=False).input_ids for i, t in enumerate(item["options"])]
    width = len(prompt_ids) + max(len(a) for a in answers)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(answers), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, answer in enumerate(answers):
        seq = prompt_ids + answer
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    scores = []
    for row, answer in enumerate(answers):
        start = len(prompt_ids)
        targets = torch.tensor(answer, device=logprobs.device)
        picked = logprobs[row, start - 1 : start - 1 + len(answer)].gather(1, targets[:, None])
        scores.append(picked.sum().item())
    return scores


def score(model: Any, tokenizer: Any, items: list[dict[str, Any]], device: str) -> dict[str, Any]:
    """Accuracy (sum log-prob) and length-normalised accuracy, with each prediction."""
    correct = correct_norm = 0
    predictions = []
    for item in items:
        scores = option_logprobs(model, tokenizer, item, device)
        per_char = [s / max(1, len(f"{LETTERS[i]}. {t}")) for i, (s, t) in enumerate(zip(scores, item["options"]))]
        pick, pick_norm = _argmax(scores), _argmax(per_char)
        correct += pick == item["answer"]
        correct_norm += pick_norm == item["answer"]
        predictions.append(LETTERS[pick_norm])
    n = max(1, len(items))
    return {"accuracy": correct / n, "accuracy_norm": correct_norm / n, "predictions": predictions}


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)
