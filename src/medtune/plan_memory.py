"""Peak GPU (or CPU) memory of LoRA training, from the model's shape and what one micro batch holds.

A physical model, not a fit: every term is a tensor that PyTorch keeps alive at the peak, counted
in bytes from the shape. The figure is comparable to `torch.cuda.max_memory_allocated()` (what
bench/ and `training.peak_memory_gib` record), so the CUDA context and the caching allocator's
reserve are not in it; `plan.py` adds those for the scheduler request.

The peak is the largest of three moments of an optimizer step (weights, LoRA parameters, their
gradients and optimizer states are resident in all three; gradients accumulate across micro batches):

  loss       end of the forward: the saved activations plus the loss computation (Liger's fused
             linear cross-entropy works through row chunks and keeps only the hidden-state gradient;
             transformers' loss holds full logits in 16 bits and fp32 copies)
  layer      backward through the last decoder layer: the saved activations (with gradient
             checkpointing: one input per layer plus that layer recomputed) and its gradient buffers
  optimizer  AdamW's step: one fp32 temporary per LoRA parameter (the foreach implementation's sqrt(v))

What a micro batch holds is an input (`MicroBatch`): packed, the sum of its rows' tokens; padded, rows
× the longest row (length grouping makes that the row count times a near-uniform length).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medtune.plan_tables import Shape

GIB = 2**30
# bitsandbytes NF4 with double quantization: 4 bits per weight, one 8-bit absmax per block of 64 and
# one fp32 second-level absmax per 256 blocks: 4 + 8/64 + 32/(64*256) = 4.127 bits.
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)
# LLM.int8: one byte per weight plus one fp32 scale per output row (added per layer below).
INT8_BYTES = 1
ADAMW_STATE_BYTES = {"adamw_torch": 8, "adamw_torch_fused": 8, "paged_adamw_8bit": 2, "adamw_8bit": 2}  # exp_avg + exp_avg_sq


@dataclass(frozen=True)
class MicroBatch:
    """What one forward pass computes on."""
    tokens: int             # packed: sum of the rows' tokens; padded: rows × padded length
    rows: int = 1
    layout: str = "packed"  # "packed" (rows flattened), "padded" (attention mask), "full" (no mask)

    @property
    def row_len(self) -> int:
        return self.tokens // max(1, self.rows) if self.layout != "packed" else self.tokens


@dataclass(frozen=True)
class Recipe:
    """The training settings that decide which tensors exist and in which precision."""
    quantization: str              # "4bit" | "8bit" | "none"
    lora_r: int
    targets: tuple[str, ...]
    lora_dropout: float
    optimizer: str = "adamw_torch"
    gradient_checkpointing: bool = True
    recompute_every: int = 1       # with checkpointing: every n-th decoder layer is recomputed, the rest keep activations
    liger: bool = True             # Liger kernels: RMSNorm, SwiGLU, RoPE, fused linear cross-entropy
    fused_loss: bool = True        # with liger: its fused linear cross-entropy (left out under FSDP)
    attention: str = "varlen"
    compute_bytes: int = 2         # bf16/fp16; 4 for float32 training on CPUs without bf16
    upcast_frozen: bool = False    # PEFT's prepare_model_for_kbit_training: norms, embeddings, lm_head in fp32
    fused_backward: bool = False   # medtune.fast_lora's LoraLinear: the input kept once, dropout masks replayed
    lean_mlp: bool = False         # medtune.lean_mlp: the down projection's input computed again, not kept
    dropout_kernels: bool = False  # medtune.lora_dropout: the fused backward's dropout drawn inside its GEMMs
    keys_repeated: bool = False    # varlen on PyTorch <= 2.11 keeping k and v repeated to every query head in
    #                                every layer (before medtune.attention.keep_unrepeated, then in the layer
    #                                being recomputed until attention.FlashGqa, which repeats them nowhere)


def attention_family(name: str) -> str:
    """varlen (medtune's PyTorch varlen FlashAttention), flash (flash-attn kernels), flex, sdpa, or eager."""
    n = name.lower()
    for family in ("varlen", "flex", "sdpa", "eager"):
        if family in n:
            return family
    return "flash"  # flash_attention_2/3 and other fused variable-length kernels: q, k, v, out, log-sum-exp


def projections(s: Shape) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer in one decoder block."""
    q, kv = s.heads * s.head_size, s.kv_heads * s.head_size
    return {"q_proj": (s.hidden, q), "k_proj": (s.hidden, kv), "v_proj": (s.hidden, kv), "o_proj": (q, s.hidden),
            "gate_proj": (s.hidden, s.intermediate), "up_proj": (s.hidden, s.intermediate),
            "down_proj": (s.intermediate, s.hidden)}


def static_bytes(s: Shape, r: Recipe) -> dict[str, float]:
    """Weights (by quantization) and LoRA parameters + gradients + optimizer states (fp32)."""
    proj = projections(s)
    linear = s.layers * sum(i * o for i, o in proj.values())
    other = s.vocab * s.hidden * (1 if s.tied else 2) + s.layers * 2 * s.hidden + s.hidden
    if r.quantization == "4bit":
        weights = linear * NF4_BITS / 8
    elif r.quantization == "8bit":
        weights = linear * INT8_BYTES + s.layers * sum(o for _, o in proj.values()) * 4
    else:
        weights = linear * r.compute_bytes
    weights += other * (4 if r.upcast_frozen else r.compute_bytes)
    lora = s.layers * sum(r.lora_r * (proj[t][0] + proj[t][1]) for t in r.targets)
    # PEFT keeps adapters in fp32 (autocast_adapter_dtype): weight 4 + gradient 4 + optimizer states.
    return {"weights": weights, "lora": lora * (8 + ADAMW_STATE_BYTES.get(r.optimizer, 8)), "lora_params": lora}


def layer_saved_bytes(s: Shape, r: Recipe, b: MicroBatch) -> float:
    """Tensors one decoder layer saves for its backward pass, for the whole micro batch.

    The frozen base projections keep no input (autograd saves a matmul's input only to compute the
    weight's gradient; bitsandbytes' 4/8-bit matmuls keep only the quantized weight), so the inputs
    kept are the adapters': with dropout each adapter's own dropped copy plus its bool mask, without
    dropout (or with medtune's fused LoRA backward, which draws the masks again) the shared input once per
    distinct input.
    """
    c, h, kv, i, t = r.compute_bytes, s.hidden, s.kv_heads * s.head_size, s.intermediate, b.tokens
    q = s.heads * s.head_size
    # RMSNorm inputs (Liger keeps the 16-bit input; transformers' RMSNorm keeps an fp32 upcast);
    # q and k after RoPE and v (the attention keeps them) and the attention output;
    # SwiGLU's gate and up (unfused: also silu(gate))
    norms = 2 * h * (c if r.liger else 4)
    # medtune_varlen hands the kernel contiguous (tokens, heads, dim) copies of q, k, v; on PyTorch
    # <= 2.11 (no enable_gqa in varlen_attn) the flash kernels get the shared k/v heads themselves
    # (medtune.attention.FlashGqa); older code repeated them to every query head (`keys_repeated`)
    keys = 2 * q if attention_family(r.attention) == "varlen" and r.keys_repeated else 2 * kv
    per_token = norms + (q + keys + q + (2 if r.liger else 3) * i) * c
    proj = projections(s)
    if r.lora_dropout > 0 and not r.fused_backward:
        per_token += sum(proj[m][0] * (c + 1) for m in r.targets)
    else:
        shared = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "gate_proj": "mlp_in",
                  "up_proj": "mlp_in", "o_proj": "o_in", "down_proj": "down_in"}
        kept = {shared.get(m, m): m for m in r.targets}
        if r.lean_mlp:  # computed again from gate and up, which SwiGLU keeps anyway
            kept.pop("down_in", None)
        per_token += sum(proj[m][0] * c for m in kept.values())
    per_token += len(r.targets) * r.lora_r * c  # lora_A output, saved by lora_B
    saved = per_token * t + t * s.heads * 4  # + the attention's fp32 log-sum-exp
    saved += _attention_matrices(s, r, b, attention_family(r.attention))[0]
    return saved


def _attention_matrices(s: Shape, r: Recipe, b: MicroBatch, fam: str) -> tuple[float, float]:
    """(saved, backward transient) bytes of score matrices and masks for one layer."""
    c, kv, q = r.compute_bytes, s.kv_heads * s.head_size, s.heads * s.head_size
    rows, n = (1, b.tokens) if b.layout == "packed" else (b.rows, b.row_len)
    if fam == "eager":
        # softmax(QK^T) per head is saved; its backward holds the incoming gradient and the softmax
        # gradient beside it; k/v are repeated to every head
        scores = s.heads * rows * n * n * c
        return scores + 2 * (q - kv) * b.tokens * c, 2 * scores
    if fam == "sdpa" and b.layout != "full":
        # a padding or packed block mask: SDPA's memory-efficient kernel, fed the mask as an additive
        # bias (saved, padded to multiples of 16) and k/v repeated to every head (transformers'
        # repeat_kv: SDPA's own GQA needs a mask-free call)
        n16 = -(-n // 16) * 16
        return rows * n16 * n16 * c + 2 * (q - kv) * b.tokens * c, 0.0
    return 0.0, 0.0


def layer_backward_bytes(s: Shape, r: Recipe, b: MicroBatch) -> float:
    """Gradient buffers alive while back-propagating one layer's MLP: the down-projection input's
    gradient (Liger's SwiGLU writes the gate/up gradients in place of its saved inputs; unfused, two
    more), the residual stream's gradient and the input gradient being accumulated; with the fused LoRA
    backward and PyTorch's dropout, the down projection's dropped input and mask drawn again (not with
    medtune.lora_dropout's kernels); with the lean MLP, that input computed again."""
    i = s.intermediate * (1 if r.liger else 3)
    redraw = r.fused_backward and r.lora_dropout > 0 and not r.dropout_kernels
    redrawn = s.intermediate * (r.compute_bytes + 1) if redraw else 0
    recomputed = s.intermediate * r.compute_bytes if r.lean_mlp else 0
    return ((i + 2 * s.hidden) * r.compute_bytes + redrawn + recomputed) * b.tokens


def loss_bytes(s: Shape, r: Recipe, b: MicroBatch) -> tuple[float, float]:
    """(peak during the loss, what stays for the backward) in bytes."""
    c, t = r.compute_bytes, b.tokens
    if r.liger and r.fused_loss:
        # Liger's fused linear cross-entropy computes the hidden-state gradient during the forward in
        # chunks of next_pow2(ceil(tokens / ceil(vocab / hidden))) rows, one 16-bit logit chunk at a time.
        per_chunk = -(-t // -(-s.vocab // s.hidden))
        chunk = 1 << max(0, (per_chunk - 1).bit_length())
        return chunk * s.vocab * c + t * s.hidden * c, t * s.hidden * c
    # transformers' loss: at the forward's end 16-bit logits, their fp32 copy and log_softmax's fp32
    # output (c + 8 B per logit); in its backward the saved output, the incoming fp32 gradient and
    # log_softmax's fp32 gradient (12 B): the larger of the two
    peak = t * s.vocab * max(c + 8, 12)
    if r.upcast_frozen:
        peak += s.vocab * s.hidden * c  # autocast's 16-bit copy of the fp32 lm_head, kept for its backward
    return peak, t * s.hidden * c


def estimate(s: Shape, r: Recipe, b: MicroBatch) -> dict[str, Any]:
    """Peak memory parts in GiB; "total" is the largest of the loss, layer and optimizer moments."""
    st = static_bytes(s, r)
    c = r.compute_bytes
    fam = attention_family(r.attention)
    resid = 4 if r.upcast_frozen else c  # fp32 embeddings keep the residual stream in fp32
    saved_layer = layer_saved_bytes(s, r, b)
    if r.gradient_checkpointing:
        # non-reentrant checkpointing keeps each checkpointed layer's input (and the final norm's), and
        # recomputes one layer at a time in the backward; autocast's 16-bit LoRA weight copies then live
        # per layer. With recompute_every = n only layers 0, n, 2n, ... are checkpointed (transformers'
        # every_n_layers); the others keep their activations and their LoRA weight copies.
        checkpointed = -(-s.layers // r.recompute_every)
        keeping = s.layers - checkpointed
        kept = (checkpointed + 1) * b.tokens * s.hidden * resid + keeping * saved_layer \
            + st["lora_params"] * c * keeping / s.layers
        recompute = layer_saved_bytes(s, r, b)  # the layer being recomputed saves what a kept layer does
    else:
        kept = s.layers * saved_layer + st["lora_params"] * c  # + autocast's cached 16-bit LoRA weights
        recompute = 0.0
    largest = max(i * o for i, o in projections(s).values())
    dequant = largest * c if r.quantization != "none" else 0.0  # one dequantized weight at a time
    loss_peak, loss_kept = loss_bytes(s, r, b)
    attn_transient = _attention_matrices(s, r, b, fam)[1]
    moments = {  # (activations, transient) at each moment
        "loss": (kept, loss_peak),
        "layer": (kept + recompute, loss_kept + layer_backward_bytes(s, r, b) + attn_transient + dequant),
        "optimizer": (0.0, st["lora_params"] * 4),
    }
    moment = max(moments, key=lambda k: sum(moments[k]))
    acts, transient = moments[moment]
    parts = {"weights": st["weights"], "lora_and_optimizer": st["lora"], "activations": acts, "transient": transient}
    out: dict[str, Any] = {k: v / GIB for k, v in parts.items()}
    out["total"] = sum(out.values())
    out["peak_moment"] = moment
    return out
