"""The fused LoRA forward computes what PEFT's forward computes: outputs and adapter gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from medtune import fast_lora, fp8_base


def _lora_model(dropout: float):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(
        r=8, lora_alpha=16, lora_dropout=dropout, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():  # lora_B starts at zero: give the update a value so it is actually compared
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def _loss_and_grads(model, ids, seed: int):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks on both paths
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads


@pytest.mark.parametrize("backward,keep_mask", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_paths_match_peft(dropout, backward, keep_mask):
    """The fused forward, and with `install(backward=True)` one autograd node per projection (its dropout
    mask replayed, or with `keep_mask` kept): logits, loss and every adapter gradient as PEFT's (float32;
    the dropout masks drawn from the same generator state)."""
    peft_model = _lora_model(dropout)
    fused = copy.deepcopy(peft_model)
    assert fast_lora.install(fused, backward=backward, keep_mask=keep_mask) == 7 * 2
    q_proj = fused.get_base_model().model.layers[0].self_attn.q_proj
    assert q_proj.forward.__func__ is (fast_lora.fused_forward_backward if backward else fast_lora.fused_forward)
    peft_model.train(), fused.train()
    _assert_same_training_step(peft_model, fused, torch.randint(0, 97, (2, 24)), seed=3)


def _assert_same_training_step(reference, model, ids, seed: int) -> None:
    """Logits, loss and every adapter gradient (all nonzero) as the reference's, the same dropout masks."""
    logits_a, loss_a, grads_a = _loss_and_grads(reference, ids, seed=seed)
    logits_b, loss_b, grads_b = _loss_and_grads(model, ids, seed=seed)
    torch.testing.assert_close(logits_b, logits_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=0)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 2 * 7 * 2
    for name in grads_a:
        assert grads_a[name].abs().sum() > 0, name
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_other_states_take_peft_forward():
    """Disabled adapters and merged weights are PEFT's business: the swap must not alter them."""
    model = _lora_model(0.0)
    fast_lora.install(model)
    model.eval()
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert not torch.allclose(tuned, base)
    plain = _lora_model(0.0)
    plain.eval()
    with torch.no_grad(), plain.disable_adapter():
        torch.testing.assert_close(base, plain(input_ids=ids).logits)
    model.merge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, tuned, rtol=1e-5, atol=1e-5)


