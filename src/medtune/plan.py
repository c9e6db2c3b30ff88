"""`medtune plan`: what a config will cost before any download or GPU allocation.

Offline and fast: the model's shape comes from a local/cached config.json or the presets' table,
dataset tokens from an earlier run's data report, a local sample, or a stated assumption, and
throughput from measured figures (plan_tables.py, each citing its bench/results line). Every estimate
says where its inputs came from. The memory model is plan_memory.py (peak torch allocation); the
CUDA context and allocator reserve are added on top for the scheduler request only.
With infrastructure.distributed=fsdp over N GPUs, weights, LoRA and optimizer states are divided by N,
except the 4-bit quantization constants (not parameters: whole on every GPU), plus two decoder layers
gathered whole (the one computing and the one prefetched) and the lm_head, which stays gathered from
forward to backward; QLoRA loads the whole 4-bit base onto every GPU before sharding it (a load peak).
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

from medtune.config import MedtuneConfig
from medtune.errors import ConfigError
from medtune.plan_batches import QUANTILES, knots_from_lengths, planned_micro_batch, steps_per_epoch
from medtune.plan_memory import MicroBatch, Recipe, attention_family, estimate, projections
from medtune.plan_tables import CARDS, KNOWN_SHAPES, THROUGHPUT, Card, Shape, Throughput
from medtune.sharding import uses_fsdp
from medtune.token_bins import MEASURED_FILL

GIB = 2**30
ASSUMED_TOKENS_PER_ROW = 300  # the seed's medical sets: 234-306 tokens/row (shared/bench/README.md)
ASSUMED_ROWS = 10_000
CUDA_CONTEXT_GIB = 1.0  # CUDA context + allocator reserve: outside max_memory_allocated, added for the request only
# RSS of `medtune run` (embedded demo, whole workflow in one process) when training starts, sampled every
# second on 2026-11-28: 2.55 GiB, less the 0.25 GiB bf16 SmolLM2-135M weights. Imports, tokenizer, Arrow
# tables and earlier stages' leftovers; torch tensors come on top, and glibc keeps freed step buffers, so
# RSS climbs to runtime + the tensors' peak (docs/benchmarks.md, CPU comparison).
CPU_RUNTIME_GIB = 2.3


def model_shape(cfg: MedtuneConfig) -> tuple[Shape, str]:
    """The base model's shape and where it came from (a local config.json first, then the presets' table)."""
    for path in _local_configs(cfg):
        if path.is_file():
            return shape_from_config(json.loads(path.read_text())), str(path)
    model_id = cfg.model.base_model_id
    if model_id in KNOWN_SHAPES:
        return KNOWN_SHAPES[model_id], "medtune's table of preset base models"
    raise ConfigError(f"no offline config.json for {model_id}; download it once (`medtune run` stage model) or use "
                      "model.model_source=local with a folder holding config.json")


def _local_configs(cfg: MedtuneConfig) -> list[Path]:
    m = cfg.model
    cache = Path(m.model_cache_dir).expanduser()
    if m.model_source == "local":
        return [Path(m.local_model_path).expanduser() / "config.json"]
    if m.model_source == "gguf":
        stem = Path(m.gguf_path).stem if m.gguf_path else "SmolLM2-135M-Instruct.Q4_1"
        return sorted(cache.glob(f"gguf--{stem}--*/config.json"))
    return [cache / m.base_model_id.replace("/", "--") / "config.json"]


def shape_from_config(c: dict[str, Any]) -> Shape:
    return Shape(hidden=c["hidden_size"], intermediate=c["intermediate_size"], layers=c["num_hidden_layers"],
                 heads=c["num_attention_heads"], kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
                 vocab=c["vocab_size"], tied=bool(c.get("tie_word_embeddings", False)), head_dim=c.get("head_dim") or 0)


def parameter_counts(s: Shape, r: int, targets: tuple[str, ...]) -> dict[str, int]:
    proj = projections(s)
    linear = s.layers * sum(i * o for i, o in proj.values())
    embeddings = s.vocab * s.hidden * (1 if s.tied else 2)
    norms = s.layers * 2 * s.hidden + s.hidden
    unknown = [t for t in targets if t not in proj]
    if unknown:
        raise ConfigError(f"lora.target_modules {unknown} are not Llama-style projections; plan knows "
                          f"{', '.join(proj)}")
    lora = s.layers * sum(r * (proj[t][0] + proj[t][1]) for t in targets)
    return {"total": linear + embeddings + norms, "linear": linear, "embeddings": embeddings, "norms": norms,
            "lora": lora}


def recipe(cfg: MedtuneConfig, device: str, attention: str | None = None, liger: bool | None = None) -> Recipe:
    """The memory model's view of a config on `device` (what medtune.train would set up there)."""
    lo, t = cfg.lora, cfg.training
    if attention is None:  # mirrors medtune.train.attention_kernel (importing it would import torch: slow)
        attention = t.attn_implementation if t.attn_implementation != "auto" else \
            ("varlen" if device == "cuda" and lo.packing else "sdpa")
    # train.load_for_training: the fused LoRA backward on plain and 4-bit bases, not under FSDP; with it
    # the lean MLP (medtune.lean_mlp)
    fused = t.fused_lora and not uses_fsdp(cfg) and lo.quantization != "8bit"
    return Recipe(quantization=lo.quantization if device == "cuda" else "none", lora_r=lo.lora_r,
                  targets=tuple(lo.target_modules), lora_dropout=lo.lora_dropout, optimizer=t.optimizer,
                  gradient_checkpointing=lo.gradient_checkpointing is not False,  # `auto` unresolved: on
                  recompute_every=lo.recompute_every_n_layers,
                  liger=(device == "cuda" and t.liger_kernels) if liger is None else liger, attention=attention,
                  fused_loss=not uses_fsdp(cfg),  # sharding.trainer_arguments: no Liger fused loss under FSDP
                  fused_backward=fused, lean_mlp=fused, dropout_kernels=fused and device == "cuda",
                  compute_bytes=2 if device == "cuda" or lo.bf16 else 4)  # CPUs without bf16 train in fp32


