"""Data-stage speed: tokenize + pack 15,000 rows, then a second run on the same inputs (cache hit).

Rows: the shared medical_mistral_instruct_dataset_short (1,800 rows) repeated to 15,000, written as
one JSONL file; tokenizer: the embedded SmolLM2-135M-Instruct (a real 49k-vocab BPE with a ChatML
template), rendered with `dataset.rerender_prompts=true`. Packing is timed as the padding-free
collator run over every training example in micro batches of 8 (what the Trainer does with
`lora.packing=true`). Skips when ../shared is absent.

    .venv/bin/python bench/data_speed.py
"""

from __future__ import annotations

import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

ROWS = 15_000
SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "medical_mistral_instruct_dataset_short"


def main() -> int:
    if not SHARED.is_dir():
        print(f"skipped: {SHARED} not present")
        return 0
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from medtune.config_io import load_config
    from medtune.data import prepare_data
    from medtune.data.load import check_source
    from medtune.model import prepare_model
    from medtune.rundir import RunDir
    from medtune.train import make_collator

    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="medtune-bench-"))
    source = load_from_disk(str(SHARED))["train"].remove_columns(["prompt"]).to_list()
    data = tmp / "medical_15k.jsonl"
    with data.open("w") as fh:
        for i in range(ROWS):
            fh.write(json.dumps(source[i % len(source)]) + "\n")
    cfg = load_config(preset="smollm2-135m-medical", overrides=[
        f"dataset.local_dataset_path={data}", "dataset.eval_split=", "dataset.rerender_prompts=true",
        "training.max_seq_length=1024", "lora.packing=true", f"model.model_cache_dir={tmp / 'models'}",
        f"output.output_root={tmp / 'out'}"])
    model_path = prepare_model(cfg.model)["path"]  # the GGUF conversion is the model stage's, not timed here

    def one_run(name: str) -> dict[str, float]:
        run = RunDir(tmp / name).create()
        t0 = time.perf_counter()
        check_source(cfg.dataset)
        t1 = time.perf_counter()
        result = prepare_data(cfg, run, model_path)
        t2 = time.perf_counter()
        train = load_from_disk(str(run.data / "train"))
        collator = make_collator(cfg, AutoTokenizer.from_pretrained(model_path), "cpu")
        feats = [{"input_ids": i, "labels": lab} for i, lab in zip(train["input_ids"], train["labels"], strict=True)]
        packed_tokens = sum(collator(feats[i:i + 8])["input_ids"].shape[1] for i in range(0, len(feats), 8))
        t3 = time.perf_counter()
        report = result["report"]
        return {"preflight_s": t1 - t0, "data_stage_s": t2 - t1, "pack_s": t3 - t2, "total_s": t3 - t0,
                "examples": report["train_examples"] + report["eval_examples"], "packed_tokens": packed_tokens}

    first, second = one_run("run1"), one_run("run2")
    print(f"machine: {platform.processor() or platform.machine()}, python {sys.version.split()[0]}")
    for name, r in (("first run (tokenize + pack)", first), ("second run (cache)", second)):
        print(f"{name}: preflight {r['preflight_s']:.2f} s, data stage {r['data_stage_s']:.2f} s, "
              f"packing {r['pack_s']:.2f} s, total {r['total_s']:.2f} s; {r['examples']} examples, "
              f"{r['packed_tokens']} packed tokens")
    print(f"second run, data stage alone: {second['data_stage_s']:.2f} s (limit 3 s); first run total "
          f"{first['total_s']:.2f} s (limit 30 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
