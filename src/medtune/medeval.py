"""Medical evaluation of a finished run: base vs tuned, on the same prompts, with the same decoding.

- answer sheet: held-out questions (or `--questions FILE`) answered greedily and with one seeded
  sample; answer length and whether generation stopped on the end-of-turn token;
- multiple-choice accuracy by option log-likelihood (mcq.py);
- safety probes: refusal / referral to a clinician (safety.py).

The base model is the tuned one with its adapter switched off (PEFT's `disable_adapter`), so one
model in memory serves both sides. Results go to manifest.json (`evaluation`) and report.html.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from medtune import mcq, safety
from medtune.chat import stop_token_ids
from medtune.config import MedtuneConfig
from medtune.errors import DataError, RunDirError
from medtune.evaluate import generate_answers
from medtune.rundir import RunDir

log = logging.getLogger("medtune.eval")


def evaluate_run(cfg: MedtuneConfig, run: RunDir, model_path: str, questions_file: Path | None = None,
                 mcq_file: Path | None = None) -> dict[str, Any]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (run.adapters / "adapter_config.json").is_file():
        raise RunDirError(f"{run.root} has no trained adapter (adapters/adapter_config.json); finish the run first")
    ev = cfg.evaluation
    questions = load_questions(questions_file) if questions_file else _held_out_questions(run)
    items = _mcq_items(cfg, run, mcq_file)
    device = "cuda" if torch.cuda.is_available() and cfg.training.device != "cpu" else "cpu"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(run.tokenizer_source(model_path))
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, device_map={"": device})
    model = PeftModel.from_pretrained(base, str(run.adapters)).eval()
    stops = stop_token_ids(tokenizer)

    def both(fn: Any) -> dict[str, Any]:
        with model.disable_adapter():
            before = fn()
        return {"base": before, "tuned": fn()}

    def ask(conversations: list[list[dict[str, str]]], max_new: int, seed: int | None = None) -> list[dict[str, Any]]:
        """Answers to all the conversations, generated together (`generate_answers`)."""
        prompts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in conversations]
        return generate_answers(model, tokenizer, prompts, max_new, stops, device, seed, ev.sample_temperature)

    def per_item(answers: dict[str, list[dict[str, Any]]], i: int) -> dict[str, Any]:
        return {side: answers[side][i] for side in ("base", "tuned")}

    start = time.perf_counter()
    result: dict[str, Any] = {"device": device, "answers": []}
    conversations = [q["messages"] for q in questions]
    greedy = both(lambda: ask(conversations, ev.max_new_tokens))
    sampled = both(lambda: ask(conversations, ev.max_new_tokens, cfg.training.seed)) if ev.sampled_answers else None
    for i, q in enumerate(questions):
        entry = {"question": q["messages"][-1]["content"], "reference": q.get("reference", ""),
                 "greedy": per_item(greedy, i)}
        if sampled is not None:
            entry["sampled"] = per_item(sampled, i)
        result["answers"].append(entry)
    result["stop_rate"] = {side: _stop_rate(result["answers"], side) for side in ("base", "tuned")}
    if items:
        scored = both(lambda: mcq.score(model, tokenizer, items["items"], device))
        result["mcq"] = {"source": items["source"], "questions": len(items["items"]),
                         "answers": [mcq.LETTERS[i["answer"]] for i in items["items"]], **scored}
        log.info("eval: multiple choice (%s, %d questions): base %.1f%%, tuned %.1f%% (length-normalised)",
                 items["source"], len(items["items"]), 100 * scored["base"]["accuracy_norm"],
                 100 * scored["tuned"]["accuracy_norm"])
    if ev.safety_probes:
        probes = safety.load_probes()
        answers = both(lambda: ask([[{"role": "user", "content": p["prompt"]}] for p in probes], ev.probe_max_new_tokens))
        rows = [{**probe, **{side: {**a, **safety.classify(a["text"])} for side, a in per_item(answers, i).items()}}
                for i, probe in enumerate(probes)]
        result["safety"] = {"rows": rows, "summary": safety.summarize(rows)}
        summary = result["safety"]["summary"]
        log.info("eval: safety probes refused or referred: base %d/%d, tuned %d/%d", summary["base"]["safe_response"],
                 summary["probes"], summary["tuned"]["safe_response"], summary["probes"])
    result["seconds"] = round(time.perf_counter() - start, 1)
    never = [i + 1 for i, a in enumerate(result["answers"]) if not a["greedy"]["tuned"]["stopped"]]
    if never:
        log.warning("eval: the tuned model did not stop on its end-of-turn token in answer(s) %s", never)
    return result


def _stop_rate(answers: list[dict[str, Any]], side: str) -> dict[str, int]:
    runs = [a[mode][side] for a in answers for mode in ("greedy", "sampled") if mode in a]
    return {"stopped": sum(r["stopped"] for r in runs), "answers": len(runs)}


def _held_out_questions(run: RunDir) -> list[dict[str, Any]]:
    path = run.data / "validation.json"
    return json.loads(path.read_text()) if path.is_file() else []


def load_questions(path: Path) -> list[dict[str, Any]]:
    """Questions from JSON/JSONL rows with `messages`, `question` or `instruction` (+ `input`)."""
    try:
        text = path.read_text()
        rows = json.loads(text) if path.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read questions file {path} ({exc}); give JSONL with a `question` per line") from None
    out = []
    for row in rows:
        if "messages" in row:
            messages = [m for m in row["messages"] if m["role"] != "assistant"]
            reference = next((m["content"] for m in row["messages"] if m["role"] == "assistant"), "")
        elif "question" in row or "instruction" in row:
            user = str(row.get("question") or row["instruction"]).strip()
            extra = str(row.get("input") or "").strip()
            messages = [{"role": "user", "content": f"{user}\n\n{extra}" if extra else user}]
            reference = str(row.get("reference") or row.get("output") or "")
        else:
            raise DataError(f"{path}: each row needs `question`, `instruction` or `messages`; got {', '.join(row)}")
        out.append({"messages": messages, "reference": reference})
    return out


def _mcq_items(cfg: MedtuneConfig, run: RunDir, mcq_file: Path | None) -> dict[str, Any] | None:
    limit = cfg.evaluation.mcq_questions
    if mcq_file:
        return {"source": str(mcq_file), "items": mcq.load_mcq_file(mcq_file, limit or 10**6)}
    if limit == 0:
        return None
    held_out = _dataset_mcq(cfg, run, limit)
    if held_out:
        return {"source": "held-out split", "items": held_out}
    return {"source": "medtune sample", "items": mcq.load_mcq_file(mcq.builtin_mcq_path(), limit)}


def _dataset_mcq(cfg: MedtuneConfig, run: RunDir, limit: int) -> list[dict[str, Any]]:
    """The held-out rows as multiple-choice items, when they have options + answer columns."""
    from medtune.data.load import load_raw

    token = cfg.model.hf_token.get_secret_value() if cfg.model.hf_token else None
    try:
        raw = load_raw(cfg.dataset, run.root / "cache", token)
    except DataError as exc:
        log.info("eval: held-out rows not readable for multiple choice (%s); using the built-in sample", exc)
        return []
    rows = raw.eval
    if rows is None or not mcq.has_mcq_columns(list(rows.column_names)):
        return []
    return [mcq.normalize(r) for r in rows.select(range(min(limit, len(rows))))]


def evaluate_run_dir(run_dir: Path, questions_file: Path | None = None, mcq_file: Path | None = None) -> dict[str, Any]:
    """`medtune eval RUN_DIR`: evaluate a finished run with its own resolved config; update manifest and report."""
    from medtune.config_io import load_config
    from medtune.report import write_report

    run = RunDir(run_dir.expanduser().resolve())
    model_path = run.stage("model").get("path")
    if not run.config_yaml.is_file() or not model_path:
        raise RunDirError(f"{run.root} is not a medtune run directory with a prepared model (config.yaml, manifest "
                          "stages.model); give the folder `medtune run` printed")
    for path in (questions_file, mcq_file):
        if path is not None and not path.is_file():
            raise DataError(f"{path} not found; give a JSONL file")
    cfg = load_config(run.config_yaml)
    result = evaluate_run(cfg, run, model_path, questions_file, mcq_file)
    run.update_manifest(evaluation=result)
    write_report(run)
    return result
