"""Chat templates: the model's own, a documented fallback per family, and a check of pre-rendered prompts.

Rendering uses the tokenizer's `chat_template` (what vLLM applies when serving). A tokenizer without
one gets its family's template, written here from each family's published format:

- Llama 3: `<|begin_of_text|>` then per message `<|start_header_id|>ROLE<|end_header_id|>\\n\\n` +
  trimmed content + `<|eot_id|>`; the generation prompt is the assistant header.
- Llama 2: `<s>[INST] ` (+ `<<SYS>>\\nSYSTEM\\n<</SYS>>\\n\\n` on the first turn) + user + ` [/INST]`,
  then ` ` + answer + ` </s>`.
- Mistral (Instruct v0.1/v0.2): `<s>` then `[INST] ` + user + ` [/INST]` and answer + `</s>`; no
  system role, so a system message is put before the first user message, separated by a blank line.
- Gemma: `<bos>` then `<start_of_turn>ROLE\\n` + trimmed content + `<end_of_turn>\\n` with the
  assistant's role called `model`; no system role (folded into the first user turn as for Mistral).

The family is told by the tokenizer's special tokens (Llama 3, Gemma) or the model's `model_type`.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from pathlib import Path
from typing import Any

from medtune.errors import DataError

log = logging.getLogger("medtune.data")

_FOLD_SYSTEM = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = [{'role': messages[1]['role'], 'content': messages[0]['content'] + '\\n\\n' + "
    "messages[1]['content']}] + messages[2:] %}{% else %}{% set loop_messages = messages %}{% endif %}"
)

FAMILY_TEMPLATES = {
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + content | trim + ' ' + eos_token }}{% endif %}{% endfor %}"
    ),
    "mistral": (
        _FOLD_SYSTEM + "{{ bos_token }}{% for message in loop_messages %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    "gemma": (
        _FOLD_SYSTEM + "{{ bos_token }}{% for message in loop_messages %}"
        "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
        "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
}


def model_family(tokenizer: Any, model_path: str | None) -> str | None:
    vocab = tokenizer.get_vocab()
    if "<|start_header_id|>" in vocab:
        return "llama3"
    if "<start_of_turn>" in vocab:
        return "gemma"
    model_type = ""
    if model_path and (Path(model_path) / "config.json").is_file():
        model_type = json.loads((Path(model_path) / "config.json").read_text()).get("model_type", "")
    if model_type in ("mistral", "mixtral"):
        return "mistral"
    if model_type == "llama" and tokenizer.bos_token == "<s>":
        return "llama2"
    return None


def template_source(tokenizer: Any, model_path: str | None) -> str | None:
    """"model" when the tokenizer has a chat template, else its family with a fallback, else None."""
    return "model" if getattr(tokenizer, "chat_template", None) else model_family(tokenizer, model_path)


def ensure_chat_template(tokenizer: Any, model_path: str | None) -> str:
    """Give a template-less tokenizer its family's template; return what is used (for the report)."""
    family = template_source(tokenizer, model_path)
    if family == "model":
        return "model"
    if family is None:
        raise DataError("the base model's tokenizer has no chat template and its family is not one medtune knows "
                        "(Llama 2/3, Mistral, Gemma); use a chat/instruct model or dataset.row_format=prompt")
    tokenizer.chat_template = FAMILY_TEMPLATES[family]
    log.warning("data: the tokenizer has no chat template; using medtune's %s fallback template", family)
    return f"fallback:{family}"


# --- pre-rendered prompt columns -----------------------------------------------------------------

def known_problems(text: str, tokenizer: Any) -> list[str]:
    """Template faults seen in published medical datasets, named so the user recognises them."""
    problems = []
    if "[s]" in text or "[/s]" in text:
        problems.append("`[s]`/`[/s]` where the model's BOS/EOS tokens `<s>`/`</s>` belong")
    if "\\n" in text:
        problems.append("a literal backslash-n (`\\n`) where a newline belongs")
    bos = tokenizer.bos_token
    if bos and text.startswith(bos + bos) or (bos and text.startswith(bos + " " + bos)):
        problems.append(f"a doubled BOS ({bos}{bos})")
    if "<|end_header_id|> " in text:
        problems.append("a space after `<|end_header_id|>` where Llama 3 puts `\\n\\n`")
    return problems


_PIECE = re.compile(r"<[^<>\s]{1,40}>|\[/?[A-Za-z]{1,10}\]|\\n|\s+|\w+|[^\w\s]")


def _pieces(text: str) -> list[str]:
    """Special tokens, `[INST]`-style markers, literal `\\n`, words, spaces, punctuation: diff units."""
    return _PIECE.findall(text)


def prompt_diff(dataset_text: str, template_text: str, hunks: int = 3) -> str:
    """The first differing spans of one example, as `dataset 'x' vs template 'y'` with context."""
    a, b = _pieces(dataset_text), _pieces(template_text)
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    parts = []
    for tag, a0, a1, b0, b1 in matcher.get_opcodes():
        if tag == "equal":
            continue
        context = "".join(a[max(0, a0 - 3):a0])[-24:]
        parts.append(f"after {context!r}: dataset {''.join(a[a0:a1])!r} vs template {''.join(b[b0:b1])!r}")
        if len(parts) == hunks:
            break
    return "; ".join(parts)


def check_prompt_column(row: dict[str, Any], prompt_field: str, tokenizer: Any, messages: list[dict[str, str]] | None,
                        rerender: bool) -> dict[str, Any] | None:
    """Compare one pre-rendered prompt with the model's template rendering of the same row.

    Returns a report entry (None when they agree); logs a warning when the prompt column is trained as is.
    """
    text = str(row[prompt_field])
    problems = known_problems(text, tokenizer)
    diff = ""
    if messages is not None:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        if rendered == text:
            return None
        diff = prompt_diff(text, rendered)
    if not problems and not diff:
        return None
    entry = {"problems": problems, "diff": diff, "rerendered": rerender}
    if not rerender:
        fix = ("set dataset.rerender_prompts=true to render instruction/input/output with the model's template"
               if messages is not None else "fix the prompt column or provide instruction/output columns")
        log.warning("data: the %r column disagrees with the model's chat template: %s%s; %s", prompt_field,
                    "; ".join(problems) + ("; " if problems and diff else ""), diff, fix)
    else:
        log.info("data: %r column disagrees with the model's template (%s); re-rendered from instruction/input/output",
                 prompt_field, "; ".join(problems) or diff[:120])
    return entry