def memory_gib(cfg: MedtuneConfig, s: Shape, device: str, batch: MicroBatch, shards: int = 1) -> dict[str, Any]:
    """Peak memory parts in GiB per GPU (plan_memory.estimate) plus the runtime outside torch's counters;
    with `shards` > 1 the base, LoRA and optimizer states are sharded over that many GPUs (FSDP)."""
    out = estimate(s, recipe(cfg, device), batch)
    if shards > 1:
        half = 2 if device == "cuda" or cfg.lora.bf16 else 4
        weight_bytes = {"4bit": 4.127 / 8, "8bit": 1.0, "none": half}[cfg.lora.quantization]
        counts = parameter_counts(s, cfg.lora.lora_r, cfg.lora.target_modules)
        sharded = fsdp_parts(s, counts, weight_bytes, half, out["lora_and_optimizer"] * GIB, shards)
        out["total"] -= out["weights"] + out["lora_and_optimizer"]
        out.update({k: v / GIB for k, v in sharded.items()})
        out["total"] += out["weights"] + out["lora_and_optimizer"] + out["gathered"]
    out["overhead"] = CUDA_CONTEXT_GIB if device == "cuda" else CPU_RUNTIME_GIB
    out["total"] += out["overhead"]
    return out


def fsdp_parts(s: Shape, counts: dict[str, int], weight_bytes: float, half: int, lora: float,
               shards: int) -> dict[str, float]:
    """Bytes per GPU under FSDP full shard: this GPU's shares, the unsharded 4-bit constants, and what
    is gathered whole at the peak."""
    packed = 0.5 if weight_bytes < 1 else weight_bytes  # nf4 packs two weights per byte; the rest is absmax
    constants = counts["linear"] * (weight_bytes - packed)
    share = (counts["linear"] * packed + (counts["embeddings"] + counts["norms"]) * half) / shards
    layer = sum(i * o for i, o in projections(s).values()) * packed + 2 * s.hidden * half
    lm_head = s.vocab * s.hidden * half
    return {"weights": share + constants, "lora_and_optimizer": lora / shards, "gathered": 2 * layer + lm_head}


def _run_gpus(cfg: MedtuneConfig) -> int:
    """GPUs the run trains on, all nodes together (`num_gpus: auto` counts this machine's)."""
    infra = cfg.infrastructure
    return (infra.num_gpus if infra.num_gpus != "auto" else visible_gpu_count()) * infra.nodes


