"""FlashAttention 4 (`flash_attn.cute`, CuTe DSL kernels for Hopper and Blackwell) on the GPU against
medtune's attention path (`medtune.attention.FlashGqa`: PyTorch's FlashAttention 2 kernels) for Llama-3.1-8B's
attention (32 query heads, 8 key/value heads, head size 128) over 8,192-token micro batches of packed examples of
the bench data's lengths, causal within each example, bf16: the output's and the gradients' relative difference,
forward and forward + backward time of each (GPU), the host's time per forward + backward and whether a call waits
for the GPU, and the first call's time (the DSL compiles its kernels then). Packings of 2 to 64 examples show
whether another example count compiles again. One JSON line; where
`flash_attn.cute` cannot be imported, a line with the error.

Attention was 8 % of an 8B QLoRA step's GPU time on an H200 (docs/benchmarks.md, machines thirty-nine to
forty-one), FlashAttention 2 running far below the card's rate on short packed examples.

    python bench/fa4_check.py      (bench/run_gpu.sh: RUNS=fa4check, the wheels staged by RUNS=fa4stage)
"""

from __future__ import annotations

import json
import random
import time

import torch

from gqa_check import attention_inputs
from kernel_timing import host_ms, rel, timed


def main() -> None:
    line: dict[str, object] = {"run": "fa4check"}
    try:
        import flash_attn.cute as fa4
        from medtune import attention
    except Exception as exc:  # not installed, or its compiler's libraries missing: say which
        line["error"] = f"{type(exc).__name__}: {exc}"[:400]
        print(json.dumps(line))
        return
    line.update({"gpu": torch.cuda.get_device_name(), "fa4_version": getattr(fa4, "__version__", None)})
    lengths, cu, longest, q, k, v, grad = attention_inputs()
    line.update({"tokens": int(cu[-1]), "examples": len(lengths)})

    def flash_gqa(q=q, k=k, v=v, cu=cu, longest=longest):
        return attention.FlashGqa.apply(q, k, v, cu, longest, None)

    def flash4(q=q, k=k, v=v, cu=cu, longest=longest):
        return fa4.flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest,
                                          max_seqlen_k=longest, causal=True)[0]

    want = flash_gqa()
    want = (want.detach(), *torch.autograd.grad(want, (q, k, v), grad))
    start = time.perf_counter()
    try:
        got = flash4()
        got = (got.detach(), *torch.autograd.grad(got, (q, k, v), grad))
    except Exception as exc:
        line["error"] = f"{type(exc).__name__}: {exc}"[:400]
        print(json.dumps(line))
        return
    torch.cuda.synchronize()
    line["first_call_s"] = round(time.perf_counter() - start, 2)
    line["rel_err"] = {n: round(rel(a, b), 6) for n, a, b in zip(("out", "dq", "dk", "dv"), got, want)}
    for name, fn in (("flash_gqa", flash_gqa), ("fa4", flash4)):
        with torch.no_grad():
            line[f"{name}_fwd_ms"] = round(timed(fn), 3)
        line[f"{name}_fwd_bwd_ms"] = round(timed(lambda fn=fn: torch.autograd.grad(fn(), (q, k, v), grad)), 3)
    line["speedup_fwd_bwd"] = round(line["flash_gqa_fwd_bwd_ms"] / line["fa4_fwd_bwd_ms"], 3)
    # the host's time per forward + backward (a training step issues 128 of each for an 8B at 4 x 8,192 tokens)
    for name, fn in (("flash_gqa", flash_gqa), ("fa4", flash4)):
        ms, waited = host_ms(lambda fn=fn: torch.autograd.grad(fn(), (q, k, v), grad))
        line[f"{name}_host_ms_fwd_bwd"], line[f"{name}_waited_for_gpu"] = round(ms, 3), waited
    # packings of other example counts (a training micro batch held 5 to 61): does a first call compile again?
    firsts = {}
    for count in (2, 6, 12, 24, 40, 64):
        cuts = sorted(random.Random(count).sample(range(1, 8192), count - 1))
        bounds = [0, *cuts, 8192]
        cu2 = torch.tensor(bounds, device="cuda", dtype=torch.int32)
        longest2 = max(b - a for a, b in zip(bounds, bounds[1:]))
        start = time.perf_counter()
        torch.autograd.grad(flash4(cu=cu2, longest=longest2), (q, k, v), grad)
        torch.cuda.synchronize()
        firsts[count] = round(time.perf_counter() - start, 3)
    line["first_call_s_by_examples"] = firsts
    print(json.dumps(line))


if __name__ == "__main__":
    main()
