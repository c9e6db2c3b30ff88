"""Where a QLoRA micro batch's time goes, and what each lever is worth, on one loaded model.

Builds medtune's own trainer (`medtune.train.build_trainer`: the same loading, LoRA, Liger and
varlen attention as `medtune run`) once, then times forward + backward over the same packed micro
batches of real-length rows (`--tokens` per micro batch) under variants switched on the loaded model:

    peft         PEFT's own LoRA forward, gradient checkpointing on, the seed's LoRA dropout 0.05
    fused        medtune.fast_lora's forward (the default), the rest as `peft`
    fusedbw      medtune.fast_lora's forward and backward as one autograd node (`install(backward=True)`)
    *_dropout0   LoRA dropout modules replaced by identities
    *_nogc       gradient checkpointing off
    *_compiled   each decoder layer under torch.compile (regional compilation; the first micro batch,
                 untimed, compiles)
    *_graphed    each decoder layer replayed as CUDA graphs (medtune.layer_graphs: captured once for
                 `--tokens`-token micro batches; with `--pad`, which graphed variants imply, every
                 micro batch is padded to exactly `--tokens` for every variant; tokens/s counts real
                 tokens); the fused backward keeps its dropout masks there (`keep_mask`)

all under bf16 autocast as the Trainer runs them, and profiles one micro batch of `peft` and of `fused`
with torch.profiler: GPU busy time against wall time (a GPU
idle while Python launches kernels shows as busy < wall), the kernel count and the kernels that take
the most GPU time. One JSON line per variant and one for the profile.

    python bench/profile_levers.py --model-dir /tmp/llama31-8b-random --ids ids.json --tokens 8192
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from gpu_train import ensure_tokenizer, load_ids, write_data
from medtune import fast_lora, layer_graphs
from medtune.config_io import load_config
from medtune.rundir import RunDir
from medtune.train import build_trainer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run of the script itself


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEVICE == "cuda" else 0.0


def packed_batches(ids: list[list[int]], tokens: int, count: int, max_len: int) -> list[dict[str, torch.Tensor]]:
    """`count` micro batches of whole rows (in file order) up to `tokens` each, as the packing collator
    lays them out: one row, position ids restarting per example, each example's first label masked."""
    batches, rows, used = [], [], 0
    for row in (r[:max_len] for r in ids):
        if used + len(row) > tokens and rows:
            batches.append(_flatten(rows))
            rows, used = [], 0
            if len(batches) == count:
                break
        rows.append(row)
        used += len(row)
    return batches


def _flatten(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    flat = [t for r in rows for t in r]
    labels = [t for r in rows for t in [-100, *r[1:]]]
    pos = [p for r in rows for p in range(len(r))]
    cu = [0]
    for r in rows:
        cu.append(cu[-1] + len(r))
    longest = max(len(r) for r in rows)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=DEVICE)
    return {"input_ids": torch.tensor([flat], device=DEVICE), "labels": torch.tensor([labels], device=DEVICE),
            "position_ids": torch.tensor([pos], device=DEVICE), "cu_seq_lens_q": cu_t, "cu_seq_lens_k": cu_t,
            "max_length_q": longest, "max_length_k": longest}


def set_dropout(model: torch.nn.Module, on: bool, saved: dict) -> None:
    """Swap PEFT's LoRA dropout modules for identities (and back)."""
    for name, module in model.named_modules():
        if name.endswith("lora_dropout"):
            for key in list(module.keys()):
                if not on:
                    saved.setdefault((name, key), module[key])
                    module[key] = torch.nn.Identity()
                elif (name, key) in saved:
                    module[key] = saved[(name, key)]


LIGER_LAYER_FORWARDS: dict = {}  # Liger's instance forwards taken off compiled layers, to put back
EAGER_ROPE: list = []  # transformers' apply_rotary_pos_emb, saved before Liger replaces it


