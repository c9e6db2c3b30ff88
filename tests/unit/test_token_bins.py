"""Token-budget micro batches (`training.micro_batch_tokens`, token_bins.py): the packer's guarantees,
the bin collator against the packing collator, the rank split the Trainer makes under DDP, and a tiny
CPU training run."""

from __future__ import annotations

import math
import random

import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoTokenizer, DataCollatorWithFlattening, Trainer

from medtune.config_io import load_config
from medtune.errors import ConfigError
from medtune.oom import smaller_budget
from medtune.rundir import RunDir
from medtune.token_bins import BIN_ROWS, BinCollator, bins_dataset, pack
from medtune.train import LeanTrainer, _with_length, training_args
from tests_support import qa_examples

MAX_LEN = 2048


def medical_like_lengths(n: int, seed: int) -> list[int]:
    """Row lengths shaped like the medical sets: median ~200 tokens, a long tail cut at MAX_LEN."""
    rng = random.Random(seed)
    return [min(MAX_LEN, max(50, int(rng.lognormvariate(5.4, 0.8)))) for _ in range(n)]


@pytest.mark.parametrize("budget", [2048, 4096, 16384])
def test_every_row_once_every_bin_within_budget_and_deterministic(budget):
    lengths = medical_like_lengths(3000, seed=budget)
    bins = pack(lengths, budget)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    totals = [sum(lengths[i] for i in b) for b in bins]
    assert max(totals) <= budget
    assert pack(lengths, budget) == bins and pack(list(lengths), budget) == bins
    # any-fit packing leaves at most one bin half empty, so it needs fewer than 2 x tokens / budget + 1 bins
    assert len(bins) <= math.ceil(2 * sum(lengths) / budget)
    # rows come longest first: every bin but the last opened one lacks less than one row of the budget
    assert all(total > budget - MAX_LEN for total in totals[:-1])


def test_bin_count_within_the_best_fit_decreasing_bound_on_a_known_optimum():
    """Bins of exactly the budget cut into pieces and shuffled: the optimum is known, and best-fit
    decreasing (like first-fit decreasing) needs at most 11/9 of it plus 6/9."""
    rng, budget, optimum, lengths = random.Random(7), 4096, 40, []
    for _ in range(optimum):
        cuts = sorted(rng.sample(range(1, budget), 5))
        lengths += [b - a for a, b in zip([0, *cuts], [*cuts, budget])]
    rng.shuffle(lengths)
    assert len(pack(lengths, budget)) <= 11 / 9 * optimum + 6 / 9


def test_ties_go_to_the_lower_index_and_a_row_longer_than_the_budget_is_refused():
    assert pack([5, 5, 5, 5], 10) == [[0, 1], [2, 3]]
    assert pack([3, 7, 3, 7], 10) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="does not fit a bin of 10"):
        pack([11], 10)


def _rows(tokenizer) -> Dataset:
    return _with_length(Dataset.from_list(qa_examples(tokenizer)))


def _same(a, b) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize("varlen", [False, True])
def test_a_bin_collates_exactly_as_its_rows_do_in_the_packing_collator(tiny_model_dir, varlen):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = _rows(tokenizer)
    lengths = rows["length"]
    bins = bins_dataset(rows, max(lengths) + min(lengths))  # room for the longest row and one more
    assert len(bins) > 1 and sorted(i for b in bins[BIN_ROWS] for i in b) == list(range(len(rows)))
    inner = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100, return_flash_attn_kwargs=varlen)
    collate = BinCollator(rows, inner)
    for b in bins:
        got, want = collate([b]), inner([rows[i] for i in b[BIN_ROWS]])
        assert got.keys() == want.keys() and all(_same(got[k], want[k]) for k in want)
        assert got["input_ids"].shape[1] == b["bin_tokens"]
        starts = [0, *torch.cumsum(torch.tensor([lengths[i] for i in b[BIN_ROWS]]), 0).tolist()]
        assert all(got["labels"][0, s] == -100 for s in starts[:-1])  # no prediction across an example boundary
        if varlen:
            assert got["cu_seq_lens_q"].tolist() == starts
    # evaluation batches are rows: they pass straight through
    evals = [rows[0], rows[1]]
    assert torch.equal(collate(evals)["input_ids"], inner(evals)["input_ids"])


