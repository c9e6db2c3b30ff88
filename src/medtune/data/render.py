"""Turning rows into training examples: chat-template rendering, label masking, truncation.

The prompt and the answer are rendered with the model's own chat template (the one vLLM applies
when serving) and tokenized without adding special tokens, because the template already carries
them: tokenizing a Llama 3 rendering with `add_special_tokens=True` doubles `<|begin_of_text|>`.
Labels cover the answer and its end-of-turn token, so the tuned model learns to stop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from medtune.chat import stop_token_ids
from medtune.config import DatasetConfig
from medtune.errors import DataError

log = logging.getLogger("medtune.data")

IGNORE = -100
ALPACA_COLUMNS = ("instruction", "output")


def detect_format(columns: list[str], cfg: DatasetConfig) -> str:
    """Which row shape to use; `auto` prefers a pre-rendered prompt unless re-rendering is asked for."""
    can_alpaca = all(c in columns for c in ALPACA_COLUMNS)
    if cfg.row_format != "auto":
        needed = {"prompt": [cfg.prompt_field], "alpaca": list(ALPACA_COLUMNS), "messages": ["messages"]}[cfg.row_format]
        _require(columns, needed, f"dataset.row_format={cfg.row_format}")
        return cfg.row_format
    if cfg.rerender_prompts and can_alpaca:
        return "alpaca"
    if cfg.prompt_field in columns:
        return "prompt"
    if "messages" in columns:
        return "messages"
    if can_alpaca:
        return "alpaca"
    import difflib

    close = difflib.get_close_matches(cfg.prompt_field, columns, n=1)
    hint = f" (closest: {close[0]!r} — set dataset.prompt_field={close[0]})" if close else ""
    raise DataError(
        f"dataset has none of: prompt column {cfg.prompt_field!r}, `messages`, instruction/output; "
        f"columns are {', '.join(columns)}{hint}"
    )


def _require(columns: list[str], needed: list[str], why: str) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError(f"{why} needs column(s) {', '.join(missing)}; the dataset has {', '.join(columns)}")


def to_messages(row: dict[str, Any], fmt: str, system_prompt: str) -> list[dict[str, str]]:
    """The conversation for a row (alpaca or messages shape), answer last."""
    if fmt == "messages":
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    else:
        question = str(row["instruction"]).strip()
        extra = str(row.get("input") or "").strip()
        user = f"{question}\n\n{extra}" if extra else question
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": str(row["output"]).strip()}]
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


@dataclass
class Tokenized:
    input_ids: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0


def tokenize_rows(rows: Any, fmt: str, tokenizer: Any, cfg: DatasetConfig, max_len: int) -> Tokenized:
    out = Tokenized()
    stops = set(stop_token_ids(tokenizer))
    for row in rows:
        if fmt == "prompt":
            prompt_ids: list[int] = []
            answer_ids = _encode(tokenizer, str(row[cfg.prompt_field]), add_bos=True)
        else:
            prompt_text, answer_text = render_pair(tokenizer, to_messages(row, fmt, cfg.system_prompt))
            prompt_ids = _encode(tokenizer, prompt_text, add_bos=False)
            answer_ids = _encode(tokenizer, answer_text, add_bos=False)
        if not any(t in stops for t in answer_ids[-3:]):
            answer_ids.append(tokenizer.eos_token_id)
        if len(prompt_ids) >= max_len - 8:
            out.dropped += 1
            continue
        ids = prompt_ids + answer_ids
        mask_prompt = not cfg.train_on_prompt
        labels = ([IGNORE] * len(prompt_ids) if mask_prompt else list(prompt_ids)) + list(answer_ids)
        if len(ids) > max_len:
            out.truncated += 1
            ids, labels = ids[:max_len], labels[:max_len]
        out.input_ids.append(ids)
        out.labels.append(labels)
    return out


def render_pair(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, str]:
    """(prompt incl. the assistant header, answer incl. end-of-turn) as the chat template renders them."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the base model's tokenizer has no chat template; use a chat/instruct model or dataset.row_format=prompt"
        )
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    if not full.startswith(prompt):
        raise DataError("the chat template renders the prompt differently with and without the answer; "
                        "use dataset.row_format=prompt with a pre-rendered column")
    return prompt, full[len(prompt):]


def _encode(tokenizer: Any, text: str, add_bos: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=add_bos)["input_ids"]
    bos = tokenizer.bos_token_id
    if add_bos and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]  # the text already started with BOS and the tokenizer added another
    return ids
