"""The output layer and the loss computed only at the positions that are trained on.

medtune trains on the answer only by default (`dataset.train_on_prompt: false`): a prompt's positions carry
label -100 and add nothing to the loss or to any gradient, yet a causal LM's forward computes the output
layer (hidden x vocabulary: 4,096 x 128,256 for Llama 3; 576 x 49,152 for the embedded SmolLM2) and the
cross-entropy at every position, and their backward too. `LossPositions` wraps the collator so that each
micro batch also carries
  `logits_to_keep`  the positions whose next token is trained on (in any row of the batch), an index tensor
                    that transformers' causal LMs and Liger's fused forward take to slice the hidden states
                    before the output layer;
  `shift_labels`    the labels shifted by one, at those positions: the loss reads them instead of shifting
                    `labels` itself (transformers' `ForCausalLMLoss`, Liger's `LigerForCausalLMLoss`).
The loss and every gradient are those of the whole batch: the positions left out had no loss. `labels` stays
in the batch, so the Trainer's count of trained tokens (`num_items_in_batch`) is the same. On the medical
rows with Llama 3's layout 18 % of the tokens are prompt (475 rows of ../shared's medical sample: 87,357 of
106,777 tokens trained); on the bundled demo data 31 %.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

from medtune.data.render import IGNORE


def supported(causal_lm: Any) -> bool:
    """The causal LM's forward (under PEFT: its base model's) takes `logits_to_keep` and passes other keywords
    (`shift_labels`) on to its loss, as transformers' causal LMs do; remote code may not."""
    params = inspect.signature(causal_lm.forward).parameters
    return "logits_to_keep" in params and any(p.kind is p.VAR_KEYWORD for p in params.values())


def with_loss_positions(batch: dict[str, Any]) -> dict[str, Any]:
    """`batch` plus `logits_to_keep` and `shift_labels` (see the module's docstring); unchanged when it has no
    labels or only its last position (which predicts nothing) would be left out."""
    labels = batch.get("labels")
    if labels is None:
        return batch
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # position t predicts token t + 1
    keep = torch.nonzero((shifted != IGNORE).any(dim=0)).reshape(-1)
    if keep.numel() >= shifted.shape[1] - 1:
        return batch
    if keep.numel() == 0:  # nothing trained in this micro batch: one position, its label ignored (loss 0 as before)
        keep = keep.new_zeros(1)
    return {**batch, "logits_to_keep": keep, "shift_labels": shifted[:, keep]}


class LossPositions:
    """A collator whose batches carry the loss positions (`with_loss_positions`)."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        return with_loss_positions(self.collator(features))