def _four_bit_lora_model(dropout: float):
    """The tiny model with its projections in bitsandbytes nf4 (double quant, bf16 compute), as QLoRA loads it."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if isinstance(linear, torch.nn.Linear):
                    quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                                  compute_dtype=torch.bfloat16, compress_statistics=True,
                                                  quant_type="nf4")
                    quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False,
                                                         compress_statistics=True, quant_type="nf4").to("cpu")
                    setattr(parent, name, quantized)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def test_fused_backward_on_a_4bit_base_matches_peft():
    """The same on an nf4 base in bfloat16 under autocast, as QLoRA trains: the base's input gradient goes
    through bitsandbytes' dequantize, the LoRA branch is added in place (one rounding instead of two)."""
    peft_model = _four_bit_lora_model(0.1)
    fused = copy.deepcopy(peft_model)
    fast_lora.install(fused, backward=True)
    peft_model.train(), fused.train()
    ids = torch.randint(0, 97, (2, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits_a, loss_a, grads_a = _loss_and_grads(peft_model, ids, seed=5)
        logits_b, loss_b, grads_b = _loss_and_grads(fused, ids, seed=5)
    torch.testing.assert_close(logits_b, logits_a, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-3, atol=0)
    for name in grads_a:
        assert grads_a[name].abs().sum() > 0, name
        cos = torch.nn.functional.cosine_similarity(grads_b[name].flatten(), grads_a[name].flatten(), dim=0)
        assert cos > 0.999, (name, float(cos))


@pytest.mark.parametrize("four_bit", [False, True], ids=["bf16 base", "nf4 base"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_accumulating_into_the_base_gemm_matches_peft(monkeypatch, four_bit, dropout):
    """`ACCUMULATE_IN_BASE` (the default path): the adapter's part is computed first and the base's
    GEMMs add into it, forward and backward. In bf16, as PEFT in bf16: logits, loss, and every adapter gradient
    pointing the same way (the lean MLP's down projection included), on a plain bf16 base and on nf4."""
    monkeypatch.setattr(fast_lora, "ACCUMULATE_IN_BASE", True)
    taken = []
    decide = fast_lora.accumulates
    monkeypatch.setattr(fast_lora, "accumulates", lambda *a: taken.append(decide(*a)) or taken[-1])
    if four_bit:
        peft_model = _four_bit_lora_model(dropout)
    else:
        peft_model = _lora_model(dropout).to(torch.bfloat16)
    fused = copy.deepcopy(peft_model)
    fast_lora.install(fused, backward=True)
    from medtune import lean_mlp

    assert lean_mlp.install(fused) == 2
    peft_model.train(), fused.train()
    ids = torch.randint(0, 97, (2, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits_a, loss_a, grads_a = _loss_and_grads(peft_model, ids, seed=5)
        logits_b, loss_b, grads_b = _loss_and_grads(fused, ids, seed=5)
    assert taken and all(taken)  # every projection took the accumulating path
    torch.testing.assert_close(logits_b.float(), logits_a.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(loss_b.float(), loss_a.float(), rtol=2e-3, atol=0)
    for name in grads_a:
        assert grads_a[name].abs().sum() > 0, name
        cos = torch.nn.functional.cosine_similarity(grads_b[name].float().flatten(), grads_a[name].float().flatten(),
                                                    dim=0)
        assert cos > 0.999, (name, float(cos))


def test_the_accumulating_path_applies_only_where_the_base_computes_the_same():
    import bitsandbytes as bnb

    plain = torch.nn.Linear(8, 4, bias=False).to(torch.bfloat16)
    x16, x32 = torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(3, 8)
    fast_lora.ACCUMULATE_IN_BASE = False
    try:
        assert not fast_lora.accumulates(x16, plain, False)  # switched off
        fast_lora.ACCUMULATE_IN_BASE = True
        assert fast_lora.accumulates(x16, plain, False)
        assert not fast_lora.accumulates(x32, plain, False)  # float32 activations: the base's own call
        assert not fast_lora.accumulates(x16, plain, True)  # float8 GEMMs
        assert not fast_lora.accumulates(x16, torch.nn.Linear(8, 4).to(torch.bfloat16), False)  # a bias
        with torch.autocast("cpu", dtype=torch.float16):
            assert not fast_lora.accumulates(x16, plain, False)  # autocast would compute in another dtype
        nf4 = bnb.nn.Linear4bit(8, 4, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        assert not fast_lora.accumulates(x16, nf4, False)  # computes in float32
    finally:
        fast_lora.ACCUMULATE_IN_BASE = True


@pytest.mark.parametrize("backward", [False, True])
def test_fp8_base_gemms_stay_close_to_the_bf16_path_on_an_nf4_base(backward):
    """The float8 lever (`install(fp8_base=True)`, in the fused forward and in the fused backward): both
    GEMMs of each nf4 projection in e4m3 with row-wise scales. Not bit-equal, but the loss within 1 % and
    every adapter gradient pointing the same way."""
    bf16 = _four_bit_lora_model(0.0)
    fp8 = copy.deepcopy(bf16)
    fast_lora.install(bf16, backward=backward)
    fast_lora.install(fp8, backward=backward, fp8_base=True)
    q_proj = fp8.get_base_model().model.layers[0].self_attn.q_proj
    assert q_proj.fp8_base and not bf16.get_base_model().model.layers[0].self_attn.q_proj.fp8_base
    bf16.train(), fp8.train()
    ids = torch.randint(0, 97, (2, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss_a, grads_a = _loss_and_grads(bf16, ids, seed=5)
        _, loss_b, grads_b = _loss_and_grads(fp8, ids, seed=5)
    assert loss_b != loss_a  # the float8 path really ran
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-2, atol=0)
    for name in grads_a:
        cos = torch.nn.functional.cosine_similarity(grads_b[name].float().flatten(), grads_a[name].float().flatten(), dim=0)
        assert cos > 0.98, (name, float(cos))


@pytest.mark.parametrize("accumulate", [False, True])
def test_fp8_in_the_backward_only_keeps_the_forward_and_the_loss_bf16(monkeypatch, accumulate):
    """`install(fp8_base="backward")`: the forward (and so the loss) is the bf16 path's to the bit, its base GEMM
    accumulating into the adapter's part as the bf16 path's does (`accumulate`); only the input-gradient GEMMs
    run in float8 (never accumulating), so the adapter gradients stay close (cosine > 0.98)."""
    monkeypatch.setattr(fast_lora, "ACCUMULATE_IN_BASE", accumulate)
    bf16 = _four_bit_lora_model(0.0)
    fp8 = copy.deepcopy(bf16)
    fast_lora.install(bf16, backward=True)
    fast_lora.install(fp8, backward=True, fp8_base="backward")
    assert fp8.get_base_model().model.layers[0].self_attn.q_proj.fp8_base == "backward"
    bf16.train(), fp8.train()
    ids = torch.randint(0, 97, (2, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits_a, loss_a, grads_a = _loss_and_grads(bf16, ids, seed=5)
        logits_b, loss_b, grads_b = _loss_and_grads(fp8, ids, seed=5)
    torch.testing.assert_close(logits_b, logits_a, rtol=0, atol=0)
    assert loss_b == loss_a
    differ = 0
    for name in grads_a:
        cos = torch.nn.functional.cosine_similarity(grads_b[name].float().flatten(), grads_a[name].float().flatten(), dim=0)
        assert cos > 0.98, (name, float(cos))
        differ += not torch.equal(grads_a[name], grads_b[name])
    assert differ  # the float8 input gradients really ran (the last layer's own gradients do not pass one)


def test_fp8_base_matches_a_float64_reference_within_float8_rounding():
    import bitsandbytes as bnb

    torch.manual_seed(1)
    base = bnb.nn.Linear4bit(64, 48, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(48, 64, dtype=torch.bfloat16), requires_grad=False,
                                    quant_type="nf4").to("cpu")
    w = fast_lora._base_weight(base, torch.float64)
    x = torch.randn(5, 7, 64, dtype=torch.bfloat16, requires_grad=True)
    y = fp8_base.Fp8Base.apply(x, base)
    g = torch.randn_like(y)
    y.backward(g)
    want_y, want_dx = x.double() @ w.t(), g.double() @ w
    # e4m3 keeps 3 mantissa bits: each product is off by a few %, the sums by less
    assert (y.double() - want_y).norm() / want_y.norm() < 0.05
    assert (x.grad.double() - want_dx.reshape(x.shape)).norm() / want_dx.norm() < 0.05
    assert y.dtype == x.grad.dtype == torch.bfloat16


def _saved_bytes(model, ids, forward_only: bool = False) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of one forward (and whatever the
    backward itself saves, unless `forward_only`)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
        if not forward_only:
            loss.backward()
    if forward_only:
        loss.backward()
    return sum(storages.values())


def test_the_fused_backward_keeps_no_dropped_copy_per_projection():
    """With dropout PEFT keeps every projection's dropped copy of its input and the mask; the fused backward
    keeps the shared input once and redraws the mask: what it keeps is what PEFT keeps without dropout."""
    peft_drop, peft_plain = _lora_model(0.1), _lora_model(0.0)
    fused = copy.deepcopy(peft_drop)
    fast_lora.install(fused, backward=True)
    ids = torch.randint(0, 97, (2, 24))
    for m in (peft_drop, peft_plain, fused):
        m.train()
    dropped, plain, lean = _saved_bytes(peft_drop, ids), _saved_bytes(peft_plain, ids), _saved_bytes(fused, ids)
    assert lean < plain < dropped, (lean, plain, dropped)


@pytest.mark.parametrize("recompute", [False, True])
def test_training_loads_the_fused_backward_and_it_matches_peft_under_recompute(tiny_model_dir, tmp_path, recompute):
    """medtune.train installs the fused forward and backward; with dropout, and with activation checkpointing
    replaying the forward (and with it the saved generator state), loss and adapter gradients are PEFT's."""
    from medtune.config_io import load_config
    from medtune.train import load_for_training

    cfg = load_config(preset="smollm2-135m-medical", env={}, overrides=[
        "model.model_source=local", f"model.local_model_path={tiny_model_dir}", f"output.output_root={tmp_path}",
        "lora.quantization=none", "lora.bf16=false", "lora.lora_dropout=0.1",
        f"lora.gradient_checkpointing={str(recompute).lower()}"])
    torch.manual_seed(0)
    fused = load_for_training(cfg, str(tiny_model_dir), "cpu").train()
    q_proj = fused.get_base_model().model.layers[0].self_attn.q_proj
    assert q_proj.forward.__func__ is fast_lora.fused_forward_backward  # not grouped on a CPU (shared_input)
    with torch.no_grad():  # lora_B starts at zero: give the update a value so the gradients differ
        for name, p in fused.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    plain = copy.deepcopy(fused)
    for module in plain.modules():
        vars(module).pop("forward", None)  # PEFT's own forward again
    ids = torch.randint(0, fused.config.vocab_size, (2, 20))
    _, loss_a, grads_a = _loss_and_grads(plain, ids, seed=7)
    _, loss_b, grads_b = _loss_and_grads(fused, ids, seed=7)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=0)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("keep_mask", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lean_mlp_matches_peft_and_keeps_gate_and_up_only(dropout, keep_mask):
    """medtune.lean_mlp: the activation and the down projection as one node that keeps gate and up and
    computes their product again: logits, loss and adapter gradients as PEFT's, and what autograd keeps
    is exactly the down projections' inputs less than with the fused backward alone."""
    from medtune import lean_mlp

    peft_model = _lora_model(dropout)
    fused = copy.deepcopy(peft_model)
    fast_lora.install(fused, backward=True, keep_mask=keep_mask)
    lean = copy.deepcopy(fused)
    assert lean_mlp.install(lean) == 2 and lean_mlp.install(lean) == 2  # idempotent
    for m in (peft_model, fused, lean):
        m.train()
    ids = torch.randint(0, 97, (2, 24))
    _assert_same_training_step(peft_model, lean, ids, seed=5)
    # per layer: the product (the down projection's input) and, kept by autograd's multiplication on
    # this CPU path (Liger's kernel keeps gate and up only), silu(gate); two layers, float32
    wide = ids.numel() * 64 * 4
    assert _saved_bytes(fused, ids, forward_only=True) - _saved_bytes(lean, ids, forward_only=True) == 2 * 2 * wide


def test_lean_mlp_needs_the_fused_backward_and_steps_aside_for_peft_states():
    from medtune import lean_mlp

    forward_only = _lora_model(0.1)
    fast_lora.install(forward_only, backward=False)
    assert lean_mlp.install(forward_only) == 0  # the fused forward alone keeps PEFT's dropped copies anyway
    lean = _lora_model(0.1)
    fast_lora.install(lean, backward=True)
    lean_mlp.install(lean)
    plain = copy.deepcopy(lean)
    ids = torch.randint(0, 97, (2, 16))
    with lean.disable_adapter():  # PEFT's own forward inside the lean MLP: the base model's output
        base_logits = lean(input_ids=ids).logits
    for module in plain.modules():
        vars(module).pop("forward", None)
    with plain.disable_adapter():
        torch.testing.assert_close(base_logits, plain(input_ids=ids).logits)
    lean.eval()
    with torch.no_grad():  # no autograd: the product and the projection, nothing kept
        torch.testing.assert_close(lean(input_ids=ids).logits, plain.eval()(input_ids=ids).logits)


def test_training_installs_the_lean_mlp_when_it_starts(tiny_model_dir, tmp_path):
    """Through the Trainer (after its Liger patches, where it has them): the callback swaps the MLPs."""
    from medtune import lean_mlp
    from medtune.config_io import load_config
    from medtune.train import load_for_training

    cfg = load_config(preset="smollm2-135m-medical", env={}, overrides=[
        "model.model_source=local", f"model.local_model_path={tiny_model_dir}", f"output.output_root={tmp_path}",
        "lora.quantization=none", "lora.bf16=false"])
    model = load_for_training(cfg, str(tiny_model_dir), "cpu")
    lean_mlp.AtTrainStart().on_train_begin(None, None, None, model=model)
    mlp = model.get_base_model().model.layers[0].mlp
    assert mlp.forward.__func__ is lean_mlp.forward and mlp.gated_act.liger is False


def test_adapter_weight_copies_live_within_one_optimizer_step():
    """`adapter_weight` reuses a 16-bit copy only between `StepCasts`' step begin and the optimizer, for the
    same tensor unchanged, in the same dtype; an update the version counter cannot see (an 8-bit optimizer
    writes through raw pointers, here `.data`) is read after the next step begins."""
    weight, bf16 = torch.randn(4, 8, requires_grad=True), torch.bfloat16
    casts = fast_lora.StepCasts()
    assert fast_lora.adapter_weight(weight, bf16) is not fast_lora.adapter_weight(weight, bf16)  # outside a step
    casts.on_step_begin(None, None, None)
    first = fast_lora.adapter_weight(weight, bf16)
    assert fast_lora.adapter_weight(weight, bf16) is first and torch.equal(first, weight.detach().to(bf16))
    assert fast_lora.adapter_weight(weight, torch.float16).dtype == torch.float16
    assert fast_lora.adapter_weight(weight, torch.float32) is weight  # no copy where none is needed
    with torch.no_grad():
        weight.mul_(2)  # in place: the version counter moves
    second = fast_lora.adapter_weight(weight, bf16)
    assert second is not first and torch.equal(second, weight.detach().to(bf16))
    casts.on_pre_optimizer_step(None, None, None)
    assert fast_lora._casts is None
    weight.data.mul_(3)
    casts.on_step_begin(None, None, None)
    assert torch.equal(fast_lora.adapter_weight(weight, bf16), weight.detach().to(bf16))
    casts.on_train_end(None, None, None)
    assert fast_lora._casts is None


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_casting_once_per_step_trains_bit_for_bit_as_casting_per_call(monkeypatch, dropout):
    """Two optimizer steps of two micro batches each (float32 adapters, bf16 activations): with the copies
    kept across the micro batches, the losses and every weight after the steps are those of a cast per call."""
    from medtune import lean_mlp

    ids = torch.randint(0, 97, (4, 2, 24), generator=torch.Generator().manual_seed(3))
    results = []
    for once in (False, True):
        monkeypatch.setattr(fast_lora, "CAST_ONCE_PER_STEP", once)
        model = _lora_model(dropout)
        fast_lora.install(model, backward=True)
        lean_mlp.install(model)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        casts, losses, kept = fast_lora.StepCasts(), [], []
        torch.manual_seed(11)
        for step in range(2):
            casts.on_step_begin(None, None, None)
            for micro in ids[2 * step:2 * step + 2]:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = model(input_ids=micro, labels=micro).loss
                loss.backward()
                losses.append(loss.detach())
            kept.append(len(fast_lora._casts))
            casts.on_pre_optimizer_step(None, None, None)
            optimizer.step()
            optimizer.zero_grad()
        assert kept == ([28, 28] if once else [0, 0])  # 2 layers x 7 projections x (A, B)
        results.append((losses, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (losses_a, weights_a), (losses_b, weights_b) = results
    assert all(torch.equal(a, b) for a, b in zip(losses_a, losses_b))
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name


def test_fp8_input_grad_applies_to_4bit_bases_on_float8_cards_only(monkeypatch):
    """`training.fp8_input_gradients` (on by default): "backward" for a layer `install` made capable (the fused
    backward, a 4-bit base without bias, the setting on), on a CUDA card with float8 GEMMs; never on the CPU or
    an Ampere card; `install`'s own fp8_base first; `FP8_INPUT_GRAD` (the bench's switch) off turns it off."""
    from types import SimpleNamespace

    cuda = SimpleNamespace(is_cuda=True, device=SimpleNamespace(index=0))
    layer = SimpleNamespace(fp8_base=False, fp8_capable=True)
    monkeypatch.setattr(fast_lora, "float8_gemms", lambda index: True)
    assert fast_lora.fp8_mode(layer, cuda) == "backward"
    assert fast_lora.fp8_mode(layer, torch.zeros(1)) is False  # CPU
    assert fast_lora.fp8_mode(SimpleNamespace(fp8_base=False, fp8_capable=False), cuda) is False
    assert fast_lora.fp8_mode(SimpleNamespace(fp8_base=True, fp8_capable=True), cuda) is True
    monkeypatch.setattr(fast_lora, "FP8_INPUT_GRAD", False)
    assert fast_lora.fp8_mode(layer, cuda) is False
    monkeypatch.setattr(fast_lora, "FP8_INPUT_GRAD", True)
    monkeypatch.setattr(fast_lora, "float8_gemms", lambda index: False)  # an Ampere card
    assert fast_lora.fp8_mode(layer, cuda) is False
    for setting in (True, False):
        model = _four_bit_lora_model(0.0)
        fast_lora.install(model, backward=True, fp8_input_grad=setting)
        attn = model.get_base_model().model.layers[0].self_attn
        assert attn.q_proj.fp8_capable is setting and attn.q_proj.fp8_base is False
    model = _four_bit_lora_model(0.0)
    fast_lora.install(model, backward=False, fp8_input_grad=True)  # the fused forward alone: no such backward
    assert not model.get_base_model().model.layers[0].self_attn.q_proj.fp8_capable


def test_training_passes_the_fp8_setting_to_the_fused_layers(tiny_model_dir, tmp_path, monkeypatch):
    """`load_for_training` hands `training.fp8_input_gradients` to `fast_lora.install` (the tiny model's base is
    not 4-bit, so no layer is made capable either way; the 4-bit case is the test above)."""
    from medtune.config_io import load_config
    from medtune.train import load_for_training

    seen = []
    install = fast_lora.install
    monkeypatch.setattr(fast_lora, "install", lambda *a, **k: seen.append(k["fp8_input_grad"]) or install(*a, **k))
    for setting in ("true", "false"):
        cfg = load_config(preset="smollm2-135m-medical", env={}, overrides=[
            "model.model_source=local", f"model.local_model_path={tiny_model_dir}", f"output.output_root={tmp_path}",
            "lora.quantization=none", f"training.fp8_input_gradients={setting}"])
        model = load_for_training(cfg, str(tiny_model_dir), "cpu")
        assert not any(getattr(m, "fp8_capable", False) for m in model.modules())
    assert seen == [True, False]