def set_compiled(model: torch.nn.Module, on: bool) -> None:
    """Regional torch.compile: each decoder layer compiled (one graph shared by all layers, dynamic
    token counts), the rest of the model eager; off drops the compiled call. Compiled layers run
    transformers' own RMSNorm, SwiGLU and RoPE, which inductor fuses: dynamo cannot trace Liger's
    autograd Functions inside a decoder layer (call v: an assertion in its autograd.Function handling
    at LigerRMSNormFunction.apply). Liger's fused linear + cross-entropy stays (outside the layers)."""
    from transformers.models.llama import modeling_llama

    for layer in model.get_base_model().model.layers:
        for module in (layer.input_layernorm, layer.post_attention_layernorm, layer.mlp):
            if on and "forward" in vars(module):
                LIGER_LAYER_FORWARDS[module] = vars(module).pop("forward")
            elif not on and module in LIGER_LAYER_FORWARDS:
                module.forward = LIGER_LAYER_FORWARDS.pop(module)
        if on:
            layer.compile(dynamic=True)
        else:
            layer._compiled_call_impl = None
    if EAGER_ROPE:
        liger_rope = EAGER_ROPE[1] if len(EAGER_ROPE) > 1 else modeling_llama.apply_rotary_pos_emb
        EAGER_ROPE[1:] = [liger_rope]
        modeling_llama.apply_rotary_pos_emb = EAGER_ROPE[0] if on else liger_rope


def step(model: torch.nn.Module, batch: dict) -> float:
    with torch.autocast(DEVICE, dtype=torch.bfloat16):  # as accelerate wraps the forward for bf16 training
        loss = model(**batch).loss
    loss.backward()
    return loss


def time_variant(model, batches, label: str, repeats: int, real: list[int]) -> dict:
    # warm-up: kernels tuned for this variant; compiled layers see every micro batch once, so the
    # timed passes find their graphs compiled (one per new token count until dynamo generalises it)
    for b in batches if "compiled" in label else batches[:1]:
        step(model, b)
    sync()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()  # the reserved peak then starts from what this variant holds
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    tokens = 0
    for _ in range(repeats):
        for b, n in zip(batches, real):
            loss = step(model, b)
            tokens += n
    cpu_s = time.perf_counter() - t0  # Python has launched everything; the GPU may still be behind
    sync()
    wall = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return {"variant": label, "tokens": tokens, "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall),
            "launch_s": round(cpu_s, 3), "peak_mem_gib": peak_gib(),
            # CUDA graphs keep their memory in a private pool, which the allocated figure may not show
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if DEVICE == "cuda" else 0.0,
            "loss": round(float(loss.detach()), 4)}


