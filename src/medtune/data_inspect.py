"""`medtune data inspect`: the data stage's checks and statistics without training, and one rendered
example with the tokens the model is trained on highlighted, so a user sees exactly what it learns.

Nothing is written to the output root: the examples are built in a temporary folder (the base
model is fetched into `model.model_cache_dir` as `medtune run` would).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from medtune.config import MedtuneConfig
from medtune.data.render import IGNORE

TRAINED_STYLE = "bold black on green"
PROMPT_STYLE = "dim"


def inspect_data(cfg: MedtuneConfig, console: Console, example: int = 0) -> dict[str, Any]:
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from medtune.data import build_examples
    from medtune.data.load import check_source, load_raw
    from medtune.data.templates import ensure_chat_template
    from medtune.model import check_source as check_model
    from medtune.model import prepare_model

    check_model(cfg.model)
    check_source(cfg.dataset)
    model_path = prepare_model(cfg.model)["path"]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    template = ensure_chat_template(tokenizer, model_path)
    token = cfg.model.hf_token.get_secret_value() if cfg.model.hf_token else None
    with tempfile.TemporaryDirectory(prefix="medtune-inspect-") as tmp:
        raw = load_raw(cfg.dataset, Path(tmp) / "cache", token)
        report = build_examples(cfg, raw, tokenizer, template, Path(tmp) / "data")
        train = load_from_disk(str(Path(tmp) / "data" / "train"), keep_in_memory=True)
        row = train[min(example, len(train) - 1)]
    console.print(stats_table(report))
    console.print(f"\nExample {min(example, len(train) - 1)} of {len(train)} (tokenized; "
                  f"[{TRAINED_STYLE}]highlighted[/] = trained tokens, [dim]dim[/] = context only):\n")
    console.print(highlight(tokenizer, row["input_ids"], row["labels"]))
    return report


def stats_table(report: dict[str, Any]) -> Table:
    table = Table("data", "value", title="data report", show_lines=False)
    pct = report["length_percentiles"]
    dup, over, phi = report["duplicates"], report["train_eval_overlap"], report["phi"]
    rows = [
        ("row format / template", f"{report['row_format']} / {report['template']}"),
        ("source rows (blank left out)", f"{report['source_rows']} ({report['blank_rows_dropped']})"),
        ("train / eval examples", f"{report['train_examples']} / {report['eval_examples']}"),
        ("train tokens (trained)", f"{report['train_tokens']} ({report['trained_tokens']})"),
        ("length p50 / p90 / p95 / p99 / max", " / ".join(str(pct[k]) for k in ("p50", "p90", "p95", "p99", "max"))),
        (f"over max_seq_length={report['max_seq_length']}", f"{report['truncated']} ({report['truncation']}); "
                                                            f"{report['dropped']} dropped (prompt too long)"),
        ("duplicates exact / near", f"{dup['exact']} / {dup['near']}"),
        ("eval rows in train (same prompt)", f"{over['eval_rows_in_train']} ({over['eval_prompts_in_train']})"),
        (f"PHI/PII (action {phi['action']})", ", ".join(f"{k}: {v['count']} (rows {', '.join(map(str, v['example_rows']))})"
                                                       for k, v in phi["by_type"].items()) or "none found"),
        ("input sha256", report["input"]["sha256"]),
    ]
    if report.get("prompt_column_check"):
        check = report["prompt_column_check"]
        rows.append(("prompt column vs template", "; ".join(check["problems"] + [check["diff"]])))
    for name, value in rows:
        table.add_row(name, str(value))
    return table


def highlight(tokenizer: Any, input_ids: list[int], labels: list[int]) -> Text:
    """The decoded example, runs of trained tokens highlighted (decoded per run so words stay whole)."""
    text = Text()
    start = 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] == IGNORE) != (labels[start] == IGNORE):
            piece = tokenizer.decode(input_ids[start:i], skip_special_tokens=False)
            text.append(piece, style=PROMPT_STYLE if labels[start] == IGNORE else TRAINED_STYLE)
            start = i
    return text
