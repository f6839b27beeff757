"""The generation engine: batching equals one-by-one, per-row budgets, stop strings, the repetition guard,
streaming deltas, cancellation."""

from __future__ import annotations

import pytest
import torch

from medgpt.args import GenArgs, ModelArgs
from medgpt.infer.engine import Controller, Engine, Row, repeated_tail

GREEDY = GenArgs(temperature=0, max_new_tokens=24, repetition_penalty=1.0, repetition_guard=False)
QUESTIONS = ["高血压是什么？", "What is the maximum daily dose of paracetamol for adults?", "发热怎么办"]


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return Engine.load(ModelArgs(name_or_path=str(tiny_llama)), template="chatml")


def ask(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


@pytest.mark.parametrize("ids, period", [
    ([1, 2, 3] * 8, 3),              # a 3-token unit 8 times
    ([5] * 24, 1),                   # one token 24 times
    ([5] * 23, 0),                   # too short a span
    (list(range(30)) + [1, 2, 3, 4, 5, 6, 7, 8, 9] * 3, 9),   # a "sentence" three times
    (list(range(30)) + [1, 2, 3, 4, 5, 6, 7, 8, 9] * 2, 0),   # only twice
    (list(range(100)), 0),
])
def test_repeated_tail(ids, period):
    assert repeated_tail(ids) == period


def test_batch_equals_one_by_one(engine):
    prompts = [engine.prompt_ids(ask(q)) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) > 1  # really different lengths: left padding matters
    batched = engine.generate(prompts, GREEDY)
    for p, b in zip(prompts, batched):
        alone = engine.generate([p], GREEDY)[0]
        assert alone.token_ids == b.token_ids and alone.text == b.text
        assert b.prompt_tokens == len(p)


def test_per_row_budgets(engine):
    prompts = [engine.prompt_ids(ask(q)) for q in QUESTIONS[:2]]
    full = engine.generate(prompts, GREEDY)
    short, long = engine.generate(prompts, GREEDY, budgets=[3, 24])
    assert short.completion_tokens <= 3 and short.token_ids == full[0].token_ids[:short.completion_tokens]
    assert long.token_ids == full[1].token_ids
    if full[0].completion_tokens > 3:
        assert short.finish_reason == "length"


def test_stream_concatenates_to_text(engine):
    gen = GenArgs(temperature=0, max_new_tokens=20, repetition_guard=False)
    deltas = list(engine.stream(ask(QUESTIONS[0]), gen))
    assert "".join(deltas) == engine.chat(ask(QUESTIONS[0]), gen).text
    assert all(d and not d.endswith("\ufffd") for d in deltas[:-1])  # no half character is sent


def test_stream_break_stops_generation(engine, monkeypatch):
    seen = []
    original = engine.generate

    def spy(*a, **k):
        out = original(*a, **k)
        seen.extend(out)
        return out

    monkeypatch.setattr(engine, "generate", spy)
    gen = GenArgs(temperature=0.9, seed=0, max_new_tokens=200, repetition_guard=False)
    stream = engine.stream(ask(QUESTIONS[1]), gen)
    next(stream)
    stream.close()  # the client went away
    assert seen and seen[0].completion_tokens < 200


def test_stop_string_trims(engine):
    text = engine.chat(ask(QUESTIONS[1]), GREEDY).text
    cut = next((i for i in range(3, len(text) - 2) if text[i:i + 2].strip() and text.find(text[i:i + 2]) == i), None)
    if cut is None:
        pytest.skip("greedy text too short to pick a stop string")
    res = engine.generate([engine.prompt_ids(ask(QUESTIONS[1]))], GREEDY, stop=[text[cut:cut + 2]])[0]
    assert res.text == text[:cut] and res.finish_reason == "stop"


def test_sampling_seed_reproducible(engine):
    gen = GenArgs(temperature=1.0, top_p=0.95, seed=7, max_new_tokens=16)
    a = engine.chat(ask(QUESTIONS[2]), gen)
    b = engine.chat(ask(QUESTIONS[2]), gen)
    assert a.token_ids == b.token_ids


def _feed(controller: Controller, tokens: list[int]) -> None:
    seq = torch.tensor([[0]])
    for t in tokens:
        seq = torch.cat([seq, torch.tensor([[t]])], dim=1)
        if controller(seq, None).all():
            break


def test_controller_guard_keeps_one_copy(engine):
    tok = engine.tokenizer
    unit = tok("血压升高时应该休息。", add_special_tokens=False)["input_ids"]
    head = tok("回答：", add_special_tokens=False)["input_ids"]
    row = Row(GenArgs(max_new_tokens=500), [], None, None)
    _feed(Controller([row], tok, {tok.eos_token_id}, guard=True), head + unit * 20)
    assert row.done == "repetition"
    assert row.final_text() == "回答：血压升高时应该休息。"
    assert len(row.ids) < len(head + unit * 20)  # it stopped early

    out = []  # streamed: what was sent stays, and the result text ends exactly where the stream did
    row = Row(GenArgs(max_new_tokens=500), [], out.append, None)
    _feed(Controller([row], tok, {tok.eos_token_id}, guard=True), head + unit * 20)
    assert row.done == "repetition" and "".join(out) == row.final_text()
    assert row.final_text().startswith("回答：血压升高时应该休息。") and len(row.final_text()) < 60


def test_controller_eos_and_stop_string(engine):
    tok = engine.tokenizer
    words = tok("Rest and drink water. USER: next", add_special_tokens=False)["input_ids"]
    row = Row(GenArgs(max_new_tokens=500), ["USER:"], None, None)
    _feed(Controller([row], tok, {tok.eos_token_id}, guard=True), words)
    assert row.done == "stop" and row.final_text() == "Rest and drink water. "
    row = Row(GenArgs(max_new_tokens=500), [], None, None)
    _feed(Controller([row], tok, {tok.eos_token_id}, guard=True), words[:3] + [tok.eos_token_id] + words[3:])
    assert row.done == "stop" and row.ids == words[:3]


def test_context_overflow_is_clear(engine):
    with pytest.raises(Exception, match="context"):
        engine.generate([[1] * 600], GREEDY)
