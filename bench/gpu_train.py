"""Throughput of medtune's own training path on a GPU, on the same token data as the seed anchor.

Runs `medtune.train.build_trainer` — the exact model loading, LoRA, collator and Trainer settings
`medtune run` uses — on a model folder (e.g. the random Llama-3.1-8B from the seed anchor's `make`)
and the shared real-length token ids, and prints one JSON line:

    tokens_per_s (real tokens, padding excluded), peak_mem_gib, mfu_pct, first losses.

MFU counts model FLOPs only (recompute excluded): 33.5 GFLOP/token for LoRA on a frozen
Llama-3.1-8B at sequence 2048 (the figure of the performance issue), against the 795 TFLOP/s bf16
matmul ceiling measured on the H100 (the H200 measured 769-798).

Usage (see bench/run_gpu.sh):
    python bench/gpu_train.py --model-dir /tmp/llama31-8b-random --ids medical_token_ids.json \
        --quantization 4bit --micro-batch 4 --grad-accum 4 --steps 3 --warm 1
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from medtune import attention, divergence, fast_lora, fp8_base, fp8_rows, lora_dropout, nf4, shared_input
from medtune.config_io import load_config
from medtune.machine_fit import resolve_recompute
from medtune.rundir import RunDir
from medtune.train import build_trainer

MODEL_GFLOP_PER_TOKEN = 33.5
PEAK_TFLOPS = 795.0


class BatchShapes:
    """Records [rows, tokens computed on] of every micro batch, in order, as the Trainer fetches them (packed: the
    flattened length; padded: rows x padded length): bench/plan_vs_measured.py sizes the memory estimate of each
    timed micro batch from these. Read in the training process, also where dataloader workers collate."""

    def __init__(self, trainer) -> None:
        self.shapes: list[list[int]] = []
        fetch = trainer.get_batch_samples

        def recorded(*args, **kwargs):
            batches, items = fetch(*args, **kwargs)
            self.shapes.extend(self.shape(b) for b in batches)
            return batches, items

        trainer.get_batch_samples = recorded

    @staticmethod
    def shape(batch) -> list[int]:
        ids = batch["input_ids"]
        rows = len(batch["cu_seq_lens_q"]) - 1 if "cu_seq_lens_q" in batch else int(ids.shape[0])  # a bin: one row
        return [rows, int(ids.numel())]


class StepTimer(TrainerCallback):
    """Times optimizer steps after `warm` warm-up steps, from the first timed step's start to the last
    step's end, as the anchors' loops do (../shared/bench); counts real (non-padding) tokens. The Trainer's
    checkpoint at the end of training (save_strategy "steps" saves at the last step: the adapter and the
    optimizer state, ~2 s for an 8B model's r=64 adapter) falls after the clock stops; before 2026-11-29 the
    clock stopped at `on_train_end` and took it in."""

    def __init__(self, warm: int, window: int = 0) -> None:
        self.warm, self.window = warm, window
        self.start = 0.0
        self.tokens0 = 0
        self.result: dict[str, float] = {}

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warm:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = time.perf_counter()
            self.tokens0 = int(state.num_input_tokens_seen)

    def on_step_end(self, args, state, control, **kwargs):
        if self.window and state.global_step == self.warm + self.window < args.max_steps:
            # the anchors' own window (../shared/bench: 3 timed optimizer steps): the same clock read at that step's
            # end, one device sync more in the run (between two steps)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - self.start
            tokens = int(state.num_input_tokens_seen) - self.tokens0
            self.result["window"] = {"steps": self.window, "seconds": round(seconds, 2), "tokens": tokens,
                                     "tokens_per_s": round(tokens / seconds)}
        if state.global_step == args.max_steps:  # the step counter has moved on: this was the last step
            self._stop(state)

    def on_train_end(self, args, state, control, **kwargs):
        if not self.result:  # training stopped before max_steps
            self._stop(state)

    def _stop(self, state) -> None:
        torch.cuda.synchronize()
        seconds = time.perf_counter() - self.start
        tokens = int(state.num_input_tokens_seen) - self.tokens0
        self.result.update(seconds=round(seconds, 2), tokens=tokens, tokens_per_s=round(tokens / seconds))


class Alternate(TrainerCallback):
    """A/B within one run: after `warm` steps (which alternate the two settings, so that one-time costs such as
    Triton's compiles fall there), the timed steps take a lever's two settings in ABBA order
    (A B B A A B B A ...: a drift of the card's clock over the run weighs on both alike), set by `switch(on)`
    at each step's start. Each step is timed alone, from its start to its end with a device sync at both
    (the logging between steps and the checkpoint after the last one fall outside). `result`: `ab_summary`
    of [on, seconds, tokens, cudaMalloc calls] for every timed step."""

    ORDER = (True, False, False, True)

    def __init__(self, warm: int, switch) -> None:
        self.warm, self.switch = warm, switch
        self.started: tuple[bool, float, int, int] | None = None
        self.each: list[list[float]] = []
        self.result: dict[str, Any] = {}

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step < self.warm:  # both settings in the warm-up: one-time costs (Triton's compiles) fall there
            self.switch(state.global_step % 2 == 0)
            return
        on = self.ORDER[(state.global_step - self.warm) % len(self.ORDER)]
        self.switch(on)
        _sync()
        self.started = (on, time.perf_counter(), int(state.num_input_tokens_seen), _device_allocs())

    def on_step_end(self, args, state, control, **kwargs):
        if self.started is None:
            return
        _sync()
        on, start, tokens, allocs = self.started
        self.each.append([int(on), round(time.perf_counter() - start, 3), int(state.num_input_tokens_seen) - tokens,
                          _device_allocs() - allocs])
        self.started = None

    def on_train_end(self, args, state, control, **kwargs):
        self.result = ab_summary(self.each)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _device_allocs() -> int:
    """cudaMalloc calls so far by PyTorch's caching allocator (0 without CUDA)."""
    return int(torch.cuda.memory_stats().get("num_device_alloc", 0)) if torch.cuda.is_available() else 0


def ab_summary(each: list[list[float]]) -> dict[str, Any]:
    """tokens/s of the steps with the lever on and off and their ratio, over all steps (`ab_ratio`) and as
    the ratio of each arm's median step rate (`ab_median_ratio`): a one-off slow step (a compile, the
    allocator's first cudaMalloc of a size) moves the first, hardly the second. `ab_steps`: `each`."""
    rate, median = {}, {}
    for on in (1, 0):
        steps = [e for e in each if e[0] == on]
        seconds = sum(e[1] for e in steps)
        rate[on] = round(sum(e[2] for e in steps) / seconds) if seconds else 0
        rates = [e[2] / e[1] for e in steps if e[1]]
        median[on] = statistics.median(rates) if rates else 0.0
    return {"ab_tokens_per_s_on": rate[1], "ab_tokens_per_s_off": rate[0],
            "ab_ratio": round(rate[1] / rate[0], 4) if rate[0] else 0.0,
            "ab_median_ratio": round(median[1] / median[0], 4) if median[0] else 0.0, "ab_steps": each}


class RepeatedHeads:
    """Grouped-query attention as before `attention.FlashGqa` (PyTorch 2.10/2.11): k and v repeated to every
    query head for `varlen_attn`, the repeated copies kept for its backward. Stands in for `FlashGqa`."""

    @staticmethod
    def apply(q, k, v, cu, longest, scale):
        from torch.nn.attention.varlen import varlen_attn

        groups, params = q.shape[1] // k.shape[1], attention._supported()
        k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
        extra = {"scale": scale} if "scale" in params else {}
        extra.update({"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True})
        return varlen_attn(q, k, v, cu, cu, longest, longest, **extra)


# Levers that are not the default path: (module, attribute, value with the lever, the default value).
# `--lever NAME` switches one on for the run, `--ab NAME` alternates it with the default step by step.
LEVERS = {
    "repeatkv": (attention, "FlashGqa", RepeatedHeads, attention.FlashGqa),  # the path before FlashGqa
    # before 2026-11-29 02:05: the adapter's part added to the base's product by its own GEMM
    "noaccumulate": (fast_lora, "ACCUMULATE_IN_BASE", False, True),
    "nonf4kernel": (fast_lora, "NF4_KERNEL", False, True),  # before 2026-11-29 02:05: bitsandbytes' dequantize
    "elementhash": (lora_dropout, "PAIRED", False, True),  # before 2026-11-29 04:30: one dropout hash per element
    "deferdivergence": (divergence, "DEFER", True, False),  # NaN flags read a step late, without a sync
    # before 2026-11-29 05:40: bitsandbytes dequantized the nested block scales before medtune.nf4's kernel
    "nestedbybnb": (nf4, "NESTED_IN_KERNEL", False, True),
    "castpercall": (fast_lora, "CAST_ONCE_PER_STEP", False, True),  # before 2026-11-29 05:40: a cast per call
    # before 2026-11-29 06:20: a 4-bit base's input-gradient GEMMs in bf16 (call 2026-11-29 y ran this pair as
    # `fp8inputgrad`, the lever then being float8)
    "bf16inputgrad": (fast_lora, "FP8_INPUT_GRAD", False, True),
    # the float8 weight by three passes (dequantized to bf16, quantized, copied transposed), as before f13226f (06:11)
    "fp8viabf16": (fp8_base, "FP8_TRANSPOSED", False, True),
    # before 2026-11-29 (session 12): each gradient row read twice by the float8 quantization (amax, then cast)
    "rowstwice": (fp8_rows, "ONE_BLOCK", 0, fp8_rows.ONE_BLOCK),
    # before 2026-11-29 (session 12): nf4.fp8_transposed computed each byte's block scale on its own
    "scaleperbyte": (nf4, "ROW_BLOCKS", False, True),
    # FlashAttention 4 (flash_attn.cute, staged by bench/run_gpu.sh fa4stage) for the packed attention
    "fa4": (attention, "FLASH4", True, False),
    # before 2026-11-29 (session 14): q/k/v and gate/up each run alone instead of one node per group
    "noshared": (shared_input, "SHARED_INPUT", False, True),
    # training.fp8_forward overridden (session 15): every 4-bit projection's forward GEMM in float8; q/k/v and
    # gate/up's (the default in sessions 15 and 16; calls aw and ax ran it as the lever then named fp8groups); none
    "fp8forward": (fast_lora, "FP8_FORWARD", "all", None),
    "fp8groups": (fast_lora, "FP8_FORWARD", "qkv_gate_up", None),
    "nofp8forward": (fast_lora, "FP8_FORWARD", "none", None),
    # q/k/v, gate/up and o (its input's amax / rms the lowest on SmolLM2: bench/cpu_fp8_forward.py): the setting
    # all_but_down, the default since session 17 (calls ay, be and bg ran it as this lever)
    "fp8witho": (fast_lora, "FP8_FORWARD", frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"}),
                 None),
    # the MLP's three projections only (down's forward is 10 % of the step in bf16, q/k/v's 3 %: call bb's profile)
    "fp8mlp": (fast_lora, "FP8_FORWARD", frozenset({"gate_proj", "up_proj", "down_proj"}), None),
    # every group's input gradients as one float8 GEMM over its members side by side, gate/up's too (slower for
    # gate/up: call 2026-11-29 bd)
    "groupgrad": (fp8_base, "GROUP_INPUT_GRAD", "all", "narrow"),
    # only the groups with members narrower than their input (q/k/v: k and v are 1,024 wide under grouped-query
    # attention), gate/up apart (call 2026-11-29 bd, groupcheck: q/k/v 0.476 against 0.592 ms, gate/up 1.848 against
    # 1.765): the default since session 17 (calls be and bg ran it as this lever); groupnone: each member apart, as
    # before
    "groupqkv": (fp8_base, "GROUP_INPUT_GRAD", "narrow", "narrow"),
    "groupnone": (fp8_base, "GROUP_INPUT_GRAD", "none", "narrow"),
}


def switch(name: str, on: bool) -> None:
    target, attribute, with_lever, default = LEVERS[name]
    setattr(target, attribute, with_lever if on else default)


def load_ids(path: Path) -> list[list[int]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        return json.load(fh)


def ensure_tokenizer(model_dir: Path) -> None:
    """The random model folder has no tokenizer; the collator only needs the pad/eos ids."""
    if (model_dir / "tokenizer.json").is_file():
        return
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<|begin_of_text|>": 128000, "<|finetune_right_pad_id|>": 128004, "<|eot_id|>": 128009}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
                                  bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  pad_token="<|finetune_right_pad_id|>", unk_token="<unk>")
    tok.save_pretrained(model_dir)


def write_data(ids: list[list[int]], max_len: int, out: Path) -> None:
    from datasets import Dataset

    rows = [r[:max_len] for r in ids]
    # Labels = inputs, as in the seed anchor, so both sides train on the same tokens.
    Dataset.from_dict({"input_ids": rows, "labels": rows}).save_to_disk(str(out / "train"))


def bench_merge(cfg, run: RunDir, model_dir: str, trainer) -> dict[str, object]:
    """medtune's merge stage on the trained adapter: time, peak GPU memory, shards, reload time."""
    import resource

    from transformers import AutoModelForCausalLM

    from medtune.merge import merge

    trainer.model.save_pretrained(str(run.adapters))
    del trainer
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    info = merge(cfg.output, run, model_dir)
    merge_s = time.perf_counter() - t0
    merge_peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.empty_cache()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(run.merged), device_map={"": 0})
    with torch.no_grad():
        logits = model(torch.tensor([[128000, 1, 2, 3]], device="cuda")).logits
    reload_s = time.perf_counter() - t0
    shards = [f for f in info["files"] if f.endswith(".safetensors")]
    return {"merge_s": round(merge_s, 1), "merge_peak_gpu_gib": round(merge_peak, 2),
            "merge_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1),
            "merged_shards": len(shards), "merged_dtype": info["dtype"], "reload_s": round(reload_s, 1),
            "reload_finite": bool(torch.isfinite(logits).all())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--ids", required=True, type=Path)
    ap.add_argument("--quantization", default="4bit", choices=["4bit", "8bit", "none"])
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--packing", action="store_true")
    ap.add_argument("--tokens", type=int, default=0,
                    help="training.micro_batch_tokens: micro batches of whole rows up to this many tokens (implies --packing)")
    ap.add_argument("--no-gc", action="store_true", help="turn gradient checkpointing off")
    ap.add_argument("--recompute-every", type=int, default=1,
                    help="lora.recompute_every_n_layers: with checkpointing, recompute only every n-th layer")
    ap.add_argument("--fused-backward", action="store_true",
                    help="each projection's LoRA forward and backward as one node: the default since 2026-11-28 19:40 "
                         "(kept for the older run_gpu.sh cases)")
    ap.add_argument("--forward-only", action="store_true",
                    help="medtune.fast_lora.install(backward=False): the fused forward only (the default before "
                         "2026-11-28 19:40), PEFT's autograd for the LoRA backward")
    ap.add_argument("--fp8-base", action="store_true",
                    help="medtune.fast_lora.install(fp8_base=True): each nf4 projection's two GEMMs in float8 (Fp8Base)")
    ap.add_argument("--fp8-backward", action="store_true",
                    help="medtune.fast_lora.install(backward=True, fp8_base='backward'): each nf4 projection's input-"
                         "gradient GEMM in float8, the forward (and the loss) in bf16")
    ap.add_argument("--torch-dropout", action="store_true",
                    help="PyTorch's dropout in the fused LoRA backward instead of medtune.lora_dropout's kernels (the "
                         "default before 2026-11-28 23:00)")
    ap.add_argument("--before-lean", action="store_true",
                    help="the default path before 2026-11-28 22:30: the down projection's input kept (no "
                         "medtune.lean_mlp) and grouped k/v kept repeated to every query head (lever repeatkv)")
    ap.add_argument("--lever", action="append", default=[], choices=sorted(LEVERS),
                    help="switch on a lever that is not the default path (LEVERS; repeatable)")
    ap.add_argument("--ab", choices=sorted(LEVERS),
                    help="alternate the timed steps (ABBA) between a lever and the default path, timing each step "
                         "(the ab_* fields)")
    ap.add_argument("--hf-loop", action="store_true",
                    help="the Trainer's own loop settings medtune replaced: the NaN filter and the token count that read "
                    "every micro batch's loss and length on the host")
    ap.add_argument("--host-lead", action="store_true",
                    help="how far the GPU runs behind the host at each forward, backward and optimizer step of the "
                         "timed steps, from CUDA events, no profiler (bench/host_lead.py)")
    ap.add_argument("--profile", action="store_true",
                    help="profile the first timed optimizer step through the Trainer (bench/trainer_profile.py)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a further config override")
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warm", type=int, default=1)
    ap.add_argument("--window", type=int, default=3,
                    help="also report tokens/s over the first N timed steps (the anchors time 3); 0: not")
    ap.add_argument("--attn", default="auto", choices=["auto", "sdpa", "flex_attention", "eager"])
    ap.add_argument("--label", default="medtune")
    ap.add_argument("--merge", action="store_true", help="then save the adapter, merge it (medtune.merge) and reload")
    ap.add_argument("--plain", action="store_true",
                    help="the plain PEFT path: padded rows, SDPA, no Liger kernels, PEFT's LoRA forward (the loss-agreement reference)")
    ap.add_argument("--preset-batch", action="store_true",
                    help="keep the preset's micro batch, accumulation and packing instead of the flags")
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="medtune-bench-"))
    ensure_tokenizer(Path(a.model_dir))
    write_data(load_ids(a.ids), a.max_len, work / "data")
    overrides = [
        "model.model_source=local", f"model.local_model_path={a.model_dir}",
        "dataset.dataset_source=local", f"dataset.local_dataset_path={a.ids}",
        f"lora.quantization={a.quantization}", "lora.bf16=true",
        f"lora.lora_dropout={a.dropout}",
        f"training.max_seq_length={a.max_len}", f"training.max_steps={a.warm + a.steps}",
        f"training.attn_implementation={'sdpa' if a.plain else a.attn}", "training.logging_steps=1",
        "training.save_steps=100000", "training.warmup_ratio=0", f"output.output_root={work}",
    ]
    if not a.preset_batch:  # else the preset's batch and its recompute setting (`auto` on the GPU presets)
        overrides += [f"lora.gradient_checkpointing={str(not a.no_gc).lower()}",
                      f"lora.recompute_every_n_layers={a.recompute_every}",
                      f"lora.packing={str((a.packing or a.tokens > 0) and not a.plain).lower()}",
                      f"training.micro_batch_tokens={a.tokens}",
                      f"training.micro_batch_size={a.micro_batch}", f"training.gradient_accumulation={a.grad_accum}"]
    if a.plain:
        overrides += ["training.liger_kernels=false", "training.fused_lora=false"]
    cfg = load_config(preset="llama3-8b-medical", overrides=overrides + a.set, env={})
    run = RunDir.for_run(work, "bench").create()
    cfg = resolve_recompute(cfg, a.model_dir)
    timer = StepTimer(a.warm, a.window)
    t0 = time.perf_counter()
    # StopOnDivergence as `medtune run` has it (its flags read once per step; not in lines before 2026-11-29 r)
    trainer = build_trainer(cfg, run, a.model_dir, str(work / "data"), callbacks=(timer, divergence.StopOnDivergence()))
    load_s = time.perf_counter() - t0
    if a.forward_only or a.fp8_base or a.fp8_backward or a.torch_dropout:  # medtune.train installed the fused path
        # under CUDA graphs the fused backward keeps its dropout masks (a graph cannot replay the generator state)
        fast_lora.install(trainer.model, backward=not a.forward_only, fp8_base="backward" if a.fp8_backward else a.fp8_base,
                          keep_mask=bool(cfg.training.cuda_graphs), dropout_kernels=not a.torch_dropout)
    levers = sorted(set(a.lever) | ({"repeatkv"} if a.before_lean else set()))
    for name in levers:
        switch(name, True)
    if a.before_lean:
        from medtune import lean_mlp

        trainer.remove_callback(lean_mlp.AtTrainStart)
    if a.hf_loop:
        from transformers import Trainer

        trainer.args.logging_nan_inf_filter = True
        trainer._track_num_input_tokens = Trainer._track_num_input_tokens.__get__(trainer)
    alternate = None
    if a.ab:
        switch(a.ab, True)  # on when training begins: a lever read by a callback's on_train_begin sees it
        alternate = Alternate(a.warm, lambda on: switch(a.ab, on))
        trainer.add_callback(alternate)
    profiler = None
    if a.profile:
        from trainer_profile import TrainerProfile

        # The last warm-up step, and ahead of the step timer: the profile is closed and summarised before
        # the timed steps start.
        profiler = TrainerProfile(trainer, max(0, a.warm - 1))
        trainer.callback_handler.callbacks.insert(0, profiler)
    lead = None
    if a.host_lead:
        from host_lead import HostLead

        layers = [m for m in trainer.model.modules() if type(m).__name__.endswith("DecoderLayer")]
        lead = HostLead(trainer, a.warm, layers=layers)
        trainer.add_callback(lead)
    shapes = BatchShapes(trainer)
    trainer.train()
    ga = cfg.training.gradient_accumulation
    timed = shapes.shapes[a.warm * ga:(a.warm + a.steps) * ga]
    losses = [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]
    tps = timer.result["tokens_per_s"]
    merged = bench_merge(cfg, run, a.model_dir, trainer) if a.merge else {}
    if trainer.args.process_index != 0:  # under torchrun: rank 0 reports the gathered token count
        return
    print(json.dumps({
        "run": a.label, "gpu": torch.cuda.get_device_name(0), "world_size": trainer.args.world_size, "quantization": a.quantization,
        "micro_batch": cfg.training.micro_batch_size, "micro_batch_tokens": cfg.training.micro_batch_tokens,
        "fused_lora": cfg.training.fused_lora, "fused_backward": fused_backward(trainer.model), "fp8_base": "backward" if a.fp8_backward else a.fp8_base,
        # projections whose input gradient ran in float8 (training.fp8_input_gradients; absent from lines before 06:20)
        "fp8_input_grad": sum(bool(getattr(m, "fp8_capable", False)) for m in trainer.model.modules())
        if fast_lora.FP8_INPUT_GRAD and torch.cuda.get_device_capability() >= (8, 9) else 0,
        # of those, the projections whose forward ran in float8 too (training.fp8_forward; absent before session 15)
        "fp8_forward": sum(fast_lora.forward_in_fp8(m) for m in trainer.model.modules() if getattr(m, "fp8_capable", False))
        if fast_lora.FP8_INPUT_GRAD and torch.cuda.get_device_capability() >= (8, 9) else 0,
        "levers": levers, "flash4_importable": attention._flash4() is not None,
        "lean_mlp": lean_mlps(trainer.model), "dropout_kernels": dropout_kernels(trainer.model),
        "shared_input_groups": shared_groups(trainer.model), "keys_repeated": keys_repeated(trainer.model, levers),
        "cuda_graphs": cfg.training.cuda_graphs, "grad_accum": cfg.training.gradient_accumulation,
        "packing": cfg.lora.packing,
        "gradient_checkpointing": cfg.lora.gradient_checkpointing,
        "recompute_every_n_layers": cfg.lora.recompute_every_n_layers, "lora_dropout": a.dropout,
        "liger": bool(trainer.args.use_liger_kernel), "attn": trainer.model.config._attn_implementation, "load_s": round(load_s, 1),
        "hf_loop": a.hf_loop, "timed_steps": a.steps, **timer.result,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        "mfu_pct": round(100 * tps * MODEL_GFLOP_PER_TOKEN * 1e9 / (PEAK_TFLOPS * 1e12), 1),
        "losses": losses, "micro_batches": timed,
        **merged, **({"trainer_profile": profiler.result} if profiler else {}),
        **(alternate.result if alternate else {}), **(lead.result if lead else {}),
        "date": time.strftime("%Y-%m-%d"),
    }), flush=True)


def fused_backward(model) -> bool:
    """Whether the LoRA layers run medtune.fast_lora's fused backward (what this line measured)."""
    return any(getattr(vars(m).get("forward"), "__func__", None) is fast_lora.fused_forward_backward
               for m in model.modules())


def dropout_kernels(model) -> bool:
    """Whether the LoRA dropout masks were drawn inside medtune.lora_dropout's kernels."""
    from medtune import lora_dropout

    return lora_dropout._kernels() is not None and any(
        fast_lora.dropout_mode(m) == "kernel" for m in model.modules() if hasattr(m, "dropout_kernels"))


def shared_groups(model) -> int:
    """How many groups of projections ran as one node (medtune.shared_input; none switched off)."""
    groups = {id(m.shared_group): m.shared_group for m in model.modules()
              if getattr(vars(m).get("forward"), "__func__", None) is shared_input.forward}
    return sum(not g.off for g in groups.values())


def lean_mlps(model) -> int:
    """How many MLPs trained with medtune.lean_mlp's forward."""
    from medtune import lean_mlp

    return sum(getattr(vars(m).get("forward"), "__func__", None) is lean_mlp.forward for m in model.modules())


def keys_repeated(model, levers: list[str]) -> bool:
    """Whether the varlen attention's backward kept k and v repeated to every query head."""
    c = model.config
    return (c._attn_implementation == attention.VARLEN and c.num_key_value_heads != c.num_attention_heads
            and "enable_gqa" not in attention._supported() and "repeatkv" in levers)


if __name__ == "__main__":
    main()
