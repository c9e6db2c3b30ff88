"""The one configuration schema: the seed workflow's sections and keys, plus medtune's own.

Everything else (the CLI's `--set`, `medtune init`'s YAML, docs/config.md, training.env) is
generated from these models. Precedence when loading: schema defaults < preset < config file <
`--set section.key=value`; the Hugging Face token comes from the environment or a file, never argv.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from medtune.errors import ConfigError


class Section(BaseModel):
    """Strict, immutable base: a typo is an error, and nothing mutates a config after loading."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, protected_namespaces=())


class ContainerConfig(Section):
    source: Literal["none", "lfs", "path", "pull", "build"] = Field(
        "none",
        description="Where the training container comes from. `none` runs natively in this Python "
        "environment; `lfs`, `path`, `pull` and `build` are the seed's container sources.",
    )
    finetune_path: str = Field(
        "~/pw/singularity/finetune.sif", description="Path of the fine-tuning container image (source `path`/`lfs`)."
    )
    lfs_repo: str = Field("~/singularity-containers", description="Git LFS repository holding container images (source `lfs`).")
    bucket: str = Field("", description="Bucket URL to pull the container image from (source `pull`).")


def _walltime(value: Any) -> Any:
    """YAML 1.1 reads `24:00:00` as the base-60 integer 86400: turn it back into H:MM:SS."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value // 3600}:{value % 3600 // 60:02d}:{value % 60:02d}"
    return value


class SlurmConfig(Section):
    account: str = Field("", description="Slurm account to charge (`#SBATCH --account`); empty: your default.")
    partition: str = Field("", description="Slurm partition (`#SBATCH --partition`); empty: the cluster's default.")
    qos: str = Field("", description="Slurm quality of service (`#SBATCH --qos`); empty: none.")
    cpus_per_task: int = Field(8, ge=1, description="CPU cores per node for the job (`#SBATCH --cpus-per-task`).")
    time: str = Field("24:00:00", description="Wall-time limit (`#SBATCH --time`, e.g. `2-00:00:00`).")
    gres: str = Field("", description="Generic resources per node, e.g. `gpu:4` (`#SBATCH --gres`); empty: none.")
    nodes: int = Field(1, ge=1, description="Nodes; above 1 torchrun starts on every node (srun) with rendezvous on the first.")
    extra_directives: tuple[str, ...] = Field(
        (), description="More `#SBATCH` options, one per item, e.g. `--mem=64G` or `--constraint=a100`."
    )
    signal_seconds: int = Field(
        300, ge=0, description="Seconds before the time limit at which Slurm sends SIGUSR1 so the run checkpoints "
        "and requeues (`#SBATCH --signal`); 0: no warning signal."
    )

    _time = field_validator("time", mode="before")(_walltime)


class PbsConfig(Section):
    account: str = Field("", description="PBS account to charge (`#PBS -A`); empty: your default.")
    queue: str = Field("", description="PBS queue (`#PBS -q`); empty: the server's default.")
    walltime: str = Field("24:00:00", description="Wall-time limit (`#PBS -l walltime=`).")
    select: str = Field(
        "1:ncpus=8:ngpus=1", pattern=r"^[0-9]+:", description="Resource chunks (`#PBS -l select=`): "
        "`N:ncpus=C:ngpus=G`, one chunk per node; N above 1 starts torchrun on every node (pbsdsh)."
    )
    extra_directives: tuple[str, ...] = Field((), description="More `#PBS` options, one per item, e.g. `-l mem=64gb`.")

    _walltime = field_validator("walltime", mode="before")(_walltime)

    @property
    def chunks(self) -> int:
        return int(self.select.split(":", 1)[0])


class InfrastructureConfig(Section):
    cluster: Literal["local", "slurm", "pbs"] = Field(
        "local", description="Where the workflow runs: this machine, or a Slurm/PBS cluster (via `medtune submit`)."
    )
    container: ContainerConfig = Field(default_factory=ContainerConfig, description="Container runtime settings.")
    output_bucket: str = Field(
        "", description="fsspec URL to upload the run's outputs to (e.g. `s3://bucket/prefix`). Empty: outputs stay local."
    )
    num_gpus: int | Literal["auto"] = Field(
        "auto", description="GPUs per node to train on, data-parallel: `auto` uses every visible GPU, a number at "
        "most that many. Above 1, `medtune run` relaunches the finetune stage under torchrun itself."
    )
    cpu_processes: int = Field(
        1, ge=1, description="Data-parallel processes when training on the CPU (gloo). Above 1 it runs the "
        "multi-process path without GPUs (tests, debugging); it does not make one machine faster."
    )
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="How several training processes share the work. `ddp`: every GPU holds the whole "
        "(4-bit) base and the ranks average gradients. `fsdp`: the base is sharded over the GPUs (FSDP full "
        "shard, one unit per decoder layer; with 4-bit, `bnb_4bit_quant_storage` is the compute dtype so the "
        "4-bit weights shard too), for a base that does not fit one GPU; needs 2 or more CUDA GPUs (refused on "
        "CPUs and for a single process)."
    )
    rdzv_endpoint: str = Field(
        "", description="host:port of the torchrun rendezvous for multi-node runs; the batch scripts of "
        "`medtune submit` set it to the job's first node."
    )
    slurm: SlurmConfig = Field(default_factory=SlurmConfig, description="Batch job settings for `medtune submit --scheduler slurm`.")
    pbs: PbsConfig = Field(default_factory=PbsConfig, description="Batch job settings for `medtune submit --scheduler pbs`.")

    @property
    def nodes(self) -> int:
        """Nodes the job spans, as the batch script asks the scheduler for them."""
        return {"slurm": self.slurm.nodes, "pbs": self.pbs.chunks}.get(self.cluster, 1)

    @field_validator("num_gpus")
    @classmethod
    def _positive_gpus(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be `auto` or at least 1")
        return value


class ModelConfig(Section):
    model_source: Literal["huggingface", "local", "gguf"] = Field(
        "huggingface",
        description="Where the base model comes from: a Hub repo (`base_model_id`), a local folder "
        "(`local_model_path`), or a GGUF file (`gguf_path`; empty = the embedded SmolLM2-135M-Instruct).",
    )
    model_config_name: str = Field(
        "llama3-8b-medical",
        alias="model_config",
        description="Name of the preset this config started from (see `medtune presets`).",
    )
    base_model_id: str = Field("meta-llama/Llama-3.1-8B-Instruct", description="Hugging Face Hub repo id of the base model.")
    revision: str = Field("main", description="Hub revision (branch, tag or commit) of the base model.")
    local_model_path: str = Field(
        "/models/Llama-3.1-8B-Instruct", description="Folder with config.json, weights and tokenizer (source `local`)."
    )
    gguf_path: str = Field(
        "", description="GGUF file to convert once into safetensors (source `gguf`). Empty: the embedded model."
    )
    model_cache_dir: str = Field(
        "~/pw/models", description="Where downloaded and converted models are kept between runs."
    )
    hf_token: SecretStr | None = Field(
        None,
        description="Hugging Face token for gated models. Read from the `HF_TOKEN` environment variable or "
        "`hf_token_file`; never written to any output.",
    )
    hf_token_file: str = Field("", description="File holding the Hugging Face token (alternative to `HF_TOKEN`).")


class DatasetConfig(Section):
    dataset_source: Literal["huggingface", "bucket", "local"] = Field(
        "huggingface", description="Where the training data comes from: a Hub dataset, a bucket, or a local path."
    )
    dataset_name: str = Field("Shekswess/medical_llama3_instruct_dataset", description="Hub dataset id (source `huggingface`).")
    dataset_bucket: str = Field("", description="Bucket URL (source `bucket`), e.g. `s3://my-bucket`.")
    dataset_bucket_path: str = Field("", description="Path inside `dataset_bucket` to a file or folder of files.")
    local_dataset_path: str = Field("", description="Local file or folder (source `local`).")
    dataset_format: Literal["auto", "json", "jsonl", "csv", "parquet", "arrow", "dataset"] = Field(
        "json",
        description="File format of local/bucket data; `dataset` is a `save_to_disk` folder. When this key is not "
        "set (the default `json` is the seed's) or is `auto`, the format is inferred from the file extensions; "
        "a file of another format than the one set here is an error.",
    )
    dataset_split: str = Field("train", description="Split to train on.")
    dataset_config_name: str = Field("", description="Hub dataset configuration name, if the dataset has several.")
    prompt_field: str = Field("prompt", description="Column holding a fully rendered training text (row format `prompt`).")
    max_samples: int = Field(0, ge=0, description="Use at most this many rows (0 = all).")
    row_format: Literal["auto", "prompt", "alpaca", "messages"] = Field(
        "auto",
        description="Row shape: `prompt` trains `prompt_field` as is; `alpaca` renders instruction/input/output "
        "with the model's chat template; `messages` renders role/content lists; `auto` detects it.",
    )
    rerender_prompts: bool = Field(
        False,
        description="Ignore a pre-rendered prompt column and render instruction/input/output with the model's "
        "own chat template instead (the seed's datasets carry templates that do not match the models).",
    )
    system_prompt: str = Field("", description="System message added to rendered conversations (empty: the template's default).")
    train_on_prompt: bool = Field(False, description="Compute the loss on the prompt too (default: on the answer only).")
    eval_fraction: float = Field(
        0.05, ge=0.0, lt=0.5, description="Fraction of rows held out for evaluation (ignored when `eval_split` is set)."
    )
    eval_split: str = Field("", description="Named split (or file for local data) to evaluate on instead of a fraction.")
    truncation: Literal["truncate", "drop"] = Field(
        "truncate",
        description="Rows longer than `training.max_seq_length`: cut at the limit, or leave out (counted in "
        "data_report.json either way). Rows whose prompt alone fills the limit are always left out.",
    )
    phi_action: Literal["report", "redact", "fail"] = Field(
        "report",
        description="What a PHI/PII match (email, phone, SSN, MRN, date of birth, street address, name after a "
        "title) does: count it in data_report.json, replace it with `[TYPE]` before training, or stop the run.",
    )

    @property
    def format_to_use(self) -> str:
        """The format the loader applies: `auto` unless the user set `dataset_format` explicitly."""
        return self.dataset_format if "dataset_format" in self.model_fields_set else "auto"


class TrainingConfig(Section):
    num_epochs: float = Field(3.0, gt=0, description="Passes over the training data.")
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate of the LoRA parameters.")
    micro_batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        1,
        description="Sequences per device per forward pass. `auto`: the largest micro batch medtune's memory model "
        "fits in 90% of the GPU's free memory, decided before loading: with `lora.packing` a token budget "
        "(`micro_batch_tokens` = 4 or 2 x `max_seq_length` without recompute, else 8, 4, 2 or 1 x with it), "
        "without packing 16, 8, 4, 2 or 1 rows; the gradient accumulation stays as set; 1 row on CPUs and "
        "under FSDP. The choice is logged and recorded in manifest.json.",
    )
    gradient_accumulation: int = Field(16, ge=1, description="Micro batches accumulated per optimizer step.")
    micro_batch_tokens: int = Field(
        0, ge=0,
        description="0: micro batches of `micro_batch_size` rows. Above 0 (needs `lora.packing`, at least "
        "`max_seq_length`): each micro batch is a bin of whole rows holding at most this many tokens, packed "
        "once before training, so memory and per-GPU work stay even however the row lengths vary; "
        "`micro_batch_size` then sets only the evaluation batch.",
    )
    max_seq_length: int = Field(2048, ge=32, le=131072, description="Longest training sequence in tokens; longer rows are truncated.")
    seed: int = Field(42, description="Seed for shuffling, LoRA initialisation and sampling.")
    max_steps: int = Field(0, ge=0, description="Stop after this many optimizer steps (0 = run `num_epochs`).")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps with linear learning-rate warm-up.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warm-up."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on LoRA parameters.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "adamw_8bit"] = Field(
        "adamw_torch", description="Optimizer: PyTorch's AdamW (`adamw_torch`: a few kernels per group of tensors; "
        "`adamw_torch_fused`: the same update in one fused kernel, less host time between optimizer steps), or "
        "bitsandbytes' 8-bit AdamW (`paged_adamw_8bit`, `adamw_8bit`: a quarter of the optimizer state; need a GPU)."
    )
    dataloader_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description="Processes that fetch and collate the next micro batches while the GPU trains (the Trainer's "
        "dataloader workers); 0: the training process collates them itself, between optimizer steps, while the "
        "GPU waits. `auto`: 2 on a GPU, 0 on a CPU (where the cores train).",
    )
    logging_steps: int = Field(10, ge=1, description="Log loss and throughput every N optimizer steps.")
    save_steps: int = Field(100, ge=1, description="Save a resumable checkpoint every N optimizer steps.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept on disk (older ones are deleted).")
    eval_steps: int = Field(0, ge=0, description="Evaluate on the held-out split every N steps (0 = at the end only).")
    liger_kernels: bool = Field(
        True,
        description="On CUDA GPUs, use Liger's fused kernels (linear + cross-entropy without materialising the "
        "logits, RMSNorm, SwiGLU, RoPE) when the `liger-kernel` package is installed (`pip install medtune[gpu]`).",
    )
    fused_lora: bool = Field(
        True,
        description="Add each LoRA update to the base projection's output inside one GEMM (scaled in its "
        "epilogue, no copy of the base output, adapter weights cast to the activations' dtype), and on plain and "
        "4-bit bases (not under FSDP) compute the LoRA branch's backward in the same node: it keeps each shared "
        "input once instead of a dropped copy and mask per projection; on an Ampere or newer GPU its dropout is "
        "drawn inside the adapter's GEMMs (Triton kernels, medtune.lora_dropout; elsewhere PyTorch's masks are "
        "drawn again from the saved generator state); a gated MLP's activation and down projection then keep "
        "gate and up only and "
        "compute their product again in the backward (medtune.lean_mlp). An 8B at 8,192 tokens without recompute "
        "on an H200: 63.3 GiB peak with PEFT's backward, 36.0 with this and the attention's unrepeated key/value "
        "heads, and 11.9 % faster than with PyTorch's dropout. False "
        "keeps PEFT's own LoRA forward and backward. With PyTorch's masks, the same numbers as PEFT up to rounding "
        "(the update is rounded once instead of three times, tests/unit/test_fast_lora.py); the kernels' masks "
        "come from another generator, the same in distribution (losses within 0.05 % of PEFT's over 20 steps).",
    )
    fp8_input_gradients: bool = Field(
        True,
        description="With `fused_lora` on an Ada, Hopper or newer GPU, the frozen 4-bit base's input-gradient "
        "GEMMs (the gradient passed back through each nf4 projection) run in float8 e4m3: the gradient quantized "
        "per token, the weight per output channel, written for the GEMM straight from its 4-bit bytes. The "
        "forward, the loss and the adapters' own gradients stay 16-bit. An 8B QLoRA step on an H200: 2.2 % "
        "faster, losses within 0.06 % of the plain PEFT path over 20 steps (docs/benchmarks.md). False keeps "
        "those GEMMs in bf16.",
    )
    fp8_forward: Literal["none", "qkv_gate_up", "all_but_down", "all"] = Field(
        "all_but_down",
        description="Where `fp8_input_gradients` runs a 4-bit projection's input gradient in float8, its forward's "
        "base GEMM too: the input quantized per token (once for q/k/v and once for gate/up, which read it together), "
        "the weight per output channel from its 4-bit bytes, the adapter's update added in 16 bits. `qkv_gate_up`: "
        "the projections that read the normalized hidden state. `all_but_down`: those and o; down (whose input has "
        "the largest outliers) stays 16-bit. `all`: down too. `none`: the forward 16-bit. Evaluation and generation "
        "always run 16-bit. An 8B QLoRA step on an H200: `qkv_gate_up` 7 % faster than `none`, `all_but_down` about "
        "1 % faster again, `all` 11 % faster than `none`; losses within 0.06 % (`none`), 1.3 % (`qkv_gate_up`), "
        "1.9 % (`all_but_down`) and 2.2 % (`all`) of the plain PEFT path over 20 steps. On SmolLM2-135M's real "
        "weights the forward's loss before training rose 0.5 % (`qkv_gate_up`), 0.7 % (`all_but_down`) and 0.9 % "
        "(`all`) (docs/benchmarks.md).",
    )
    cuda_graphs: bool | Literal["auto"] = Field(
        False,
        description="Replay each decoder layer's forward and backward as CUDA graphs (one launch each, where "
        "eager PyTorch launches ~240 kernels per layer), captured once when training starts for the token-bin "
        "micro batch; every bin is padded to exactly `micro_batch_tokens` tokens (label-free padding: no loss, "
        "not counted as tokens seen). Needs a CUDA GPU, one process, `micro_batch_tokens` and no recompute. "
        "`auto`: on exactly there. Evaluation runs eagerly.",
    )
    attn_implementation: Literal["auto", "varlen", "sdpa", "flex_attention", "eager"] = Field(
        "auto",
        description="Attention kernel. `auto`: on an Ampere or newer CUDA GPU with `lora.packing`, `varlen` "
        "(PyTorch's variable-length FlashAttention: each packed example attends to itself only, no mask, no "
        "padding); PyTorch SDPA otherwise. `varlen` needs such a GPU and `lora.packing`.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where to train: `auto` uses CUDA when available, else the CPU."
    )
    auto_fit: bool = Field(
        True,
        description="On CUDA out of memory, retry from the last checkpoint with half the micro batch and twice "
        "the gradient accumulation (same effective batch), down to micro batch 1 (with `micro_batch_tokens`: half "
        "the token budget, down to `max_seq_length`); false: stop and name the remedies. Single-process runs only; every change is recorded in manifest.json (`auto_fit`).",
    )


class LoraConfig(Section):
    lora_r: int = Field(64, ge=1, le=1024, description="LoRA rank.")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA branch.")
    target_modules: tuple[str, ...] = Field(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        min_length=1,
        description="Module names that get LoRA adapters (the seed adapts all seven projections).",
    )
    quantization: Literal["4bit", "8bit", "none"] = Field(
        "4bit", description="Base weights during training: 4-bit NF4 with double quantization (QLoRA), 8-bit, or none."
    )
    gradient_checkpointing: bool | Literal["auto"] = Field(
        True,
        description="Recompute activations in the backward pass: far less memory, ~30% more compute. `auto`: "
        "off on a CUDA GPU when micro batches are token-bounded (`training.micro_batch_tokens`) and medtune's "
        "memory model (the one `medtune plan` prints) puts the peak without recompute within 90% of the GPU's "
        "free memory; where it does not fit, recompute for as few layers as fit (`recompute_every_n_layers`); "
        "on for every layer otherwise, and for every layer first if training still runs out of memory.",
    )
    recompute_every_n_layers: int = Field(
        1, ge=1,
        description="With gradient checkpointing: recompute only decoder layers 0, n, 2n, ...; the others keep "
        "their activations (more memory, less recompute). 1 = every layer. `gradient_checkpointing: auto` "
        "sets it to the largest n that fits.",
    )
    bf16: bool = Field(
        False,
        description="Compute in bfloat16: on GPUs (false = float16, the seed's default) and on CPUs with native "
        "bf16 (AVX512-BF16/AMX; other CPUs and false = float32).",
    )
    packing: bool = Field(False, description="Pack several short rows into one sequence (no attention across rows).")


class OutputConfig(Section):
    merge_full_weights: bool = Field(True, description="Merge the adapter into a 16-bit copy of the base model.")
    merged_save_format: Literal["safetensors", "bin"] = Field("safetensors", description="File format of merged weights.")
    merged_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Dtype of the merged weights; `auto` keeps the base checkpoint's dtype."
    )
    max_shard_size: str = Field("5GB", description="Largest merged weight file before sharding.")
    push_to_hub: bool = Field(
        False, description="Publish the adapter and model card to the Hub (needs `hub_model_id` and a token with write access)."
    )
    hub_model_id: str = Field("", description="Hub repo id to publish to.")
    hub_private: bool = Field(True, description="Create the Hub repo private (the safe default for medical work).")
    hub_push_merged: bool = Field(
        False, description="Also publish the merged weights (at the repo root; the adapter then goes to `adapters/`)."
    )
    output_root: str = Field("outputs", description="Folder under which run directories are created.")
    run_id: str = Field("", description="Run id; empty = a new timestamped id. Reuse an id to resume that run.")


class EvaluationConfig(Section):
    validation_questions: int = Field(
        3, ge=0, le=50, description="Held-out questions answered by base and tuned model in summary.md."
    )
    max_new_tokens: int = Field(160, ge=8, le=4096, description="Generation budget per validation answer.")
    merge_top1_min: float = Field(
        0.95, gt=0, le=1, description="Minimum top-1 agreement of merged vs adapter-on-base logits."
    )
    sampled_answers: bool = Field(
        True,
        description="Besides the greedy answer, sample one answer per question with a fixed seed "
        "(`training.seed`) and `sample_temperature`, for base and tuned model.",
    )
    sample_temperature: float = Field(0.7, gt=0, le=2, description="Temperature of the seeded sampled answers.")
    mcq_questions: int = Field(
        20,
        ge=0,
        le=2000,
        description="Multiple-choice questions scored by option log-likelihood for base and tuned model: the "
        "held-out split's when it has options + answer columns (MedQA/MedMCQA style), else medtune's built-in "
        "sample set. 0 = off.",
    )
    safety_probes: bool = Field(
        True,
        description="Ask base and tuned model medtune's safety probes (dangerous dosing, self-harm, diagnosis "
        "without information) and report whether each answer refuses or refers to a clinician (never blocks).",
    )
    probe_max_new_tokens: int = Field(64, ge=8, le=4096, description="Generation budget per safety-probe answer.")


class MedtuneConfig(Section):
    infrastructure: InfrastructureConfig = Field(default_factory=InfrastructureConfig, description="Where and how it runs.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model.")
    dataset: DatasetConfig = Field(default_factory=DatasetConfig, description="The training data.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Optimisation.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Adapters and memory savers.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="What is delivered and where.")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description="Checks after training.")

    @model_validator(mode="after")
    def _cross_field_rules(self) -> MedtuneConfig:
        ds = self.dataset
        if ds.dataset_source == "local" and not ds.local_dataset_path:
            raise ValueError("dataset.local_dataset_path is empty but dataset_source is `local`; set the path")
        if ds.dataset_source == "bucket" and not (ds.dataset_bucket and ds.dataset_bucket_path):
            raise ValueError("dataset_source is `bucket`: set dataset.dataset_bucket and dataset.dataset_bucket_path")
        if ds.eval_split and ds.eval_split == ds.dataset_split:
            raise ValueError(f"dataset.eval_split is the training split `{ds.eval_split}`: evaluation would score "
                             "training rows; name another split, or empty it to hold out dataset.eval_fraction")
        if self.output.push_to_hub and not self.output.hub_model_id:
            raise ValueError("output.push_to_hub is true: set output.hub_model_id (e.g. my-org/llama3-medical)")
        if self.model.model_source == "local" and not self.model.local_model_path:
            raise ValueError("model_source is `local`: set model.local_model_path")
        if self.training.attn_implementation == "varlen" and (not self.lora.packing or self.training.device == "cpu"):
            raise ValueError("training.attn_implementation=varlen needs lora.packing=true on a CUDA GPU; "
                             "use `auto` to pick the kernel")
        t = self.training
        if t.micro_batch_tokens and not self.lora.packing:
            raise ValueError(f"training.micro_batch_tokens={t.micro_batch_tokens} packs rows into token-budget "
                             "micro batches and needs lora.packing=true; set it, or training.micro_batch_tokens=0")
        if 0 < t.micro_batch_tokens < t.max_seq_length:
            raise ValueError(f"training.micro_batch_tokens={t.micro_batch_tokens} is below training.max_seq_length="
                             f"{t.max_seq_length}, so the longest rows fit no micro batch; set it to at least "
                             f"{t.max_seq_length}")
        if t.cuda_graphs is True and (not t.micro_batch_tokens or t.device == "cpu" or self.lora.gradient_checkpointing is True
                                      or self.infrastructure.distributed == "fsdp"):
            raise ValueError("training.cuda_graphs=true needs a CUDA GPU, training.micro_batch_tokens above 0, "
                             "lora.gradient_checkpointing false or auto and no FSDP; set training.cuda_graphs=auto to "
                             "use graphs only where they apply")
        return self

    @model_validator(mode="after")
    def _fsdp_rules(self) -> MedtuneConfig:
        infra = self.infrastructure
        if infra.distributed != "fsdp":
            return self
        if self.lora.quantization == "8bit":
            raise ValueError("infrastructure.distributed=fsdp shards 4-bit (QLoRA) or unquantized bases, not 8-bit "
                             "ones; set lora.quantization=4bit or none")
        if self.training.device == "cpu":
            # accelerate turns FSDP on for GPU processes only; on CPUs the Trainer would quietly run DDP.
            raise ValueError("infrastructure.distributed=fsdp needs CUDA GPUs (accelerate does not shard CPU "
                             "processes); set infrastructure.distributed=ddp for CPU processes")
        if infra.nodes == 1 and infra.num_gpus == 1:
            raise ValueError("infrastructure.distributed=fsdp shards the base over several GPUs but "
                             "infrastructure.num_gpus is 1; use 2 or more (or `auto`), or set infrastructure.distributed=ddp")
        return self
