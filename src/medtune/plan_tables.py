"""The numbers `medtune plan` works from: model shapes, GPU cards, and measured training throughput.

Shapes are the presets' base models' config.json values (so planning needs no download). Card
figures are the vendors' spec sheets (memory, dense bf16 TFLOPS), used only to scale a measured
throughput to another card. Throughput entries are measurements, each copied from
docs/benchmarks.md with its card, recipe and source; nothing here is a guess.
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
    recipe: str        # what was measured
    quantization: str
    packing: bool
    tokens_per_second: float
    peak_gib: float | None
    source: str


# docs/benchmarks.md, "Measured throughput anchors" (copied there from /work/shared/bench/README.md
# and from the embedded demo). The lowest figure is used where one recipe was measured several times.
THROUGHPUT: tuple[Throughput, ...] = (
    Throughput("cpu-2core", 134.5e6, "LoRA r=16 all 7 projections, bf16 CPU, micro batch 4, no packing", "none", False,
               296.0, None, "embedded demo, 2-core AMD EPYC (AVX512-BF16), 2026-11-28"),
    Throughput("H200-141GB", 8.03e9, "seed QLoRA: nf4, r=64, fp16, gradient checkpointing, micro batch 1, no packing",
               "4bit", False, 472.0, 13.6, "shared/bench seed mode, Llama-3.1-8B shape, H200"),
    Throughput("H200-141GB", 8.03e9, "seed QLoRA + bf16 + packing to 2048", "4bit", True, 3440.0, 14.8,
               "shared/bench seedfast mode (lowest of 3 machines), Llama-3.1-8B shape, H200"),
)
