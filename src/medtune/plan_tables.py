"""The numbers `medtune plan` works from: model shapes, GPU cards, and measured training throughput.

Shapes are the presets' base models' config.json values (so planning needs no download). Card
figures are the vendors' spec sheets (memory, dense bf16 TFLOPS), used only to scale a measured
throughput to another card. Throughput entries are measurements, each citing the bench/results file
and run label (or the docs/benchmarks.md section) it comes from; nothing here is a guess.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    head_dim: int = 0  # 0: hidden // heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden // self.heads


KNOWN_SHAPES: dict[str, Shape] = {
    "meta-llama/Llama-3.1-8B-Instruct": Shape(4096, 14336, 32, 32, 8, 128256, False),
    "meta-llama/Llama-3.1-70B-Instruct": Shape(8192, 28672, 80, 64, 8, 128256, False),  # FSDP's use case
    "mistralai/Mistral-7B-Instruct-v0.2": Shape(4096, 14336, 32, 32, 8, 32000, False),
    "google/gemma-7b-it": Shape(3072, 24576, 28, 16, 16, 256000, True, head_dim=256),
    "meta-llama/Llama-2-7b-chat-hf": Shape(4096, 11008, 32, 32, 32, 32000, False),
    "HuggingFaceTB/SmolLM2-135M-Instruct": Shape(576, 1536, 30, 9, 3, 49152, True),
}


@dataclass(frozen=True)
class Card:
    name: str
    memory_gib: float
    bf16_tflops: float


CARDS: dict[str, Card] = {c.name: c for c in (
    Card("H100-80GB", 79.6, 989.0),   # SXM
    Card("H100-PCIe", 79.6, 756.0),
    Card("H200-141GB", 139.8, 989.0),
    Card("A100-80GB", 79.2, 312.0),
    Card("A100-40GB", 39.4, 312.0),
    Card("L40S-48GB", 44.4, 362.0),
    Card("A10-24GB", 22.0, 125.0),
    Card("RTX4090-24GB", 23.6, 165.0),
)}


@dataclass(frozen=True)
class Throughput:
    card: str          # a CARDS name, or "cpu-2core"
    params: float      # base model parameters of the measured run
    quantization: str
    packing: bool
    gradient_checkpointing: bool
    attention: str     # the attention kernel the run used
    tokens_per_micro_batch: int  # real tokens per forward pass in the timed steps (mean)
    tokens_per_second: float
    source: str        # results file and run label (or the docs section) the figure comes from
    recompute_every: int = 1  # with gradient checkpointing: every n-th decoder layer recomputed


H200 = "H200-141GB"
L8B = 8.03e9
# Measured training throughput of medtune's own training path (bench/gpu_train.py: medtune.train's
# model loading, LoRA r=64 on all 7 projections, dropout 0.05, collator and Trainer) on a random
# Llama-3.1-8B-shaped model and the shared real medical token ids, 3 timed optimizer steps after one
# warm-up; tokens/s count real (non-padding) tokens. Tokens per micro batch = the line's tokens /
# (timed steps x gradient accumulation). The CPU row is the embedded demo (docs/benchmarks.md).
THROUGHPUT: tuple[Throughput, ...] = (
    Throughput("cpu-2core", 134.5e6, "none", False, False, "sdpa", 589, 296.0,
               "docs/benchmarks.md, embedded demo (micro batch 4, 64,810 tokens in 219 s)"),
    Throughput(H200, L8B, "4bit", False, True, "sdpa", 2274, 2103.0,
               "bench/results/2026-11-28-h200-a.jsonl medtune_qlora"),
    Throughput(H200, L8B, "4bit", False, True, "sdpa", 6810, 4579.0,
               "bench/results/2026-11-28-h200-a.jsonl medtune_qlora_mb16"),
    Throughput(H200, L8B, "none", False, True, "sdpa", 2274, 2315.0,
               "bench/results/2026-11-28-h200-a.jsonl medtune_bf16"),
    Throughput(H200, L8B, "4bit", True, True, "sdpa", 5360, 2875.0,
               "bench/results/2026-11-28-h200-b.jsonl medtune_qlora_packed_merge"),
    Throughput(H200, L8B, "none", True, True, "sdpa", 5360, 4003.0,
               "bench/results/2026-11-28-h200-b.jsonl medtune_bf16_packed"),
    Throughput(H200, L8B, "4bit", True, True, "flex_attention", 5360, 5168.0,
               "bench/results/2026-11-28-h200-c.jsonl medtune_qlora_packed"),
    Throughput(H200, L8B, "4bit", True, False, "flex_attention", 2680, 6074.0,
               "bench/results/2026-11-28-h200-c.jsonl medtune_qlora_packed_nogc"),
    Throughput(H200, L8B, "none", True, True, "flex_attention", 5360, 5891.0,
               "bench/results/2026-11-28-h200-c.jsonl medtune_bf16_packed"),
    Throughput(H200, L8B, "4bit", True, True, "varlen", 5360, 5456.0,
               "bench/results/2026-11-28-h200-d.jsonl medtune_varlen"),
    Throughput(H200, L8B, "4bit", True, True, "varlen", 5360, 5061.0,
               "bench/results/2026-11-28-h200-e.jsonl medtune_varlen"),
    Throughput(H200, L8B, "4bit", True, True, "varlen", 5517, 6112.0,
               "bench/results/2026-11-28-h200-d.jsonl medtune_preset"),
    Throughput(H200, L8B, "4bit", True, True, "varlen", 9582, 7335.0,
               "bench/results/2026-11-28-h200-d.jsonl fast20"),
    Throughput(H200, L8B, "4bit", True, True, "varlen", 10721, 6406.0,
               "bench/results/2026-11-28-h200-d.jsonl medtune_varlen_mb52"),
    Throughput(H200, L8B, "4bit", True, True, "varlen", 10721, 7318.0,
               "bench/results/2026-11-28-h200-e.jsonl medtune_varlen_mb52"),
    # From here: token-bin micro batches and the fused LoRA forward (medtune.fast_lora)
    Throughput(H200, L8B, "4bit", True, True, "varlen", 16090, 9121.0,
               "bench/results/2026-11-28-h200x2-m.jsonl medtune_bins16k_gpus1"),
    Throughput(H200, L8B, "4bit", True, False, "varlen", 8058, 12374.0,
               "bench/results/2026-11-28-h200x2-m.jsonl bins_nogc"),
    Throughput(H200, L8B, "4bit", True, False, "varlen", 8058, 12023.0,
               "bench/results/2026-11-28-h200-n.jsonl bins_nogc"),
    Throughput(H200, L8B, "4bit", True, False, "varlen", 4066, 10511.0,
               "bench/results/2026-11-28-h200-n.jsonl bins_nogc4k"),
    Throughput(H200, L8B, "none", True, False, "varlen", 8058, 12911.0,
               "bench/results/2026-11-28-h200-n.jsonl bins_bf16_nogc"),
    Throughput(H200, L8B, "4bit", True, False, "varlen", 8058, 12318.0,
               "bench/results/2026-11-28-h200-r.jsonl bins_nogc"),
    Throughput(H200, L8B, "4bit", True, False, "varlen", 8058, 11873.0,
               "bench/results/2026-11-28-h200-s.jsonl bins_nogc"),
    Throughput(H200, L8B, "4bit", True, True, "varlen", 16090, 9309.0,
               "bench/results/2026-11-28-h200-s.jsonl bins_gc"),
    Throughput(H200, L8B, "4bit", True, True, "varlen", 8058, 10173.0,
               "bench/results/2026-11-28-h200-t.jsonl bins_partial2", recompute_every=2),
    # From here: the fused LoRA backward, the lean MLP and the dropout kernels (the default since 2026-11-28
    # 22:10); among runs as close as each other the plan takes the latest, listed last
    Throughput(H200, L8B, "4bit", True, False, "varlen", 8058, 13355.0,
               "bench/results/2026-11-28-h200-ak.jsonl bins_nogc"),
    # From here: timed to the last step's end (before, the Trainer's final checkpoint was inside the time)
    Throughput(H200, L8B, "none", True, False, "varlen", 8058, 15313.0,
               "bench/results/2026-11-29-h200-g.jsonl bins_bf16_nogc"),
    # The base's GEMMs accumulating into the adapter's part and medtune.nf4's dequantize (the default since
    # 2026-11-29 02:05)
    Throughput(H200, L8B, "4bit", True, False, "varlen", 8058, 15668.0,
               "bench/results/2026-11-29-h200-i.jsonl bins_nogc"),
    # medtune.lora_dropout's paired hash (the default since 2026-11-29 04:10); m: its kernels no longer
    # specialised on the token count and seed
    Throughput(H200, L8B, "none", True, False, "varlen", 8058, 15795.0,
               "bench/results/2026-11-29-h200-k.jsonl bins_bf16_nogc"),
    Throughput(H200, L8B, "4bit", True, False, "varlen", 8058, 15339.0,
               "bench/results/2026-11-29-h200-m.jsonl bins_nogc"),
    # the nested nf4 scales dequantized in medtune.nf4's kernel and the adapter weights cast once per step (the
    # default since 2026-11-29 05:40); u: beside Unsloth on the same machine
    Throughput(H200, L8B, "4bit", True, False, "varlen", 8058, 15604.0,
               "bench/results/2026-11-29-h200-u.jsonl bins_nogc"),
    # a 4-bit base's input-gradient GEMMs in float8 (the default since 2026-11-29 06:20; z ran it as a lever,
    # beside Unsloth on the same machine)
    Throughput(H200, L8B, "4bit", True, False, "varlen", 8058, 15938.0,
               "bench/results/2026-11-29-h200-z.jsonl bins_nogc_fp8inputgrad"),
    # the same defaults beside Unsloth on another machine (2026-11-29 ac, session 12)
    Throughput(H200, L8B, "4bit", True, False, "varlen", 8058, 15850.0,
               "bench/results/2026-11-29-h200-ac.jsonl bins_nogc"),
    # q/k/v and gate/up as one node each (medtune.shared_input, the default since 2026-11-29 12:50); aq ran it
    # straight after a 24-step A/B run, on a warm card, as a long run trains
    Throughput(H200, L8B, "4bit", True, False, "varlen", 8058, 17245.0,
               "bench/results/2026-11-29-h200-aq.jsonl bins_nogc"),
    # the forward of q/k/v and gate/up in float8 (training.fp8_forward, the default since session 15; aw ran it as
    # the lever fp8groups, on the same machine as its 16-bit forward's 16,807)
    Throughput(H200, L8B, "4bit", True, False, "varlen", 8058, 17978.0,
               "bench/results/2026-11-29-h200-aw.jsonl bins_nogc_fp8grp"),
    # o's forward in float8 too and q/k/v's input gradients as one float8 GEMM (the default since session 17; bg ran
    # it as the levers fp8witho + groupqkv, the first of its runs on the machine's first card)
    Throughput(H200, L8B, "4bit", True, False, "varlen", 8058, 18795.0,
               "bench/results/2026-11-29-h200-bg-gpu0.jsonl bins_nogc_fp8o_groupqkv"),
)
