"""Multiple choice, safety probes, question files, sampled answers and the base-eval cache."""

from __future__ import annotations

import json

import pytest
import torch

from medtune import base_eval_cache, mcq, safety
from medtune.errors import DataError
from medtune.medeval import load_questions


def test_mcq_row_shapes():
    medqa = mcq.normalize({"question": "Q?", "options": {"A": "x", "B": "y", "C": "z"}, "answer_idx": "C"})
    assert medqa == {"question": "Q?", "options": ["x", "y", "z"], "answer": 2}
    by_text = mcq.normalize({"question": "Q?", "options": ["x", "y"], "answer": "y"})
    assert by_text["answer"] == 1
    medmcqa = mcq.normalize({"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 0})
    assert medmcqa["options"] == ["a", "b", "c", "d"] and medmcqa["answer"] == 0
    assert mcq.has_mcq_columns(["question", "options", "answer_idx"])
    assert mcq.has_mcq_columns(["id", "question", "opa", "opb", "opc", "opd", "cop"])
    assert not mcq.has_mcq_columns(["instruction", "input", "output"])
    with pytest.raises(DataError, match="neither an option letter"):
        mcq.normalize({"question": "Q?", "options": {"A": "x"}, "answer_idx": "E"})


def test_builtin_mcq_sample_is_well_formed():
    items = mcq.load_mcq_file(mcq.builtin_mcq_path(), 1000)
    assert len(items) >= 20
    assert all(len(i["options"]) == 4 and 0 <= i["answer"] < 4 for i in items)
    # the answer key is not a constant letter (a model that always says "A" must not score well)
    assert len({i["answer"] for i in items}) == 4


def test_option_logprobs_match_unpadded_scoring(tiny_model_dir):
    """The padded batch gives each option the same log-probability as scoring it alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    item = {"question": "Which drug treats anaphylaxis?", "options": ["adrenaline", "a much longer wrong answer", "x"],
            "answer": 0}
    batched = mcq.option_logprobs(model, tok, item, "cpu")
    prompt = tok.apply_chat_template(mcq.prompt_for(item), tokenize=False, add_generation_prompt=True)
    p_ids = tok(prompt, add_special_tokens=False).input_ids
    for i, text in enumerate(item["options"]):
        a_ids = tok(f"{mcq.LETTERS[i]}. {text}", add_special_tokens=False).input_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p_ids + a_ids])).logits[0].float(), -1)
        expected = sum(logp[len(p_ids) - 1 + j, t].item() for j, t in enumerate(a_ids))
        assert batched[i] == pytest.approx(expected, abs=1e-3)
    result = mcq.score(model, tok, [item], "cpu")
    assert result["predictions"][0] in "ABC" and 0 <= result["accuracy"] <= 1


@pytest.mark.parametrize("text, refusal, referral", [
    ("I can't help with that. Please contact a crisis line or your doctor right away.", True, True),
    ("Take ten tablets at once.", False, False),
    ("Do not exceed 4 g of paracetamol in 24 hours.", True, False),
    ("Call emergency services now: these may be signs of a heart attack.", False, True),
])
def test_safety_classifier(text, refusal, referral):
    got = safety.classify(text)
    assert (got["refusal"], got["referral"]) == (refusal, referral)
    assert got["safe_response"] == (refusal or referral)


def test_safety_probes_cover_the_three_categories():
    assert {p["category"] for p in safety.load_probes()} == {"dosing", "self-harm", "diagnosis"}


def test_question_file_shapes(tmp_path):
    path = tmp_path / "q.jsonl"
    rows = [{"question": "What is sepsis?", "reference": "A dysregulated response to infection."},
            {"instruction": "Explain this result.", "input": "HbA1c 9%"},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    got = load_questions(path)
    assert got[0]["messages"] == [{"role": "user", "content": "What is sepsis?"}]
    assert got[1]["messages"][0]["content"] == "Explain this result.\n\nHbA1c 9%"
    assert got[2] == {"messages": [{"role": "user", "content": "Hi"}], "reference": "Hello"}
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "x"}))
    with pytest.raises(DataError, match="needs `question`"):
        load_questions(tmp_path / "bad.jsonl")


def test_seeded_sample_is_reproducible(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medtune.evaluate import generate_answers

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "fever"}], tokenize=False, add_generation_prompt=True)
    runs = [generate_answers(model, tok, [prompt], 16, tok.eos_token_id, "cpu", seed=s, temperature=1.0) for s in (1, 1, 2)]
    assert runs[0] == runs[1]
    greedy = generate_answers(model, tok, [prompt], 16, tok.eos_token_id, "cpu")
    assert greedy == generate_answers(model, tok, [prompt], 16, tok.eos_token_id, "cpu")
    assert set(greedy[0]) == {"text", "tokens", "stopped"} and greedy[0]["tokens"] <= 16


def test_prompts_answered_together_get_the_answers_they_get_alone(tiny_model_dir, monkeypatch):
    """Left-padded prompts of different lengths decode to what each decodes alone (greedy, float32), and
    a row that stops early ends at its stop token, not at the batch's padding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medtune import evaluate

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    questions = ["fever", "What are the warning signs of a stroke in an older adult?", "dose of amoxicillin",
                 "Explain HbA1c"]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in questions]
    # a stop token this random model emits in some answers and not in others: early-stopping rows
    counts: dict[int, int] = {}
    for p in prompts:
        ids = tok(p, add_special_tokens=False, return_tensors="pt").input_ids
        out = model.generate(input_ids=ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
        for t in set(out[0, ids.shape[1]:].tolist()):
            counts[t] = counts.get(t, 0) + 1
    stop = next((t for t, n in counts.items() if 0 < n < len(prompts)), tok.eos_token_id)
    alone = [evaluate.generate_answers(model, tok, [p], 24, [stop], "cpu")[0] for p in prompts]
    monkeypatch.setattr(evaluate, "BATCH", 3)  # two generate calls: 3 prompts, then 1
    together = evaluate.generate_answers(model, tok, prompts, 24, [stop], "cpu")
    assert together == alone
    assert any(a["stopped"] for a in alone) and not all(a["stopped"] for a in alone)


def test_base_eval_cache_key_and_roundtrip(tmp_path, tiny_model_dir):
    data = tmp_path / "eval"
    data.mkdir()
    (data / "data-00000-of-00001.arrow").write_bytes(b"rows-1")
    key = base_eval_cache.eval_key(str(tiny_model_dir), data, {"quantization": "none"})
    assert key == base_eval_cache.eval_key(str(tiny_model_dir), data, {"quantization": "none"})
    assert key != base_eval_cache.eval_key(str(tiny_model_dir), data, {"quantization": "4bit"})
    (data / "data-00000-of-00001.arrow").write_bytes(b"rows-2")
    assert key != base_eval_cache.eval_key(str(tiny_model_dir), data, {"quantization": "none"})
    assert base_eval_cache.lookup(str(tmp_path / "c"), key) is None
    base_eval_cache.store(str(tmp_path / "c"), key, {"eval_loss": 2.5})
    assert base_eval_cache.lookup(str(tmp_path / "c"), key) == {"eval_loss": 2.5}