def fsdp_shards(cfg: MedtuneConfig) -> int:
    """GPUs the base is sharded over: 1 unless infrastructure.distributed=fsdp."""
    if cfg.infrastructure.distributed != "fsdp":
        return 1
    if (gpus := _run_gpus(cfg)) < 2:
        raise ConfigError("planning FSDP needs the GPU count: set infrastructure.num_gpus (per node) to the GPUs "
                          "the run will shard over")
    return gpus


def _ddp_world(cfg: MedtuneConfig, device: str) -> int:
    """Processes that share the micro batches (token bins only; the row plan counts steps per process)."""
    if device != "cuda" or not cfg.training.micro_batch_tokens:
        return 1
    return max(cfg.infrastructure.nodes, _run_gpus(cfg))


def pick_target(cfg: MedtuneConfig, gpu: str | None, total_params: int) -> tuple[str, Card | None, str]:
    """("cuda"|"cpu", card, why): a named card, the visible one, or a stated default."""
    if gpu and gpu.lower() == "cpu" or cfg.training.device == "cpu":
        return "cpu", None, "CPU (asked for)"
    if gpu:
        g = gpu.lower()
        match = [c for name, c in CARDS.items() if g in (name.lower(), name.split("-")[0].lower())]
        match = match or [c for name, c in CARDS.items() if name.lower().startswith(g)]
        if not match:
            raise ConfigError(f"unknown --gpu {gpu!r}; choose one of: cpu, {', '.join(CARDS)}")
        return "cuda", match[0], "named with --gpu"
    visible = visible_gpu()
    if visible is not None:
        return "cuda", visible, "visible GPU"
    if total_params < 1e9 and cfg.lora.quantization == "none":
        return "cpu", None, "no GPU visible; a small unquantized model trains on this CPU"
    return "cuda", CARDS["H100-80GB"], "no GPU visible; planned for H100-80GB (pass --gpu to change)"


def visible_gpu() -> Card | None:
    """GPU 0 as nvidia-smi reports it (no torch import: plan must stay fast on a login node)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    if not out.strip():
        return None
    name, mib = (x.strip() for x in out.splitlines()[0].split(","))
    name = name.replace("NVIDIA ", "")
    known = next((c for n, c in CARDS.items() if n.split("-")[0] in name), None)
    return Card(name, float(mib) / 1024, known.bf16_tflops if known else 0.0)


def visible_gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return len([line for line in out.splitlines() if line.strip()])


def dataset_tokens(cfg: MedtuneConfig, rows_hint: int | None) -> dict[str, Any]:
    """Training rows and tokens: an earlier run's data report, a local sample, or a stated assumption."""
    cached = _cached_report(cfg)
    if cached:
        return cached
    rows, per_row, knots, source = None, float(ASSUMED_TOKENS_PER_ROW), None, ""
    ds = cfg.dataset
    if ds.dataset_source == "local" and ds.dataset_format in ("json", "jsonl"):
        sample = _local_sample(Path(ds.local_dataset_path).expanduser(), ds.dataset_split)
        if sample:
            rows, lengths = len(sample), [chars / 4.0 for chars in sample]
            per_row, knots = sum(lengths) / rows, knots_from_lengths(lengths)
            source = f"{rows} local rows, ~4 characters per token"
    if rows_hint:
        rows, source = rows_hint, (source or f"--rows {rows_hint}, {ASSUMED_TOKENS_PER_ROW} tokens/row assumed")
    if rows is None:
        rows = ds.max_samples or ASSUMED_ROWS
        count = f"dataset.max_samples={rows} rows" if ds.max_samples else \
            f"assumed: {rows} rows (dataset not available offline; pass --rows)"
        source = f"{count} × {ASSUMED_TOKENS_PER_ROW} tokens/row (assumed)"
    if ds.max_samples:
        rows = min(rows, ds.max_samples)
    if not ds.eval_split:
        rows -= round(rows * ds.eval_fraction)
    return {"rows": rows, "tokens": int(rows * per_row), "longest": int(knots[-1][1]) if knots else None,
            "length_quantiles": knots, "source": source}


def _cached_report(cfg: MedtuneConfig) -> dict[str, Any] | None:
    """The data report of an earlier run of the same dataset settings under output_root (newest first)."""
    from medtune.config_io import to_dict

    wanted = to_dict(cfg)["dataset"]
    root = Path(cfg.output.output_root).expanduser()
    for manifest_path in sorted(root.glob("medical-finetune-*/manifest.json"), reverse=True):
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        report = manifest.get("stages", {}).get("data", {}).get("report")
        if report and manifest.get("config", {}).get("dataset") == wanted \
                and report.get("max_seq_length") == cfg.training.max_seq_length:
            return {"rows": report["train_examples"], "tokens": report["train_tokens"],
                    "longest": report.get("length_max"), "length_quantiles": _report_knots(report),
                    "source": f"data report of {manifest_path.parent.name}"}
    return None


