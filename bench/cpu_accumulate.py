"""`fast_lora.ACCUMULATE_IN_BASE` on the CPU: LoRA forward + backward (`fast_lora.LoraLinear`, r=16, dropout
0.05, bf16 autocast on a bf16 base) over SmolLM2-135M's four projection shapes, 4 x 160 tokens, with the
base's GEMM accumulating into the adapter's part and without. Six rounds of 10 calls each in ABBA order
after a warm-up of both; prints the median seconds per round of each setting and their ratio (off / on:
above 1, accumulating is faster).

Usage: OMP_NUM_THREADS=2 .venv/bin/python bench/cpu_accumulate.py
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from medtune import fast_lora

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]  # q/o, k/v, gate/up, down (in, out)


def main() -> None:
    torch.manual_seed(0)
    bases = [torch.nn.Linear(i, o, bias=False).to(torch.bfloat16).requires_grad_(False) for i, o in SHAPES]
    adapters = [((torch.randn(16, i) * 0.1).requires_grad_(), (torch.randn(o, 16) * 0.1).requires_grad_())
                for i, o in SHAPES]
    inputs = [torch.randn(4, 160, i, dtype=torch.bfloat16, requires_grad=True) for i, _ in SHAPES]

    def calls(n: int) -> None:
        for _ in range(n):
            for base, (a, b), x in zip(bases, adapters, inputs):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = fast_lora.LoraLinear.apply(x, a, b, base, 2.0, 0.05, False, "replay")
                out.float().sum().backward()

    seconds: dict[bool, list[float]] = {True: [], False: []}
    for on in (True, False):
        fast_lora.ACCUMULATE_IN_BASE = on
        calls(3)
    for round_ in range(12):
        on = (True, False, False, True)[round_ % 4]
        fast_lora.ACCUMULATE_IN_BASE = on
        start = time.perf_counter()
        calls(10)
        seconds[on].append(time.perf_counter() - start)
    on, off = statistics.median(seconds[True]), statistics.median(seconds[False])
    print(json.dumps({"run": "cpu_accumulate", "threads": torch.get_num_threads(), "on_s": round(on, 4),
                      "off_s": round(off, 4), "off_over_on": round(off / on, 3)}))


if __name__ == "__main__":
    main()
