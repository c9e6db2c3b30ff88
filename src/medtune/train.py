"""Stage 5, finetune: LoRA / QLoRA with PEFT on transformers' Trainer.

The base is loaded in the configured precision and never silently upcast: 4-bit NF4 with double
quantization (QLoRA), 8-bit, or unquantized bf16/fp16 on GPUs; on CPUs bf16 where the CPU has
native bf16 matmuls (else float32, logged). The loss
covers the answer tokens the data stage labelled (end-of-turn included). Checkpoints go to
`<run>/checkpoints/` on a schedule and a rerun resumes from the last one; the adapter is written to
`<run>/adapters/` in one atomic rename.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from transformers.trainer_callback import PrinterCallback

from medtune import base_eval_cache
from medtune.config import MedtuneConfig
from medtune.progress import ProgressLog, peak_memory_gib
from medtune.rundir import RunDir, atomic_dir

log = logging.getLogger("medtune.train")


def pick_device(cfg: MedtuneConfig) -> str:
    return "cuda" if cfg.training.device != "cpu" and torch.cuda.is_available() else "cpu"


def cpu_has_bf16() -> bool:
    """Native bfloat16 matmuls (AVX512-BF16 / AMX): 2-3x faster LoRA training than float32 on CPU."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def compute_dtype(cfg: MedtuneConfig, device: str) -> torch.dtype:
    if device == "cpu":
        return torch.bfloat16 if cfg.lora.bf16 and cpu_has_bf16() else torch.float32
    return torch.bfloat16 if cfg.lora.bf16 else torch.float16


def load_for_training(cfg: MedtuneConfig, model_path: str, device: str) -> Any:
    """The base model with LoRA adapters attached, ready for the Trainer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = compute_dtype(cfg, device)
    quant = None
    if cfg.lora.quantization == "4bit":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype)
    elif cfg.lora.quantization == "8bit":
        quant = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, quantization_config=quant,
                                                 device_map={"": device})
    model.config.use_cache = False
    if cfg.lora.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=cfg.lora.lora_r, lora_alpha=cfg.lora.lora_alpha, lora_dropout=cfg.lora.lora_dropout,
                      target_modules=list(cfg.lora.target_modules), bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("finetune: %s base on %s, quantization %s, LoRA r=%d alpha=%d: %.2fM trainable of %.0fM parameters",
             dtype, device, cfg.lora.quantization, cfg.lora.lora_r, cfg.lora.lora_alpha, trainable / 1e6, total / 1e6)
    return model


def training_args(cfg: MedtuneConfig, run: RunDir, device: str, has_eval: bool) -> Any:
    from transformers import TrainingArguments

    t = cfg.training
    on_gpu = device == "cuda"
    return TrainingArguments(
        output_dir=str(run.checkpoints),
        per_device_train_batch_size=t.micro_batch_size,
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
        train_sampling_strategy="group_by_length",
        length_column_name="length",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def train(cfg: MedtuneConfig, run: RunDir, model_path: str, data_path: str) -> dict[str, Any]:
    from datasets import load_from_disk
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer
    from transformers.trainer_utils import get_last_checkpoint

    torch.manual_seed(cfg.training.seed)
    device = pick_device(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        # Padding positions are masked out of both attention and labels, so reusing eos is safe here.
        tokenizer.pad_token = tokenizer.eos_token
    train_ds = _with_length(load_from_disk(str(Path(data_path) / "train")))
    eval_path = Path(data_path) / "eval"
    eval_ds = load_from_disk(str(eval_path)) if eval_path.exists() else None

    model = load_for_training(cfg, model_path, device)
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, pad_to_multiple_of=8 if device == "cuda" else None)
    progress, tensorboard = ProgressLog(run.logs, device), _tensorboard(run)
    trainer = Trainer(model=model, args=training_args(cfg, run, device, eval_ds is not None), train_dataset=train_ds,
                      eval_dataset=eval_ds, data_collator=collator, callbacks=[progress, tensorboard])
    trainer.remove_callback(PrinterCallback)  # ProgressLog writes the log lines
    resume = get_last_checkpoint(str(run.checkpoints)) if run.checkpoints.is_dir() else None
    metrics: dict[str, Any] = dict(run.manifest().get("training", {}))
    if eval_ds is not None and "base_eval_loss" not in metrics:
        metrics.update(_base_eval(cfg, trainer, model_path, eval_path, device))
        run.update_manifest(training={k: metrics[k] for k in ("base_eval_loss", "base_eval_perplexity", "base_eval_cached")})
    if resume:
        log.info("finetune: resuming from %s", resume)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - start
    metrics.update(_train_metrics(trainer, result, seconds, device))
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
    with atomic_dir(run.adapters) as tmp:
        model.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(adapter_card(cfg, metrics))
    return metrics


def adapter_card(cfg: MedtuneConfig, metrics: dict[str, Any]) -> str:
    """The adapter's model card: what it was trained from, how, and how to load it (no secrets)."""
    base = cfg.model.base_model_id if cfg.model.model_source != "local" else cfg.model.local_model_path
    source = cfg.dataset.dataset_name if cfg.dataset.dataset_source == "huggingface" else cfg.dataset.dataset_source
    lines = [
        "---", "library_name: peft", f"base_model: {base}", "tags: [medtune, lora, medical]", "---", "",
        f"# LoRA adapter for {base}", "",
        f"Fine-tuned by medtune on medical instruction data ({source}) with "
        f"{'QLoRA (' + cfg.lora.quantization + ' base)' if cfg.lora.quantization != 'none' else 'LoRA'}: "
        f"r={cfg.lora.lora_r}, alpha={cfg.lora.lora_alpha}, dropout={cfg.lora.lora_dropout}, "
        f"targets {', '.join(cfg.lora.target_modules)}; {metrics.get('steps')} steps, learning rate "
        f"{cfg.training.learning_rate}, max length {cfg.training.max_seq_length}.", "",
    ]
    if "eval_loss" in metrics:
        lines += [f"Held-out eval loss: base {metrics['base_eval_loss']:.4f}, tuned {metrics['eval_loss']:.4f}.", ""]
    lines += ["```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
              f'base = AutoModelForCausalLM.from_pretrained("{base}")',
              'model = PeftModel.from_pretrained(base, "path/to/adapters")', "```", "",
              "Not a medical device: outputs need review by a qualified clinician.", ""]
    return "\n".join(lines)


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
    from transformers.integrations import TensorBoardCallback

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