def _report_knots(report: dict[str, Any]) -> list[tuple[float, float]] | None:
    """The data report's length percentiles as quantile knots (older reports: only the longest row)."""
    pct = report.get("length_percentiles") or {}
    names = ("p50", "p90", "p95", "p99", "max")
    if all(pct.get(n) is not None for n in names):
        return [(q, float(pct[n])) for q, n in zip(QUANTILES, names)]
    return [(1.0, float(report["length_max"]))] if report.get("length_max") else None


def _local_sample(path: Path, split: str) -> list[int] | None:
    """Characters per row of a local JSON Lines file or a folder's split file."""
    files = [path] if path.is_file() else sorted(path.glob(f"{split}.json*"))
    if not files or files[0].suffix != ".jsonl":
        return None
    return [len(x) for x in files[0].read_text().splitlines() if x.strip()] or None


def throughput(rec: Recipe, packing: bool, batch_tokens: int, device: str, card: Card | None, params: int,
               exclude: str = "") -> dict[str, Any]:
    """Tokens/s of the closest measured run, scaled by parameters (and by card TFLOPS across cards).

    Closest, in the order of the effects measured on one H200 (bench/results/2026-11-28-h200-*.jsonl):
    same packing, a fused attention kernel (varlen, flash, flex) for a fused one, the same kernel
    family (FlexAttention 1.8x SDPA on packed batches), same
    quantization (8-bit, never measured, uses 4-bit; 4-bit vs bf16 1.1x), same gradient checkpointing
    (1.2x) and the same share of layers recomputed, then the nearest tokens per micro batch (small
    micro batches leave the GPU idle: 2,103 vs 4,579 tok/s at 2.3k vs 6.8k tokens, same recipe).
    `exclude` drops the entry of that source (bench/plan_vs_measured.py estimates each run from the others).
    """
    pool = [a for a in THROUGHPUT if (a.card == "cpu-2core") == (device == "cpu") and a.source != exclude]
    quant = "4bit" if rec.quantization == "8bit" else rec.quantization
    fused = {"varlen", "flash", "flex"}  # kernels without a materialised mask: the closest stand-ins for each other
    for key in (lambda a: a.packing == packing,
                lambda a: (attention_family(a.attention) in fused) == (attention_family(rec.attention) in fused),
                lambda a: attention_family(a.attention) == attention_family(rec.attention),
                lambda a: a.quantization == quant, lambda a: a.gradient_checkpointing == rec.gradient_checkpointing,
                lambda a: not rec.gradient_checkpointing or a.recompute_every == rec.recompute_every):
        pool = [a for a in pool if key(a)] or pool
    # the latest of equally close runs (THROUGHPUT lists them in the order they were measured)
    anchor = min(reversed(pool), key=lambda a: abs(math.log(max(1, batch_tokens) / a.tokens_per_micro_batch)))
    scale, note = anchor.params / params, "scaled by parameter count"
    if device == "cuda":
        anchor_card = CARDS[anchor.card]
        if card is not None and card.name != anchor_card.name:
            if card.bf16_tflops and card.bf16_tflops != anchor_card.bf16_tflops:
                scale *= card.bf16_tflops / anchor_card.bf16_tflops
                note += f" and by bf16 TFLOPS {card.bf16_tflops:.0f}/{anchor_card.bf16_tflops:.0f}"
            else:
                note += f"; {anchor_card.name} figure used for {card.name} (same bf16 TFLOPS, not measured there)"
    if abs(anchor.params / params - 1) < 0.01:
        note = note.replace("scaled by parameter count", "same model size")
    return {"tokens_per_second": anchor.tokens_per_second * scale, "anchor": _describe(anchor), "note": note}


def _describe(a: Throughput) -> str:
    gc = "no recompute" if not a.gradient_checkpointing else \
        "recompute" if a.recompute_every == 1 else f"recompute 1 layer in {a.recompute_every}"
    return (f"{a.tokens_per_second:.0f} tok/s, {a.card}, {a.quantization}, {'packed' if a.packing else 'padded'}, "
            f"{gc}, {a.attention}, {a.tokens_per_micro_batch} tokens/micro batch ({a.source})")