def _rank_tokens(trainer: Trainer, rank: int, world: int) -> list[int]:
    """Tokens of each micro batch rank `rank` trains on, sharded as the Trainer's accelerator shards
    its dataloader under torchrun (accelerate's own prepare_data_loader, world processes)."""
    acc = trainer.accelerator

    def prepare(loader):
        return prepare_data_loader(loader, num_processes=world, process_index=rank, split_batches=acc.split_batches,
                                   put_on_device=False, even_batches=acc.even_batches,
                                   use_seedable_sampler=acc.use_seedable_sampler,
                                   data_seed=acc.dataloader_config.data_seed)

    acc.prepare = prepare
    loader = trainer.get_train_dataloader()
    loader.set_epoch(0)
    return [batch["input_ids"].numel() for batch in loader]


def _trainer(tmp_path, rows: Dataset, *sets: str) -> Trainer:
    cfg = load_config(preset="smollm2-135m-medical", overrides=["lora.packing=true", "training.max_seq_length=2048",
                                                                "training.gradient_accumulation=1", *sets])
    args = training_args(cfg, RunDir(tmp_path / "run"), "cpu", has_eval=False)
    inner = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    budget = cfg.training.micro_batch_tokens
    data, collator = (bins_dataset(rows, budget), BinCollator(rows, inner)) if budget else (rows, inner)
    return Trainer(model=torch.nn.Linear(1, 1), args=args, train_dataset=data, data_collator=collator)


def test_ranks_draw_bins_within_one_row_of_each_other_unlike_row_micro_batches(tmp_path):
    lengths = medical_like_lengths(1200, seed=3)
    rows = Dataset.from_dict({"input_ids": [[1] * n for n in lengths], "labels": [[1] * n for n in lengths],
                              "length": lengths})
    binned = _trainer(tmp_path, rows, "training.micro_batch_tokens=8192")
    assert binned.args.per_device_train_batch_size == 1 and binned.args.train_sampling_strategy == "random"
    per_rank = [_rank_tokens(binned, r, 2) for r in range(2)]
    tail = binned.train_dataset["bin_tokens"][-1]  # the last opened bin: the one that may be part-filled
    gaps = [abs(a - b) for a, b in zip(*per_rank) if tail not in (a, b)]
    assert len(gaps) >= len(per_rank[0]) - 1 >= 15
    assert max(gaps) < MAX_LEN  # every other bin holds more than budget - longest row
    rows_mb = _trainer(tmp_path, rows, "training.micro_batch_size=24")  # about the same mean tokens per micro batch
    naive = [_rank_tokens(rows_mb, r, 2) for r in range(2)]
    assert max(abs(a - b) for a, b in zip(*naive)) > 2 * MAX_LEN  # rows: ranks wait for each other by far more


