"""bench/make_bench_dir.py: the folder carried to the device, built from a ../shared-shaped folder."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest


def _fake_shared(root: Path, rows: int) -> Path:
    from datasets import Dataset, DatasetDict

    shared = root / "shared"
    (shared / "bench").mkdir(parents=True)
    for name in ("seed_recipe_baseline.py", "unsloth_anchor.py"):
        (shared / "bench" / name).write_text(f"# {name}\n")
    (shared / "bench" / "medical_token_ids.json").write_text(json.dumps([[1, 2, 3], [4, 5]]))
    words = "anemia fever cough dose renal hepatic insulin infection".split()
    data = {"instruction": [f"What causes {words[i % 8]}?" for i in range(rows)],
            "input": ["" if i % 3 else f"Patient {i}" for i in range(rows)],
            "output": [" ".join(words[(i + j) % 8] for j in range(12)) for i in range(rows)],
            "prompt": ["unused"] * rows}
    DatasetDict({"train": Dataset.from_dict(data)}).save_to_disk(
        str(shared / "datasets" / "medical_mistral_instruct_dataset_short"))
    return shared


def test_the_folder_holds_rows_ids_anchors_and_a_llama3_tokenizer(bench_script, tmp_path, monkeypatch):
    make = bench_script("make_bench_dir")
    monkeypatch.setattr(make, "ROWS", 40)
    monkeypatch.setattr(make, "BPE_VOCAB", 400)
    shared = _fake_shared(tmp_path, 50)
    out = tmp_path / "repo" / ".bench"
    monkeypatch.setattr(sys, "argv", ["make_bench_dir.py", "--shared", str(shared), "--out", str(out)])
    make.main()

    assert not out.with_name(".bench.tmp").exists()
    assert (out / "seed_recipe_baseline.py").read_text() == "# seed_recipe_baseline.py\n"
    with gzip.open(out / "medical_token_ids.json.gz", "rt") as fh:
        assert json.load(fh) == [[1, 2, 3], [4, 5]]
    rows = [json.loads(line) for line in (out / "medical_600.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and set(rows[0]) == {"instruction", "input", "output"}
    assert rows[3]["input"] == "Patient 3"

    from transformers import AutoTokenizer

    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes(gzip.decompress((out / "llama3-tok" / "tokenizer.json.gz").read_bytes()))
    (folder / "tokenizer_config.json").write_text((out / "llama3-tok" / "tokenizer_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(folder)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (128000, 128009, 128004)
    assert tok.convert_tokens_to_ids("<|start_header_id|>") == 128006
    assert tok.convert_tokens_to_ids("<|reserved_special_token_0|>") == 128002
    assert max(tok.get_vocab().values()) == 128255
    text = "<|start_header_id|>user<|end_header_id|>\n\nWhat causes fever?<|eot_id|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == 128006 and ids[-1] == 128009 and tok.decode(ids) == text


def test_a_tokenizer_whose_specials_moved_is_refused(bench_script, tmp_path, monkeypatch):
    make = bench_script("make_bench_dir")
    monkeypatch.setattr(make, "BPE_VOCAB", 300)
    make.write_tokenizer([{"instruction": "fever", "input": "", "output": "rest and fluids"}] * 20, tmp_path)
    make.check_tokenizer(tmp_path)
    monkeypatch.setattr(make, "FIRST_SPECIAL", 1000)  # the check expects the ids at 1000 onwards: now wrong
    with pytest.raises(SystemExit, match="got id 128000"):
        make.check_tokenizer(tmp_path)
