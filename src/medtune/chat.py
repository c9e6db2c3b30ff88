"""Facts about a tokenizer's chat format that several stages need."""

from __future__ import annotations

from typing import Any

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "</s>")


def stop_token_ids(tokenizer: Any) -> list[int]:
    """eos plus the template's end-of-turn tokens (Llama 3 `<|eot_id|>`, Gemma `<end_of_turn>`, ChatML)."""
    ids = {tokenizer.eos_token_id}
    for token in END_OF_TURN_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    ids.discard(None)
    return sorted(ids)
