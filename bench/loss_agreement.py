"""Loss agreement of medtune's fast path with the plain PEFT path: one JSON line.

Reads the JSON lines `bench/gpu_train.py` printed for the two runs (same rows, same seed, same
optimizer steps) and compares their per-step losses. Tolerance: 2% relative per step, the spread that
bf16 compute on a 4-bit base allows between two attention kernels and two cross-entropy kernels
(fused vs materialised logits); packing itself changes no loss (tests/unit/test_packing.py, float32).

Usage: python bench/loss_agreement.py FAST.out PLAIN.out
"""

from __future__ import annotations

import json
import sys

TOLERANCE = 0.02


def last_json(path: str) -> dict:
    lines = [line for line in open(path) if line.startswith("{")]
    return json.loads(lines[-1])


def main(fast_path: str, plain_path: str) -> None:
    fast, plain = last_json(fast_path), last_json(plain_path)
    pairs = list(zip(fast["losses"], plain["losses"]))
    rel = [abs(a - b) / abs(b) for a, b in pairs]
    print(json.dumps({
        "run": "loss_agreement", "steps": len(pairs), "fast": fast["losses"], "plain": plain["losses"],
        "max_rel_diff": round(max(rel), 5), "mean_rel_diff": round(sum(rel) / len(rel), 5),
        "tolerance": TOLERANCE, "within": max(rel) <= TOLERANCE,
        "fast_tokens_per_s": fast["tokens_per_s"], "plain_tokens_per_s": plain["tokens_per_s"],
    }), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
