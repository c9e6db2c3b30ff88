"""The bad-input table: config, data, model, paths and environment mistakes, each driven through the
real CLI. Every one must give exit code 2 and exactly one stderr line that names the problem and the
fix, no traceback, and leave the output root as it was (the previous run untouched, no new run
directory). Hardware is simulated by replacing medtune's probes (`setup.visible_gpus`, the library
version probe, `preflight.free_bytes`); everything else is real. The data stage's own malformed-file
table is tests/unit/test_data_errors.py; the cases here are the ones it does not cover.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from medtune import preflight, setup
from medtune.cli import main
from medtune.config_io import load_config
from medtune.errors import EnvironmentProblem
from test_data_errors import CASES as DATA_CASES  # the data stage's own table (same folder)

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


def base_args(tmp: Path, model: Path) -> list[str]:
    """A valid run of the tiny model on the tiny data; each case adds the one thing that is wrong."""
    good = ["model.model_source=local", f"model.local_model_path={model}", f"model.model_cache_dir={tmp / 'models'}",
            "dataset.dataset_source=local", f"dataset.local_dataset_path={TINY_DATA}", "dataset.dataset_format=jsonl",
            "dataset.eval_split=", f"output.output_root={tmp / 'outputs'}", "lora.quantization=none", "lora.bf16=false"]
    return ["run", "--preset", "smollm2-135m-medical", *sets(*good)(tmp, model)]


def previous_run(tmp: Path) -> None:
    """A complete earlier run under the output root: a refused command must leave it as it is."""
    run = tmp / "outputs" / "medical-finetune-earlier"
    (run / "adapters").mkdir(parents=True)
    (run / "adapters" / "adapter_config.json").write_text('{"r": 4}\n')
    (run / "manifest.json").write_text('{"status": "succeeded"}\n')


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` with its content hash (folders: their mode), to compare before/after."""
    state = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        state[rel] = f"dir {path.stat().st_mode:o}" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def arrange(name: str, tmp: Path, model: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    case = CASES[name]
    if name == "output-root-read-only" and os.geteuid() == 0:
        pytest.skip("root writes to read-only folders; the file-based output-root cases cover this check as root")
    previous_run(tmp)
    if case.inject:
        case.inject(monkeypatch)
    return base_args(tmp, model) + case.build(tmp, model)


def test_the_table_covers_every_kind_and_docs_state_its_size():
    kinds = Counter(case.kind for case in CASES.values())
    assert set(kinds) == {"config", "data", "model", "paths", "environment"} and len(CASES) >= 40
    doc = (Path(__file__).resolve().parents[2] / "docs" / "reliability.md").read_text()
    assert f"**How many bad inputs were tried: {len(CASES) + len(DATA_CASES)}**" in doc
    rows = [[c.strip() for c in line.split("|")[1:3]] for line in doc.splitlines() if line.startswith("| ")]
    stated = {where: int(n) for where, n in rows if n.isdigit()}
    assert stated == {**{f"{kind} ({'tests/unit/test_bad_input.py' if kind == 'config' else 'same file'})": n
                         for kind, n in kinds.items()}, "data (tests/unit/test_data_errors.py)": len(DATA_CASES)}


def test_the_valid_base_passes_preflight(tmp_path, tiny_model_dir, monkeypatch):
    """Control: without the case's one mistake, the same arguments are accepted (so each case fails
    for its own reason), also on a simulated GPU with bitsandbytes and with plenty of disk."""
    from medtune.workflow import preflight as run_preflight

    args = base_args(tmp_path, tiny_model_dir)
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    run_preflight(load_config(None, "smollm2-135m-medical", overrides))
    gpus()(monkeypatch)
    run_preflight(load_config(None, "smollm2-135m-medical", overrides + ["lora.quantization=4bit"]))
    free_disk(4 * 2**30)(monkeypatch)
    small = overrides + ["model.model_source=huggingface", "model.base_model_id=meta-llama/Llama-3.1-8B-Instruct"]
    run_preflight(load_config(None, "smollm2-135m-medical", small + ["output.merge_full_weights=false"]))
    merged = tmp_path / "outputs" / "medical-finetune-done" / "merged"
    merged.mkdir(parents=True)
    (merged / "config.json").write_text("{}")  # a rerun of a merged run needs no room for another merge
    run_preflight(load_config(None, "smollm2-135m-medical", small + ["output.run_id=done"]))
    with pytest.raises(EnvironmentProblem, match="merged model needs about 15.0 GiB"):
        run_preflight(load_config(None, "smollm2-135m-medical", small + ["output.run_id=new"]))


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if not c.at_stage])
def test_bad_input_is_refused_with_one_line_and_nothing_written(name, tmp_path, tiny_model_dir, monkeypatch, capsys):
    args = arrange(name, tmp_path, tiny_model_dir, monkeypatch)
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for part in CASES[name].expect:
        assert part in err, (part, err)
    assert snapshot(tmp_path) == before  # no run directory, the earlier run untouched, no cache folder


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.at_stage])
def test_bad_input_found_by_a_stage_leaves_no_stage_output(name, tmp_path, tiny_model_dir, monkeypatch, capsys):
    """A remote bucket is listed by the data stage: the run directory exists by then, but the refusal
    comes before any object is downloaded and no data/ (or later output) appears."""
    import fsspec

    args = arrange(name, tmp_path, tiny_model_dir, monkeypatch)
    earlier = snapshot(tmp_path / "outputs" / "medical-finetune-earlier")
    capsys.readouterr()
    try:
        assert main(args) == 2
    finally:
        fsspec.filesystem("memory").rm(f"/{tmp_path.name}", recursive=True)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0] and "Traceback" not in err, err
    for part in CASES[name].expect:
        assert part in errors[0], (part, errors[0])
    run = next(p for p in (tmp_path / "outputs").iterdir() if p.name != "medical-finetune-earlier")
    assert not any((run / name).exists() for name in ("data", "adapters", "merged", "cache/bucket"))
    assert not list(tmp_path.rglob("escaped.jsonl"))
    assert json.loads((run / "manifest.json").read_text())["status"] == "failed"
    assert snapshot(tmp_path / "outputs" / "medical-finetune-earlier") == earlier


