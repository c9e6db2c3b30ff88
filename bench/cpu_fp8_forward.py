"""The forward's base GEMMs in float8 (`training.fp8_forward`) on real weights, on the CPU: the embedded model
(SmolLM2-135M-Instruct, Llama architecture, pretrained) in bf16 with the embedded preset's adapters (B at zero:
the base's forward alone), its loss on the first bundled medical rows (the loss on the answers only, as the data
stage tokenizes them) with every base GEMM in bf16 ("none"), with those of q/k/v and gate/up in float8
("qkv_gate_up"), those and o ("qkv_o_gate_up", the bench lever fp8witho), the MLP's three ("gate_up_down", fp8mlp), and with all seven in float8 ("all") (PyTorch's float8 GEMM on the CPU, the row quantization's reference arithmetic: the same
scales as the GPU's kernels). Also, per projection, how far its input's largest value stands above the row's RMS
(median and maximum over layers and tokens of amax / rms): an input with outliers loses more to a per-token
float8 scale. Prints one JSON line.

Usage: OMP_NUM_THREADS=2 .venv/bin/python bench/cpu_fp8_forward.py MODEL_DIR [ROWS]
(MODEL_DIR: the converted SmolLM2 folder in ~/pw/models/gguf--SmolLM2-135M-Instruct.Q4_1--*)
"""

from __future__ import annotations

import json
import statistics
import sys

import torch
from transformers import AutoTokenizer

from medtune import fast_lora, shared_input
from medtune.config_io import load_config
from medtune.data.render import render_rows, tokenize_pairs
from medtune.presets import EMBEDDED_PRESET, embedded_dataset_path
from medtune.train import load_for_training, make_collator

NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODES = ("qkv_gate_up", "qkv_o_gate_up", "gate_up_down", "all")
SETS = {"qkv_o_gate_up": frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"}),  # lever fp8witho
        "gate_up_down": frozenset({"gate_proj", "up_proj", "down_proj"})}  # bench/gpu_train.py's lever fp8mlp


def main(model_dir: str, rows: int = 32) -> None:
    cfg = load_config(preset=EMBEDDED_PRESET, overrides=["model.model_source=local", f"model.local_model_path={model_dir}",
                                                          "training.device=cpu", "lora.lora_dropout=0"], env={})
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    lines = (embedded_dataset_path() / "train.jsonl").read_text().splitlines()[:rows]
    data = tokenize_pairs(render_rows([json.loads(line) for line in lines], "alpaca", tok, cfg.dataset), "alpaca",
                          tok, cfg.dataset, cfg.training.max_seq_length)
    collate = make_collator(cfg, tok, "cpu")
    batches = [collate([{"input_ids": i, "labels": l} for i, l in zip(data.input_ids[s:s + 4], data.labels[s:s + 4])])
               for s in range(0, len(data.input_ids), 4)]
    torch.manual_seed(0)
    model = load_for_training(cfg, model_dir, "cpu").to(torch.bfloat16)
    if not any(getattr(m.forward, "__func__", None) is fast_lora.fused_forward_backward for m in model.modules()):
        fast_lora.install(model, backward=True)
    groups = shared_input.install(model)
    # float8 GEMMs run on the CPU too (PyTorch's reference); gradients are not needed to compare forwards
    fast_lora.fp8_mode = lambda layer, x: "both" if fast_lora.forward_in_fp8(layer) else "backward"
    model.train()
    ratios: dict[str, list[float]] = {n: [] for n in NAMES}

    def record(name):
        def hook(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            ratios[name].extend((x.abs().amax(1) / x.pow(2).mean(1).sqrt().clamp(min=1e-12)).tolist())
        return hook

    handles = [m.register_forward_pre_hook(record(n.rsplit(".", 1)[-1])) for n, m in model.named_modules()
               if n.rsplit(".", 1)[-1] in NAMES and hasattr(m, "lora_A")]
    losses = {}
    for mode in ("none", *MODES):
        fast_lora.FP8_FORWARD = SETS.get(mode, mode)
        with torch.no_grad():
            losses[mode] = [model(**b).loss.item() for b in batches]
        for h in handles:
            h.remove()
        handles = []
    fast_lora.FP8_FORWARD = None
    bf16 = statistics.mean(losses["none"])
    print(json.dumps({
        "run": "cpu_fp8_forward", "rows": rows, "micro_batches": len(batches), "groups": groups,
        "loss_bf16": round(bf16, 5),
        **{f"loss_{m}": round(statistics.mean(losses[m]), 5) for m in MODES},
        **{f"rel_diff_{m}": round(statistics.mean(losses[m]) / bf16 - 1, 5) for m in MODES},
        **{f"max_batch_rel_diff_{m}": round(max(abs(a / b - 1) for a, b in zip(losses[m], losses["none"])), 5)
           for m in MODES},
        "input_amax_over_rms": {n: {"median": round(statistics.median(v), 1), "max": round(max(v), 1)}
                                for n, v in ratios.items() if v}}))


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
