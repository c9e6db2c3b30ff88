"""Row checks before any tokenizer or GPU is involved: the columns a row shape needs, their types,
and rows with nothing to learn from. Every problem is one line naming where, which column/row, and the fix.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset

from medtune.config import DatasetConfig
from medtune.data.load import RawData
from medtune.data.stewardship import enforce_phi, scan_phi
from medtune.errors import DataError

log = logging.getLogger("medtune.data")

ALPACA_REQUIRED = ("instruction", "output")


def detect_format(columns: list[str], cfg: DatasetConfig, where: str = "dataset") -> str:
    """Which row shape to use; `auto` prefers a pre-rendered prompt unless re-rendering is asked for."""
    can_alpaca = all(c in columns for c in ALPACA_REQUIRED)
    if cfg.row_format != "auto":
        needed = {"prompt": [cfg.prompt_field], "alpaca": list(ALPACA_REQUIRED), "messages": ["messages"]}[cfg.row_format]
        missing = [c for c in needed if c not in columns]
        if missing:
            raise DataError(f"{where}: dataset.row_format={cfg.row_format} needs column {missing[0]!r}, which is "
                            f"missing; columns are {', '.join(columns)}{_closest(missing[0], columns)}")
        return cfg.row_format
    if cfg.rerender_prompts and can_alpaca:
        return "alpaca"
    if cfg.prompt_field in columns:
        return "prompt"
    if "messages" in columns:
        return "messages"
    if can_alpaca:
        return "alpaca"
    hint = _closest(cfg.prompt_field, columns) or _closest("output", columns) or _closest("messages", columns)
    raise DataError(f"{where}: no usable columns: need prompt column {cfg.prompt_field!r}, `messages`, or "
                    f"instruction/output; columns are {', '.join(columns)}{hint}")


def _closest(name: str, columns: list[str]) -> str:
    close = difflib.get_close_matches(name, columns, n=1, cutoff=0.6)
    if not close:
        return ""
    key = "prompt_field" if name not in ("instruction", "output", "input", "messages") else None
    fix = f"set dataset.prompt_field={close[0]}" if key else f"rename column {close[0]!r} to {name!r}"
    return f" (closest: {close[0]!r}; {fix})"


def text_columns(fmt: str, cfg: DatasetConfig) -> tuple[list[str], list[str]]:
    """(columns that must hold text in every row, optional text columns) for a row shape."""
    if fmt == "prompt":
        return [cfg.prompt_field], []
    if fmt == "alpaca":
        return list(ALPACA_REQUIRED), ["input"]
    return [], []


def validate_rows(raw: RawData, cfg: DatasetConfig) -> str:
    """Raise on the first problem in either split; return the row shape."""
    fmt = detect_format(list(raw.train.column_names), cfg, raw.where)
    for ds, name in ((raw.train, "train"), (raw.eval, "eval")):
        if ds is None:
            continue
        if len(ds) == 0:
            raise DataError(f"{raw.where}: the {name} split has no rows; add rows or point the config at another file")
        if name == "eval":
            detect_format(list(ds.column_names), cfg.model_copy(update={"row_format": fmt}), f"{raw.where} (eval split)")
        _check_types(ds, fmt, cfg, raw, name)
        if not blank_mask(ds, fmt, cfg).count(False):
            raise DataError(f"{raw.where}: every row of the {name} split has an empty "
                            f"{' or '.join(text_columns(fmt, cfg)[0] or ['messages'])}; nothing left to train on — "
                            "fill those columns")
        if cfg.phi_action == "fail":
            columns = sum(text_columns(fmt, cfg), [])
            columns = [c for c in columns if c in ds.column_names] or ["messages"]
            texts = [row_text(row, fmt, columns) for row in ds.select_columns(columns).to_list()]
            enforce_phi(scan_phi(texts), "fail", f"{raw.where} ({name} split)")
    return fmt


def _check_types(ds: Dataset, fmt: str, cfg: DatasetConfig, raw: RawData, split: str) -> None:
    required, optional = text_columns(fmt, cfg)
    for col in required + [c for c in optional if c in ds.column_names]:
        column = ds.data.column(col)
        textual = pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
        if not textual and column.null_count < len(column):  # an all-empty CSV column reads as float nulls
            row = pc.index(pc.is_valid(column), True).as_py()
            value = ds[row][col]
            raise DataError(f"{location(raw, row, split)}: column {col!r} holds {type(value).__name__} values "
                            f"({str(value)[:40]!r}), not text; convert the column to strings")
    if fmt == "messages":
        _check_messages(ds, raw, split)


def _check_messages(ds: Dataset, raw: RawData, split: str) -> None:
    for i, messages in enumerate(ds["messages"]):
        ok = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)
        if not ok:
            raise DataError(f"{location(raw, i, split)}: column 'messages' must be a list of "
                            "{\"role\": ..., \"content\": ...} objects with text content; fix this row")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{location(raw, i, split)}: the last message has role {messages[-1]['role']!r}; "
                            "each conversation must end with the assistant's answer")


def row_text(row: dict[str, Any], fmt: str, columns: list[str]) -> str:
    """All the text of a row that training sees (for the PHI scan)."""
    if fmt == "messages":
        return "\n".join(m["content"] for m in row["messages"])
    return "\n".join(str(row.get(c) or "") for c in columns)


def blank_mask(ds: Dataset, fmt: str, cfg: DatasetConfig) -> list[bool]:
    """True for rows with nothing to learn from (a required text column empty or null)."""
    required, _ = text_columns(fmt, cfg)
    if not required:
        return [not m for m in ds["messages"]]
    blank = None
    for col in required:
        column = ds.data.column(col)
        if column.null_count == len(column):
            return [True] * len(ds)
        empty = pc.or_kleene(pc.is_null(column), pc.equal(pc.utf8_trim_whitespace(column), ""))
        empty = pc.fill_null(empty, True)
        blank = empty if blank is None else pc.or_(blank, empty)
    return blank.to_pylist()


def drop_blank(ds: Dataset, fmt: str, cfg: DatasetConfig) -> tuple[Dataset, int]:
    mask = blank_mask(ds, fmt, cfg)
    keep = [i for i, b in enumerate(mask) if not b]
    if len(keep) == len(ds):
        return ds, 0
    return ds.select(keep), len(ds) - len(keep)


def location(raw: RawData, row: int, split: str = "train") -> str:
    """`file:line` for a JSONL row, else `source, row N` (1-based rows)."""
    if split == "train" and raw.files and all(f.suffix == ".jsonl" for f in raw.files):
        seen = 0
        for path in raw.files:
            with Path(path).open(encoding="utf-8") as fh:
                for number, line in enumerate(fh, 1):
                    if line.strip():
                        if seen == row:
                            return f"{path}:{number}"
                        seen += 1
    return f"{raw.where} ({split} split), row {row + 1}"
