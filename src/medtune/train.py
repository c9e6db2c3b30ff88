"""Stage 5, finetune: LoRA / QLoRA with PEFT on transformers' Trainer.

The base is loaded in the configured precision and never silently upcast: 4-bit NF4 with double
quantization (QLoRA), 8-bit, or unquantized bf16/fp16 on GPUs; on CPUs bf16 where the CPU has
native bf16 matmuls (else float32, logged). The loss
covers the answer tokens the data stage labelled (end-of-turn included). Checkpoints go to
`<run>/checkpoints/` on a schedule and a rerun resumes from the last complete one; SIGTERM/SIGUSR1
save one and stop (see preemption.py); the adapter is written to `<run>/adapters/` in one atomic
rename. Under torchrun (launch/torchrun.py) the same function runs on every rank: each rank holds
its own (4-bit) base on its own device, and only rank 0 writes the manifest and the adapter.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import PrinterCallback

from medtune import (attention, base_eval_cache, fast_lora, layer_graphs, lean_mlp, loss_positions, shared_input,
                     token_bins)
from medtune.config import MedtuneConfig
from medtune.divergence import StopOnDivergence, diverged_error
from medtune.errors import EnvironmentProblem
from medtune.machine_fit import BATCH_PIN, pick_device, pin_batch, resolve_recompute
from medtune.oom import train_fitting_memory
from medtune.preemption import Preempted, StopOnSignal, last_complete_checkpoint, remove_incomplete_checkpoints
from medtune.modelcard import write_card
from medtune.progress import ProgressLog, peak_memory_gib
from medtune.rundir import RunDir, atomic_dir
from medtune.sharding import full_state, load_placement, shard_report, trainer_arguments, uses_fsdp

log = logging.getLogger("medtune.train")


def cpu_has_bf16() -> bool:
    """Native bfloat16 matmuls (AVX512-BF16 / AMX): 2-3x faster LoRA training than float32 on CPU."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def compute_dtype(cfg: MedtuneConfig, device: str) -> torch.dtype:
    if device == "cpu":
        return torch.bfloat16 if cfg.lora.bf16 and cpu_has_bf16() else torch.float32
    return torch.bfloat16 if cfg.lora.bf16 else torch.float16


def attention_kernel(cfg: MedtuneConfig, device: str) -> str:
    """The `attn_implementation` to load the model with. Packed batches get the varlen FlashAttention
    kernel; SDPA would take a materialised block mask per layer (measured: out of memory at 4k tokens
    without recompute) and FlexAttention compiles per packed length. GPUs older than Ampere have no
    FlashAttention in PyTorch: there `auto` keeps SDPA (its memory-efficient kernel takes the mask)."""
    choice = cfg.training.attn_implementation
    if choice == "auto":
        choice = "varlen" if device == "cuda" and cfg.lora.packing and attention.flash_capable() else "sdpa"
    if choice == "varlen" and not (device == "cuda" and attention.flash_capable()):
        raise EnvironmentProblem("training.attn_implementation=varlen needs an Ampere or newer CUDA GPU (compute "
                                 "capability 8.0+) and none is visible here; set it to `auto`")
    return attention.register() if choice == "varlen" else choice


