"""CUDA-graph replay of decoder layers: the parts that decide when a micro batch may replay, and the
padding that makes a token bin the captured shape (the capture itself needs a GPU: bench/profile_levers.py)."""

from __future__ import annotations

import pytest
import torch

from medtune import layer_graphs


def _packed(lengths: list[int]) -> dict:
    ids = torch.arange(1, sum(lengths) + 1).unsqueeze(0)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0),
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lengths), "max_length_k": max(lengths)}


def test_padding_fills_the_bin_with_label_free_examples_no_longer_than_max_len():
    batch = layer_graphs.pad_packed(_packed([5, 3]), tokens=30, max_len=10, pad_id=0)
    assert batch["input_ids"].shape == (1, 30) and batch["labels"].shape == (1, 30)
    assert batch["cu_seq_lens_q"].tolist() == [0, 5, 8, 18, 28, 30]
    assert batch["cu_seq_lens_k"] is batch["cu_seq_lens_q"]
    assert batch["labels"][0, 8:].eq(-100).all() and batch["labels"][0, :8].tolist() == list(range(1, 9))
    assert batch["input_ids"][0, 8:].eq(0).all()
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, *range(10), *range(10), 0, 1]
    assert batch["max_length_q"] == batch["max_length_k"] == 10


def test_a_full_bin_is_left_as_it_is():
    batch = _packed([6, 4])
    assert layer_graphs.pad_packed(batch, tokens=10, max_len=8, pad_id=0) is batch


def test_boundaries_grow_by_empty_examples():
    cu = torch.tensor([0, 5, 9], dtype=torch.int32)
    assert layer_graphs.pad_boundaries(cu, 6).tolist() == [0, 5, 9, 9, 9, 9]
    assert layer_graphs.pad_boundaries(cu, 3).tolist() == [0, 5, 9]


class _Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lora = torch.nn.Parameter(torch.ones(3))
        self.frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)

    def forward(self, hidden, **kwargs):
        return hidden + 1


def _wrapper():
    graphed = lambda *a: ("graph", a)  # noqa: E731 - stands in for the captured callable
    layer = _Layer().train()
    layer.forward = layer_graphs.GraphedLayer(layer, graphed, tokens=8, slots=4, max_len=6)
    return layer


@pytest.mark.parametrize("change", ["shape", "no_grad", "eval", "too_many_examples", "longer", "mask", "no_cu"])
def test_anything_but_the_captured_shape_runs_the_layer_eagerly(change):
    layer = _wrapper()
    hidden = torch.zeros(1, 8, 4, requires_grad=True)
    rope = (torch.zeros(1, 8, 2), torch.zeros(1, 8, 2))
    kwargs = {"position_embeddings": rope, "cu_seq_lens_q": torch.tensor([0, 3, 8]), "max_length_q": 5}
    assert layer(hidden, **kwargs)[0] == "graph"
    if change == "shape":
        hidden = torch.zeros(1, 7, 4, requires_grad=True)
    elif change == "eval":
        layer.eval()  # the module's own mode decides
    elif change == "too_many_examples":
        kwargs["cu_seq_lens_q"] = torch.tensor([0, 1, 2, 3, 8])
    elif change == "longer":
        kwargs["max_length_q"] = 7
    elif change == "mask":
        kwargs["attention_mask"] = torch.ones(1, 8)
    elif change == "no_cu":
        del kwargs["cu_seq_lens_q"]
    with torch.set_grad_enabled(change != "no_grad"):
        out = layer(hidden, **kwargs)
    assert isinstance(out, torch.Tensor) and out.shape == hidden.shape


def test_the_replay_gets_padded_boundaries_and_the_rotary_tables():
    layer = _wrapper()
    hidden = torch.zeros(1, 8, 4, requires_grad=True)
    cos, sin = torch.ones(1, 8, 2), torch.zeros(1, 8, 2)
    tag, args = layer(hidden, position_embeddings=(cos, sin), cu_seq_lens_q=torch.tensor([0, 8]), max_length_q=6)
    assert tag == "graph" and args[0] is hidden and args[1] is cos and args[2] is sin
    assert args[3].tolist() == [0, 8, 8, 8] and args[3].dtype == torch.int32


def test_a_replay_gives_trained_parameters_a_gradient_to_add_into():
    """Autograd would otherwise move the graph's static gradient buffer into an empty .grad, and the next
    replay of a gradient accumulation would overwrite it."""
    layer = _wrapper()
    hidden = torch.zeros(1, 8, 4, requires_grad=True)
    layer(hidden, position_embeddings=(hidden, hidden), cu_seq_lens_q=torch.tensor([0, 8]), max_length_q=6)
    assert layer.lora.grad is not None and layer.lora.grad.eq(0).all()
    assert layer.frozen.grad is None


