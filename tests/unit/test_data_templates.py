"""Chat-template rendering for Llama 3, Mistral and Gemma, on a row of the real shared dataset.

No Llama/Mistral/Gemma tokenizer can be downloaded here, so each family's tokenizer is built offline:
a small byte-level BPE carrying the family's real special tokens, BOS/EOS, and its chat template.
The expected texts below are written out by hand from each family's published prompt format.
"""

from __future__ import annotations

import json

import pytest
from datasets import load_from_disk

from medtune.config import DatasetConfig
from medtune.data.render import IGNORE, render_rows, tokenize_pairs
from medtune.data.templates import FAMILY_TEMPLATES, check_prompt_column, ensure_chat_template, known_problems
from medtune.errors import DataError
from tests_support import SHARED_DATASET

SPECIALS = {
    "llama3": {"tokens": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "model_type": "llama"},
    "mistral": {"tokens": ["<unk>", "<s>", "</s>"], "bos": "<s>", "eos": "</s>", "model_type": "mistral"},
    "gemma": {"tokens": ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], "bos": "<bos>",
              "eos": "<eos>", "model_type": "gemma"},
    "llama2": {"tokens": ["<unk>", "<s>", "</s>"], "bos": "<s>", "eos": "</s>", "model_type": "llama"},
}
ROW = {
    "instruction": "Answer the question truthfully, you are a medical professional.",
    "input": "Can you provide an overview of the lung's squamous cell carcinoma?",
    "output": "Squamous cell carcinoma of the lung may be classified according to the WHO histological classification "
              "system into 4 main types: papillary, clear cell, small cell, and basaloid.",
}
USER = f"{ROW['instruction']}\n\n{ROW['input']}"
EXPECTED = {
    "llama3": ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" + USER + "<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n", ROW["output"] + "<|eot_id|>"),
    "mistral": ("<s>[INST] " + USER + " [/INST]", ROW["output"] + "</s>"),
    "gemma": ("<bos><start_of_turn>user\n" + USER + "<end_of_turn>\n<start_of_turn>model\n",
              ROW["output"] + "<end_of_turn>\n"),
    "llama2": ("<s>[INST] " + USER + " [/INST]", " " + ROW["output"] + " </s>"),
}


