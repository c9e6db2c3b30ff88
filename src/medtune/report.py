"""report.html: one self-contained page a reviewer can open from the run directory (no network assets).

Everything comes from manifest.json (config, data report, stage timings, training history,
evaluation) plus a listing of the artifacts with sizes and sha256. Charts are PNGs drawn with
matplotlib and embedded as base64; there is no JavaScript. Keys a stage did not write are left out.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from medtune.rundir import RunDir, write_text

STAGES = ("setup", "container", "model", "data", "finetune", "merge", "upload", "validate", "evaluate")
CSS = """
body{font:15px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#1d2433;padding:0 1em}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #d5dbe5;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #d5dbe5;padding:.3em .6em;text-align:left;
vertical-align:top}th{background:#eef2f8}.ok{color:#16794a;font-weight:600}.bad{color:#b3261e;font-weight:600}
.status{display:inline-block;padding:.2em .7em;border-radius:1em;color:#fff}.succeeded{background:#16794a}
.failed,.running{background:#b3261e}.running{background:#946200}.pair{display:grid;grid-template-columns:1fr 1fr;gap:1em}
.answer{background:#f6f8fb;border:1px solid #d5dbe5;border-radius:6px;padding:.6em;white-space:pre-wrap}
.muted{color:#5b6475;font-size:.9em}img{max-width:100%}details{margin:.4em 0}code{background:#eef2f8;padding:0 .2em;
overflow-wrap:anywhere}td{overflow-wrap:anywhere}
"""


def write_report(run: RunDir) -> Path:
    path = run.root / "report.html"
    write_text(path, render_report(run, run.manifest()))
    return path


def render_report(run: RunDir, manifest: dict[str, Any]) -> str:
    status = manifest.get("status", "running")
    parts = [f"<h1>medtune run {_e(run.run_id)}</h1>",
             f'<p><span class="status {_e(status)}">{_e(status)}</span> {_e(manifest.get("error") or "")}</p>']
    parts += _overview(manifest)
    parts += _data_section(manifest.get("stages", {}).get("data", {}).get("report"))
    parts += _training_section(manifest.get("training", {}))
    parts += _evaluation_section(manifest.get("training", {}), manifest.get("evaluation", {}),
                                 manifest.get("validation", {}))
    parts += _answers_section(manifest.get("evaluation", {}))
    parts += _safety_section(manifest.get("evaluation", {}).get("safety"))
    parts += _artifacts_section(run)
    parts += _config_section(manifest.get("config", {}))
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>medtune run {_e(run.run_id)}</title>'
            f"<style>{CSS}</style></head><body>\n{body}\n"
            '<p class="muted">Not a medical device: outputs need review by a qualified clinician.</p></body></html>\n')


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return _e("-" if value is None else value)


def _overview(manifest: dict[str, Any]) -> list[str]:
    cfg = manifest.get("config", {})
    model, data = cfg.get("model", {}), cfg.get("dataset", {})
    stages = manifest.get("stages", {})
    rows = [[_e(name), _e(stages[name].get("status", "-")), _fmt(stages[name].get("seconds"), 1)]
            for name in [*STAGES, *[s for s in stages if s not in STAGES]] if name in stages]
    total = sum(stages[s].get("seconds", 0) for s in stages)
    return ["<h2>Overview</h2>",
            f"<p>Preset <code>{_e(model.get('model_config'))}</code>, base model <code>{_e(model.get('base_model_id'))}"
            f"</code> (source <code>{_e(model.get('model_source'))}</code>); dataset <code>"
            f"{_e(data.get('local_dataset_path') or data.get('dataset_name'))}</code>; medtune "
            f"{_e(manifest.get('medtune_version', '?'))}.</p>",
            "<h3>Stage timings</h3>", _table(["stage", "status", "seconds"], rows),
            f'<p class="muted">All stages: {total / 60:.1f} min.</p>']


def _data_section(report: dict[str, Any] | None) -> list[str]:
    """Every key the data stage wrote: scalars in one table, nested summaries (e.g. a PHI scan) each in their own."""
    if not report:
        return []
    scalars = [[_e(k), _fmt(v)] for k, v in report.items() if not isinstance(v, (dict, list))]
    parts = ["<h2>Data</h2>", _table(["item", "value"], scalars)]
    for key, value in report.items():
        if isinstance(value, dict):
            rows = [[_e(k), _e(json.dumps(v) if isinstance(v, (dict, list)) else v)] for k, v in value.items()]
            parts += [f"<h3>{_e(key.replace('_', ' '))}</h3>", _table(["item", "value"], rows)]
        elif isinstance(value, list) and value:
            parts += [f"<details><summary>{_e(key.replace('_', ' '))} ({len(value)})</summary><pre>"
                      f"{_e(json.dumps(value[:50], indent=1))}</pre></details>"]
    return parts


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return f'<img alt="chart" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def loss_chart(train: dict[str, Any]) -> str | None:
    from matplotlib.figure import Figure

    history = train.get("history", [])
    steps = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if not steps and not evals:
        return None
    fig = Figure(figsize=(8, 3.6))
    ax = fig.add_subplot()
    if steps:
        ax.plot(*zip(*steps), marker=".", label="train loss")
    if "base_eval_loss" in train:
        evals = [(0, train["base_eval_loss"]), *evals]
    if evals:
        ax.plot(*zip(*evals), marker="o", label="held-out eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def throughput_chart(train: dict[str, Any]) -> str | None:
    from matplotlib.figure import Figure

    samples = train.get("throughput", [])
    if not samples:
        return None
    fig = Figure(figsize=(8, 3.2))
    ax = fig.add_subplot()
    steps = [s["step"] for s in samples]
    ax.plot(steps, [s["tokens_per_second"] for s in samples], color="tab:green", marker=".")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("tokens/s (cumulative)", color="tab:green")
    mem = ax.twinx()
    mem.plot(steps, [s["peak_memory_gib"] for s in samples], color="tab:purple", marker=".")
    mem.set_ylabel(f"peak memory GiB ({train.get('peak_memory_kind', '')})", color="tab:purple")
    ax.grid(alpha=0.3)
    return _png(fig)


def _training_section(train: dict[str, Any]) -> list[str]:
    if not train:
        return []
    parts = ["<h2>Training</h2>"]
    if "steps" in train:
        parts.append(f"<p>{train['steps']} optimizer steps on {_e(train.get('device'))}, {train.get('tokens')} tokens "
                     f"in {train.get('train_seconds')} s ({train.get('tokens_per_second')} tokens/s); final train loss "
                     f"{_fmt(train.get('train_loss'))}; peak memory {_fmt(train.get('peak_memory_gib'), 2)} GiB "
                     f"({_e(train.get('peak_memory_kind', '-'))}).</p>")
    for chart in (loss_chart(train), throughput_chart(train)):
        if chart:
            parts.append(chart)
    return parts


def _evaluation_section(train: dict[str, Any], ev: dict[str, Any], val: dict[str, Any]) -> list[str]:
    rows = []
    if "base_eval_loss" in train:
        rows.append(["held-out eval loss", _fmt(train["base_eval_loss"]), _fmt(train.get("eval_loss"))])
        rows.append(["held-out perplexity", _fmt(train.get("base_eval_perplexity"), 2),
                     _fmt(train.get("eval_perplexity"), 2)])
    if "mcq" in ev:
        m = ev["mcq"]
        for key, label in (("accuracy_norm", "accuracy (length-normalised)"), ("accuracy", "accuracy (sum log-prob)")):
            rows.append([f"multiple choice, {m['questions']} questions ({_e(m['source'])}): {label}",
                         f"{100 * m['base'][key]:.1f}%", f"{100 * m['tuned'][key]:.1f}%"])
    for side_rate in [ev.get("stop_rate")] if ev.get("stop_rate") else []:
        rows.append(["answers that stopped on the end-of-turn token",
                     *(f"{side_rate[s]['stopped']} / {side_rate[s]['answers']}" for s in ("base", "tuned"))])
    if "safety" in ev:
        s = ev["safety"]["summary"]
        rows.append(["safety probes answered with a refusal or referral",
                     *(f"{s[m]['safe_response']} / {s['probes']}" for m in ("base", "tuned"))])
    parts = ["<h2>Evaluation: base vs tuned</h2>", _table(["measure", "base", "tuned"], rows)] if rows else []
    if val.get("merge_check"):
        c = val["merge_check"]
        verdict = '<span class="ok">pass</span>' if c["passed"] else '<span class="bad">FAIL</span>'
        parts.append(f"<p>Merged weights vs adapter-on-base logits over {c['positions']} positions: max |diff| "
                     f"{c['max_abs_diff']:.4g}, top-1 agreement {c['top1_agreement']:.4f} (required ≥ {c['min_top1']}): "
                     f"{verdict}.</p>")
    return parts


def _answer_cell(answer: dict[str, Any]) -> str:
    flag = "" if answer["stopped"] else ' <span class="bad">did not stop</span>'
    return (f'<div><div class="muted">{answer["tokens"]} tokens{flag}</div>'
            f'<div class="answer">{_e(answer["text"]) or "<em>(empty)</em>"}</div></div>')


def _answers_section(ev: dict[str, Any]) -> list[str]:
    if not ev.get("answers"):
        return []
    parts = ["<h2>Answers to held-out questions</h2>",
             '<p class="muted">Left: base model; right: tuned model. Greedy decoding, then one sample with a fixed '
             "seed.</p>"]
    for i, a in enumerate(ev["answers"], 1):
        parts.append(f"<h3>Question {i}</h3><p><strong>{_e(a['question'])}</strong></p>")
        for mode in ("greedy", "sampled"):
            if mode in a:
                parts.append(f'<p class="muted">{mode}</p><div class="pair">{_answer_cell(a[mode]["base"])}'
                             f'{_answer_cell(a[mode]["tuned"])}</div>')
        if a.get("reference"):
            parts.append(f"<details><summary>reference answer</summary><div class=\"answer\">{_e(a['reference'])}"
                         "</div></details>")
    return parts


def _mark(row: dict[str, Any]) -> str:
    labels = [k for k in ("refusal", "referral") if row[k]]
    return f'<span class="ok">{", ".join(labels)}</span>' if labels else '<span class="bad">neither</span>'


def _safety_section(safety: dict[str, Any] | None) -> list[str]:
    if not safety:
        return []
    rows = [[_e(r["category"]), _e(r["prompt"]), _mark(r["base"]), _mark(r["tuned"])] for r in safety["rows"]]
    parts = ["<h2>Safety probes</h2>",
             '<p class="muted">Reported, not blocked. A phrase match for a refusal or a referral to a clinician or '
             "crisis service; read the answers below.</p>", _table(["category", "prompt", "base", "tuned"], rows)]
    for r in safety["rows"]:
        parts.append(f"<details><summary>{_e(r['prompt'])}</summary><div class=\"pair\">{_answer_cell(r['base'])}"
                     f"{_answer_cell(r['tuned'])}</div></details>")
    return parts


def artifact_rows(run: RunDir) -> list[tuple[str, int, str]]:
    """(relative path, bytes, sha256) of every delivered file (working state and caches left out)."""
    skip = {"checkpoints", "cache", "data", "report.html"}
    out, sha256 = [], run.digests()
    for path in sorted(run.root.rglob("*")):
        rel = path.relative_to(run.root)
        if path.is_file() and rel.parts[0] not in skip and not any(p.startswith(".") for p in rel.parts):
            out.append((str(rel), path.stat().st_size, sha256(path)))
    return out


def _artifacts_section(run: RunDir) -> list[str]:
    rows = [[f"<code>{_e(name)}</code>", f"{size:,}", f"<code>{sha}</code>"] for name, size, sha in artifact_rows(run)]
    return ["<h2>Artifacts</h2>", _table(["file", "bytes", "sha256"], rows)]


def _config_section(cfg: dict[str, Any]) -> list[str]:
    parts = ["<h2>Configuration</h2>"]
    for section, values in cfg.items():
        rows = [[f"<code>{_e(k)}</code>", _e(json.dumps(v) if isinstance(v, (list, dict)) else v)]
                for k, v in (values.items() if isinstance(values, dict) else [(section, values)])]
        parts.append(f"<details><summary>{_e(section)}</summary>{_table(['key', 'value'], rows)}</details>")
    return parts
