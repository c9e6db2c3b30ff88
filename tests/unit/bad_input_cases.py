"""The bad-input table of tests/unit/test_bad_input.py: each case builds one mistake (CLI arguments,
files under the test's folder, a replaced hardware probe) and names what the one error line must say."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from medtune import preflight, setup

TINY_DATA = Path(__file__).resolve().parents[1] / "assets" / "tiny_medical.jsonl"
Build = Callable[[Path, Path], list[str]]  # (tmp, tiny model) -> extra CLI arguments
Inject = Callable[[pytest.MonkeyPatch], None]


@dataclass(frozen=True)
class Bad:
    kind: str  # config, data, model, paths, environment
    build: Build
    expect: tuple[str, ...]  # substrings of the one stderr line: the problem, then the fix
    inject: Inject | None = None
    at_stage: bool = False  # knowable only when the data stage lists the bucket (after the run directory exists)


def sets(*items: str) -> Build:
    return lambda tmp, model: [a for s in items for a in ("--set", s)]


def config_file(text: str) -> Build:
    def build(tmp: Path, model: Path) -> list[str]:
        (tmp / "bad.yaml").write_text(text)
        return ["--config", str(tmp / "bad.yaml")]
    return build


def model_copy(change: Callable[[Path], None]) -> Build:
    """A copy of the tiny model folder with one thing broken."""
    def build(tmp: Path, model: Path) -> list[str]:
        folder = tmp / "broken-model"
        shutil.copytree(model, folder)
        change(folder)
        return sets(f"model.local_model_path={folder}")(tmp, model)
    return build


def gguf_file(content: Callable[[], bytes]) -> Build:
    def build(tmp: Path, model: Path) -> list[str]:
        (tmp / "model.gguf").write_bytes(content())
        return sets("model.model_source=gguf", f"model.gguf_path={tmp / 'model.gguf'}")(tmp, model)
    return build


def truncated_gguf() -> bytes:
    """A valid GGUF header that promises a tensor table the file does not hold."""
    return b"GGUF" + (3).to_bytes(4, "little") + (5).to_bytes(8, "little") + (0).to_bytes(8, "little")


def chat_template_removed(folder: Path) -> None:
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    for extra in folder.glob("chat_template.*"):
        extra.unlink()


def edit_config(**changes: object) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        for key, value in changes.items():
            if value is None:
                cfg.pop(key, None)
            else:
                cfg[key] = value
        (folder / "config.json").write_text(json.dumps(cfg))
    return change


def in_outputs(setting: str, make: Callable[[Path], None]) -> Build:
    """`setting` (a path key) pointed below the test's outputs folder, prepared by `make`."""
    def build(tmp: Path, model: Path) -> list[str]:
        make(tmp / "outputs")
        return sets(setting.replace("{outputs}", str(tmp / "outputs")))(tmp, model)
    return build


def a_file(outputs: Path) -> None:
    (outputs / "notes.txt").write_text("not a folder\n")


def read_only(outputs: Path) -> None:
    (outputs / "locked").mkdir()
    (outputs / "locked").chmod(0o555)


def bucket(path: str) -> Build:
    def build(tmp: Path, model: Path) -> list[str]:
        (tmp / "bucket" / "data").mkdir(parents=True)
        shutil.copy(TINY_DATA, tmp / "bucket" / "data" / "qa.jsonl")
        shutil.copy(TINY_DATA, tmp / "secret.jsonl")
        return sets("dataset.dataset_source=bucket", f"dataset.dataset_bucket=file://{tmp / 'bucket'}",
                    f"dataset.dataset_bucket_path={path}")(tmp, model)
    return build


def data_folder(files: dict[str, str], *extra: str) -> Build:
    """tmp/in holding `files` (name: text), as the local dataset."""
    def build(tmp: Path, model: Path) -> list[str]:
        (tmp / "in").mkdir()
        for name, text in files.items():
            (tmp / "in" / name).write_text(text)
        return sets(f"dataset.local_dataset_path={tmp / 'in'}", "dataset.dataset_format=auto", *extra)(tmp, model)
    return build


