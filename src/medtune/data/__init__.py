"""Stage 4, data: load rows, check them, render them with the model's chat template, tokenize, split, save.

Writes `<run>/data/` (train/ and eval/ as saved datasets, validation.json with held-out questions,
data_report.json) through one atomic rename; the stage is skipped when that folder is complete.
The tokenized result is also kept in `<model_cache_dir>/data-cache/<key>/`, keyed by the input
data's sha256, the tokenizer's files and every setting that changes the examples, so a second run
on the same inputs copies it instead of tokenizing again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset

from medtune.config import MedtuneConfig
from medtune.data.cache import cache_key, restore, store
from medtune.data.load import RawData, load_raw
from medtune.data.render import Tokenized, render_rows, to_messages, tokenize_pairs
from medtune.data.stewardship import duplicates, enforce_phi, overlap, redact, scan_phi
from medtune.data.templates import check_prompt_column, ensure_chat_template
from medtune.data.validate import drop_blank, row_text, text_columns, validate_rows
from medtune.errors import DataError
from medtune.rundir import RunDir, atomic_dir

log = logging.getLogger("medtune.data")


@dataclass
class Rows:
    """One split as plain rows, with each row's number in the source (1-based) for the report."""

    rows: list[dict[str, Any]]
    numbers: list[int]


def prepare_data(cfg: MedtuneConfig, run: RunDir, model_path: str) -> dict[str, Any]:
    from transformers import AutoTokenizer

    token = cfg.model.hf_token.get_secret_value() if cfg.model.hf_token else None
    raw = load_raw(cfg.dataset, run.root / "cache", token)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    template = ensure_chat_template(tokenizer, model_path)
    key = cache_key(cfg, raw.provenance, model_path, template)
    cache_root = Path(cfg.model.model_cache_dir).expanduser() / "data-cache"
    with atomic_dir(run.data) as tmp:
        report = restore(cache_root, key, tmp)
        if report is None:
            report = build_examples(cfg, raw, tokenizer, template, tmp)
            store(cache_root, key, tmp)
        else:
            log.info("data: reused tokenized examples from the cache (%s)", cache_root / key)
        # The template the examples were rendered with travels on to training, the merged model and evaluation.
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
    return {"path": str(run.data), "input_sha256": report["input"]["sha256"], "report": report}