def test_a_tiny_cpu_run_trains_one_optimizer_step_per_accumulated_bins(tiny_overrides):
    from medtune.workflow import run_workflow

    cfg = load_config(preset="smollm2-135m-medical", overrides=[
        *tiny_overrides, "lora.packing=true", "training.micro_batch_tokens=256", "training.gradient_accumulation=2",
        "training.max_steps=0", "training.num_epochs=1", "training.eval_steps=0", "dataset.eval_fraction=0",
        "output.merge_full_weights=false", "evaluation.validation_questions=0", "evaluation.mcq_questions=0",
        "evaluation.safety_probes=false"])
    run = run_workflow(cfg)
    manifest = run.manifest()
    from datasets import load_from_disk

    lengths = [len(ids) for ids in load_from_disk(str(run.data / "train"))["input_ids"]]
    bins = pack(lengths, 256)
    assert len(bins) >= 3
    training = manifest["training"]
    assert manifest["status"] == "succeeded" and training["steps"] == math.ceil(len(bins) / 2)
    assert training["micro_batch_tokens"] == 256 and training["effective_batch_tokens"] == 512
    assert training["micro_batch_size"] == 2  # the configured evaluation batch (tiny_overrides)
    assert training["effective_batch_size"] == round(len(lengths) / len(bins) * 2)
    assert training["tokens"] == sum(lengths)  # every row once in the epoch
    lora_b = [t for k, t in load_file(run.adapters / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # B starts at zero: training moved every one
    assert "effective batch ≤ 512 tokens = 256-token micro batches x accumulation 2 x world size 1" \
        in run.log_file.read_text()
    assert "Micro batches of whole rows up to 256 tokens: at most 512 tokens per optimizer step" \
        in run.summary.read_text()


def test_auto_fit_halves_the_budget_down_to_max_seq_length_then_stops():
    assert smaller_budget(16384, 2, 2048) == (8192, 4)
    assert smaller_budget(3000, 1, 2048) == (2048, 2)  # not below the longest row
    assert smaller_budget(2048, 4, 2048) is None


def test_rows_longer_than_the_budget_are_one_clear_error():
    rows = Dataset.from_dict({"length": [100, 700, 300]})
    with pytest.raises(ConfigError, match=r"^training.micro_batch_tokens=512 is below the longest prepared training "
                                          r"row \(700 tokens\); set it to at least 700$"):
        bins_dataset(rows, 512)


def test_token_bins_train_the_same_loss_as_row_micro_batches(tiny_overrides):
    """Each optimizer step takes the whole epoch (the accumulation exceeds the micro batches), so both
    paths see the same rows per step, only grouped differently; packed examples never see each other
    and the loss is summed over the step's tokens, so the losses must agree to float32 rounding."""
    from medtune.workflow import run_workflow

    common = [*tiny_overrides, "lora.packing=true", "lora.lora_dropout=0", "training.gradient_accumulation=64",
              "training.max_steps=0", "training.num_epochs=3", "training.eval_steps=0", "dataset.eval_fraction=0",
              "training.warmup_ratio=0", "output.merge_full_weights=false", "evaluation.validation_questions=0",
              "evaluation.mcq_questions=0", "evaluation.safety_probes=false"]
    losses = {}
    for name, batch in (("rows", "training.micro_batch_size=3"), ("bins", "training.micro_batch_tokens=256")):
        run = run_workflow(load_config(preset="smollm2-135m-medical",
                                       overrides=[*common, batch, f"output.run_id={name}"]))
        losses[name] = [h["loss"] for h in run.manifest()["training"]["history"] if "loss" in h]
    assert len(losses["bins"]) == len(losses["rows"]) == 3 and losses["bins"][0] != losses["bins"][2]  # it learns
    assert losses["bins"] == pytest.approx(losses["rows"], rel=1e-5)


def test_packed_micro_batches_count_every_token_without_reading_the_gpu_and_padded_ones_skip_padding(
        tmp_path, tiny_model_dir):
    """medtune's Trainer counts a packed micro batch by its length (no host sync); transformers' count
    compares with the pad id on the device and misses every end-of-turn token where pad = eos."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = tok.eos_token  # what build_trainer does for a tokenizer without a pad token
    eos = tok.eos_token_id
    cfg = load_config(preset="smollm2-135m-medical", overrides=["lora.packing=true"])
    args = training_args(cfg, RunDir(tmp_path / "run"), "cpu", has_eval=False)
    assert args.logging_nan_inf_filter is False  # no host read of every micro batch's loss either
    trainer = LeanTrainer(model=torch.nn.Linear(1, 1), args=args, processing_class=tok)
    packed = {"input_ids": torch.tensor([[5, 6, eos, 7, eos]]), "position_ids": torch.tensor([[0, 1, 2, 0, 1]])}
    trainer._track_num_input_tokens(packed)
    assert trainer.state.num_input_tokens_seen == 5
    Trainer._track_num_input_tokens(trainer, packed)  # transformers' own count of the same batch
    assert trainer.state.num_input_tokens_seen == 5 + 3
    padded = {"input_ids": torch.tensor([[5, eos, eos]]), "attention_mask": torch.tensor([[1, 1, 0]])}
    trainer._track_num_input_tokens(padded)
    assert trainer.state.num_input_tokens_seen == 8 + 2


def test_bins_collated_in_dataloader_workers_train_exactly_as_in_the_training_process(tiny_overrides):
    """`training.dataloader_workers` (2 on a GPU by default): the same bins in the same order, collated in worker
    processes (the bin collator, the packing collator and the loss positions pickled or forked there), give the
    same losses and the same token count as collated in the training process."""
    from medtune.workflow import run_workflow

    common = [*tiny_overrides, "lora.packing=true", "training.micro_batch_tokens=256", "training.gradient_accumulation=2",
              "training.max_steps=4", "training.logging_steps=1", "training.eval_steps=0", "dataset.eval_fraction=0",
              "output.merge_full_weights=false", "evaluation.validation_questions=0", "evaluation.mcq_questions=0",
              "evaluation.safety_probes=false"]
    runs = {}
    for workers in (0, 2):
        run = run_workflow(load_config(preset="smollm2-135m-medical", overrides=[
            *common, f"training.dataloader_workers={workers}", f"output.run_id=w{workers}"]))
        runs[workers] = run.manifest()["training"]
        assert ("2 dataloader workers collate" in run.log_file.read_text()) == (workers == 2)
    losses = {w: [h["loss"] for h in t["history"] if "loss" in h] for w, t in runs.items()}
    assert len(losses[0]) == 4 and losses[0][0] != losses[0][3]
    assert losses[2] == losses[0]
    assert runs[2]["tokens"] == runs[0]["tokens"] > 0


def test_dataloader_workers_auto_collates_ahead_on_a_gpu_only():
    from medtune.train import dataloader_workers

    auto = load_config(preset="smollm2-135m-medical", env={})
    assert dataloader_workers(auto, "cuda") == 2 and dataloader_workers(auto, "cpu") == 0
    three = load_config(preset="smollm2-135m-medical", overrides=["training.dataloader_workers=3"], env={})
    assert dataloader_workers(three, "cpu") == 3
    with pytest.raises(ConfigError):
        load_config(preset="smollm2-135m-medical", overrides=["training.dataloader_workers=-1"], env={})


def test_the_fused_adamw_trains_as_pytorchs_adamw(tiny_overrides):
    """`training.optimizer: adamw_torch_fused` (one fused kernel per optimizer step, also on a CPU): the same
    update as `adamw_torch`, so the same losses to float32 rounding over four steps."""
    from medtune.workflow import run_workflow

    common = [*tiny_overrides, "lora.packing=true", "training.micro_batch_tokens=256", "training.gradient_accumulation=2",
              "training.max_steps=4", "training.logging_steps=1", "training.eval_steps=0", "dataset.eval_fraction=0",
              "training.warmup_ratio=0", "output.merge_full_weights=false", "evaluation.validation_questions=0",
              "evaluation.mcq_questions=0", "evaluation.safety_probes=false"]
    losses = {}
    for optimizer in ("adamw_torch", "adamw_torch_fused"):
        run = run_workflow(load_config(preset="smollm2-135m-medical", overrides=[
            *common, f"training.optimizer={optimizer}", f"output.run_id={optimizer}"]))
        losses[optimizer] = [h["loss"] for h in run.manifest()["training"]["history"] if "loss" in h]
        assert run.manifest()["status"] == "succeeded"
    assert len(losses["adamw_torch"]) == 4 and losses["adamw_torch"][0] != losses["adamw_torch"][3]
    assert losses["adamw_torch_fused"] == pytest.approx(losses["adamw_torch"], rel=1e-4)
