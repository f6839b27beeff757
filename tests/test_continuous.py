"""Continuous batching (medgpt/infer/continuous.py): requests that join a running batch at different steps get the
answer `engine.generate` gives each alone; a cancelled row leaves and the others go on; every row keeps its own
budget, stop strings, sampling settings and seed."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from medgpt.args import GenArgs, ModelArgs
from medgpt.infer.continuous import Decoder, Request
from medgpt.infer.engine import Engine
from medgpt.utils import MedGPTError

GREEDY = GenArgs(temperature=0, max_new_tokens=30, repetition_penalty=1.0, repetition_guard=False)
QUESTIONS = ["高血压是什么？", "What is the maximum daily dose of paracetamol for adults who weigh less than 50 kg?",
             "发热怎么办", "Is aspirin safe for children?", "咳嗽"]


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return Engine.load(ModelArgs(name_or_path=str(tiny_llama)), template="chatml", only_cpu=True)


def prompt(engine, q: str) -> list[int]:
    return engine.prompt_ids([{"role": "user", "content": q}])


def run(decoder: Decoder, schedule: dict[int, list[Request]], max_steps: int = 500) -> dict:
    """Join schedule[s] before step s; step until every request is done. Returns {request: (result, step)}."""
    done, last = {}, max(schedule, default=0)
    for step in range(max_steps):
        if step in schedule:
            done.update({r: (res, step) for r, res in decoder.join(schedule[step])})
        done.update({r: (res, step) for r, res in decoder.step()})
        if step >= last and len(decoder) == 0:
            assert decoder.cache is None and decoder.mask is None
            return done
    raise AssertionError("the decoder did not finish")


@pytest.mark.parametrize("gen", [GREEDY, replace(GREEDY, repetition_penalty=1.3, repetition_guard=True)])
def test_rows_joining_at_different_steps_answer_as_alone(engine, gen):
    prompts = [prompt(engine, q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) >= 4  # different lengths: the left padding varies
    budgets = [30, 6, 25, 12, 30]
    requests = [Request(p, replace(gen, max_new_tokens=b)) for p, b in zip(prompts, budgets)]
    done = run(Decoder(engine), {0: requests[:2], 3: [requests[2]], 4: [requests[3]], 9: [requests[4]]})
    for r in requests:
        alone = engine.generate([r.prompt_ids], r.gen)[0]
        assert done[r][0] == alone  # same tokens, text, counts and finish reason


def test_a_cancelled_row_leaves_and_the_others_go_on(engine):
    prompts = [prompt(engine, q) for q in QUESTIONS[:3]]
    gone = threading.Event()
    requests = [Request(p, replace(GREEDY, max_new_tokens=30)) for p in prompts]
    requests[1].cancelled = gone.is_set
    decoder = Decoder(engine)
    assert decoder.join(requests) == []
    for _ in range(3):
        assert decoder.step() == []
    gone.set()
    (left, result), = decoder.step()
    assert left is requests[1] and result.completion_tokens == 5 and len(decoder) == 2
    assert decoder.cache.layers[0].keys.shape[0] == decoder.mask.shape[0] == 2  # its cache row is gone
    assert decoder.mask[:, 0].any() and decoder.mask.shape[1] == decoder.cache.layers[0].keys.shape[2]  # no spare column
    done = run(decoder, {})
    for r in (requests[0], requests[2]):
        assert done[r][0] == engine.generate([r.prompt_ids], r.gen)[0]


def test_budgets_stop_strings_and_streams_are_per_row(engine):
    q = QUESTIONS[1]
    full = engine.generate([prompt(engine, q)], GREEDY)[0]
    text = full.text
    cut = next((i for i in range(3, len(text) - 2) if text[i:i + 2].strip() and text.find(text[i:i + 2]) == i), None)
    assert cut is not None, text
    streamed: list[str] = []
    short = Request(prompt(engine, q), replace(GREEDY, max_new_tokens=4))
    stopped = Request(prompt(engine, q), GREEDY, stop=[text[cut:cut + 2]], on_text=streamed.append)
    whole = Request(prompt(engine, q), GREEDY)
    other = Request(prompt(engine, QUESTIONS[0]), replace(GREEDY, max_new_tokens=1))  # done at its first token
    decoder = Decoder(engine)
    (first, result), = decoder.join([short, stopped, whole, other])
    assert first is other and result.completion_tokens == 1 and result.finish_reason == "length"
    done = run(decoder, {})
    assert done[short][0].token_ids == full.token_ids[:4] and done[short][0].finish_reason == "length"
    assert done[stopped][0].text == text[:cut] and done[stopped][0].finish_reason == "stop"
    assert "".join(streamed) == text[:cut]
    assert done[whole][0] == full
    assert max(done[short][1], done[stopped][1]) < done[whole][1]  # each left when it was done


def test_sampled_and_seeded_rows_beside_greedy_ones(engine):
    seeded = GenArgs(temperature=0.9, top_p=0.95, top_k=40, seed=11, max_new_tokens=20, repetition_guard=False)
    prompts = [prompt(engine, q) for q in QUESTIONS[:3]]
    a = Request(prompts[0], GREEDY)
    b = Request(prompts[1], seeded)
    c = Request(prompts[2], replace(seeded, seed=12, temperature=0.7))
    done = run(Decoder(engine), {0: [a], 2: [b], 5: [c]})
    assert done[a][0] == engine.generate([prompts[0]], GREEDY)[0]
    assert done[b][0] == engine.generate([prompts[1]], seeded)[0]  # its own generator: same as alone
    assert done[c][0] == engine.generate([prompts[2]], c.gen)[0]


def test_requests_that_cannot_run_are_refused_before_prefill(engine):
    decoder = Decoder(engine)
    with pytest.raises(MedGPTError, match="empty prompt"):
        decoder.check(Request([], GREEDY))
    with pytest.raises(MedGPTError, match="context"):
        decoder.check(Request([1] * 500, replace(GREEDY, max_new_tokens=20)))
    assert len(decoder) == 0 and decoder.step() == []
