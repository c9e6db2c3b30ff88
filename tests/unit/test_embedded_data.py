"""The bundled medical Q&A set: shape, size, split hygiene."""

import json

from medtune.presets import embedded_dataset_path

SPECIALTIES_MIN = 15


def _rows(name):
    return [json.loads(line) for line in (embedded_dataset_path() / name).read_text().splitlines()]


def test_size_columns_and_split_hygiene():
    train, held = _rows("train.jsonl"), _rows("heldout.jsonl")
    assert len(train) + len(held) >= 200 and len(held) >= 20
    for row in train + held:
        assert set(row) == {"instruction", "input", "output", "specialty"}
        assert row["instruction"].strip() and row["output"].strip()
    questions = [r["instruction"].strip().lower() for r in train]
    assert len(set(questions)) == len(questions)
    assert not {r["instruction"].strip().lower() for r in held} & set(questions)
    assert len({r["specialty"] for r in train}) >= SPECIALTIES_MIN
