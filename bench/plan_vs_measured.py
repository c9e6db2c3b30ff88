"""`medtune plan`'s estimator against every measured GPU run in bench/results/*.jsonl.

For each result line with a peak memory it builds the run's recipe (medtune runs: the config
bench/gpu_train.py built, through the same `load_config`; seed anchors: their settings in
../shared/bench/seed_recipe_baseline.py), works out what each timed micro batch held, estimates the
peak of every one of them with medtune.plan_memory and prints a Markdown table.

What a timed micro batch held, in order of preference:
  1. the line's own `micro_batches` ([rows, tokens computed on] per timed micro batch, written by
     bench/gpu_train.py since 2026-11-28);
  2. a replay of the Trainer's length-grouped sampler (seed 42, after the DataLoader's one draw for its
     base seed) over the shared token ids, accepted only when it reproduces the line's token count;
  3. the mean: tokens / (timed steps × accumulation), marked "mean" in the table.
Tokens/s: `medtune plan`'s table (plan_tables.THROUGHPUT) without the run's own entry, i.e. the
estimate the plan would have made had this run not been measured; anchors: the same mode's mean on
the other machines.

Usage: .venv/bin/python bench/plan_vs_measured.py [--ids ../shared/bench/medical_token_ids.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from medtune.config_io import load_config  # noqa: E402
from medtune.plan import recipe, throughput  # noqa: E402
from medtune.plan_memory import MicroBatch, Recipe, estimate  # noqa: E402
from medtune.plan_tables import CARDS, KNOWN_SHAPES  # noqa: E402

SHAPE = KNOWN_SHAPES["meta-llama/Llama-3.1-8B-Instruct"]  # the random model has exactly this shape
PARAMS = 8_030_261_248
ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_LEN = 2048
# seed_recipe_baseline.py: r=64, dropout 0.05 on all 7 projections, nf4 + double quant, torch AdamW;
# (micro batch, accumulation, recipe) per mode. seedfast/bf16lora call prepare_model_for_kbit_training
# or plain GC without Liger; tuned_* apply Liger; rows are 2048-token slices of the concatenated data.
ANCHORS = {
    "seedfast": (1, 16, Recipe("4bit", 64, ALL7, 0.05, liger=False, attention="sdpa", upcast_frozen=True)),
    "tuned_gc": (4, 4, Recipe("4bit", 64, ALL7, 0.05, liger=True, attention="sdpa")),
    "tuned_nogc": (2, 8, Recipe("4bit", 64, ALL7, 0.05, gradient_checkpointing=False, liger=True, attention="sdpa")),
    "bf16lora": (1, 16, Recipe("none", 64, ALL7, 0.05, liger=False, attention="sdpa")),
}


# Calls u and v ran the first fused LoRA backward, which still kept a dropped copy of the input per projection
# (as PEFT does); the one that draws the masks again came later (docs/benchmarks.md, machines ten to twelve).
FUSED_BACKWARD_WITH_COPIES = {"2026-11-28-h200-u.jsonl", "2026-11-28-h200-v.jsonl"}


def medtune_recipe(line: dict, path: Path | None = None) -> Recipe:
    """The config bench/gpu_train.py built for this line (runs before the `attn` field used SDPA)."""
    cfg = load_config(preset="llama3-8b-medical", env={}, overrides=[
        f"lora.quantization={line['quantization']}", "lora.bf16=true", f"lora.packing={str(line['packing']).lower()}",
        f"lora.gradient_checkpointing={str(line['gradient_checkpointing']).lower()}",
        f"lora.recompute_every_n_layers={line.get('recompute_every_n_layers', 1)}",
        f"lora.lora_dropout={line['lora_dropout']}", f"training.micro_batch_size={line['micro_batch']}",
        f"training.gradient_accumulation={line['grad_accum']}", f"training.max_seq_length={MAX_LEN}",
        f"training.micro_batch_tokens={line.get('micro_batch_tokens', 0)}"])
    # lines before 2026-11-28 19:40 trained without the fused LoRA backward, unless they name it
    lean = bool(line.get("fused_backward")) and (path is None or path.name not in FUSED_BACKWARD_WITH_COPIES)
    # lines before 2026-11-28 22:30 kept the down projection's input and k/v repeated (PyTorch 2.11, varlen)
    return dataclasses.replace(recipe(cfg, "cuda", attention=line.get("attn", "sdpa"), liger=line["liger"]),
                               fused_backward=lean, lean_mlp=bool(line.get("lean_mlp")),
                               dropout_kernels=bool(line.get("dropout_kernels")),
                               keys_repeated=line.get("keys_repeated", True))


def replayed_batches(lengths: list[int], line: dict) -> list[MicroBatch] | None:
    """The timed micro batches, by replaying the Trainer's sampler; None if it does not reproduce the run."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    mb, ga = line["micro_batch"], line["grad_accum"]
    torch.manual_seed(42)  # medtune's training.seed; Trainer seeds the same
    torch.empty((), dtype=torch.int64).random_()  # the DataLoader draws its base seed before the sampler runs
    order = get_length_grouped_indices(lengths, mb * ga)
    rows = [[lengths[i] for i in order[k:k + mb]] for k in range(0, len(order), mb)]
    # the line does not name its warm-up steps (bench/run_gpu.sh uses 0, 1 or 2): the one that reproduces it
    timed = next((t for warm in (1, 0, 2) for t in [rows[warm * ga:(warm + line["timed_steps"]) * ga]]
                  if sum(map(sum, t)) == line["tokens"]), None)
    if timed is None:
        return None
    if line["packing"]:
        return [MicroBatch(sum(r), len(r), "packed") for r in timed]
    return [MicroBatch(len(r) * -(-max(r) // 8) * 8, len(r), "padded") for r in timed]  # pad_to_multiple_of=8


def micro_batches(line: dict, lengths: list[int] | None) -> tuple[list[MicroBatch], str]:
    if "micro_batches" in line:
        layout = "packed" if line["packing"] else "padded"
        return [MicroBatch(tokens, rows, layout) for rows, tokens in line["micro_batches"]], "recorded"
    if "run" not in line:
        mb = ANCHORS[line["mode"]][0]
        return [MicroBatch(mb * MAX_LEN, mb, "full")], "fixed"
    if lengths:
        replay = replayed_batches(lengths, line)
        if replay:
            return replay, "replayed"
    mean = round(line["tokens"] / (line["timed_steps"] * line["grad_accum"]))
    return [MicroBatch(mean, line["micro_batch"], "packed" if line["packing"] else "padded")], "mean"


def compare(path: Path, line: dict, lengths: list[int] | None, lines: list[tuple[Path, dict]]) -> dict:
    batches, how = micro_batches(line, lengths)
    if "run" in line:
        rec = medtune_recipe(line, path)
        label = line["run"]
        mean = round(statistics.mean(b.tokens for b in batches))
        speed = throughput(rec, line["packing"], mean, "cuda", CARDS["H200-141GB"], PARAMS,
                           exclude=f"bench/results/{path.name} {label}")["tokens_per_second"]
        what = f"{line['quantization']}, {'packed' if line['packing'] else 'padded'}, " \
               f"{'GC' if line['gradient_checkpointing'] else 'no GC'}, {rec.attention}, " + \
               (f"bins {line['micro_batch_tokens']}" if line.get("micro_batch_tokens") else f"mb {line['micro_batch']}")
    else:
        rec, label = ANCHORS[line["mode"]][2], line["mode"]
        others = [d["tokens_per_s"] for p, d in lines if d.get("mode") == label and p != path]
        speed = statistics.mean(others) if others else float("nan")
        what = f"seed anchor, mb {ANCHORS[label][0]} x 2048"
    peak = max((estimate(SHAPE, rec, b) for b in batches), key=lambda e: e["total"])
    largest = max(b.tokens for b in batches)
    return {"run": f"{path.stem.removeprefix('2026-11-28-')} {label}", "what": what, "measured": line["peak_mem_gib"],
            "estimate": peak["total"], "moment": peak["peak_moment"], "tokens": f"{largest:,} ({how})",
            "tps": line["tokens_per_s"], "tps_est": speed}


# Calls b, c and d of 2026-11-29 ran with a direct 4-bit forward (bitsandbytes' dequantize + one GEMM, the
# block scales kept: +0.41 GiB) that did not pay and was not kept (docs/benchmarks.md, machines 22-26).
NOT_LANDED = {"2026-11-29-h200-b.jsonl", "2026-11-29-h200-c.jsonl", "2026-11-29-h200-d.jsonl"}
# levers that became the default path after the lines naming them were measured (2026-11-29 z: float8 input
# gradients, the default since 06:20; aw, ax: the forward of q/k/v and gate/up in float8, since session 15; ay, be,
# bg: o's forward in float8 too and q/k/v's input gradients as one GEMM, since session 17)
LANDED_LEVERS = {"fp8inputgrad", "fp8groups", "fp8witho", "groupqkv"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ids", type=Path, default=ROOT.parent / "shared" / "bench" / "medical_token_ids.json")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    a = ap.parse_args()
    lengths = [min(len(r), MAX_LEN) for r in json.loads(a.ids.read_text())] if a.ids.is_file() else None
    lines = [(p, json.loads(x)) for p in sorted(a.results.glob("*.jsonl")) for x in p.read_text().splitlines()
             if x.strip()]
    # a line with merge_s read its peak after bench_merge reset the counter: that peak is the merge's;
    # data-parallel lines count every rank's tokens and each rank draws its own share of the sampler;
    # `dequantized_base`, `torch_compile`, `fp8_base`, `cuda_graphs` and `levers` lines measured levers that are not the
    # default (docs/benchmarks.md, machines eight, ten and fourteen to eighteen); a `trainer_profile` line's steps ran under the profiler; an empty
    # `micro_batches` was collated in dataloader workers (call w), so what its micro batches held is unknown;
    # an `ab_ratio` line alternated two paths; a `_pyspy` line ran under py-spy's sampler; NOT_LANDED files measured a tree with a lever that was not kept
    lines = [(p, d) for p, d in lines
             if p.name not in NOT_LANDED and "ab_ratio" not in d and d.get("peak_mem_gib") and ("micro_batch" in d or d.get("mode") in ANCHORS) and "merge_s" not in d
             and d.get("world_size", 1) == 1 and not d.get("dequantized_base") and not d.get("torch_compile")
             and not d.get("fp8_base") and not d.get("cuda_graphs") and not set(d.get("levers") or ()) - LANDED_LEVERS
             and "trainer_profile" not in d and d.get("micro_batches") != [] and not d.get("run", "").endswith("_pyspy")]
    print("| run | recipe | largest timed micro batch, tokens | measured GiB | estimated GiB (peak at) | error "
          "| measured tok/s | estimated tok/s | error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path, line in lines:
        r = compare(path, line, lengths, lines)
        print(f"| {r['run']} | {r['what']} | {r['tokens']} | {r['measured']:.2f} | {r['estimate']:.2f} "
              f"({r['moment']}) | {100 * (r['estimate'] / r['measured'] - 1):+.0f} % | {r['tps']:,} | "
              f"{r['tps_est']:,.0f} | {100 * (r['tps_est'] / r['tps'] - 1):+.0f} % |")


if __name__ == "__main__":
    main()