def test_the_captured_function_computes_what_the_layer_computes():
    """What `capture` hands to make_graphed_callables (each layer as a function of hidden states, rotary
    tables and boundaries), wired in by GraphedLayer, gives the model's own logits and gradients; run
    eagerly here, since capturing needs a GPU."""
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # an attention without a mask function, as medtune_varlen (which needs CUDA): no mask is built
    AttentionInterface.register("test_maskless", lambda *a, **k: sdpa_attention_forward(*a, **k))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).train()
    model.set_attn_implementation("test_maskless")
    batch = layer_graphs.pad_packed(_packed([5, 7]), tokens=16, max_len=8, pad_id=0)
    batch["input_ids"] = batch["input_ids"] % 97
    expected = model(**batch).logits
    expected.sum().backward()
    grads = [p.grad.clone() for p in model.model.layers.parameters()]
    model.zero_grad(set_to_none=True)
    layers = model.model.layers
    names = [n for n, _ in model.named_parameters()]
    replays = []
    for layer in layers:
        call = layer_graphs._Call(layer, 8)
        layer.forward = layer_graphs.GraphedLayer(layer, lambda *a, call=call: replays.append(a[3]) or call(*a),
                                                  tokens=16, slots=8, max_len=8)
    got = model(**batch).logits
    assert len(replays) == 2 and replays[0].tolist() == [0, 5, 12, 16, 16, 16, 16, 16]
    got.sum().backward()
    torch.testing.assert_close(got, expected)
    for g, p in zip(grads, layers.parameters()):
        torch.testing.assert_close(p.grad, g)
    # the module tree is untouched: checkpoints and adapter files keep their parameter names
    assert [n for n, _ in model.named_parameters()] == names
    assert layer_graphs.release(model) == 2 and "forward" not in vars(layers[0])


def test_graphs_run_where_they_apply_and_true_elsewhere_is_one_clear_error():
    from medtune.errors import ConfigError

    assert layer_graphs.wanted("auto", "cuda", 1, recompute=False)
    assert not layer_graphs.wanted("auto", "cuda", 2, recompute=False)
    assert not layer_graphs.wanted("auto", "cuda", 1, recompute=True)
    assert not layer_graphs.wanted("auto", "cpu", 1, recompute=False)
    assert not layer_graphs.wanted(False, "cuda", 1, recompute=False)
    assert layer_graphs.wanted(True, "cuda", 1, recompute=False)
    with pytest.raises(ConfigError, match="set training.cuda_graphs=auto or false"):
        layer_graphs.wanted(True, "cuda", 1, recompute=True)


def test_slots_hold_the_rows_the_padding_and_the_end():
    assert layer_graphs.slots_for(30, 8192, 2048) == 40  # 30 rows + 4 padding examples + end = 35 -> 40
    assert layer_graphs.slots_for(1, 2048, 2048) == 8


def test_the_bin_collator_pads_bins_and_reports_their_real_tokens():
    from datasets import Dataset
    from transformers import DataCollatorWithFlattening

    from medtune import token_bins

    rows = Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5, 6, 7, 8]], "labels": [[1, 2, 3], [4, 5, 6, 7, 8]]})
    packing = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100, return_flash_attn_kwargs=True)
    collate = token_bins.BinCollator(rows, packing, pad_to=(16, 6, 0))
    batch = collate([{token_bins.BIN_ROWS: [0, 1]}])
    assert batch[layer_graphs.REAL_TOKENS] == 8 and batch["input_ids"].shape == (1, 16)
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 8, 14, 16]
    assert batch["labels"][0, 8:].eq(-100).all()
    plain = token_bins.BinCollator(rows, packing)([{token_bins.BIN_ROWS: [0, 1]}])
    assert layer_graphs.REAL_TOKENS not in plain and plain["input_ids"].shape == (1, 8)


def test_the_trainer_counts_the_real_tokens_of_a_padded_micro_batch():
    from transformers import TrainerState

    from medtune.train import LeanTrainer

    trainer = LeanTrainer.__new__(LeanTrainer)
    trainer.state = TrainerState()
    trainer.real_tokens = 8
    trainer._track_num_input_tokens({"input_ids": torch.zeros(1, 16), "position_ids": torch.zeros(1, 16)})
    assert trainer.state.num_input_tokens_seen == 8