def saved_data(splits: tuple[str, ...] | None, *extra: str) -> Build:
    """tmp/in as a `save_to_disk` folder: a DatasetDict with these splits, or (None) a single Dataset."""
    def build(tmp: Path, model: Path) -> list[str]:
        from datasets import Dataset, DatasetDict

        rows = Dataset.from_json(str(TINY_DATA))
        (DatasetDict({split: rows for split in splits}) if splits else rows).save_to_disk(str(tmp / "in"))
        return sets(f"dataset.local_dataset_path={tmp / 'in'}", "dataset.dataset_format=auto", *extra)(tmp, model)
    return build


def empty_parquet(tmp: Path, model: Path) -> list[str]:
    """A Parquet file with the right columns and no rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp / "in").mkdir()
    pq.write_table(pa.table({c: pa.array([], pa.string()) for c in ("instruction", "input", "output")}),
                   tmp / "in" / "qa.parquet")
    return sets(f"dataset.local_dataset_path={tmp / 'in' / 'qa.parquet'}", "dataset.dataset_format=auto")(tmp, model)


GOOD_ROWS = TINY_DATA.read_text()


def escaping_bucket(tmp: Path, model: Path) -> list[str]:
    """An in-memory bucket (fsspec `memory://`, so remote to medtune) with an object key holding `..`."""
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe(f"/{tmp.name}/med/qa.jsonl", TINY_DATA.read_bytes())
    fs.pipe(f"/{tmp.name}/med/../../escaped.jsonl", TINY_DATA.read_bytes())
    return sets("dataset.dataset_source=bucket", f"dataset.dataset_bucket=memory://{tmp.name}",
                "dataset.dataset_bucket_path=med", "dataset.dataset_format=jsonl")(tmp, model)


def gpus(*, bf16: bool = True, count: int = 1) -> Inject:
    card = {"name": "Tesla V100-SXM2-32GB" if not bf16 else "NVIDIA A100-SXM4-40GB", "memory_gib": 32.0, "bf16": bf16}
    return lambda mp: mp.setattr(setup, "visible_gpus", lambda: [dict(card) for _ in range(count)])


def no_gpu(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(setup, "visible_gpus", lambda: [])


def gpu_without_bitsandbytes(mp: pytest.MonkeyPatch) -> None:
    gpus()(mp)
    version = setup._version
    mp.setattr(setup, "_version", lambda name: None if name == "bitsandbytes" else version(name))


def free_disk(n: int) -> Inject:
    return lambda mp: mp.setattr(preflight, "free_bytes", lambda path: n)


CASES: dict[str, Bad] = {
    # --- config: unknown keys, wrong types, out-of-range values, contradictions -------------------
    "unknown-key": Bad("config", sets("lora.lora_rank=8"),
        ("unknown config key `lora.lora_rank`", "did you mean `lora.lora_r`")),
    "unknown-section": Bad("config", sets("trainig.num_epochs=1"),
        ("unknown config key `trainig`", "did you mean `training`")),
    "unknown-key-in-file": Bad("config", config_file("lora:\n  lora_alpah: 8\n"),
        ("`lora.lora_alpah`", "did you mean `lora.lora_alpha`")),
    "type-number": Bad("config", sets("training.num_epochs=three"),
        ("`training.num_epochs` = 'three'", "valid number", "set training.num_epochs to a valid value")),
    "type-bool": Bad("config", sets("lora.bf16=maybe"), ("`lora.bf16` = 'maybe'", "valid boolean", "set lora.bf16")),
    "type-int": Bad("config", sets("training.micro_batch_size=1.5"),
        ("`training.micro_batch_size` = 1.5", "valid integer", "set training.micro_batch_size")),
    "type-list": Bad("config", sets("lora.target_modules=7"),
        ("`lora.target_modules` = 7", "valid tuple", "set lora.target_modules")),
    "lora-r-zero": Bad("config", sets("lora.lora_r=0"),
        ("`lora.lora_r` = 0", "greater than or equal to 1", "set lora.lora_r to a valid value (LoRA rank)")),
    "learning-rate-negative": Bad("config", sets("training.learning_rate=-1"),
        ("`training.learning_rate` = -1", "greater than 0", "set training.learning_rate")),
    "max-seq-length-10": Bad("config", sets("training.max_seq_length=10"),
        ("`training.max_seq_length` = 10", "greater than or equal to 32", "set training.max_seq_length")),
    "micro-batch-zero": Bad("config", sets("training.micro_batch_size=0"),
        ("`training.micro_batch_size` = 0", "set training.micro_batch_size")),
    "micro-batch-word": Bad("config", sets("training.micro_batch_size=big"),
        ("`training.micro_batch_size` = 'big'", "valid integer", "or one of 'auto'", "set training.micro_batch_size")),
    "micro-batch-tokens-without-packing": Bad("config", sets("training.micro_batch_tokens=4096"),
        ("training.micro_batch_tokens=4096", "needs lora.packing=true", "or training.micro_batch_tokens=0")),
    "micro-batch-tokens-below-max-seq-length": Bad("config", sets("lora.packing=true", "training.micro_batch_tokens=300",
                                                                   "training.max_seq_length=512"),
        ("training.micro_batch_tokens=300 is below training.max_seq_length=512", "set it to at least 512")),
    "cuda-graphs-without-bins": Bad("config", sets("training.cuda_graphs=true"),
        ("training.cuda_graphs=true needs a CUDA GPU, training.micro_batch_tokens above 0",
         "set training.cuda_graphs=auto")),
    "eval-fraction-too-big": Bad("config", sets("dataset.eval_fraction=0.7"),
        ("`dataset.eval_fraction` = 0.7", "less than 0.5")),
    "max-samples-negative": Bad("config", sets("dataset.max_samples=-1"),
        ("`dataset.max_samples` = -1", "set dataset.max_samples")),
    "quantization-literal": Bad("config", sets("lora.quantization=2bit"),
        ("`lora.quantization` = '2bit' is not allowed", "use one of '4bit', '8bit' or 'none'")),
    "num-gpus-zero": Bad("config", sets("infrastructure.num_gpus=0"),
        ("infrastructure.num_gpus", "must be `auto` or at least 1")),
    "set-without-value": Bad("config", lambda tmp, model: ["--set", "lora.lora_r"],
        ("--set 'lora.lora_r' must look like section.key=value",)),
    "yaml-syntax": Bad("config", config_file("training:\n  num_epochs: [1\n"),
        ("bad.yaml line", "is not valid YAML", "fix the syntax")),
    "yaml-not-mapping": Bad("config", config_file("- training\n- lora\n"), ("bad.yaml must be a mapping of sections",)),
    "config-file-missing": Bad("config", lambda tmp, model: ["--config", str(tmp / "nope.yaml")],
        ("nope.yaml not found", "medtune init -o")),
    "preset-unknown": Bad("config", lambda tmp, model: ["--preset", "llama4-medical"],
        ("unknown preset 'llama4-medical'", "medtune presets")),
    "token-in-config": Bad("config", config_file("model:\n  hf_token: hf_abcdef\n"),
        ("model.hf_token must not be written in a config", "export HF_TOKEN")),
    "token-file-missing": Bad("config", sets("model.hf_token_file=/nonexistent/token"),
        ("model.hf_token_file /nonexistent/token not found",)),
    "push-without-repo": Bad("config", sets("output.push_to_hub=true"),
        ("output.push_to_hub is true", "set output.hub_model_id")),
    "local-data-without-path": Bad("config", sets("dataset.local_dataset_path="),
        ("dataset.local_dataset_path is empty", "set the path")),
    "eval-split-is-train-split": Bad("config", sets("dataset.eval_split=train"),
        ("dataset.eval_split is the training split `train`", "name another split")),
    "bf16-on-gpu-without-bf16": Bad("config", sets("lora.bf16=true"),
        ("lora.bf16 is true but Tesla V100-SXM2-32GB has no bfloat16", "set lora.bf16=false"), gpus(bf16=False)),
    # --- data: what the data stage's own table (test_data_errors.py) does not cover ---------------
    "data-bucket-missing-settings": Bad("data", sets("dataset.dataset_source=bucket"),
        ("dataset_source is `bucket`", "set dataset.dataset_bucket")),
    "data-bucket-object-escapes": Bad("data", escaping_bucket,
        ("holds objects whose names leave that folder (../../escaped.jsonl)", "rename or remove them"), at_stage=True),
    "data-saved-but-format-jsonl": Bad("data", saved_data(("train",), "dataset.dataset_format=jsonl"),
        ("is a saved dataset (save_to_disk) but dataset.dataset_format is jsonl",
         "set dataset.dataset_format=dataset")),
    "data-saved-unreadable": Bad("data", data_folder({"state.json": "{not json", "data-00000-of-00001.arrow": "x"}),
        ("looks like a saved dataset but cannot be read", "save it again with Dataset.save_to_disk")),
    "data-saved-eval-split-missing": Bad("data", saved_data(("train",), "dataset.eval_split=heldout"),
        ("dataset.eval_split 'heldout' not in", "it has: train", "leave it empty")),
    "data-saved-single-with-eval-split": Bad("data", saved_data(None, "dataset.eval_split=heldout"),
        ("is a single saved Dataset with no splits", "use dataset.eval_fraction")),
    "data-folder-not-saved": Bad("data", data_folder({"qa.jsonl": GOOD_ROWS}, "dataset.dataset_format=dataset"),
        ("is not a saved dataset (no dataset_dict.json or state.json)", "set dataset.dataset_format to the format")),
    "data-no-files-of-the-format": Bad("data", data_folder({"qa.csv": "instruction,input,output\nq,,a\n"},
                                                           "dataset.dataset_format=parquet"),
        ("no parquet files in folder", "it has qa.csv", "set dataset.dataset_format=csv")),
    "data-only-eval-split": Bad("data", data_folder({"heldout.jsonl": GOOD_ROWS}, "dataset.eval_split=heldout"),
        ("holds only the eval split 'heldout'", "add a training file")),
    "data-header-only-csv": Bad("data", data_folder({"qa.csv": "instruction,input,output\n"}),
        ("qa.csv holds no rows", "add rows")),
    "data-parquet-no-rows": Bad("data", empty_parquet, ("qa.parquet holds no rows", "add rows")),
    "data-eval-split-wrong-columns": Bad("data", data_folder({"train.jsonl": GOOD_ROWS,
                                                              "heldout.jsonl": '{"question": "q", "answer": "a"}\n'},
                                                             "dataset.eval_split=heldout"),
        ("(eval split)", "columns are question, answer")),
    # --- model -----------------------------------------------------------------------------------
    "model-folder-missing": Bad("model", sets("model.local_model_path=/nonexistent/llama"),
        ("/nonexistent/llama is not a folder", "point it at a model folder")),
    "model-no-config-json": Bad("model", model_copy(lambda d: (d / "config.json").unlink()),
        ("has no config.json", "point it at a Hugging Face model folder")),
    "model-no-weights": Bad("model", model_copy(lambda d: [p.unlink() for p in d.glob("*.safetensors")]),
        ("no *.safetensors or *.bin weights", "copy the full model folder")),
    "model-config-not-json": Bad("model", model_copy(lambda d: (d / "config.json").write_text("{model_type: llama")),
        ("config.json is not valid JSON", "copy the model's config.json again")),
    "model-config-no-model-type": Bad("model", model_copy(edit_config(model_type=None)),
        ("config.json has no model_type", "copy the model's own config.json")),
    "model-no-tokenizer": Bad("model", model_copy(lambda d: [p.unlink() for p in d.glob("tokenizer*")]),
        ("the tokenizer cannot be loaded", "copy the model's tokenizer files")),
    "model-architecture-without-template": Bad("model", model_copy(chat_template_removed),
        ("no chat template and the architecture (llama) matches none", "use a chat/instruct model")),
    "model-gguf-missing": Bad("model", sets("model.model_source=gguf", "model.gguf_path=/nonexistent/m.gguf"),
        ("model.gguf_path /nonexistent/m.gguf not found", "point it at a .gguf file")),
    "model-gguf-garbage": Bad("model", gguf_file(lambda: b"this is not a gguf file at all\n" * 40),
        ("model.gguf", "is not a readable GGUF model", "download the file again")),
    "model-gguf-truncated": Bad("model", gguf_file(truncated_gguf),
        ("is not a readable GGUF model", "compare its sha256")),
    "model-gguf-empty": Bad("model", gguf_file(lambda: b""), ("is not a readable GGUF model",)),
    "model-hub-id-malformed": Bad("model", sets("model.model_source=huggingface", "model.base_model_id=not a repo//id"),
        ("model.base_model_id 'not a repo//id' is not a Hub repo id", "org/name")),
    # --- paths -----------------------------------------------------------------------------------
    "bucket-path-dotdot": Bad("paths", bucket("../secret.jsonl"),
        ("dataset.dataset_bucket_path '../secret.jsonl' leaves dataset.dataset_bucket",
         "give a path relative to the bucket")),
    "bucket-path-dotdot-inside": Bad("paths", bucket("data/../../secret.jsonl"),
        ("leaves dataset.dataset_bucket", "relative to the bucket")),
    "bucket-path-absolute": Bad("paths", bucket("/etc/passwd"),
        ("dataset.dataset_bucket_path '/etc/passwd' leaves", "relative to the bucket")),
    "output-root-is-a-file": Bad("paths", in_outputs("output.output_root={outputs}/notes.txt", make=a_file),
        ("output.output_root", "notes.txt is a file, not a folder", "set output.output_root to a folder path")),
    "output-root-below-a-file": Bad("paths", in_outputs("output.output_root={outputs}/notes.txt/runs", make=a_file),
        ("is below the file", "set output.output_root to a folder path")),
    "output-root-read-only": Bad("paths", in_outputs("output.output_root={outputs}/locked/runs", make=read_only),
        ("is not writable", "set output.output_root to a folder you can write")),
    "cache-dir-is-a-file": Bad("paths", in_outputs("model.model_cache_dir={outputs}/notes.txt", make=a_file),
        ("model.model_cache_dir", "is a file, not a folder")),
    "run-id-escapes": Bad("paths", sets("output.run_id=../../elsewhere"),
        ("output.run_id '../../elsewhere' is not a plain name", "outside output.output_root")),
    "run-id-absolute": Bad("paths", sets("output.run_id=/tmp/run"),
        ("output.run_id '/tmp/run' is not a plain name", "rename it")),
    # --- environment: simulated GPUs, libraries and disks ----------------------------------------
    "no-gpu-device-cuda": Bad("environment", sets("training.device=cuda"),
        ("training.device is `cuda` but no CUDA GPU is visible", "set training.device=auto"), no_gpu),
    "no-gpu-8bit-optimizer": Bad("environment", sets("training.optimizer=paged_adamw_8bit"),
        ("`paged_adamw_8bit` needs a CUDA GPU", "training.optimizer=adamw_torch"), no_gpu),
    "no-gpu-num-gpus": Bad("environment", sets("infrastructure.num_gpus=2"),
        ("infrastructure.num_gpus is 2 but no CUDA GPU is visible", "num_gpus=auto"), no_gpu),
    "too-few-gpus": Bad("environment", sets("infrastructure.num_gpus=4"),
        ("infrastructure.num_gpus is 4 but only 2 GPU(s)", "set infrastructure.num_gpus=2"), gpus(count=2)),
    "bitsandbytes-missing-4bit": Bad("environment", sets("lora.quantization=4bit"),
        ("lora.quantization=4bit needs bitsandbytes, which is not installed", "pip install bitsandbytes",
         "lora.quantization=none"), gpu_without_bitsandbytes),
    "bitsandbytes-missing-8bit": Bad("environment", sets("lora.quantization=8bit"),
        ("lora.quantization=8bit needs bitsandbytes",), gpu_without_bitsandbytes),
    "bitsandbytes-missing-8bit-optimizer": Bad("environment", sets("training.optimizer=adamw_8bit"),
        ("training.optimizer=adamw_8bit needs bitsandbytes",), gpu_without_bitsandbytes),
    "disk-too-small-8b": Bad("environment",
        sets("model.model_source=huggingface", "model.base_model_id=meta-llama/Llama-3.1-8B-Instruct"),
        ("has 4.0 GiB free but the merged model needs about 15.0 GiB", "8.03B parameters in bfloat16",
         "output.merge_full_weights=false"), free_disk(4 * 2**30)),
    "disk-too-small-local": Bad("environment", sets("output.merged_dtype=float32"),
        ("has 0.1 MiB free but the merged model needs about", "in float32",
         "point output.output_root at a larger disk"), free_disk(100 * 1024)),
}