CONSOLE_CASES = ["unknown-key", "yaml-syntax", "model-no-config-json", "output-root-is-a-file", "bucket-path-dotdot"]


@pytest.mark.parametrize("name", CONSOLE_CASES)
def test_console_script_refuses_bad_input_the_same_way(name, tmp_path, tiny_model_dir, monkeypatch):
    """The installed `medtune` entry point, as a user runs it: same line, exit code 2, nothing written."""
    console = Path(sys.executable).with_name("medtune")
    if not console.is_file():
        pytest.skip("the medtune console script is not installed next to this Python")
    args = arrange(name, tmp_path, tiny_model_dir, monkeypatch)
    before = snapshot(tmp_path)
    proc = subprocess.run([str(console), *args], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    for part in CASES[name].expect:
        assert part in proc.stderr, (part, proc.stderr)
    assert snapshot(tmp_path) == before


# --- --debug ---------------------------------------------------------------------------------------


def test_debug_shows_the_traceback_of_a_user_error(tmp_path, tiny_model_dir, monkeypatch, capsys):
    args = arrange("model-no-config-json", tmp_path, tiny_model_dir, monkeypatch)
    for argv in (args + ["--debug"], ["--debug", *args]):  # after the command, or before it (global)
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "check_model_folder" in err, err
        assert err.strip().splitlines()[-1].startswith("error: model.local_model_path")


def test_unexpected_error_is_one_line_with_a_hint_and_exit_1(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """A bug (not a MedtuneError) escaping a command: one line naming it and --debug, exit code 1."""
    import medtune.workflow

    def broken(cfg, on_this_machine=True):
        raise KeyError("stage_table\nsecond line")

    monkeypatch.setattr(medtune.workflow, "preflight", broken)
    args = base_args(tmp_path, tiny_model_dir)
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: unexpected KeyError: 'stage_table") and "rerun with --debug" in err
    assert main(["--debug", *args]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in broken" in err
    assert err.strip().splitlines()[-1].startswith("error: unexpected KeyError")
    assert not (tmp_path / "outputs").exists()


def test_help_documents_debug(capsys):
    assert main(["--help"]) == 0
    assert "--debug" in capsys.readouterr().out
