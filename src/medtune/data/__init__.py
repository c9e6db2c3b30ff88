"""Stage 4, data: load rows, render them with the model's chat template, tokenize, split, save.

Writes `<run>/data/` (train/ and eval/ as saved datasets, validation.json with held-out questions,
data_report.json) through one atomic rename; the stage is skipped when that folder is complete.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from datasets import Dataset

from medtune.config import MedtuneConfig
from medtune.data.load import load_raw
from medtune.data.render import detect_format, to_messages, tokenize_rows
from medtune.errors import DataError
from medtune.rundir import RunDir, atomic_dir

log = logging.getLogger("medtune.data")


def prepare_data(cfg: MedtuneConfig, run: RunDir, model_path: str) -> dict[str, Any]:
    from transformers import AutoTokenizer

    ds_cfg = cfg.dataset
    token = cfg.model.hf_token.get_secret_value() if cfg.model.hf_token else None
    raw = load_raw(ds_cfg, run.root / "cache", token)
    columns = list(raw.train.column_names)
    fmt = detect_format(columns, ds_cfg)
    log.info("data: %d rows, columns %s; row format `%s`%s", len(raw.train), columns, fmt,
             " (rendered with the model's chat template)" if fmt != "prompt" else " (trained as is)")
    train_rows = raw.train.shuffle(seed=cfg.training.seed)
    if ds_cfg.max_samples:
        train_rows = train_rows.select(range(min(ds_cfg.max_samples, len(train_rows))))
    eval_rows = raw.eval
    if eval_rows is None and ds_cfg.eval_fraction > 0 and len(train_rows) >= 10:
        n_eval = max(1, round(len(train_rows) * ds_cfg.eval_fraction))
        eval_rows = train_rows.select(range(n_eval))
        train_rows = train_rows.select(range(n_eval, len(train_rows)))
    if len(train_rows) == 0:
        raise DataError("the dataset has no training rows left after max_samples/eval split; check the data and settings")

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    max_len = cfg.training.max_seq_length
    train = tokenize_rows(train_rows, fmt, tokenizer, ds_cfg, max_len)
    if not train.input_ids:
        raise DataError(f"every row's prompt is longer than training.max_seq_length={max_len}; raise it")
    evald = tokenize_rows(eval_rows, fmt, tokenizer, ds_cfg, max_len) if eval_rows is not None else None
    report = _report(fmt, train, evald, raw.provenance, max_len)
    log.info("data: %d train / %d eval examples, %d train tokens, %d truncated, %d dropped (prompt too long)",
             report["train_examples"], report["eval_examples"], report["train_tokens"],
             report["truncated"], report["dropped"])
    questions = _validation_questions(eval_rows, fmt, ds_cfg.system_prompt, cfg.evaluation.validation_questions)

    with atomic_dir(run.data) as tmp:
        _save(train, tmp / "train")
        if evald is not None and evald.input_ids:
            _save(evald, tmp / "eval")
        (tmp / "validation.json").write_text(json.dumps(questions, indent=2) + "\n")
        (tmp / "data_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return {"path": str(run.data), "report": report}


def _save(tok: Any, path: Path) -> None:
    Dataset.from_dict({"input_ids": tok.input_ids, "labels": tok.labels}).save_to_disk(str(path))


def _report(fmt: str, train: Any, evald: Any, provenance: dict[str, Any], max_len: int) -> dict[str, Any]:
    lengths = sorted(len(x) for x in train.input_ids)

    def pct(p: float) -> int:
        return lengths[min(len(lengths) - 1, int(p * len(lengths)))]

    return {
        "row_format": fmt,
        "train_examples": len(train.input_ids),
        "eval_examples": len(evald.input_ids) if evald else 0,
        "train_tokens": sum(lengths),
        "trained_tokens": sum(sum(1 for t in lab if t != -100) for lab in train.labels),
        "length_p50": pct(0.5), "length_p90": pct(0.9), "length_max": lengths[-1],
        "max_seq_length": max_len,
        "truncated": train.truncated + (evald.truncated if evald else 0),
        "dropped": train.dropped + (evald.dropped if evald else 0),
        "input": provenance,
    }


def _validation_questions(rows: Any, fmt: str, system_prompt: str, n: int) -> list[dict[str, Any]]:
    """Held-out questions for the base-vs-tuned answers in summary.md (chat-shaped rows only)."""
    if rows is None or fmt == "prompt" or n == 0:
        return []
    out = []
    for row in rows.select(range(min(n, len(rows)))):
        messages = to_messages(row, fmt, system_prompt)
        out.append({"messages": messages[:-1], "reference": messages[-1]["content"]})
    return out