def build_examples(cfg: MedtuneConfig, raw: RawData, tokenizer: Any, template: str, out: Path) -> dict[str, Any]:
    """Validate, scan, split, render and tokenize; write train/, eval/, validation.json, data_report.json."""
    ds_cfg = cfg.dataset
    fmt = validate_rows(raw, ds_cfg)
    train_ds, blank = drop_blank(raw.train, fmt, ds_cfg)
    eval_ds, eval_blank = drop_blank(raw.eval, fmt, ds_cfg) if raw.eval is not None else (None, 0)
    log.info("data: %d rows from %s, columns %s; row format `%s`%s", len(raw.train), raw.where, raw.train.column_names,
             fmt, " (rendered with the model's chat template)" if fmt != "prompt" else f" ({ds_cfg.prompt_field!r} "
             "trained as is)")
    train, evald = _split(cfg, train_ds, eval_ds)
    phi = _phi(cfg, fmt, train, evald, raw.where)
    prompt_check = _check_prompts(cfg, fmt, train, tokenizer)
    max_len = cfg.training.max_seq_length
    train_pairs = render_rows(train.rows, fmt, tokenizer, ds_cfg)
    eval_pairs = render_rows(evald.rows, fmt, tokenizer, ds_cfg) if evald else []
    train_tok = tokenize_pairs(train_pairs, fmt, tokenizer, ds_cfg, max_len, train.numbers)
    if not train_tok.input_ids:
        raise DataError(f"{raw.where}: every row is longer than training.max_seq_length={max_len} "
                        f"(shortest {min(train_tok.lengths_before)} tokens); raise training.max_seq_length"
                        + (" or set dataset.truncation=truncate" if ds_cfg.truncation == "drop" else ""))
    eval_tok = tokenize_pairs(eval_pairs, fmt, tokenizer, ds_cfg, max_len, evald.numbers) if evald else None
    report = {
        "row_format": fmt, "template": template if fmt != "prompt" else "none (pre-rendered prompt column)",
        "source_rows": len(raw.train) + (len(raw.eval) if raw.eval is not None else 0),
        "blank_rows_dropped": blank + eval_blank,
        **_token_stats(train_tok, eval_tok, max_len, ds_cfg.truncation),
        "duplicates": duplicates([p + a for p, a in train_pairs]),
        "train_eval_overlap": overlap(train_pairs, eval_pairs),
        "phi": {**phi, "action": ds_cfg.phi_action},
        "prompt_column_check": prompt_check,
        "input": {**raw.provenance, "sha256": input_sha256(raw.provenance)},
    }
    log.info("data: %d train / %d eval examples, %d train tokens, %d truncated, %d dropped; %d exact + %d near "
             "duplicates; %d eval rows also in train; PHI/PII matches: %d", report["train_examples"],
             report["eval_examples"], report["train_tokens"], report["truncated"], report["dropped"],
             report["duplicates"]["exact"], report["duplicates"]["near"],
             report["train_eval_overlap"]["eval_rows_in_train"], phi["total"])
    _save(train_tok, out / "train")
    if eval_tok is not None and eval_tok.input_ids:
        _save(eval_tok, out / "eval")
    questions = _validation_questions(evald, fmt, ds_cfg.system_prompt, cfg.evaluation.validation_questions)
    (out / "validation.json").write_text(json.dumps(questions, indent=2) + "\n")
    (out / "data_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _split(cfg: MedtuneConfig, train_ds: Dataset, eval_ds: Dataset | None) -> tuple[Rows, Rows | None]:
    """Deterministic shuffle by seed, max_samples, then the eval fraction (unless a named eval split)."""
    ds_cfg = cfg.dataset
    numbers = list(range(1, len(train_ds) + 1))
    train_ds = train_ds.add_column("__row", numbers).shuffle(seed=cfg.training.seed, keep_in_memory=True)
    if ds_cfg.max_samples:
        train_ds = train_ds.select(range(min(ds_cfg.max_samples, len(train_ds))), keep_in_memory=True)
    rows = train_ds.to_list()
    evald = None
    if eval_ds is not None:
        evald = Rows(eval_ds.to_list(), list(range(1, len(eval_ds) + 1)))
    elif ds_cfg.eval_fraction > 0 and len(rows) >= 10:
        n_eval = max(1, round(len(rows) * ds_cfg.eval_fraction))
        evald, rows = Rows(rows[:n_eval], [r["__row"] for r in rows[:n_eval]]), rows[n_eval:]
    if not rows:
        raise DataError("the dataset has no training rows left after max_samples/eval split; check the data and "
                        "dataset.max_samples / dataset.eval_fraction")
    return Rows(rows, [r["__row"] for r in rows]), evald


def _phi(cfg: MedtuneConfig, fmt: str, train: Rows, evald: Rows | None, where: str) -> dict[str, Any]:
    """Scan (and with phi_action=redact, rewrite) the text of every row; numbers are source rows."""
    ds_cfg = cfg.dataset
    required, optional = text_columns(fmt, ds_cfg)
    columns = required + optional
    result: dict[str, Any] = {"total": 0, "by_type": {}}
    for split in (train, evald):
        if split is None:
            continue
        texts = [row_text(row, fmt, columns) for row in split.rows]
        found = scan_phi(texts)
        result["total"] += found["total"]
        for kind, entry in found["by_type"].items():
            slot = result["by_type"].setdefault(kind, {"count": 0, "example_rows": []})
            slot["count"] += entry["count"]
            slot["example_rows"] = sorted(slot["example_rows"] + [split.numbers[r - 1] for r in entry["example_rows"]])[:5]
        if ds_cfg.phi_action == "redact" and found["total"]:
            for row in split.rows:
                _redact_row(row, fmt, columns)
    enforce_phi(result, ds_cfg.phi_action, where)
    return result


def _redact_row(row: dict[str, Any], fmt: str, columns: list[str]) -> None:
    if fmt == "messages":
        row["messages"] = [{**m, "content": redact(m["content"])} for m in row["messages"]]
    for col in columns:
        if isinstance(row.get(col), str):
            row[col] = redact(row[col])


def _check_prompts(cfg: MedtuneConfig, fmt: str, train: Rows, tokenizer: Any) -> dict[str, Any] | None:
    """Compare the first row's pre-rendered prompt with the model's template rendering of the same row."""
    ds_cfg = cfg.dataset
    row = train.rows[0]
    if ds_cfg.prompt_field not in row or fmt == "messages":
        return None
    can_render = all(c in row for c in ("instruction", "output")) and bool(getattr(tokenizer, "chat_template", None))
    messages = to_messages(row, "alpaca", ds_cfg.system_prompt) if can_render else None
    entry = check_prompt_column(row, ds_cfg.prompt_field, tokenizer, messages, rerender=fmt == "alpaca")
    return None if entry is None else {**entry, "row": train.numbers[0]}


def _token_stats(train: Tokenized, evald: Tokenized | None, max_len: int, policy: str) -> dict[str, Any]:
    lengths = sorted(len(x) for x in train.input_ids)
    before = sorted(train.lengths_before)

    def pct(values: list[int], p: float) -> int:
        return values[min(len(values) - 1, int(p * len(values)))]

    return {
        "train_examples": len(train.input_ids),
        "eval_examples": len(evald.input_ids) if evald else 0,
        "train_tokens": sum(lengths),
        "trained_tokens": sum(sum(1 for t in lab if t != -100) for lab in train.labels),
        "length_percentiles": {f"p{p}": pct(before, p / 100) for p in (50, 90, 95, 99)} | {"max": before[-1]},
        "length_p50": pct(lengths, 0.5), "length_p90": pct(lengths, 0.9), "length_max": lengths[-1],
        "max_seq_length": max_len,
        "truncation": policy,
        "truncated": train.truncated + (evald.truncated if evald else 0),
        "dropped": train.dropped + (evald.dropped if evald else 0),
    }


def input_sha256(provenance: dict[str, Any]) -> str:
    """One digest over every input file's sha256 (sorted by name)."""
    import hashlib

    files = provenance.get("files", {})
    return hashlib.sha256("".join(f"{k}\t{v}\n" for k, v in sorted(files.items())).encode()).hexdigest()


def _save(tok: Tokenized, path: Path) -> None:
    Dataset.from_dict({"input_ids": tok.input_ids, "labels": tok.labels}).save_to_disk(str(path))


def _validation_questions(split: Rows | None, fmt: str, system_prompt: str, n: int) -> list[dict[str, Any]]:
    """Held-out questions for the base-vs-tuned answers in summary.md (chat-shaped rows only)."""
    if split is None or fmt == "prompt" or n == 0:
        return []
    out = []
    for row in split.rows[:n]:
        messages = to_messages(row, fmt, system_prompt)
        out.append({"messages": messages[:-1], "reference": messages[-1]["content"]})
    return out
