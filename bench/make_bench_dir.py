"""Builds `.bench/`, the folder `bench/run_gpu.sh` carries to the device, from `../shared` (run here, not there).

    .venv/bin/python bench/make_bench_dir.py [--shared ../shared] [--out .bench]

What it writes:
- `seed_recipe_baseline.py`, `unsloth_anchor.py`: copied as they are from `../shared/bench` (reference tools,
  run beside medtune, never part of it);
- `medical_token_ids.json.gz`: the shared real-length token ids, compressed to fit the call's 64 MiB;
- `medical_600.jsonl`: the first 600 rows of the shared medical dataset (instruction, input, output), for the
  quick preset end to end;
- `llama3-tok/`: a byte-level BPE tokenizer trained on those rows, with the Llama 3 special tokens at Llama 3's
  ids (128000 onwards), so that the random 8B folder renders and stops as Llama 3.1 does. No Llama 3 tokenizer
  can be downloaded here; the end-to-end time does not depend on which BPE vocabulary is used.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
from pathlib import Path

ROWS = 600
BPE_VOCAB = 8000
FIRST_SPECIAL = 128000
SPECIALS = 256  # Llama 3: <|begin_of_text|> .. <|reserved_special_token_247|>, ids 128000..128255
NAMED = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>", 6: "<|start_header_id|>",
         7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>", 10: "<|python_tag|>"}


def special_tokens() -> list[str]:
    reserved = iter(range(SPECIALS))
    names = []
    for i in range(SPECIALS):
        names.append(NAMED.get(i) or f"<|reserved_special_token_{next(reserved)}|>")
    return names


def write_rows(shared: Path, out: Path) -> list[dict[str, str]]:
    from datasets import load_from_disk

    data = load_from_disk(str(shared / "datasets" / "medical_mistral_instruct_dataset_short"))
    train = data["train"] if hasattr(data, "keys") else data
    rows = [{k: train[i][k] for k in ("instruction", "input", "output")} for i in range(ROWS)]
    with open(out / "medical_600.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def write_tokenizer(rows: list[dict[str, str]], out: Path) -> None:
    """BPE on the rows, then the specials placed at their Llama 3 ids in tokenizer.json's added tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(r.values()) for r in rows] * 2, trainer)
    spec = json.loads(tok.to_str())
    # The added tokens' ids are taken from the model's vocabulary where it holds them: put them there first.
    spec["model"]["vocab"].update({name: FIRST_SPECIAL + i for i, name in enumerate(special_tokens())})
    spec["added_tokens"] = [{"id": FIRST_SPECIAL + i, "content": name, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": True}
                            for i, name in enumerate(special_tokens())]
    folder = out / "llama3-tok"
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "tokenizer.json.gz", "wt") as fh:
        json.dump(spec, fh)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
              "eos_token": "<|eot_id|>", "pad_token": "<|finetune_right_pad_id|>", "model_max_length": 131072,
              "clean_up_tokenization_spaces": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")


def check_tokenizer(out: Path) -> None:
    """The specials must come back at their ids, and a rendered turn must round-trip."""
    from tokenizers import Tokenizer

    with gzip.open(out / "llama3-tok" / "tokenizer.json.gz", "rt") as fh:
        tok = Tokenizer.from_str(fh.read())
    for i, name in NAMED.items():
        if tok.token_to_id(name) != FIRST_SPECIAL + i:
            raise SystemExit(f"{name} got id {tok.token_to_id(name)}, not {FIRST_SPECIAL + i}")
    text = "<|start_header_id|>user<|end_header_id|>\n\nWhat is anemia?<|eot_id|>"
    ids = tok.encode(text, add_special_tokens=False).ids
    if FIRST_SPECIAL + 9 not in ids or tok.decode(ids, skip_special_tokens=False) != text:
        raise SystemExit(f"a rendered turn does not round-trip: {ids}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / ".bench")
    args = parser.parse_args()
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("seed_recipe_baseline.py", "unsloth_anchor.py"):
        shutil.copy(args.shared / "bench" / name, tmp / name)
    with open(args.shared / "bench" / "medical_token_ids.json", "rb") as src, \
            gzip.open(tmp / "medical_token_ids.json.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    write_tokenizer(write_rows(args.shared, tmp), tmp)
    check_tokenizer(tmp)
    shutil.rmtree(args.out, ignore_errors=True)
    tmp.rename(args.out)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"{args.out}: {size:,} bytes")


if __name__ == "__main__":
    main()
