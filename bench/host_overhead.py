"""Host time per call of the pieces of one QLoRA projection (Llama-3.1-8B's q_proj shape: nf4 4,096 x 4,096,
double quantization, LoRA r=64, dropout 0.05) on a 64-token input: the host's time alone (the clock stops
before the GPU is waited for), what the forward of an 8B model (224 projections) spends in Python. One
JSON line: microseconds per call. (Call 2026-11-29-h200-c also timed a direct 4-bit forward that was not
kept: its `direct_*` fields.)"""

from __future__ import annotations

import json
import time

import torch

from medtune import fast_lora, lora_dropout, nf4

TOKENS, WIDTH, RANK, P = 64, 4096, 64, 0.05


def per_call_us(fn, repeats: int = 40) -> float:
    """Host time per call: the clock stops before the device is waited for (40 calls stay well inside the
    launch queue, so the host never blocks on the GPU)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    return round(host / repeats * 1e6, 1)


def lora_layer():
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    class One(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = bnb.nn.Linear4bit(WIDTH, WIDTH, bias=False, compute_dtype=torch.bfloat16,
                                          compress_statistics=True, quant_type="nf4")

        def forward(self, x):
            return self.proj(x)

    model = One()
    model.proj.weight = bnb.nn.Params4bit(torch.randn(WIDTH, WIDTH, dtype=torch.bfloat16) * 0.02, requires_grad=False,
                                          compress_statistics=True, quant_type="nf4")
    model = get_peft_model(model.cuda(), LoraConfig(r=RANK, lora_alpha=16, lora_dropout=P, target_modules=["proj"]))
    fast_lora.install(model, backward=True)
    model.train()
    return model


def main() -> None:
    import bitsandbytes as bnb

    torch.manual_seed(0)
    model = lora_layer()
    layer = model.base_model.model.proj
    base = layer.base_layer
    state = base.weight.quant_state
    x = torch.randn(TOKENS, WIDTH, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    a = layer.lora_A["default"].weight
    a16 = a.to(torch.bfloat16)
    dh = torch.randn(TOKENS, RANK, device="cuda", dtype=torch.bfloat16)
    gx = torch.randn(TOKENS, WIDTH, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(TOKENS, WIDTH, device="cuda", dtype=torch.bfloat16)
    small = torch.randn(4, device="cuda")

    def forward_backward():
        layer(x).backward(grad)

    line: dict[str, object] = {"run": "hostbench", "gpu": torch.cuda.get_device_name(), "tokens": TOKENS}
    with torch.no_grad():
        line["empty_add"] = per_call_us(lambda: small.add(1))
        line["cast_a"] = per_call_us(lambda: a.to(torch.bfloat16))
        line["new_seed"] = per_call_us(lora_dropout.new_seed)
        line["dropout_forward_kernel"] = per_call_us(lambda: lora_dropout.forward(x, a16, P, 7))
        line["dropout_grad_a_kernel"] = per_call_us(lambda: lora_dropout.grad_a(x, dh, P, 7))
        line["dropout_grad_x_kernel"] = per_call_us(lambda: lora_dropout.add_grad_x(gx, dh, a16, P, 7))
        line["bnb_dequantize_4bit"] = per_call_us(lambda: bnb.functional.dequantize_4bit(base.weight.data, state))
        line["bnb_linear4bit_forward"] = per_call_us(lambda: base(x))
        line["nf4_dequantize"] = per_call_us(lambda: nf4.dequantize(base, state.dtype))
        nf4.NESTED_IN_KERNEL = False
        line["nf4_dequantize_scales_apart"] = per_call_us(lambda: nf4.dequantize(base, state.dtype))
        nf4.NESTED_IN_KERNEL = True
    line["lora_forward"] = per_call_us(lambda: layer(x))
    line["lora_forward_backward"] = per_call_us(forward_backward)
    steps = fast_lora.StepCasts()  # within an optimizer step: the adapter's 16-bit copies kept
    steps.on_step_begin(None, None, None)
    line["lora_forward_in_step"] = per_call_us(lambda: layer(x))
    line["lora_forward_backward_in_step"] = per_call_us(forward_backward)
    steps.on_train_end(None, None, None)
    print(json.dumps(line))


if __name__ == "__main__":
    main()
