"""The model card (README.md in adapters/ and merged/), rendered from manifest.json alone.

A reviewer should be able to answer from the card, without the run directory: which base weights
(by hash), which data (by hash and row count), which chat template, every training parameter, what
the evaluation showed, on what hardware and how long, and what the model must not be used for.
Stages call `write_card` for their own folder; cleanup rewrites both once every fact is known.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from medtune.rundir import write_text

Kind = Literal["adapters", "merged"]

NOT_A_DEVICE = (
    "**This model is not a medical device and is not for clinical decision-making.** It has not been "
    "clinically validated or approved by any regulator. Its answers can be wrong, incomplete or outdated "
    "and must not be used to diagnose, treat or triage patients; a qualified clinician must review any output."
)
INTENDED_USE = (
    "Research and development on medical question answering: studying fine-tuning, building evaluation "
    "pipelines, and prototyping assistants whose every output is reviewed by a qualified professional."
)
LIMITATIONS = [
    "Trained on a small instruction dataset for a limited number of steps; it inherits the base model's "
    "knowledge cut-off, biases and failure modes (including confident fabrication).",
    "Evaluated only by held-out loss and a few sample answers listed below: no clinical benchmark, no safety "
    "red-teaming, no fairness analysis across patient groups.",
    "English-only data unless stated otherwise; behaviour on other languages is unknown.",
]


def write_card(folder: Path, kind: Kind, manifest: dict[str, Any], model_path: str | Path) -> None:
    write_text(folder / "README.md", render_card(kind, manifest, chat_template_of(Path(model_path))))


def chat_template_of(model_path: Path) -> str | None:
    """The chat template a tokenizer folder carries (transformers 5 writes chat_template.jinja)."""
    jinja = model_path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = model_path / "tokenizer_config.json"
    template = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
    return template if isinstance(template, str) else None


def render_card(kind: Kind, manifest: dict[str, Any], chat_template: str | None) -> str:
    cfg = manifest.get("config", {})
    base = _base_name(cfg.get("model", {}))
    title = f"LoRA adapter for {base}" if kind == "adapters" else f"{base} fine-tuned for medical Q&A (merged)"
    lines = ["---", f"library_name: {'peft' if kind == 'adapters' else 'transformers'}", f"base_model: {base}",
             "pipeline_tag: text-generation", "tags: [medtune, medical, lora, not-for-clinical-use]", "---", "",
             f"# {title}", "", f"> {NOT_A_DEVICE}", ""]
    lines += _model_section(kind, manifest, base)
    lines += _data_section(manifest, chat_template)
    lines += _parameters_section(cfg)
    lines += _evaluation_section(manifest)
    lines += _hardware_section(manifest)
    lines += _usage_section(kind, base)
    lines += ["## Intended use", "", INTENDED_USE, "", "## Limitations", "", *[f"- {x}" for x in LIMITATIONS], "",
              "## Not a medical device", "", NOT_A_DEVICE, ""]
    return "\n".join(lines)


def _base_name(model: dict[str, Any]) -> str:
    return model.get("local_model_path", "?") if model.get("model_source") == "local" else model.get("base_model_id", "?")


def _model_section(kind: Kind, manifest: dict[str, Any], base: str) -> list[str]:
    cfg = manifest.get("config", {})
    model, lora = cfg.get("model", {}), cfg.get("lora", {})
    source = manifest.get("stages", {}).get("model", {})
    method = "LoRA" if lora.get("quantization") == "none" else f"QLoRA ({lora.get('quantization')} base)"
    lines = ["## Model", "", f"- Base model: `{base}` (source `{model.get('model_source')}`"
             + (f", revision `{model.get('revision')}`)" if model.get("model_source") == "huggingface" else ")")]
    if source.get("gguf_sha256"):
        lines.append(f"- Converted from GGUF `{Path(source['gguf_file']).name}`, sha256 `{source['gguf_sha256']}`")
    files = manifest.get("provenance", {}).get("base_model_files", {})
    if files:
        lines += ["- Base model files (sha256):", "", "  | file | sha256 |", "  |---|---|"]
        lines += [f"  | {name} | `{digest}` |" for name, digest in files.items()]
        lines.append("")
    lines.append(f"- Method: {method}, rank {lora.get('lora_r')}, alpha {lora.get('lora_alpha')}, "
                 f"targets {', '.join(lora.get('target_modules', []))}")
    if kind == "merged":
        merge = manifest.get("stages", {}).get("merge", {})
        lines.append(f"- Merged into an unquantized copy of the base; weights saved as {merge.get('dtype', '?')} "
                     f"{merge.get('format', '?')}")
    git = manifest.get("provenance", {}).get("medtune_git")
    lines.append(f"- Produced by medtune {manifest.get('medtune_version', '?')}"
                 + (f" (git {git['commit'][:12]}{', uncommitted changes' if git['dirty'] else ''})" if git else "")
                 + f", run `{manifest.get('run_id', '?')}`, seed {manifest.get('seed', '?')}")
    return [*lines, ""]


def _data_section(manifest: dict[str, Any], chat_template: str | None) -> list[str]:
    cfg = manifest.get("config", {}).get("dataset", {})
    report = manifest.get("stages", {}).get("data", {}).get("report", {})
    name = cfg.get("dataset_name") if cfg.get("dataset_source") == "huggingface" else cfg.get("local_dataset_path")
    lines = ["## Training data", "", f"- Dataset: `{name}` (source `{cfg.get('dataset_source')}`)"]
    if report:
        lines.append(f"- {report['train_examples']} training rows and {report['eval_examples']} held-out rows after "
                     f"filtering; {report['train_tokens']} training tokens ({report['trained_tokens']} with loss); "
                     f"row format `{report['row_format']}`; {report['truncated']} truncated, {report['dropped']} dropped")
        inputs = report.get("input", {})
        if inputs.get("files"):
            lines += ["", "| input file | sha256 |", "|---|---|"]
            lines += [f"| {Path(f).name} | `{h}` |" for f, h in inputs["files"].items()]
        elif inputs.get("fingerprint"):
            lines.append(f"- `datasets` fingerprint `{inputs['fingerprint']}`")
    if chat_template:
        digest = hashlib.sha256(chat_template.encode()).hexdigest()
        lines += ["", f"Rows were rendered with the model's chat template (sha256 `{digest}`):", "",
                  "<details><summary>chat template</summary>", "", "```jinja", chat_template.strip(), "```", "",
                  "</details>"]
    return [*lines, ""]


def _parameters_section(cfg: dict[str, Any]) -> list[str]:
    lines = ["## Training parameters", "", "Every resolved setting (also in `training.env` of the run):", "",
             "| key | value |", "|---|---|"]
    for section in ("training", "lora", "dataset"):
        for key, value in cfg.get(section, {}).items():
            lines.append(f"| {section}.{key} | `{json.dumps(value)}` |")
    return [*lines, ""]


def _evaluation_section(manifest: dict[str, Any]) -> list[str]:
    train, val = manifest.get("training", {}), manifest.get("validation", {})
    lines = ["## Evaluation", ""]
    if "eval_loss" in train:
        lines.append(f"- Held-out loss: base model **{train['base_eval_loss']:.4f}** → fine-tuned "
                     f"**{train['eval_loss']:.4f}** ({100 * train['eval_loss_reduction']:.1f}% lower)")
    if "train_loss" in train:
        lines.append(f"- {train['steps']} optimizer steps, final training loss {train['train_loss']:.4f}")
    check = val.get("merge_check")
    if check:
        lines.append(f"- Merged weights vs adapter-on-base: top-1 agreement {check['top1_agreement']:.4f}, "
                     f"max |logit diff| {check['max_abs_diff']:.3g} over {check['positions']} positions")
    answers = val.get("answers", [])
    if answers:
        lines += [f"- The fine-tuned model ended {val.get('tuned_stopped')} of {len(answers)} answers on its "
                  "end-of-turn token", "", "Sample answers to held-out questions (greedy decoding):", ""]
        for a in answers:
            lines += [f"**Q:** {a['question']}", "", f"- *Base:* {a['base']['text']}", f"- *Fine-tuned:* {a['tuned']['text']}"]
            lines += [f"- *Reference:* {a['reference']}", ""] if a.get("reference") else [""]
    if len(lines) == 2:
        lines.append("No evaluation results were recorded for this run.")
    return [*lines, ""]


def _hardware_section(manifest: dict[str, Any]) -> list[str]:
    env = manifest.get("environment", {})
    stages = manifest.get("stages", {})
    gpus = ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in env.get("gpus", [])) or "no GPU"
    lines = ["## Hardware and time", "",
             f"- {env.get('platform', '?')}, {env.get('cpu_count', '?')} CPUs, {env.get('ram_gib', '?')} GiB RAM, {gpus}"]
    timed = [f"{name} {info['seconds']} s" for name, info in stages.items() if "seconds" in info]
    if timed:
        lines.append(f"- Stage times: {', '.join(timed)}")
    libs = env.get("libraries", {})
    if libs:
        lines.append(f"- Libraries: {', '.join(f'{k} {v}' for k, v in libs.items() if v)}")
    return [*lines, ""]


def _usage_section(kind: Kind, base: str) -> list[str]:
    if kind == "adapters":
        code = ["from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
                f'base = AutoModelForCausalLM.from_pretrained("{base}")',
                'model = PeftModel.from_pretrained(base, "path/to/adapters")']
        return ["## How to use", "", "```python", *code, "```", ""]
    return ["## How to use", "", "```bash", "python -m vllm.entrypoints.openai.api_server --model path/to/merged",
            "```", "", "The folder carries the tokenizer, the chat template and a generation config whose stop "
            "tokens include the end-of-turn token, so answers stop where the model was trained to stop.", ""]
