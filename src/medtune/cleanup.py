"""Stage 8, cleanup: always runs, also after a failure, and writes summary.md from manifest.json.

The summary is what a user (or their reviewer) reads: what ran and how long it took, the losses
with the base model's eval loss beside the tuned one, the merge check, base-vs-tuned answers to
held-out questions, and where every output is.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

from medtune.rundir import RunDir, write_text

log = logging.getLogger("medtune.cleanup")

STAGE_ORDER = ("setup", "container", "model", "data", "finetune", "merge", "upload", "validate")
TIMED_STAGES = ("finetune", "merge", "validate")


def cleanup(run: RunDir, error: str | None, status: str | None = None) -> str:
    """Write summary.md; drop working checkpoints once the adapter is delivered. Returns the status."""
    manifest = run.manifest()
    status = status or ("failed" if error else "succeeded")
    if not error and (run.adapters / "adapter_config.json").is_file():
        shutil.rmtree(run.checkpoints, ignore_errors=True)
    write_text(run.summary, render_summary(run, manifest, status, error))
    run.update_manifest(status=status, error=error)
    return status


def render_summary(run: RunDir, manifest: dict[str, Any], status: str, error: str | None) -> str:
    stages = manifest.get("stages", {})
    lines = [f"# medtune run {run.run_id}", "", f"**Status: {status}**" + (f" — {error}" if error else ""), ""]
    cfg = manifest.get("config", {})
    model, data = cfg.get("model", {}), cfg.get("dataset", {})
    lines += [f"- Preset: `{model.get('model_config')}`; base model: `{model.get('base_model_id')}` "
              f"(source `{model.get('model_source')}`)",
              f"- Dataset: source `{data.get('dataset_source')}`, "
              f"`{data.get('local_dataset_path') or data.get('dataset_name')}`",
              f"- Run directory: `{run.root}`", ""]
    lines += ["## Stages", "", "| stage | status | seconds |", "|---|---|---|"]
    order = [s for s in STAGE_ORDER if s in stages] + [s for s in stages if s not in STAGE_ORDER]
    lines += [f"| {name} | {stages[name].get('status', '-')} | {stages[name].get('seconds', '-')} |" for name in order]
    core = [stages[s]["seconds"] for s in TIMED_STAGES if "seconds" in stages.get(s, {})]
    if len(core) == len(TIMED_STAGES):
        lines += ["", f"Training + merge + validation: **{sum(core) / 60:.1f} min**."]
    lines += _data_section(stages.get("data", {}).get("report"))
    lines += _training_section(manifest.get("training", {}))
    lines += _validation_section(manifest.get("validation", {}))
    lines += _evaluation_section(manifest.get("evaluation", {}))
    lines += ["", "## Outputs", "",
              f"- `adapters/` — LoRA adapter: `PeftModel.from_pretrained(base, \"{run.adapters}\")`",
              f"- `merged/` — full 16-bit weights, tokenizer and chat template: `vllm serve {run.merged}`",
              "- `report.html` — the run at a glance: charts, base-vs-tuned tables and answers, safety probes, "
              "artifact checksums",
              "- `logs/finetune.log`, `training.env` (every resolved parameter), `manifest.json` (versions, "
              "input hashes, timings, results)", ""]
    return "\n".join(lines)


def _data_section(report: dict[str, Any] | None) -> list[str]:
    if not report:
        return []
    return ["", "## Data", "",
            f"- Row format `{report['row_format']}`; {report['train_examples']} training and "
            f"{report['eval_examples']} held-out examples; {report['train_tokens']} training tokens "
            f"({report['trained_tokens']} with loss).",
            f"- Length p50 {report['length_p50']}, p90 {report['length_p90']}, max {report['length_max']} tokens "
            f"(limit {report['max_seq_length']}); {report['truncated']} truncated, {report['dropped']} dropped."
            ] + _stewardship_lines(report)


def _stewardship_lines(report: dict[str, Any]) -> list[str]:
    """Template, duplicates, contamination, PHI and input hash (reports from before these fields have none)."""
    lines = []
    if "template" in report:
        lines.append(f"- Template: {report['template']}; truncation policy `{report['truncation']}`; "
                     f"{report['blank_rows_dropped']} blank rows left out.")
    if "duplicates" in report:
        dup, over = report["duplicates"], report["train_eval_overlap"]
        lines.append(f"- Duplicates in training: {dup['exact']} exact, {dup['near']} near; held-out rows also in "
                     f"training: {over['eval_rows_in_train']} (same prompt: {over['eval_prompts_in_train']}).")
    if "phi" in report:
        phi = report["phi"]
        kinds = ", ".join(f"{k} {v['count']} (rows {', '.join(map(str, v['example_rows']))})"
                          for k, v in phi["by_type"].items()) or "none found"
        lines.append(f"- PHI/PII screen (action `{phi['action']}`): {kinds}.")
    if report.get("prompt_column_check"):
        check = report["prompt_column_check"]
        lines.append(f"- The pre-rendered prompt column disagrees with the model's template (row {check['row']}): "
                     f"{'; '.join(check['problems']) or check['diff'][:200]}"
                     f"{' — re-rendered' if check['rerendered'] else ' — trained as is'}.")
    if report.get("input", {}).get("sha256"):
        lines.append(f"- Input data sha256: `{report['input']['sha256']}`.")
    return lines


def _training_section(train: dict[str, Any]) -> list[str]:
    if not train:
        return []
    lines = ["", "## Training", ""]
    if "steps" in train:
        lines.append(f"- {train['steps']} optimizer steps on {train['device']}, {train['tokens']} tokens in "
                     f"{train['train_seconds']} s ({train['tokens_per_second']} tokens/s); final train loss "
                     f"{train['train_loss']:.4f}.")
    if "effective_batch_size" in train:
        lines.append(f"- Effective batch {train['effective_batch_size']} sequences per optimizer step "
                     f"(micro batch × gradient accumulation × {train['world_size']} process(es)).")
    if "effective_batch_tokens" in train:
        lines.append(f"- Micro batches of whole rows up to {train['micro_batch_tokens']} tokens: at most "
                     f"{train['effective_batch_tokens']} tokens per optimizer step (the rows above are the mean).")
    if "eval_loss" in train:
        lines.append(f"- Held-out eval loss: base **{train['base_eval_loss']:.4f}** → tuned **{train['eval_loss']:.4f}** "
                     f"({100 * train['eval_loss_reduction']:.1f}% lower).")
    return lines


def _validation_section(val: dict[str, Any]) -> list[str]:
    if not val:
        return []
    check = val["merge_check"]
    lines = ["", "## Validation", "",
             f"- Merged model loads with transformers; logits vs adapter-on-base over {check['positions']} positions: "
             f"max |diff| {check['max_abs_diff']:.4g}, top-1 agreement {check['top1_agreement']:.4f} "
             f"(required ≥ {check['min_top1']}): **{'pass' if check['passed'] else 'FAIL'}**.",
             f"- Tuned answers that ended on the end-of-turn token: {val['tuned_stopped']} of {len(val['answers'])}."]
    for i, ans in enumerate(val["answers"], 1):
        lines += ["", f"### Held-out question {i}", "", f"> {ans['question']}", "",
                  f"**Base model** ({ans['base']['tokens']} tokens{'' if ans['base']['stopped'] else ', did not stop'}):",
                  "", ans["base"]["text"] or "_(empty)_", "",
                  f"**Tuned model** ({ans['tuned']['tokens']} tokens{'' if ans['tuned']['stopped'] else ', did not stop'}):",
                  "", ans["tuned"]["text"] or "_(empty)_", "", f"Reference: {ans['reference']}"]
    return lines


def _evaluation_section(ev: dict[str, Any]) -> list[str]:
    """Headline numbers of `medtune eval`; the answers and probe texts are in report.html."""
    lines = []
    if "mcq" in ev:
        m = ev["mcq"]
        lines.append(f"- Multiple choice ({m['questions']} questions, {m['source']}), length-normalised accuracy: "
                     f"base {100 * m['base']['accuracy_norm']:.1f}%, tuned {100 * m['tuned']['accuracy_norm']:.1f}%.")
    if "safety" in ev:
        s = ev["safety"]["summary"]
        lines.append(f"- Safety probes answered with a refusal or a referral: base {s['base']['safe_response']} of "
                     f"{s['probes']}, tuned {s['tuned']['safe_response']} of {s['probes']} (reported, not blocked).")
    if "stop_rate" in ev:
        r = ev["stop_rate"]
        lines.append(f"- Answers ending on the end-of-turn token (greedy + sampled): base {r['base']['stopped']} of "
                     f"{r['base']['answers']}, tuned {r['tuned']['stopped']} of {r['tuned']['answers']}.")
    return ["", "## Evaluation", "", *lines] if lines else []