def scheduler_lines(gpus: int, mem_gib: int, cpus: int, walltime_s: float) -> dict[str, list[str]]:
    minutes = max(15, math.ceil(walltime_s / 60 / 15) * 15)
    hhmm = f"{minutes // 60:02d}:{minutes % 60:02d}:00"
    slurm = [f"#SBATCH --cpus-per-task={cpus}", f"#SBATCH --mem={mem_gib}G", f"#SBATCH --time={hhmm}"]
    pbs = [f"#PBS -l select=1:ncpus={cpus}:mem={mem_gib}gb" + (f":ngpus={gpus}" if gpus else ""),
           f"#PBS -l walltime={hhmm}"]
    if gpus:
        slurm.insert(0, f"#SBATCH --gres=gpu:{gpus}")
    return {"slurm": slurm, "pbs": pbs}


def make_plan(cfg: MedtuneConfig, gpu: str | None = None, rows: int | None = None) -> dict[str, Any]:
    shape, shape_source = model_shape(cfg)
    counts = parameter_counts(shape, cfg.lora.lora_r, cfg.lora.target_modules)
    device, card, why = pick_target(cfg, gpu, counts["total"])
    recompute_why, batch_why = "set in the config", "set in the config"
    if cfg.training.micro_batch_size == "auto":
        from medtune.batch_auto import resolve as resolve_batch  # builds on this module's memory estimate

        cfg, batch_why = resolve_batch(cfg, shape, device, card.memory_gib if card else None)
    if cfg.lora.gradient_checkpointing == "auto":
        from medtune.recompute import resolve  # recompute.py builds on this module's memory estimate

        cfg, recompute_why = resolve(cfg, shape, device, card.memory_gib if card else None)
    data = dataset_tokens(cfg, rows)
    t = cfg.training
    batch = planned_micro_batch(cfg, data, device)
    shards = fsdp_shards(cfg) if device == "cuda" else 1
    memory = memory_gib(cfg, shape, device, batch, shards)
    mean_batch = batch.tokens * MEASURED_FILL if t.micro_batch_tokens else \
        t.micro_batch_size * data["tokens"] / max(1, data["rows"])
    speed = throughput(recipe(cfg, device), cfg.lora.packing, round(mean_batch), device, card, counts["total"])
    epoch_s = data["tokens"] / speed["tokens_per_second"]
    epoch_steps = steps_per_epoch(cfg, data, _ddp_world(cfg, device))
    train_s = epoch_s * t.num_epochs
    if t.max_steps:
        train_s = min(train_s, epoch_s * t.max_steps / max(1, epoch_steps))
    # Walltime: training plus loading, merge, validation and evaluation (~10 min on a GPU node), +30%.
    walltime = (train_s + 600) * 1.3
    merge_host = counts["total"] * 2 / GIB  # the merge reloads the base unquantized (16-bit) in host memory
    host_mem = math.ceil(max(16.0, merge_host * 1.5 + 8))
    fsdp = _fsdp_summary(cfg, counts, shards, card)
    fits = None if card is None else memory["total"] <= card.memory_gib and (not fsdp or fsdp["load_fits"])
    gpus = (shards // cfg.infrastructure.nodes if shards > 1 else 1) if device == "cuda" else 0
    return {
        "model": {"id": cfg.model.base_model_id, "shape_source": shape_source, "parameters": counts["total"],
                  "lora_trainable": counts["lora"], "lora_r": cfg.lora.lora_r, "quantization": cfg.lora.quantization},
        "target": {"device": device, "card": card.name if card else "cpu", "card_memory_gib": card.memory_gib if card
                   else None, "why": why},
        "memory_gib": {k: round(v, 2) if isinstance(v, float) else v for k, v in memory.items()},
        "micro_batch": {"tokens": batch.tokens, "rows": batch.rows, "layout": batch.layout, "why": batch_why,
                        "micro_batch_size": t.micro_batch_size, "micro_batch_tokens": t.micro_batch_tokens},
        "fsdp": fsdp,
        "fits": fits, "data": data,
        "recompute": {"on": cfg.lora.gradient_checkpointing, "why": recompute_why},
        "throughput": {**speed, "tokens_per_second": round(speed["tokens_per_second"], 1)},
        "time": {"epoch_seconds": round(epoch_s), "steps_per_epoch": epoch_steps, "train_seconds": round(train_s),
                 "walltime_seconds": round(walltime)},
        "request": {"gpus": gpus, "host_memory_gib": host_mem,
                    **scheduler_lines(gpus, host_mem, 8 if device == "cuda" else 2, walltime)},
    }


def _fsdp_summary(cfg: MedtuneConfig, counts: dict[str, int], shards: int, card: Card | None) -> dict[str, Any] | None:
    """FSDP's GPU count and, for QLoRA, the load peak: bitsandbytes quantizes the whole base on every
    GPU before accelerate shards it (unquantized bases are read by rank 0 on the host and broadcast)."""
    if shards == 1:
        return None
    peak = None
    if cfg.lora.quantization == "4bit":
        peak = (counts["linear"] * 4.127 / 8 + (counts["embeddings"] + counts["norms"]) * 2) / GIB + CUDA_CONTEXT_GIB
    return {"gpus": shards, "load_peak_gib": round(peak, 2) if peak else None,
            "load_fits": peak is None or card is None or peak <= card.memory_gib}


def render_plan(p: dict[str, Any]) -> str:
    m, mem, tm, d, mb = p["model"], p["memory_gib"], p["time"], p["data"], p["micro_batch"]
    target = p["target"]
    where = f"{target['card']} ({target['card_memory_gib']:.0f} GiB)" if target["card_memory_gib"] else "CPU"
    verdict = "" if p["fits"] is None else ("fits" if p["fits"] else "DOES NOT FIT: lower micro_batch_size or "
                                            "max_seq_length, enable gradient checkpointing or 4-bit quantization")
    gathered = f" + FSDP gathered {mem['gathered']:.2f}" if "gathered" in mem else ""
    lines = [
        f"model       {m['id']}: {m['parameters'] / 1e9:.3f}B parameters (shape from {m['shape_source']})",
        f"LoRA        r={m['lora_r']}: {m['lora_trainable']:,} trainable parameters; base {m['quantization']}",
        f"target      {where} — {target['why']}",
        f"memory      {mem['total']:.1f} GiB peak = weights {mem['weights']:.2f} + LoRA/optimizer "
        f"{mem['lora_and_optimizer']:.2f} + activations {mem['activations']:.2f} + transient {mem['transient']:.2f} "
        f"(at the {mem['peak_moment']}) + runtime {mem['overhead']:.1f}{gathered}, at the epoch's largest micro "
        f"batch: {mb['rows']} rows, {mb['tokens']:,} tokens {mb['layout']} {verdict}",
        *_fsdp_lines(p["fsdp"]),
        *([(f"micro batch {mb['micro_batch_tokens']:,}-token bins" if mb["micro_batch_tokens"] else
            f"micro batch {mb['micro_batch_size']} rows") + f" (training.micro_batch_size {mb['why']})"]
          if mb["why"].startswith("auto") else []),
        f"recompute   {'on' if p['recompute']['on'] else 'off'} ({p['recompute']['why']})",
        f"data        {d['rows']:,} training rows, {d['tokens']:,} tokens ({d['source']})",
        f"throughput  {p['throughput']['tokens_per_second']:,.0f} tok/s — {p['throughput']['note']}; anchor: "
        f"{p['throughput']['anchor']}",
        f"time        {tm['epoch_seconds'] / 60:.1f} min/epoch ({tm['steps_per_epoch']} steps), training "
        f"{tm['train_seconds'] / 60:.1f} min; walltime to request {tm['walltime_seconds'] / 60:.0f} min "
        "(+10 min load/merge/eval, +30%)",
        "", "Slurm:", *p["request"]["slurm"], "", "PBS:", *p["request"]["pbs"],
    ]
    return "\n".join(lines) + "\n"


def _fsdp_lines(fsdp: dict[str, Any] | None) -> list[str]:
    if not fsdp:
        return []
    line = f"FSDP        base sharded over {fsdp['gpus']} GPUs: the memory above is per GPU"
    if fsdp["load_peak_gib"]:
        line += (f"; loading peaks at {fsdp['load_peak_gib']:.1f} GiB per GPU (each GPU quantizes the whole base "
                 "before it is sharded)" + ("" if fsdp["load_fits"] else " — DOES NOT FIT this card"))
    return [line]