def load_for_training(cfg: MedtuneConfig, model_path: str, device: str, place: Any = None, graphs: bool = False) -> Any:
    """The base model with LoRA adapters attached, ready for the Trainer; `place` is this rank's device;
    `graphs`: its layers will be captured as CUDA graphs (the fused backward then keeps dropout masks)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = compute_dtype(cfg, device)
    quant = None
    if cfg.lora.quantization == "4bit":
        # Under FSDP the packed 4-bit weights are stored in the compute dtype, which FSDP can shard.
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype,
                                   bnb_4bit_quant_storage=dtype if uses_fsdp(cfg) else torch.uint8)
    elif cfg.lora.quantization == "8bit":
        quant = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, quantization_config=quant,
                                                 device_map={"": load_placement(cfg, place or device)},
                                                 attn_implementation=attention_kernel(cfg, device))
    model.config.use_cache = False
    assert cfg.lora.gradient_checkpointing != "auto", "resolve_recompute() decides `auto` before loading"
    if cfg.lora.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False},
                                              every_n_layers=cfg.lora.recompute_every_n_layers)
    lora = LoraConfig(r=cfg.lora.lora_r, lora_alpha=cfg.lora.lora_alpha, lora_dropout=cfg.lora.lora_dropout,
                      target_modules=list(cfg.lora.target_modules), bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if cfg.training.fused_lora:
        # The fused backward is left out under FSDP, where it has not been measured on sharded parameters.
        whole = not uses_fsdp(cfg)
        count = fast_lora.install(model, backward=whole, keep_mask=graphs,
                                  fp8_input_grad=cfg.training.fp8_input_gradients,
                                  fp8_forward=cfg.training.fp8_forward)
        log.info("finetune: fused LoRA %s on %d projections", "forward and backward" if whole else "forward", count)
        capable = [m for m in model.modules() if getattr(m, "fp8_capable", False)]
        if capable and device == "cuda" and fast_lora.float8_gemms(torch.cuda.current_device()):
            log.info("finetune: float8 base GEMMs on %d 4-bit projections' input gradients and %d forwards "
                     "(training.fp8_forward=%s)", len(capable), sum(map(fast_lora.forward_in_fp8, capable)),
                     cfg.training.fp8_forward)
        # on a GPU with 16-bit activations (elsewhere each projection would run alone: shared_input._spec)
        if whole and device == "cuda" and dtype in (torch.bfloat16, torch.float16):
            log.info("finetune: %d groups of projections reading one input set to run as one node "
                     "(medtune.shared_input)", shared_input.install(model))
    trainable, total = model.get_nb_trainable_parameters()
    log.info("finetune: %s base on %s, quantization %s, LoRA r=%d alpha=%d: %.2fM trainable of %.0fM parameters",
             dtype, device, cfg.lora.quantization, cfg.lora.lora_r, cfg.lora.lora_alpha, trainable / 1e6, total / 1e6)
    return model


def training_args(cfg: MedtuneConfig, run: RunDir, device: str, has_eval: bool) -> Any:
    """Trainer arguments; under torchrun they also carry the rank, world size and this rank's device."""
    from transformers import TrainingArguments

    t = cfg.training
    on_gpu = device == "cuda"
    bins = bool(t.micro_batch_tokens)  # one token-budget bin per micro batch; near-equal bins need no grouping
    return TrainingArguments(
        output_dir=str(run.checkpoints),
        per_device_train_batch_size=1 if bins else t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation,
        num_train_epochs=t.num_epochs,
        max_steps=t.max_steps or -1,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if has_eval and t.eval_steps else "no",
        eval_steps=t.eval_steps or None,
        bf16=compute_dtype(cfg, device) == torch.bfloat16,
        fp16=on_gpu and not cfg.lora.bf16,
        use_cpu=not on_gpu,
        seed=t.seed,
        data_seed=t.seed,
        report_to=[],
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        train_sampling_strategy="random" if bins else "group_by_length",
        length_column_name="length",
        disable_tqdm=True,
        dataloader_num_workers=dataloader_workers(cfg, device),
        # The Trainer's NaN filter reads every micro batch's loss on the host (two syncs each); a
        # non-finite loss is StopOnDivergence's to catch, and the logged loss shows it as it is.
        logging_nan_inf_filter=False,
        use_liger_kernel=use_liger(cfg, device),
        # LoRA leaves every trainable parameter in the graph; skipping DDP's unused-parameter search
        # also keeps gradient checkpointing working under DDP.
        ddp_find_unused_parameters=False,
        **trainer_arguments(cfg),
    )


def dataloader_workers(cfg: MedtuneConfig, device: str) -> int:
    """`training.dataloader_workers`. `auto`: on a GPU two workers collate ahead, so the batches of an
    optimizer step are ready when it starts (collating them in the training process left the GPU idle
    ~26 ms per 8B step, 2026-11-29 call bb, docs/benchmarks.md); on a CPU the training process's cores train."""
    workers = cfg.training.dataloader_workers
    return (2 if device == "cuda" else 0) if workers == "auto" else workers


