"""`medtune.loss_positions` on the CPU: the embedded preset's training forward + backward (its model with adapters
as `train` loads it, its collator, its micro batch) over the first rows of the bundled medical data, tokenized as
the data stage does (the loss on the answers only), with the output layer and the loss on every position and on
the trained positions only. Six rounds of 4 micro batches per setting in ABBA order after a warm-up of both;
prints the median seconds per round of each, their ratio (whole / trained only: above 1, leaving the prompt out
is faster), the share of positions kept and the largest loss difference.

Usage: OMP_NUM_THREADS=2 .venv/bin/python bench/cpu_loss_positions.py MODEL_DIR
(MODEL_DIR: the converted SmolLM2 folder in ~/pw/models/gguf--SmolLM2-135M-Instruct.Q4_1--*)
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
from transformers import AutoTokenizer

from medtune.config_io import load_config
from medtune.data.render import render_rows, tokenize_pairs
from medtune.loss_positions import with_loss_positions
from medtune.presets import EMBEDDED_PRESET, embedded_dataset_path
from medtune.train import compute_dtype, load_for_training, make_collator


def main(model_dir: str, micro_batches: int = 4) -> None:
    cfg = load_config(preset=EMBEDDED_PRESET, overrides=["model.model_source=local", f"model.local_model_path={model_dir}",
                                                          "training.device=cpu"], env={})
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    size = cfg.training.micro_batch_size
    lines = (embedded_dataset_path() / "train.jsonl").read_text().splitlines()[: micro_batches * size]
    rows = [json.loads(line) for line in lines]
    data = tokenize_pairs(render_rows(rows, "alpaca", tok, cfg.dataset), "alpaca", tok, cfg.dataset,
                          cfg.training.max_seq_length)
    collate = make_collator(cfg, tok, "cpu")
    whole = [collate([{"input_ids": i, "labels": l} for i, l in zip(data.input_ids[s:s + size], data.labels[s:s + size])])
             for s in range(0, len(data.input_ids), size)]
    kept = [with_loss_positions(b) for b in whole]
    torch.manual_seed(0)
    model = load_for_training(cfg, model_dir, "cpu")
    model.train()
    autocast = compute_dtype(cfg, "cpu") == torch.bfloat16

    def round_(batches) -> tuple[float, list[float]]:
        start, losses = time.perf_counter(), []
        for batch in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(**batch).loss
            loss.backward()
            losses.append(loss.item())
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start, losses

    seconds: dict[bool, list[float]] = {True: [], False: []}
    losses = {on: round_(kept if on else whole)[1] for on in (True, False)}  # warm-up
    for i in range(12):
        on = (True, False, False, True)[i % 4]
        seconds[on].append(round_(kept if on else whole)[0])
    on, off = statistics.median(seconds[True]), statistics.median(seconds[False])
    positions = sum(b["input_ids"].numel() for b in whole)
    print(json.dumps({
        "run": "cpu_loss_positions", "threads": torch.get_num_threads(), "micro_batches": len(whole),
        "positions": positions, "kept": sum(b["logits_to_keep"].numel() * b["input_ids"].shape[0] if "logits_to_keep" in b
                                            else b["input_ids"].numel() for b in kept),
        "trained_only_s": round(on, 3), "whole_s": round(off, 3), "whole_over_trained_only": round(off / on, 3),
        "max_loss_rel_diff": max(abs(a - b) / abs(b) for a, b in zip(losses[True], losses[False]))}))


if __name__ == "__main__":
    main(sys.argv[1])