def build_tokenizer(out, family: str, with_template: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    spec = SPECIALS[family]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(ROW.values()), "medical question answer patient treatment"] * 5
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=spec["tokens"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos_id = tok.token_to_id(spec["bos"])  # like the real tokenizers, add BOS when asked for special tokens
    tok.post_processor = processors.TemplateProcessing(single=f"{spec['bos']} $A", pair=f"{spec['bos']} $A $B",
                                                       special_tokens=[(spec["bos"], bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=spec["bos"], eos_token=spec["eos"])
    if with_template:
        fast.chat_template = FAMILY_TEMPLATES[family]
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    (out / "config.json").write_text(json.dumps({"model_type": spec["model_type"]}))
    return AutoTokenizer.from_pretrained(out)


@pytest.fixture(scope="module", params=["llama3", "mistral", "gemma"])
def family(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    return request.param, build_tokenizer(out, request.param, with_template=True), out


def shared_row() -> dict:
    if not SHARED_DATASET.is_dir():
        pytest.skip("../shared/datasets not present")
    row = load_from_disk(str(SHARED_DATASET))["train"][0]
    assert {k: row[k] for k in ROW} == ROW  # the row the expected texts were written for
    return row


def test_exact_rendering_of_a_shared_row(family):
    name, tokenizer, _ = family
    cfg = DatasetConfig(rerender_prompts=True)
    [(prompt, answer)] = render_rows([shared_row()], "alpaca", tokenizer, cfg)
    assert (prompt, answer) == EXPECTED[name]


def test_labels_cover_the_answer_and_end_of_turn_only(family):
    name, tokenizer, _ = family
    cfg = DatasetConfig(rerender_prompts=True)
    pairs = render_rows([ROW], "alpaca", tokenizer, cfg)
    tok = tokenize_pairs(pairs, "alpaca", tokenizer, cfg, max_len=4096)
    ids, labels = tok.input_ids[0], tok.labels[0]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id  # BOS once, not doubled
    trained = [t for t in labels if t != IGNORE]
    assert tokenizer.decode(trained) == EXPECTED[name][1]
    assert labels[: len(tokenizer(EXPECTED[name][0], add_special_tokens=False)["input_ids"])] == \
        [IGNORE] * len(tokenizer(EXPECTED[name][0], add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("name", ["llama3", "mistral", "gemma", "llama2"])
def test_fallback_template_for_a_tokenizer_without_one(tmp_path, name):
    tokenizer = build_tokenizer(tmp_path, name, with_template=False)
    assert not tokenizer.chat_template
    assert ensure_chat_template(tokenizer, str(tmp_path)) == f"fallback:{name}"
    [(prompt, answer)] = render_rows([ROW], "alpaca", tokenizer, DatasetConfig())
    assert (prompt, answer) == EXPECTED[name]


def test_unknown_family_without_template_is_a_data_error(tmp_path):
    tokenizer = build_tokenizer(tmp_path, "mistral", with_template=False)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(DataError, match="no chat template"):
        ensure_chat_template(tokenizer, str(tmp_path))


def test_system_prompt_is_folded_for_families_without_a_system_role(tmp_path):
    tokenizer = build_tokenizer(tmp_path, "gemma", with_template=True)
    [(prompt, _)] = render_rows([ROW], "alpaca", tokenizer, DatasetConfig(system_prompt="Be brief."))
    assert prompt.startswith("<bos><start_of_turn>user\nBe brief.\n\n" + ROW["instruction"])


def test_shared_prompt_column_disagrees_with_mistral_template_and_is_shown(tmp_path, caplog):
    tokenizer = build_tokenizer(tmp_path, "mistral", with_template=True)
    row = shared_row()
    from medtune.data.render import to_messages

    entry = check_prompt_column(row, "prompt", tokenizer, to_messages(row, "alpaca", ""), rerender=False)
    assert entry["problems"] == ["a literal backslash-n (`\\n`) where a newline belongs"]
    # the concrete diff of this example: the dataset's literal "\n" after [/INST], and its own question wording
    assert "dataset ' This is the question: ' vs template '\\n\\n'" in entry["diff"]
    assert "after '? [/INST]': dataset ' \\\\n ' vs template ''" in entry["diff"]
    assert "dataset.rerender_prompts=true" in caplog.text


@pytest.mark.parametrize("text, problem", [
    ("[s][INST] q [/INST] a[/s]", "`[s]`/`[/s]`"),
    ("<s>[INST] q [/INST] \\n a</s>", "literal backslash-n"),
    ("<s><s>[INST] q [/INST] a</s>", "doubled BOS"),
    ("<|start_header_id|>user<|end_header_id|> q<|eot_id|>", "a space after `<|end_header_id|>`"),
])
def test_known_template_faults_of_published_datasets(tmp_path_factory, text, problem):
    tokenizer = build_tokenizer(tmp_path_factory.mktemp("m"), "mistral", with_template=True)
    assert any(problem in p for p in known_problems(text, tokenizer))


def test_batch_encoding_matches_the_tokenizer_call(family):
    """The fast path (the Rust tokenizer directly) gives the ids `tokenizer(text)` gives, BOS handling included."""
    _, tokenizer, _ = family
    from medtune.data.render import _encode_batch

    texts = [ROW["output"], tokenizer.bos_token + ROW["input"]]
    for add_bos in (False, True):
        expected = tokenizer(texts, add_special_tokens=add_bos)["input_ids"]
        if add_bos:
            assert all(ids[0] == tokenizer.bos_token_id for ids in expected)
            expected = [ids[1:] if ids[:2] == [tokenizer.bos_token_id] * 2 else ids for ids in expected]
        assert _encode_batch(tokenizer, texts, add_bos) == expected