def use_liger(cfg: MedtuneConfig, device: str) -> bool:
    """Liger's Triton kernels (fused linear + cross-entropy, RMSNorm, SwiGLU, RoPE) need CUDA."""
    return device == "cuda" and cfg.training.liger_kernels and importlib.util.find_spec("liger_kernel") is not None


def build_trainer(cfg: MedtuneConfig, run: RunDir, model_path: str, data_path: str, callbacks: tuple = ()) -> Any:
    """The model with adapters, the tokenized data and the Trainer, as `train` (and bench/) use them."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    torch.manual_seed(cfg.training.seed)
    device = pick_device(cfg)
    tokenizer = AutoTokenizer.from_pretrained(run.tokenizer_source(model_path))
    if tokenizer.pad_token is None:
        # Padding positions are masked out of both attention and labels, so reusing eos is safe here.
        tokenizer.pad_token = tokenizer.eos_token
    train_ds = _with_length(load_from_disk(str(Path(data_path) / "train")))
    eval_path = Path(data_path) / "eval"
    eval_ds = load_from_disk(str(eval_path)) if eval_path.exists() else None

    args = training_args(cfg, run, device, eval_ds is not None)
    if args.dataloader_num_workers:
        log.info("finetune: %d dataloader workers collate the next micro batches (training.dataloader_workers)",
                 args.dataloader_num_workers)
    t, extra = cfg.training, [lean_mlp.AtTrainStart(), fast_lora.StepCasts()]  # AtTrainStart: before graph capture
    graphs = bool(t.micro_batch_tokens) and layer_graphs.wanted(t.cuda_graphs, device, args.world_size,
                                                                 bool(cfg.lora.gradient_checkpointing))
    model = load_for_training(cfg, model_path, device, place=args.device, graphs=graphs)  # torchrun: this rank's GPU
    collator = make_collator(cfg, tokenizer, device)
    if t.micro_batch_tokens:
        rows, train_ds = train_ds, token_bins.bins_dataset(train_ds, t.micro_batch_tokens)
        pad_to = None
        if graphs:
            pad_to = (t.micro_batch_tokens, t.max_seq_length, tokenizer.pad_token_id)
            slots = layer_graphs.slots_for(max(map(len, train_ds[token_bins.BIN_ROWS])), *pad_to[:2])
            extra.append(layer_graphs.CaptureAtStart(*pad_to[:2], slots, compute_dtype(cfg, device)))
        collator = token_bins.BinCollator(rows, collator, pad_to)
    if loss_positions.supported(model.get_base_model()):
        collator = loss_positions.LossPositions(collator)
        log.info("finetune: output layer and loss on the trained positions only (medtune.loss_positions)")
    trainer = LeanTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, data_collator=collator,
                          callbacks=[ProgressLog(run.logs, device), _tensorboard(run), *extra, *callbacks])
    trainer.remove_callback(PrinterCallback)  # ProgressLog writes the log lines
    return trainer


class LeanTrainer(Trainer):
    """transformers' Trainer, counting the tokens of a padding-free micro batch from its shape.

    The Trainer counts "non-padding" tokens with a comparison on the GPU and `.item()`: one host sync
    per micro batch, and a wrong count where the pad token is also the end-of-turn token. A packed
    micro batch (no attention mask) has no padding, so its token count is its length, known on the
    host; padded batches and multi-process runs (whose count is gathered over ranks) keep the
    Trainer's own count."""

    real_tokens: int | None = None  # the last padded micro batch's real tokens (layer_graphs.REAL_TOKENS)

    def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        self.real_tokens = inputs.pop(layer_graphs.REAL_TOKENS, None)
        return super().training_step(model, inputs, *args, **kwargs)

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        if self.real_tokens is not None:  # bins padded for CUDA graphs: the padding is not tokens seen
            self.state.num_input_tokens_seen += self.real_tokens
            return
        if self.args.world_size == 1 and "attention_mask" not in inputs and "position_ids" in inputs:
            self.state.num_input_tokens_seen += int(inputs["input_ids"].numel())
            return
        super()._track_num_input_tokens(inputs)