def accumulate(model: torch.nn.Module, batches: list[dict]) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses and the adapter gradients accumulated over `batches` (what one optimizer step sees)."""
    model.zero_grad(set_to_none=True)
    losses = [float(step(model, b).detach()) for b in batches]
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return losses, grads


def agreement(eager: tuple, graphed: tuple) -> dict:
    """How far the graphed replay's losses and accumulated gradients are from the eager run's."""
    (la, ga), (lb, gb) = eager, graphed
    rel = [float((gb[n] - ga[n]).norm() / ga[n].norm().clamp(min=1e-30)) for n in ga if n in gb]
    return {"check_losses_eager": [round(x, 5) for x in la], "check_losses_graphed": [round(x, 5) for x in lb],
            "check_grads": f"{len(rel)} of {len(ga)}", "check_grad_rel_max": max(rel) if rel else None}


def set_fused(model: torch.nn.Module, on: bool, backward: bool = False, keep_mask: bool = False) -> None:
    if on:
        fast_lora.install(model, backward=backward, keep_mask=keep_mask)
        return
    # Only fast_lora's own swaps: Liger binds RMSNorm, SwiGLU and the fused-loss forward on instances too
    # (deleting every instance forward, as this script did before 2026-11-28 15:40, removed those as well).
    for module in model.modules():
        bound = vars(module).get("forward")
        if bound is not None and getattr(bound, "__func__", None) in (fast_lora.fused_forward,
                                                                      fast_lora.fused_forward_backward):
            del module.forward


def profile(model, batch, label: str) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step(model, batch)
    sync()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        step(model, batch)
        sync()
        wall = time.perf_counter() - t0
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels) / 1e6
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        entry = by_name.setdefault(e.name[:90], [0.0, 0])
        entry[0] += e.device_time / 1e3
        entry[1] += 1
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:40]
    # The same time by the operator that launched it (aten ops, autograd nodes, Triton kernels by name).
    ops = sorted((e for e in prof.key_averages() if e.device_time_total > 0), key=lambda e: -e.self_device_time_total)
    return {"profile": label, "tokens": batch["input_ids"].numel(), "wall_s": round(wall, 3),
            "gpu_busy_s": round(busy, 3), "kernels": len(kernels),
            "top_kernels_ms_count": [[n, round(v[0], 1), v[1]] for n, v in top],
            "top_ops_self_ms_count": [[e.key[:90], round(e.self_device_time_total / 1e3, 1), e.count] for e in ops[:40]]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--ids", required=True, type=Path)
    ap.add_argument("--preset", default="llama3-8b-medical")
    ap.add_argument("--quantization", default="4bit", choices=["4bit", "none"])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variants", default="peft,fused,fused_dropout0,peft_nogc,fused_nogc,fused_nogc_dropout0")
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="skip the two profiles")
    ap.add_argument("--pad", action="store_true", help="pad every micro batch to exactly --tokens")
    ap.add_argument("--no-profile-gc", dest="profile_gc", action="store_false",
                    help="profile without recompute (the GPU presets' path on an 80 GB+ card)")
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="medtune-levers-"))
    ensure_tokenizer(Path(a.model_dir))
    ids = load_ids(a.ids)
    write_data(ids, 2048, work / "data")
    cfg = load_config(preset=a.preset, overrides=[
        "model.model_source=local", f"model.local_model_path={a.model_dir}",
        "dataset.dataset_source=local", f"dataset.local_dataset_path={a.ids}",
        f"lora.quantization={a.quantization}", "lora.bf16=true", "lora.packing=true", "lora.gradient_checkpointing=true", f"training.device={DEVICE}",
        f"output.output_root={work}"], env={})
    run = RunDir.for_run(work, "levers").create()
    trainer = build_trainer(cfg, run, a.model_dir, str(work / "data"))
    model = trainer.model
    if trainer.args.use_liger_kernel:
        # Trainer.train() applies Liger, and this script never calls it: without this line (until
        # 2026-11-28 15:50) every lever here ran without Liger's RMSNorm, SwiGLU, RoPE and fused loss.
        from transformers.integrations.liger import apply_liger_kernel
        from transformers.models.llama import modeling_llama

        EAGER_ROPE.append(modeling_llama.apply_rotary_pos_emb)
        apply_liger_kernel(model, trainer.args.liger_kernel_config)
    model.train()
    batches = packed_batches(ids, a.tokens, a.batches, 2048)
    real = [b["input_ids"].numel() for b in batches]
    if a.pad or "graphed" in a.variants:
        batches = [layer_graphs.pad_packed(b, a.tokens, 2048, pad_id=0) for b in batches]
    slots = 64 * -(-max(b["cu_seq_lens_q"].numel() for b in batches) // 64)
    saved: dict = {}
    common = {"gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu", "quantization": a.quantization, "micro_batch_tokens": a.tokens,
              "date": time.strftime("%Y-%m-%d")}
    if not a.profile_gc:
        model.activation_checkpointing_disable()
    for fused in (False, True) if a.profile else ():
        set_fused(model, fused)
        label = ("fused" if fused else "peft") + ("" if a.profile_gc else "_nogc")
        print(json.dumps({**profile(model, batches[0], label), **common}), flush=True)
    for variant in a.variants.split(","):
        set_fused(model, False)
        graphed = "graphed" in variant
        set_fused(model, variant.startswith("fused"), backward=variant.startswith("fusedbw"), keep_mask=graphed)
        set_dropout(model, "dropout0" not in variant, saved)
        set_compiled(model, "compiled" in variant)
        torch._dynamo.config.recompile_limit = 64
        if "nogc" in variant:
            model.activation_checkpointing_disable()
        else:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        extra = {}
        try:
            if graphed:
                # without dropout both runs compute the same thing: gradients over 2 accumulated micro batches
                eager = accumulate(model, batches[:2]) if "dropout0" in variant else None
                t0 = time.perf_counter()
                layer_graphs.capture(model, a.tokens, 2048, slots)
                extra = {"capture_s": round(time.perf_counter() - t0, 1), "slots": slots}
                if eager is not None:
                    extra.update(agreement(eager, accumulate(model, batches[:2])))
            result = time_variant(model, batches, variant, a.repeats, real)
            if graphed:
                print(json.dumps({**profile(model, batches[0], variant), **common}), flush=True)
        except torch.cuda.OutOfMemoryError:
            result = {"variant": variant, "oom": True}
            model.zero_grad(set_to_none=True)
        except Exception as e:  # a capture that fails must not cost the variants after it
            if not graphed:
                raise
            import traceback
            traceback.print_exc()
            result = {"variant": variant, "failed": f"{type(e).__name__}: {str(e)[:300]}"}
            model.zero_grad(set_to_none=True)
        finally:
            if graphed:
                import gc

                layer_graphs.release(model)
                gc.collect()  # the graphs' memory pool goes only with the last reference to them
                torch.cuda.empty_cache()
        print(json.dumps({"run": "levers", **result, **extra, "padded": a.pad or "graphed" in a.variants,
                          **common}), flush=True)


if __name__ == "__main__":
    main()
