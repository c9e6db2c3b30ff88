"""The output layer and the loss only where labels are trained on (`medtune.loss_positions`): the same loss and
gradients as the whole batch, with the output layer fed fewer positions, packed and padded, through PEFT."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, DataCollatorWithFlattening

from medtune import loss_positions
from medtune.loss_positions import LossPositions, with_loss_positions
from tests_support import qa_examples

X = -100


def test_positions_are_those_whose_next_token_is_trained():
    packed = {"input_ids": torch.arange(8).reshape(1, 8), "labels": torch.tensor([[X, X, 5, 6, X, X, 7, 8]])}
    out = with_loss_positions(packed)
    assert out["logits_to_keep"].tolist() == [1, 2, 5, 6]  # the last token of each example predicts nothing
    assert out["shift_labels"].tolist() == [[5, 6, 7, 8]] and out["labels"] is packed["labels"]
    # padded rows: a position is kept where any row trains on the next token; the others' labels stay ignored
    padded = {"labels": torch.tensor([[X, X, 3, 4, X, X], [X, X, X, X, 9, X]])}
    out = with_loss_positions(padded)
    assert out["logits_to_keep"].tolist() == [1, 2, 3] and out["shift_labels"].tolist() == [[3, 4, X], [X, X, 9]]


def test_batches_without_anything_to_leave_out_or_to_train_on():
    every = {"labels": torch.tensor([[1, 2, 3]])}  # every position but the last predicts a trained token
    assert with_loss_positions(every) is every
    assert with_loss_positions({"input_ids": torch.zeros(1, 3)}).keys() == {"input_ids"}
    nothing = with_loss_positions({"labels": torch.full((1, 4), X)})  # all prompt (truncated answers)
    assert nothing["logits_to_keep"].tolist() == [0] and nothing["shift_labels"].tolist() == [[X]]


def loss_grads_and_rows(model_dir, batch):
    """Loss, the adapters' gradients and how many positions reached the output layer."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero B, so that every adapter's A gets a gradient too
            torch.nn.init.normal_(p, std=0.02)
    rows: list[int] = []
    model.get_base_model().lm_head.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[:-1].numel()))
    assert loss_positions.supported(model.get_base_model())
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, rows[0]


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_the_same_loss_and_gradients_with_the_output_layer_on_trained_positions_only(tiny_model_dir, packed):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    collate = (DataCollatorWithFlattening(return_position_ids=True, separator_id=X) if packed else
               DataCollatorForSeq2Seq(tok, label_pad_token_id=X))
    whole = collate([dict(f) for f in qa_examples(tok)])
    trimmed = LossPositions(collate)([dict(f) for f in qa_examples(tok)])
    loss, grads, rows = loss_grads_and_rows(tiny_model_dir, whole)
    loss_kept, grads_kept, rows_kept = loss_grads_and_rows(tiny_model_dir, trimmed)
    trained = int((whole["labels"] != X).sum())
    assert rows == whole["input_ids"].numel() and rows_kept < rows
    if packed:  # exactly the trained positions: one per trained label
        assert rows_kept == trained
    assert abs(loss - loss_kept) < 1e-6, (loss, loss_kept)
    assert grads.keys() == grads_kept.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads_kept[name], grads[name], atol=1e-7, rtol=1e-5, msg=name)


def test_a_forward_without_logits_to_keep_is_left_as_it_is():
    class Remote(torch.nn.Module):  # remote code with its own signature
        def forward(self, input_ids, labels=None):
            return input_ids

    class Keeps(torch.nn.Module):
        def forward(self, input_ids, labels=None, logits_to_keep=0, **kwargs):
            return input_ids

    assert not loss_positions.supported(Remote()) and loss_positions.supported(Keeps())