def make_collator(cfg: MedtuneConfig, tokenizer: Any, device: str) -> Any:
    """Padding to the longest row, or with `lora.packing` padding-free packing: the micro batch becomes
    one row whose `position_ids` restart at every example, and the attention implementations turn
    those restarts into separate causal blocks, so no example attends to its neighbour (the first
    label of each example is masked, as it would be the prediction across the boundary)."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if cfg.lora.packing:
        # The example boundaries as FlashAttention's cumulative lengths, for the varlen kernel.
        varlen = attention_kernel(cfg, device) == attention.VARLEN
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=-100, return_flash_attn_kwargs=varlen)
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, pad_to_multiple_of=8 if device == "cuda" else None)


def train(cfg: MedtuneConfig, run: RunDir, model_path: str, data_path: str) -> dict[str, Any]:
    resolved = resolve_recompute(cfg, model_path, pin=run.checkpoints / BATCH_PIN)
    return train_fitting_memory(resolved, run, lambda fitted: _train_once(fitted, run, model_path, data_path),
                                recompute_auto=cfg.lora.gradient_checkpointing == "auto")


def _train_once(cfg: MedtuneConfig, run: RunDir, model_path: str, data_path: str) -> dict[str, Any]:
    pin_batch(cfg, run.checkpoints)
    stopper = StopOnSignal().install()
    try:
        trainer = build_trainer(cfg, run, model_path, data_path, callbacks=(stopper, StopOnDivergence()))
        return _train(cfg, run, trainer, stopper, model_path, data_path)
    finally:
        stopper.uninstall()


def _train(cfg: MedtuneConfig, run: RunDir, trainer: Any, stopper: StopOnSignal, model_path: str,
           data_path: str) -> dict[str, Any]:
    eval_ds, device, world = trainer.eval_dataset, trainer.args.device.type, trainer.args.world_size
    if uses_fsdp(cfg) and not trainer.is_fsdp_enabled:  # never fall back to unsharded training silently
        raise RuntimeError(f"infrastructure.distributed=fsdp but accelerate did not enable FSDP ({world} process(es) "
                           f"on {device})")
    rank0 = trainer.is_world_process_zero()
    if rank0:
        remove_incomplete_checkpoints(run.checkpoints)
    trainer.accelerator.wait_for_everyone()
    resume = last_complete_checkpoint(run.checkpoints)
    metrics: dict[str, Any] = dict(run.manifest().get("training", {}))
    for stale in ("micro_batch_tokens", "effective_batch_tokens"):  # from an earlier attempt with token bins
        metrics.pop(stale, None)
    metrics["micro_batch_size"] = cfg.training.micro_batch_size  # as trained: `auto` resolved, after any halving
    metrics["gradient_checkpointing"] = cfg.lora.gradient_checkpointing
    metrics["recompute_every_n_layers"] = cfg.lora.recompute_every_n_layers
    metrics.update(token_bins.batch_metrics(cfg.training, world, trainer.train_dataset))
    log.info("finetune: %d process(es), %s", world, token_bins.batch_line(cfg.training, metrics))
    if eval_ds is not None and "base_eval_loss" not in metrics:
        metrics.update(_base_eval(cfg, trainer, model_path, Path(data_path) / "eval", device))
        if rank0:
            run.update_manifest(training={k: metrics[k] for k in ("base_eval_loss", "base_eval_perplexity",
                                                                  "base_eval_cached")})
    if resume:
        log.info("finetune: resuming from %s", resume)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - start
    if stopper.stopped_at is not None:
        if rank0:
            run.update_manifest(preemption={"signal": stopper.signal_name, "step": stopper.stopped_at,
                                            "time": time.time()})
        raise Preempted(f"training stopped by {stopper.signal_name} after saving a checkpoint at step "
                        f"{stopper.stopped_at}; rerun with `medtune run --resume {run.root}` to continue")
    if (diverged := _callback(trainer, StopOnDivergence).diverged) is not None:
        raise _diverged(cfg, run, trainer, diverged)
    metrics.update(_train_metrics(trainer, result, seconds, device))
    if trainer.is_fsdp_enabled:
        metrics["sharding"] = shard_report(trainer)
    progress, tensorboard = _callback(trainer, ProgressLog), _callback(trainer, TensorBoardCallback)
    metrics["throughput"] = progress.samples
    metrics["peak_memory_gib"] = round(peak_memory_gib(device), 3)
    metrics["peak_memory_kind"] = "gpu allocated" if device == "cuda" else "process rss"
    if eval_ds is not None:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
        if tensorboard.tb_writer is not None:  # reopened by the evaluate() after train_end; flush and close it
            tensorboard.tb_writer.close()
        metrics["eval_perplexity"] = _perplexity(metrics["eval_loss"])
        metrics["eval_loss_reduction"] = 1 - metrics["eval_loss"] / metrics["base_eval_loss"]
        log.info("finetune: eval loss %.4f (base %.4f, %.1f%% lower)", metrics["eval_loss"],
                 metrics["base_eval_loss"], 100 * metrics["eval_loss_reduction"])
    state = full_state(trainer)  # under FSDP every rank takes part in gathering the adapter
    if rank0:
        with atomic_dir(run.adapters) as tmp:
            trainer.model.save_pretrained(str(tmp), state_dict=state)
            write_card(tmp, "adapters", {**run.manifest(), "training": metrics}, run.tokenizer_source(model_path))
        run.update_manifest(training=metrics)
    trainer.accelerator.wait_for_everyone()
    return metrics


def _diverged(cfg: MedtuneConfig, run: RunDir, trainer: Any, info: dict[str, Any]) -> Exception:
    kept = last_complete_checkpoint(run.checkpoints)
    if trainer.is_world_process_zero():
        run.update_manifest(divergence={**info, "checkpoint_kept": kept.name if kept else None})
    return diverged_error(info, trainer.args, cfg.training.learning_rate, str(kept) if kept else None)


def _callback(trainer: Any, kind: type) -> Any:
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, kind))


def _base_eval(cfg: MedtuneConfig, trainer: Any, model_path: str, eval_path: Path, device: str) -> dict[str, Any]:
    """The base model's eval loss, from the cache when this model, data and precision were seen before."""
    settings = {"quantization": cfg.lora.quantization, "dtype": str(compute_dtype(cfg, device)), "device": device,
                "micro_batch_size": cfg.training.micro_batch_size}
    key = base_eval_cache.eval_key(model_path, eval_path, settings)
    cached = base_eval_cache.lookup(cfg.model.model_cache_dir, key)
    if cached is not None:
        log.info("finetune: base model eval loss %.4f (cached)", cached["eval_loss"])
        loss = cached["eval_loss"]
    else:
        # LoRA's B matrices start at zero, so before training the model *is* the base model.
        loss = trainer.evaluate()["eval_loss"]
        base_eval_cache.store(cfg.model.model_cache_dir, key, {"eval_loss": loss, **settings})
        log.info("finetune: base model eval loss %.4f (perplexity %.2f)", loss, _perplexity(loss))
    return {"base_eval_loss": loss, "base_eval_perplexity": _perplexity(loss), "base_eval_cached": cached is not None}


def _perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def _tensorboard(run: RunDir) -> Any:
    """Event files under logs/tensorboard/ (`tensorboard --logdir <run>/logs/tensorboard`)."""
    from torch.utils.tensorboard import SummaryWriter

    folder = str(run.logs / "tensorboard")
    callback = TensorBoardCallback(tb_writer=SummaryWriter(log_dir=folder))
    callback.logging_dir = folder  # the final evaluate() after train_end reopens a writer: keep it here too
    return callback


def _with_length(ds: Any) -> Any:
    return ds.map(lambda row: {"length": len(row["input_ids"])})


def _train_metrics(trainer: Any, result: Any, seconds: float, device: str) -> dict[str, Any]:
    state = trainer.state
    tokens = int(state.num_input_tokens_seen)
    history = [{k: v for k, v in h.items() if k in ("step", "loss", "eval_loss", "learning_rate")}
               for h in state.log_history if "loss" in h or "eval_loss" in h]
    return {
        "device": device,
        "steps": state.global_step,
        "train_loss": result.training_loss,
        "tokens": tokens,
        "train_seconds": round(seconds, 1),
        "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
        "history": history,
    }
