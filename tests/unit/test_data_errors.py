"""The malformed-input table: each bad input is one line naming the file (and line for JSONL), the
column or row, and the fix; exit code 2; nothing under the output root (or no partial data/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from medtune.cli import main

GOOD = {"instruction": "What lowers blood pressure?", "input": "", "output": "Less salt and more exercise."}


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def make(tmp: Path, name: str) -> tuple[Path, list[str]]:
    """Build the bad input called `name`; return the path to point at and extra --set overrides."""
    d = tmp / "in"
    d.mkdir()
    f = d / "qa.jsonl"
    if name == "missing-path":
        return d / "nope.jsonl", []
    if name == "unknown-extension":
        (d / "qa.txt").write_text("hello\n")
        return d / "qa.txt", []
    if name == "format-mismatch":
        (d / "qa.csv").write_text("instruction,input,output\nq,,a\n")
        return d / "qa.csv", ["dataset.dataset_format=jsonl"]
    if name == "bad-json-line":
        f.write_text(jsonl([GOOD, GOOD]) + '{"instruction": "broken", "output": \n' + jsonl([GOOD]))
        return f, []
    if name == "json-line-not-object":
        f.write_text(jsonl([GOOD]) + '["a", "list"]\n')
        return f, []
    if name == "not-utf8":
        f.write_bytes(jsonl([GOOD]).encode() + b'{"instruction": "caf\xe9", "output": "x"}\n')
        return f, []
    if name == "empty-file":
        f.write_text("")
        return f, []
    if name == "malformed-csv":
        (d / "qa.csv").write_text('instruction,input,output\nq1,,a1\n"q2,,a2\nq3,x,y,z,w\n')
        return d / "qa.csv", []
    if name == "corrupt-parquet":
        (d / "qa.parquet").write_bytes(b"PAR1 this is not parquet at all")
        return d / "qa.parquet", []
    if name == "empty-folder":
        return d, []
    if name == "mixed-folder":
        f.write_text(jsonl([GOOD]))
        (d / "more.csv").write_text("instruction,input,output\nq,,a\n")
        return d, []
    if name == "saved-format-on-file":
        f.write_text(jsonl([GOOD]))
        return f, ["dataset.dataset_format=dataset"]
    if name == "missing-column":
        f.write_text(jsonl([{"instruction": "q", "outptu": "a"}]))
        return f, ["dataset.row_format=alpaca"]
    if name == "no-usable-columns":
        f.write_text(jsonl([{"question": "q", "answer": "a"}]))
        return f, []
    if name == "prompt-field-typo":
        f.write_text(jsonl([{"prompt": "<s>[INST] q [/INST] a</s>"}]))
        return f, ["dataset.prompt_field=promt"]
    if name == "non-text-values":
        f.write_text(jsonl([{"instruction": "q", "input": "", "output": 7}] * 3))
        return f, []
    if name == "all-blank":
        f.write_text(jsonl([{"instruction": "q", "input": "", "output": "  "}] * 4))
        return f, []
    if name == "eval-split-not-found":
        f.write_text(jsonl([GOOD]))
        return d, ["dataset.eval_split=heldout"]
    if name == "split-not-found":
        DatasetDict({"train": Dataset.from_list([GOOD])}).save_to_disk(str(d / "saved"))
        return d / "saved", ["dataset.dataset_split=training"]
    if name == "messages-wrong-shape":
        f.write_text(jsonl([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
                            {"messages": [{"role": "user", "text": "q"}]}]))
        return f, []
    if name == "messages-no-answer":
        f.write_text(jsonl([{"messages": [{"role": "user", "content": "q"}]}]))
        return f, []
    if name == "phi-fail":
        f.write_text(jsonl([GOOD, {**GOOD, "input": "Patient John, SSN 123-45-6789, mail j.doe@example.org"}]))
        return f, ["dataset.phi_action=fail"]
    if name == "bucket-path-missing":
        return f, ["dataset.dataset_source=bucket", f"dataset.dataset_bucket=file://{d}", "dataset.dataset_bucket_path=none.jsonl"]
    if name == "bucket-unknown-protocol":
        return f, ["dataset.dataset_source=bucket", "dataset.dataset_bucket=nosuch://b", "dataset.dataset_bucket_path=x.jsonl"]
    raise AssertionError(name)


CASES = {
    # name: substrings the one line must contain (the file / line / column, and the fix)
    "missing-path": ["nope.jsonl not found", "point it at"],
    "unknown-extension": ["qa.txt", "unknown data file extension '.txt'", "use one of"],
    "format-mismatch": ["qa.csv looks like csv", "set dataset.dataset_format=csv"],
    "bad-json-line": ["qa.jsonl:3: bad JSON", "fix or remove line 3"],
    "json-line-not-object": ["qa.jsonl:2: a JSON list, not an object"],
    "not-utf8": ["qa.jsonl:2: not UTF-8", "re-save the file as UTF-8"],
    "empty-file": ["qa.jsonl is empty", "add rows"],
    "malformed-csv": ["qa.csv", "as csv", "fix the file"],
    "corrupt-parquet": ["qa.parquet", "as parquet", "fix the file"],
    "empty-folder": ["no data files", "check the path"],
    "mixed-folder": ["mixes formats (csv, json)", "set dataset.dataset_format"],
    "saved-format-on-file": ["qa.jsonl is a jsonl file", "set dataset.dataset_format=jsonl"],
    "missing-column": ["qa.jsonl", "needs column 'output'", "columns are instruction, outptu", "closest: 'outptu'"],
    "no-usable-columns": ["qa.jsonl", "no usable columns", "columns are question, answer"],
    "prompt-field-typo": ["no usable columns", "closest: 'prompt'", "set dataset.prompt_field=prompt"],
    "non-text-values": ["qa.jsonl:1", "column 'output' holds int", "convert the column to strings"],
    "all-blank": ["qa.jsonl", "every row of the train split has an empty", "output", "fill those columns"],
    "eval-split-not-found": ["dataset.eval_split 'heldout'", "splits there: qa"],
    "split-not-found": ["split 'training' not in", "it has: train", "set dataset.dataset_split"],
    "messages-wrong-shape": ["qa.jsonl:2", "column 'messages' must be a list"],
    "messages-no-answer": ["qa.jsonl:1", "must end with the assistant"],
    "bucket-path-missing": ["dataset.dataset_bucket_path", "none.jsonl not found", "point it at"],
    "bucket-unknown-protocol": ["nosuch://b/x.jsonl", "unknown protocol 'nosuch'", "use s3://"],
    "phi-fail": ["qa.jsonl", "possible PHI/PII found", "1 email (rows 2)", "1 ssn (rows 2)", "dataset.phi_action=redact"],
}


def run_args(tmp: Path, tiny_model_dir: Path, path: Path, extra: list[str]) -> list[str]:
    sets = ["model.model_source=local", f"model.local_model_path={tiny_model_dir}", "dataset.dataset_source=local",
            f"dataset.local_dataset_path={path}", "dataset.dataset_format=auto", "dataset.eval_split=", f"output.output_root={tmp / 'outputs'}",
            f"model.model_cache_dir={tmp / 'models'}", *extra]
    return ["run", "--preset", "smollm2-135m-medical", *[a for s in sets for a in ("--set", s)]]


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_input_is_one_line_exit_2_nothing_written(name, tmp_path, tiny_model_dir, capsys):
    path, extra = make(tmp_path, name)
    capsys.readouterr()  # the fixture's own progress output
    assert main(run_args(tmp_path, tiny_model_dir, path, extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for part in CASES[name]:
        assert part in err, (part, err)
    assert not (tmp_path / "outputs").exists()  # refused in preflight: no run directory at all


def test_every_row_too_long_leaves_no_partial_data(tmp_path, tiny_model_dir, capsys):
    """Known only once tokenized (after the run directory exists): exit 2 and no data/ left behind."""
    (tmp_path / "in").mkdir()
    long = {"instruction": "why " * 200, "input": "", "output": "because " * 50}
    (tmp_path / "in" / "qa.jsonl").write_text(jsonl([long] * 3))
    args = run_args(tmp_path, tiny_model_dir, tmp_path / "in" / "qa.jsonl", ["training.max_seq_length=64"])
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "every row is longer than training.max_seq_length=64" in err and "raise training.max_seq_length" in err
    run = next((tmp_path / "outputs").iterdir())
    assert not (run / "data").exists() and not list(run.glob(".data.tmp-*"))
    assert json.loads((run / "manifest.json").read_text())["status"] == "failed"
