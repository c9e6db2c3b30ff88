"""The data stage end to end on the tiny tokenizer: split, shuffle, truncation, stewardship report,
the tokenized-examples cache, summary.md's data section, and `medtune data inspect`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from datasets import load_from_disk

from medtune.cleanup import _data_section
from medtune.cli import main
from medtune.config_io import load_config
from medtune.data import prepare_data
from medtune.data.stewardship import duplicates, overlap, redact, scan_phi
from medtune.rundir import RunDir

PHI_ROW = {"instruction": "Summarise the note.", "input": "Mr. Jonas Berg, DOB: 04/12/1961, MRN: A123456, lives at "
           "12 Elm Street; call 555-123-4567 or mail jonas.berg@example.org; SSN 123-45-6789.", "output": "Noted."}
SECRETS = ("Jonas", "04/12/1961", "A123456", "Elm Street", "555-123-4567", "jonas.berg@example.org", "123-45-6789")


def rows(n: int) -> list[dict]:
    return [{"instruction": f"What is finding number {i} in heart failure?", "input": "",
             "output": f"Finding {i} is oedema of grade {i % 4}."} for i in range(n)]


def write_jsonl(path: Path, data: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return path


def cfg_for(tmp_path, tiny_model_dir, data: Path, *extra: str):
    return load_config(preset="smollm2-135m-medical", overrides=[
        "model.model_source=local", f"model.local_model_path={tiny_model_dir}", f"model.model_cache_dir={tmp_path / 'mc'}",
        f"dataset.local_dataset_path={data}", "dataset.dataset_format=auto", "dataset.eval_split=",
        f"output.output_root={tmp_path / 'out'}", "training.max_seq_length=128", *extra])


def stage(cfg, tmp_path, tiny_model_dir, name="r1"):
    run = RunDir(tmp_path / name).create()
    return run, prepare_data(cfg, run, str(tiny_model_dir))


def test_phi_scan_counts_types_and_never_keeps_the_text():
    report = scan_phi(["nothing here", PHI_ROW["input"], "Dr. Alice Moore saw her."])
    assert {k: v["count"] for k, v in report["by_type"].items()} == {
        "email": 1, "ssn": 1, "phone": 1, "mrn": 1, "date_of_birth": 1, "street_address": 1, "name_after_title": 2}
    assert report["by_type"]["name_after_title"]["example_rows"] == [2, 3]
    dumped = json.dumps(report)
    assert not any(s in dumped for s in SECRETS)
    cleaned = redact(PHI_ROW["input"])
    assert not any(s in cleaned for s in SECRETS) and "[EMAIL]" in cleaned and "[SSN]" in cleaned


def test_duplicates_and_overlap():
    assert duplicates(["a b", "a b", "A, b!", "c"]) == {"exact": 1, "near": 1}
    train = [("What is X?", "Y."), ("What is Z?", "W.")]
    assert overlap(train, [("what is x ?", "y"), ("What is Z?", "Other."), ("New?", "N.")]) == \
        {"eval_rows_in_train": 1, "eval_prompts_in_train": 2}


def test_report_split_shuffle_and_sha(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "qa.jsonl", rows(40) + [rows(1)[0], PHI_ROW, {**rows(1)[0], "output": " "}])
    cfg = cfg_for(tmp_path, tiny_model_dir, data, "dataset.eval_fraction=0.25", "dataset.max_samples=30",
                  "training.max_seq_length=512")
    run, result = stage(cfg, tmp_path, tiny_model_dir)
    report = json.loads((run.data / "data_report.json").read_text())
    assert report == result["report"]
    assert report["source_rows"] == 43 and report["blank_rows_dropped"] == 1
    assert report["train_examples"] + report["eval_examples"] == 30 and report["eval_examples"] == 8  # round(30 * .25)
    assert report["template"] == "model" and report["row_format"] == "alpaca"
    assert set(report["length_percentiles"]) == {"p50", "p90", "p95", "p99", "max"}
    import hashlib

    assert result["input_sha256"] == report["input"]["sha256"]
    assert report["input"]["files"]["qa.jsonl"] == hashlib.sha256(data.read_bytes()).hexdigest()
    # deterministic shuffle: the same seed gives the same examples, another seed others
    stage(cfg_for(tmp_path, tiny_model_dir, data, "dataset.eval_fraction=0.25", "dataset.max_samples=30",
                  "training.max_seq_length=512", f"model.model_cache_dir={tmp_path / 'mc2'}"), tmp_path, tiny_model_dir, "r2")
    other_cfg = cfg_for(tmp_path, tiny_model_dir, data, "dataset.eval_fraction=0.25", "dataset.max_samples=30",
                        "training.max_seq_length=512", "training.seed=7")
    other_run, _ = stage(other_cfg, tmp_path, tiny_model_dir, "r3")
    first = load_from_disk(str(run.data / "train"))["input_ids"]
    assert load_from_disk(str(tmp_path / "r2" / "data" / "train"))["input_ids"] == first
    assert load_from_disk(str(other_run.data / "train"))["input_ids"] != first


def test_phi_redact_and_report(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "qa.jsonl", rows(3) + [PHI_ROW])
    run, result = stage(cfg_for(tmp_path, tiny_model_dir, data, "dataset.phi_action=redact", "dataset.eval_fraction=0",
                                "training.max_seq_length=512"), tmp_path, tiny_model_dir)
    phi = result["report"]["phi"]
    assert phi["action"] == "redact" and phi["total"] == 7 and phi["by_type"]["ssn"]["example_rows"] == [4]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = " ".join(tok.decode(ids) for ids in load_from_disk(str(run.data / "train"))["input_ids"])
    assert "[SSN]" in text and not any(s in text for s in SECRETS)
    assert not any(s in (run.data / "data_report.json").read_text() for s in SECRETS)


@pytest.mark.parametrize("policy, kept", [("truncate", 4), ("drop", 2)])
def test_truncation_policy_counts(tmp_path, tiny_model_dir, policy, kept):
    long = {"instruction": "Explain.", "input": "", "output": "very long answer " * 40}
    data = write_jsonl(tmp_path / "qa.jsonl", rows(2) + [long, long])
    _, result = stage(cfg_for(tmp_path, tiny_model_dir, data, f"dataset.truncation={policy}", "dataset.eval_fraction=0",
                              "training.max_seq_length=64"), tmp_path, tiny_model_dir)
    report = result["report"]
    assert report["truncated"] == 2 and report["train_examples"] == kept and report["length_max"] <= 64


def test_named_eval_split(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "d" / "train.jsonl", rows(12))
    write_jsonl(tmp_path / "d" / "heldout.jsonl", rows(12)[:2] + [{"instruction": "New?", "input": "", "output": "Yes."}])
    _, result = stage(cfg_for(tmp_path, tiny_model_dir, tmp_path / "d", "dataset.eval_split=heldout"),
                      tmp_path, tiny_model_dir)
    report = result["report"]
    assert (report["train_examples"], report["eval_examples"]) == (12, 3)
    assert report["train_eval_overlap"] == {"eval_rows_in_train": 2, "eval_prompts_in_train": 2}


def test_second_run_reuses_the_cache_and_a_setting_change_does_not(tmp_path, tiny_model_dir, caplog):
    data = write_jsonl(tmp_path / "qa.jsonl", rows(30))
    cfg = cfg_for(tmp_path, tiny_model_dir, data)
    run1, first = stage(cfg, tmp_path, tiny_model_dir, "r1")
    with caplog.at_level(logging.INFO, logger="medtune.data"):
        run2, second = stage(cfg, tmp_path, tiny_model_dir, "r2")
    assert "reused tokenized examples" in caplog.text and second["report"] == first["report"]
    assert load_from_disk(str(run2.data / "train"))["labels"] == load_from_disk(str(run1.data / "train"))["labels"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="medtune.data"):
        stage(cfg_for(tmp_path, tiny_model_dir, data, "training.max_seq_length=64"), tmp_path, tiny_model_dir, "r3")
    assert "reused" not in caplog.text
    write_jsonl(data, rows(31))  # new input bytes: a new key
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="medtune.data"):
        stage(cfg, tmp_path, tiny_model_dir, "r4")
    assert "reused" not in caplog.text


def test_summary_data_section(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "qa.jsonl", rows(20) + [PHI_ROW])
    _, result = stage(cfg_for(tmp_path, tiny_model_dir, data, "training.max_seq_length=512"), tmp_path, tiny_model_dir)
    text = "\n".join(_data_section(result["report"]))
    assert "PHI/PII screen (action `report`): " in text and "ssn 1 (rows 21)" in text
    assert f"Input data sha256: `{result['input_sha256']}`" in text and "Duplicates in training: 0 exact" in text
    assert not any(s in text for s in SECRETS)


def test_data_inspect_prints_report_and_highlighted_example(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "qa.jsonl", rows(20))
    sets = ["model.model_source=local", f"model.local_model_path={tiny_model_dir}", f"model.model_cache_dir={tmp_path}/mc",
            f"dataset.local_dataset_path={data}", "dataset.dataset_format=auto", "dataset.eval_split=",
            f"output.output_root={tmp_path / 'out'}"]
    assert main(["data", "inspect", "--preset", "smollm2-135m-medical", *[a for s in sets for a in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    assert "data report" in out and "train / eval examples" in out and "19 / 1" in out
    assert "trained tokens" in out and "<|im_start|>assistant" in out and "heart failure" in out
    assert not (tmp_path / "out").exists()


def test_a_fallback_template_travels_with_the_run(tmp_path, tiny_model_dir, monkeypatch):
    """A base without a chat template is rendered with its family's template; training, merge and
    evaluation must then load that tokenizer from the run, not the template-less one of the base."""
    import shutil

    from transformers import AutoTokenizer

    from medtune.data import templates

    base = tmp_path / "base-no-template"
    shutil.copytree(tiny_model_dir, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(base).chat_template is None
    monkeypatch.setattr(templates, "model_family", lambda tokenizer, path: "mistral")  # the tiny vocab is ChatML's

    data = write_jsonl(tmp_path / "d.jsonl", rows(12))
    run, _ = stage(cfg_for(tmp_path, base, data), tmp_path, base)
    source = run.tokenizer_source(str(base))
    assert source == str(run.data / "tokenizer")
    assert AutoTokenizer.from_pretrained(source).chat_template == templates.FAMILY_TEMPLATES["mistral"]
    assert RunDir(tmp_path / "other").tokenizer_source(str(base)) == str(base)  # no data stage yet: the base's
