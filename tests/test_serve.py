"""`medgpt serve`: the official openai client against a live server on the tiny model, the batcher, vLLM launcher.

One uvicorn server (module-scoped, in a thread, on a free port, continuous batching) serves every
client test, a static-batching one serves the tests that must hold for both modes, and another answers from a
small knowledge-base index built from three demo leaflets. Tests that need the model to misbehave (fail, answer
slowly) swap `engine.model.forward` with monkeypatch, which both modes call for every step, and put it back
afterwards. Needs the `serve` and `dev` extras (fastapi, uvicorn, openai, httpx).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import uvicorn

from medgpt.args import GenArgs, ModelArgs
from medgpt.infer.engine import Result
from medgpt.rag.answer import KnowledgeArgs, fit_augment, load_knowledge
from medgpt.serve.api import SOURCE_FIELDS, Config, ServeArgs, bind, create_app, run
from medgpt.serve.batcher import Batcher, ContinuousBatcher, Job
from medgpt.serve.schema import APIError, budget, sampling, to_messages
from medgpt.utils import MedGPTError

ROOT = Path(__file__).resolve().parents[1]
KNOWLEDGE = ROOT / "data" / "demo" / "knowledge"
KEY = "test-key-0123456789"
NAME = "tiny-med"
GEN = GenArgs(max_new_tokens=24, temperature=0, repetition_penalty=1.0)  # the server's request defaults
SERVE = ServeArgs(batching="continuous", api_key=KEY, model_name=NAME, max_prompt_tokens=200, max_tokens=64, max_body_bytes=20_000,
                  max_batch_size=8, batch_wait_ms=20)
QUESTIONS = ["高血压是什么？", "What is a fever?", "头痛怎么办", "Is aspirin safe for children?", "糖尿病的症状",
             "How much water should I drink?", "咳嗽一周了", "What causes chest pain?"]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def engine(tiny_llama):
    from medgpt.infer.engine import Engine

    return Engine.load(ModelArgs(name_or_path=str(tiny_llama)), template="chatml", only_cpu=True)


@contextlib.contextmanager
def serving(app):
    """Run `app` with uvicorn in a thread on a free port; yields its base URL."""
    sock = bind("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def server(engine):
    app = create_app(engine, SERVE, GEN)
    with serving(app) as url:
        yield SimpleNamespace(url=url, app=app, engine=engine)


@pytest.fixture(scope="module")
def static_server(engine):
    app = create_app(engine, replace(SERVE, batching="static"), GEN)
    with serving(app) as url:
        yield SimpleNamespace(url=url, app=app, engine=engine)


@pytest.fixture(params=["continuous", "static"])
def any_server(request):
    """The test runs once against each batching mode."""
    return request.getfixturevalue("server" if request.param == "continuous" else "static_server")


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def client_of(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def greedy(max_new_tokens: int) -> GenArgs:
    return replace(GEN, max_new_tokens=max_new_tokens)


def count_rows(monkeypatch, engine, delay: float = 0.0) -> list[int]:
    """Wrap the model's forward (each prefill and decoding step, in either batching mode): the returned list gets
    each pass's number of rows; `delay` seconds per pass makes answers slow."""
    rows, real = [], engine.model.forward

    def counted(*a, **kw):
        rows.append(len(kw["input_ids"]))
        time.sleep(delay)
        return real(*a, **kw)

    monkeypatch.setattr(engine.model, "forward", counted)
    return rows


# ------------------------------------------------------------------------------------------ the API

def test_health_and_models(server, client):
    r = httpx.get(server.url + "/health")  # no key needed: load balancers probe it
    assert r.status_code == 200 and r.json() == {"status": "ok", "model": NAME}
    assert [m.id for m in client.models.list()] == [NAME]
    assert client.models.retrieve(NAME).owned_by == "medgpt"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_chat_completion_matches_the_engine_and_counts_tokens(server, client):
    messages = [{"role": "system", "content": "You are a doctor."}] + user("What is hypertension?")
    r = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=20)
    expected = server.engine.chat(messages, greedy(20))
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == NAME and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert expected.text.strip()  # gibberish from a random model, but not nothing
    assert r.usage.prompt_tokens == len(server.engine.prompt_ids(messages)) == expected.prompt_tokens
    assert r.usage.completion_tokens == expected.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert choice.finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    # text parts, `developer` as system and unknown fields are accepted; the answer is the same
    parts = [{"role": "developer", "content": [{"type": "text", "text": "You are "}, {"type": "text", "text": "a doctor."}]},
             {"role": "user", "content": "What is hypertension?"}]
    again = client.chat.completions.create(model=NAME, messages=parts, temperature=0, max_completion_tokens=20,
                                           presence_penalty=0, user="u1", extra_body={"unknown_field": [1, 2]})
    assert again.choices[0].message.content == expected.text and again.usage == r.usage


def test_streaming_chat_concatenates_to_the_plain_answer(server, client):
    messages = user("发烧了怎么办？")
    plain = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=30)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=30,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content and len([c for c in chunks if c.choices]) > 3
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage  # the usage chunk comes last
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)

    # on the wire: `data: {json}` events, ending with `data: [DONE]`
    body = {"model": NAME, "messages": messages, "temperature": 0, "max_tokens": 30, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert all("usage" not in json.loads(e[6:]) for e in events[:-1])  # only with stream_options.include_usage


def test_completions_plain_and_streamed(server, client):
    prompt = "高血压患者应该"
    expected = server.engine.generate([server.engine.text_ids(prompt)], greedy(16))[0]  # no template
    r = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=16)
    assert r.object == "text_completion" and r.choices[0].text == expected.text
    assert r.usage.prompt_tokens == len(server.engine.text_ids(prompt)) == expected.prompt_tokens
    assert r.usage.completion_tokens == expected.completion_tokens
    streamed = list(client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=16, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected.text
    assert streamed[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_stop_strings_and_seeded_sampling(server, client):
    plain = client.completions.create(model=NAME, prompt="Fever is", temperature=0, max_tokens=24).choices[0].text
    assert len(plain) > 6
    stop = plain[3:6]  # a string the greedy answer is known to contain
    cut = client.completions.create(model=NAME, prompt="Fever is", temperature=0, max_tokens=24, stop=[stop])
    assert cut.choices[0].text == plain[:plain.find(stop)] and cut.choices[0].finish_reason == "stop"
    sampled = [client.chat.completions.create(model=NAME, messages=user("hi"), temperature=1.0, top_p=0.95,
                                              seed=7, max_tokens=12).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_api_key_is_required(server):
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.chat.completions.create(model=NAME, messages=user("hi"))
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert "Authorization: Bearer" in e.value.message
    for headers in ({}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):  # missing, no scheme, other scheme
        r = httpx.get(server.url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_oversized_requests_are_refused_clearly(server, client):
    with pytest.raises(openai.BadRequestError) as e:  # 60 x ~5 tokens > max_prompt_tokens 200
        client.chat.completions.create(model=NAME, messages=user("高血压 hypertension " * 60), max_tokens=8)
    assert "accepts at most 200" in e.value.message and "--serve.max_prompt_tokens" in e.value.message
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError, match=r"'max_tokens' is 65; this server allows at most 64"):
        client.chat.completions.create(model=NAME, messages=user("hi"), max_tokens=65)
    with pytest.raises(openai.APIStatusError) as e:  # JSON body over max_body_bytes (20 kB)
        client.completions.create(model=NAME, prompt="a" * 30_000, max_tokens=4)
    assert e.value.status_code == 413 and "at most 20000 (--serve.max_body_bytes)" in e.value.message

    def chunked():  # no Content-Length: the limit holds while the body is read
        yield b'{"prompt": "'
        for _ in range(30):
            yield b"a" * 1000
        yield b'"}'

    r = httpx.post(server.url + "/v1/completions", content=chunked(),
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 413 and "more than 20000" in r.json()["error"]["message"]


@pytest.mark.parametrize("body, status, needle", [
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "Only n=1 is supported"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, "'temperature' must be a number from 0 to 2"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "an integer >= 1"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "'stream' must be true or false"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "tools are not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "only text content parts"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}, 400,
     "must end with a user message"),
    ({"messages": []}, 400, "non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"}, 404, "'gpt-4o' is not served here"),
])
def test_bad_fields_get_openai_shaped_errors(server, body, status, needle):
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}


def test_bad_json_unknown_routes_and_a_busy_queue(server, client, monkeypatch):
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", content=b"[1, 2]", headers=auth)
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", json={"prompt": ""}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.get(server.url + "/v1/embeddings", headers=auth)
    assert r.status_code == 404 and "/v1/chat/completions" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/chat/completions", headers=auth)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    monkeypatch.setattr(server.app.state.batcher, "waiting", lambda: SERVE.max_queue)
    with pytest.raises(openai.RateLimitError, match="busy"):
        client.chat.completions.create(model=NAME, messages=user("hi"), max_tokens=4)


def test_engine_failures_are_500_without_internals(any_server, monkeypatch):
    def broken(*a, **kw):
        raise RuntimeError("secret internal detail /srv/models/weights.safetensors")

    client = client_of(any_server)
    monkeypatch.setattr(any_server.engine.model, "forward", broken)
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model=NAME, messages=user("hi"), max_tokens=4)
    assert e.value.status_code == 500 and e.value.body["type"] == "server_error"
    assert "secret" not in e.value.response.text and "Traceback" not in e.value.response.text
    with pytest.raises(openai.APIError, match="failed to generate") as e:  # mid-stream: an error event
        list(client.chat.completions.create(model=NAME, messages=user("hi"), max_tokens=4, stream=True))
    assert "secret" not in str(e.value)
    monkeypatch.undo()
    assert client.chat.completions.create(model=NAME, messages=user("hi"), max_tokens=4).choices  # still serving


def test_repetition_guard_reads_as_stop(any_server, monkeypatch):
    import medgpt.infer.engine

    monkeypatch.setattr(medgpt.infer.engine, "repeated_tail", lambda ids: 1 if len(ids) >= 3 else 0)  # fires at 3
    r = client_of(any_server).chat.completions.create(model=NAME, messages=user("hi"), max_tokens=40)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 3


def test_request_fields_over_the_defaults():
    defaults = GenArgs(max_new_tokens=100, temperature=0.7, top_p=0.9, seed=None)
    gen, stop = sampling({"temperature": 0, "top_k": 5, "seed": 3, "stop": "\n\n", "logprobs": True}, defaults)
    assert (gen.temperature, gen.top_p, gen.top_k, gen.seed, stop) == (0.0, 0.9, 5, 3, ["\n\n"])
    assert sampling({}, defaults) == (defaults, [])
    limits = ServeArgs(max_prompt_tokens=50, max_tokens=80)
    assert budget({}, 10, defaults, limits, context=512, param="prompt") == 80            # --serve.max_tokens
    assert budget({}, 40, defaults, limits, context=100, param="prompt") == 60            # what the context holds
    assert budget({"max_completion_tokens": 7, "max_tokens": 9}, 40, defaults, limits, 100, "prompt") == 7
    with pytest.raises(APIError, match="no room for an answer"):
        budget({}, 50, defaults, limits, context=50, param="prompt")
    assert to_messages([{"role": "system", "content": "a"}, {"role": "developer", "content": "b"},
                        {"role": "user", "content": [{"type": "text", "text": "c"}]}]) == \
        [{"role": "system", "content": "a\n\nb"}, {"role": "user", "content": "c"}]


# ------------------------------------------------------------------------------------------- hardening

AUTH = {"Authorization": f"Bearer {KEY}"}
HI = json.dumps({"model": NAME, "messages": user("hi"), "max_tokens": 2}).encode()


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonp"])
def test_posts_need_a_json_content_type(server, content_type):
    """A web page may POST text/plain (or a form) to a local server cross-site without a CORS preflight: such a
    body is refused before it is read, whatever it holds."""
    headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
    for path in ("/v1/chat/completions", "/v1/completions"):
        r = httpx.post(server.url + path, content=HI, headers=headers)
        assert r.request.headers.get("content-type") == content_type
        assert r.status_code == 415, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "unsupported_media_type"
        assert "Content-Type: application/json" in error["message"]
    for ok in ("application/json", "application/json; charset=utf-8", "Application/JSON;charset=UTF-8"):
        r = httpx.post(server.url + "/v1/chat/completions", content=HI, headers={**AUTH, "Content-Type": ok})
        assert r.status_code == 200, (ok, r.text)


def test_the_host_header_must_name_this_server(server):
    """DNS rebinding: a page on evil.example whose name now points at 127.0.0.1 reaches the server with its own
    name in Host. Only the bound address and the loopback names are served, with or without the port."""
    port = server.url.rsplit(":", 1)[1]
    for host in ("127.0.0.1", f"127.0.0.1:{port}", "localhost", f"LocalHost:{port}", "[::1]", "[::1]:8000"):
        assert httpx.get(server.url + "/health", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example", f"evil.example:{port}", "localhost.evil.example", "127.0.0.1.nip.io:80",
                 "[::2]:8000"):
        for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
            r = httpx.request(method, server.url + path, content=HI,
                              headers={**AUTH, "Host": host, "Content-Type": "application/json"})
            assert r.status_code == 400, (host, path, r.text)
            error = r.json()["error"]
            assert error["code"] == "invalid_host" and "--serve.allowed_hosts" in error["message"]
            assert set(error) == {"message", "type", "param", "code"}


def test_allowed_hosts_opens_the_server_to_named_hosts(engine):
    from fastapi.testclient import TestClient

    def status(serve: ServeArgs, host: str) -> int:
        with TestClient(create_app(engine, serve, GEN), base_url=f"http://{host}") as http:
            return http.get("/health").status_code

    wide = ServeArgs(host="0.0.0.0")  # binding every address alone does not open it to every name
    assert status(wide, "0.0.0.0:8000") == 200 and status(wide, "localhost") == 200
    assert status(wide, "192.168.1.20:8000") == 400 and status(wide, "med.example.org") == 400
    named = replace(wide, allowed_hosts=["med.example.org", "192.168.1.20"])
    assert status(named, "med.example.org") == 200 and status(named, "MED.example.org:443") == 200
    assert status(named, "192.168.1.20:8000") == 200 and status(named, "localhost") == 200
    assert status(named, "other.example.org") == 400
    assert status(replace(wide, allowed_hosts=["*"]), "anything.example") == 200
    assert status(ServeArgs(host="10.0.0.5"), "10.0.0.5:8000") == 200  # the bound address itself
    assert status(ServeArgs(host="::1"), "[::1]:8000") == 200


def test_a_full_queue_says_when_to_retry(server, monkeypatch):
    monkeypatch.setattr(server.app.state.batcher, "waiting", lambda: SERVE.max_queue)
    for path in ("/v1/chat/completions", "/v1/completions"):
        r = httpx.post(server.url + path, headers=AUTH, json={"messages": user("hi"), "prompt": "hi"})
        assert r.status_code == 429 and r.json()["error"]["code"] == "server_busy"
        assert int(r.headers["retry-after"]) >= 1


@contextlib.contextmanager
def server_log():
    """Every log record of the server (uvicorn's, ours, asyncio's), formatted as a log file would show it."""
    lines: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: lines.append(logging.Formatter().format(record))
    loggers = [logging.getLogger(name) for name in ("", "uvicorn")]  # the others propagate to one of these
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield lines
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def hang_up_mid_body(url: str, key: str) -> None:
    """POST to `url`'s /v1/completions announcing 1000 bytes, send 14, and close the connection."""
    host, port = url[len("http://"):].split("/")[0].split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n".encode() + b'{"prompt": "ab')


def test_a_client_that_hangs_up_mid_body_leaves_no_traceback(server, client):
    def logged(n: int) -> None:  # the request log's line says the server is done with a request
        deadline = time.monotonic() + 10  # (written once the response is sent: the client may see it first)
        while sum("POST /v1/completions" in line for line in lines) < n and time.monotonic() < deadline:
            time.sleep(0.02)

    with server_log() as lines:
        for _ in range(2):
            hang_up_mid_body(server.url, KEY)
        logged(2)
        assert client.completions.create(model=NAME, prompt="hi", max_tokens=2).choices  # still serving
        logged(3)
    assert sum("POST /v1/completions" in line for line in lines) == 3, lines
    assert not any("Traceback" in line or "Exception" in line for line in lines), "\n".join(lines)


LONE = '"\\ud800 hi"'  # the JSON escape of half a surrogate pair: valid JSON, not a valid Unicode string
OK_BODY = (b'{"messages": [{"role": "user", "content": "hi \\ud83d\\ude00"}], "prompt": "\\ud83d\\ude00", '
           b'"max_tokens": 2, "x": [[[[{"a": [1]}]]]]}')  # a whole pair (an emoji) and a little nesting


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", '{"prompt": %s}' % LONE),
    ("/v1/completions", '{"prompt": ["\\udfff"]}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": %s}]}' % LONE),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": %s}]}]}' % LONE),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "stop": [%s]}' % LONE),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], %s: 1}' % LONE),
    ("/v1/completions", '{"prompt": "hi", "x": %s}' % ("[" * 100_000 + "]" * 100_000)),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "x": %s}' % ("[" * 900 + "]" * 900)),
    ("/v1/chat/completions", "[" * 100_000 + "]" * 100_000),
    ("/v1/completions", '{"prompt": "hi", "x": %s}' % ('{"a": ' * 50_000 + "1" + "}" * 50_000)),
], ids=["prompt", "prompt-list", "content", "content-part", "stop", "key", "arrays-100000", "arrays-900",
        "top-level", "objects-50000"])
def test_lone_surrogates_and_deep_nesting_are_400s(engine, path, body):
    """Neither may reach the tokenizer, the log or a recursive walk: a 400 naming the problem, never a 500. The
    test client raises any exception the app lets through, so a traceback fails the test."""
    from fastapi.testclient import TestClient

    serve = replace(SERVE, max_body_bytes=1 << 20, log_bodies=True)  # log_bodies walks the body (scrubbed)
    with TestClient(create_app(engine, serve, GEN), base_url="http://localhost") as http:
        r = http.post(path, content=body.encode(), headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert "surrogate" in message or "nested" in message, message
        ok = http.post(path, content=OK_BODY, headers={**AUTH, "Content-Type": "application/json"})
        assert ok.status_code == 200, ok.text


# ------------------------------------------------------------------------------------- concurrency

def test_concurrent_requests_are_batched_and_answer_as_sequential(any_server, monkeypatch):
    client = client_of(any_server)

    def ask(q: str) -> str:
        return client.chat.completions.create(model=NAME, messages=user(q), temperature=0,
                                              max_tokens=12 + len(q) % 5).choices[0].message.content

    rows = count_rows(monkeypatch, any_server.engine)
    sequential = [ask(q) for q in QUESTIONS]
    assert set(rows) == {1}
    rows.clear()
    start = threading.Barrier(len(QUESTIONS))

    def together(q: str) -> str:
        start.wait()
        return ask(q)

    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        concurrent = list(pool.map(together, QUESTIONS))
    assert concurrent == sequential  # per-row budgets (12..16 tokens) and left padding change nothing
    assert max(rows) > 1  # they shared forward passes


def watch_results(monkeypatch) -> list:
    """Every Result a job hands back (also those nobody reads any more), in either batching mode."""
    results, real = [], Job.emit

    def emit(job, kind, payload):
        if kind == "done":
            results.append(payload)
        real(job, kind, payload)

    monkeypatch.setattr(Job, "emit", emit)
    return results


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_hangs_up_frees_its_row(any_server, monkeypatch, stream):
    engine = any_server.engine
    body = {"model": NAME, "prompt": "Fever is", "temperature": 0, "max_tokens": 64, "stream": stream}
    full = engine.generate([engine.text_ids("Fever is")], replace(GEN, max_new_tokens=64))[0]
    assert full.completion_tokens >= 20  # long enough that stopping early shows
    count_rows(monkeypatch, engine, delay=0.05)  # 50 ms per token (the cancel flag is polled after each)
    finished = watch_results(monkeypatch)
    auth = {"Authorization": f"Bearer {KEY}"}
    if stream:
        with httpx.stream("POST", any_server.url + "/v1/completions", json=body, headers=auth) as r:
            next(line for line in r.iter_lines() if line.startswith("data: {"))  # the first delta: hang up
    else:  # the server notices within a second while it waits for the answer
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(any_server.url + "/v1/completions", json=body, headers=auth, timeout=0.3)
    deadline = time.monotonic() + 10
    while not finished and time.monotonic() < deadline:
        time.sleep(0.02)
    assert finished and finished[0].completion_tokens < full.completion_tokens // 2


def test_a_short_answer_does_not_wait_for_a_long_one(any_server, monkeypatch):
    """Continuous batching: a short request sent while a long one is decoding joins the running batch and is done
    first. Static batching cannot do that: the long answer's batch runs to its end before the short one starts."""
    engine, client = any_server.engine, client_of(any_server)
    full = engine.generate([engine.text_ids("Fever is")], replace(GEN, max_new_tokens=64))[0]
    assert full.completion_tokens >= 20
    count_rows(monkeypatch, engine, delay=0.02)
    ended = {}

    def long() -> None:
        stream = client.completions.create(model=NAME, prompt="Fever is", temperature=0, max_tokens=64, stream=True)
        for n, _ in enumerate(stream):
            if n == 0:
                started.set()  # decoding: now the short one arrives
        ended["long"] = time.monotonic()

    started = threading.Event()
    thread = threading.Thread(target=long)
    thread.start()
    assert started.wait(30)
    short = client.chat.completions.create(model=NAME, messages=user("hi"), temperature=0, max_tokens=2)
    ended["short"] = time.monotonic()
    thread.join(60)
    assert short.usage.completion_tokens <= 2 and "long" in ended
    continuous = isinstance(any_server.app.state.batcher, ContinuousBatcher)
    assert min(ended, key=ended.get) == ("short" if continuous else "long")


def test_batcher_groups_compatible_jobs():
    loop = asyncio.new_event_loop()
    try:
        def job(n_prompt=4, budget=8, stop=(), **gen) -> Job:
            return Job([1] * n_prompt, replace(GEN, max_new_tokens=budget, **gen), list(stop), False, loop)

        batcher = Batcher(SimpleNamespace(max_context=100), max_batch_size=3, wait_ms=0)
        greedy_a, greedy_b = job(), job(top_p=0.5, seed=3)  # greedy ignores top_p and seed: one batch
        hot, other_stop = job(temperature=0.7), job(stop=["\n"])
        long_prompt = job(n_prompt=95, budget=2)  # 95 + the batch's largest budget 8 > 100: waits
        seeded, gone, greedy_c, greedy_d = job(temperature=0.7, seed=1), job(), job(), job()
        gone.cancel.set()  # its client left while queued: dropped unrun
        for j in (greedy_a, hot, greedy_b, other_stop, long_prompt, seeded, gone, greedy_c, greedy_d):
            batcher.submit(j)
        assert batcher.next_batch() == [greedy_a, greedy_b, greedy_c]  # max_batch_size 3
        assert batcher.next_batch() == [hot]                           # the oldest left-out job goes next
        assert batcher.next_batch() == [other_stop]
        assert batcher.next_batch() == [long_prompt]
        assert batcher.next_batch() == [seeded]                        # seeded sampling runs alone
        assert batcher.next_batch() == [greedy_d] and batcher.waiting() == 0
        batcher.stop()
        assert batcher.next_batch() is None
        with pytest.raises(MedGPTError, match="at least 1"):
            Batcher(None, max_batch_size=0)
    finally:
        loop.close()


# ---------------------------------------------------------------------------------- knowledge base

RAG_SERVE = replace(SERVE, max_prompt_tokens=480)  # the tiny model's 512-token context holds two short passages
RAG = KnowledgeArgs(top_k=4)
PARACETAMOL = "What is the maximum dose of paracetamol?"


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    from medgpt.rag.index import Index

    docs = [str(KNOWLEDGE / f) for f in ("pain_relievers.md", "gaoxueya_zh.md", "warfarin.md")]
    built, _ = Index.build(docs, chunk_chars=60, chunk_overlap=0)  # short passages: more than one fits
    out = tmp_path_factory.mktemp("rag") / "index"
    built.save(out)
    return out


@pytest.fixture(scope="module")
def rag_server(engine, index_dir):
    index = load_knowledge(replace(RAG, index_dir=str(index_dir)))  # as `medgpt serve --rag.index_dir` does
    app = create_app(engine, RAG_SERVE, GEN, index, RAG)
    with serving(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        yield SimpleNamespace(url=url, app=app, engine=engine, index=index, client=client)


def spy_prompts(monkeypatch, batcher) -> list[list[int]]:
    """Wrap the batcher's submit: the returned list gets every prompt's token ids."""
    seen, real = [], batcher.submit

    def spy(job):
        seen.append(job.prompt_ids)
        return real(job)

    monkeypatch.setattr(batcher, "submit", spy)
    return seen


def test_knowledge_base_answers_cite_numbered_sources(rag_server, monkeypatch):
    engine, client = rag_server.engine, rag_server.client
    seen = spy_prompts(monkeypatch, rag_server.app.state.batcher)
    r = client.chat.completions.create(model=NAME, messages=user(PARACETAMOL), temperature=0, max_tokens=16)
    sources = r.model_extra["sources"]  # an extra top-level field: the openai client keeps it
    assert 2 <= len(sources) < RAG.top_k  # the weakest ones did not fit in 480 tokens
    assert [s["n"] for s in sources] == list(range(1, len(sources) + 1)) and set(sources[0]) == set(SOURCE_FIELDS)
    assert sources[0]["source"].endswith("pain_relievers.md") and "paracetamol" in sources[0]["heading"].lower()
    for s in sources:  # `where` is a real file:line whose line starts the passage
        path, line = s["where"].rsplit(":", 1)
        assert (path, int(line)) == (s["source"], s["line"])
        text = Path(path).read_text(encoding="utf-8").splitlines()[s["line"] - 1]
        assert s["text"][:15] in text.replace("**", "") or s["text"][:15] in text

    # the engine saw the question with the same numbered passages, sized to the limits, and answered it
    expected, expected_sources = fit_augment(engine, user(PARACETAMOL), rag_server.index, RAG.top_k,
                                             512 - RAG_SERVE.max_prompt_tokens)
    assert [{k: x[k] for k in SOURCE_FIELDS} for x in expected_sources] == sources
    assert seen == [engine.prompt_ids(expected)] and r.usage.prompt_tokens == len(seen[0]) <= 480
    prompt = engine.tokenizer.decode(seen[0])
    assert "Answer the question using only the numbered passages below." in prompt
    assert all(f"[{s['n']}] {s['where']}" in prompt and s["text"] in prompt for s in sources)
    assert f"Question: {PARACETAMOL}" in prompt
    assert r.choices[0].message.content == engine.chat(expected, greedy(16)).text

    # "knowledge": false: the plain question, no sources field
    seen.clear()
    plain = client.chat.completions.create(model=NAME, messages=user(PARACETAMOL), temperature=0, max_tokens=16,
                                           extra_body={"knowledge": False})
    assert "sources" not in (plain.model_extra or {}) and seen == [engine.prompt_ids(user(PARACETAMOL))]
    # /v1/completions is never augmented
    seen.clear()
    raw = client.completions.create(model=NAME, prompt=PARACETAMOL, temperature=0, max_tokens=4)
    assert "sources" not in (raw.model_extra or {}) and seen == [engine.text_ids(PARACETAMOL)]
    r = httpx.post(rag_server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"messages": user(PARACETAMOL), "knowledge": "no"})
    assert r.status_code == 400 and "'knowledge' must be true or false" in r.json()["error"]["message"]


def test_knowledge_base_stream_carries_sources_on_the_final_chunk(rag_server):
    client = rag_server.client
    question = "高血压的诊断标准是什么？"
    plain = client.chat.completions.create(model=NAME, messages=user(question), temperature=0, max_tokens=12)
    chunks = list(client.chat.completions.create(model=NAME, messages=user(question), temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0].model_extra["sources"] == plain.model_extra["sources"]
    assert plain.model_extra["sources"][0]["source"].endswith("gaoxueya_zh.md")
    assert all("sources" not in (c.model_extra or {}) for c in chunks if c is not final[0])
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert chunks[-1].usage == plain.usage


def test_knowledge_base_keeps_the_prompt_limits(rag_server):
    client = rag_server.client
    with pytest.raises(openai.BadRequestError) as e:  # the question alone is over max_prompt_tokens: no passage fits
        client.chat.completions.create(model=NAME, messages=user("paracetamol dose " * 120), max_tokens=8)
    assert "accepts at most 480" in e.value.message and e.value.body["code"] == "context_length_exceeded"
    # a conversation that does not end with the user's turn is refused as usual, not searched
    r = httpx.post(rag_server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"messages": user("hi") + [{"role": "assistant", "content": "x"}]})
    assert r.status_code == 400 and "must end with a user message" in r.json()["error"]["message"]
    # a question no passage matches: answered without context, with an empty sources list
    r = client.chat.completions.create(model=NAME, messages=user("zzqx"), temperature=0, max_tokens=4)
    assert r.model_extra["sources"] == [] and r.choices


# ------------------------------------------------------------------------------------------- logging

def test_request_log_has_counts_but_no_text(server, client, caplog):
    caplog.set_level(logging.INFO, logger="medgpt.serve")
    secret = "PATIENT-7731 has HIV and takes 400mg"
    r = client.chat.completions.create(model=NAME, messages=user(secret), temperature=0, max_tokens=10)
    list(client.chat.completions.create(model=NAME, messages=user(secret), max_tokens=10, stream=True))
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=user(secret), max_tokens=10, n=3)
    deadline = time.monotonic() + 5  # a line is written when the response ends, maybe after the client returns
    while len([m for m in caplog.messages if m.startswith("POST")]) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    lines = [m for m in caplog.messages if m.startswith("POST /v1/chat/completions")]
    assert len(lines) == 3
    u = r.usage
    assert re.fullmatch(rf"POST /v1/chat/completions 200 prompt_tokens={u.prompt_tokens} "
                        rf"completion_tokens={u.completion_tokens} latency_ms=\d+", lines[0])
    assert lines[1].startswith(f"POST /v1/chat/completions 200 prompt_tokens={u.prompt_tokens} ")
    assert lines[2].startswith("POST /v1/chat/completions 400 prompt_tokens=- completion_tokens=- ")
    text = r.choices[0].message.content
    for record in caplog.records:
        line = record.getMessage()
        assert "PATIENT" not in line and "HIV" not in line and (len(text) < 4 or text not in line)


@pytest.mark.parametrize("scrub", [True, False])
def test_logged_bodies_and_answers_are_scrubbed(engine, caplog, monkeypatch, scrub):
    """--serve.log_bodies with scrub_logs (the default) logs [PHONE] / [ID], not the numbers; off, the raw text."""
    from fastapi.testclient import TestClient

    phone, id_number, callback = "13812345678", "11010519491231002X", "139-1234-5678"
    monkeypatch.setattr(engine, "generate", lambda prompts, gen, **kw: [
        Result(f"请致电 {callback} 复诊", len(p), 6, "stop") for p in prompts])
    caplog.set_level(logging.INFO, logger="medgpt.serve")
    serve = replace(SERVE, api_key=None, log_bodies=True, scrub_logs=scrub, batching="static")  # calls generate
    app = create_app(engine, serve, GEN)
    question = f"我的电话是{phone}，身份证号{id_number}，最近头痛怎么办？"
    with TestClient(app, base_url="http://localhost") as http:  # the test client's own "testserver" is refused
        r = http.post("/v1/chat/completions", json={"messages": user(question), "max_tokens": 6})
    assert r.status_code == 200 and callback in r.json()["choices"][0]["message"]["content"]  # the client's copy
    body = next(m for m in caplog.messages if m.startswith("body /v1/chat/completions"))
    answer = next(m for m in caplog.messages if m.startswith("answer chatcmpl-"))
    if scrub:
        assert "电话是[PHONE]，身份证号[ID]，最近头痛怎么办" in body and '"max_tokens": 6' in body
        assert "请致电 [PHONE] 复诊" in answer
        assert all(x not in m for m in caplog.messages for x in (phone, id_number, callback))
    else:
        assert phone in body and id_number in body and callback in answer and "[PHONE]" not in body + answer


# ------------------------------------------------------------------------------------- the command

def test_cli_serves_with_the_key_from_the_environment(tiny_llama):
    """`medgpt serve` in its own process: port 0, MEDGPT_API_KEY, one chat, then Ctrl+C exits cleanly."""
    env = {**os.environ, "MEDGPT_API_KEY": "env-key"}
    proc = subprocess.Popen([sys.executable, "-m", "medgpt.cli", "serve", str(ROOT / "configs/tiny/serve.yaml"),
                             "--model.name_or_path", str(tiny_llama), "--serve.port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    try:
        url = None
        for line in proc.stdout:
            if m := re.search(r"at (http://127\.0\.0\.1:\d+/v1)", line):
                url = m.group(1)
                break
        assert url and "key: required" in line
        name = tiny_llama.name  # the model dir's name by default
        deadline = time.monotonic() + 20
        while True:  # uvicorn starts serving right after the line above
            try:
                client = openai.OpenAI(base_url=url, api_key="env-key", max_retries=0)
                r = client.chat.completions.create(model=name, messages=user("PATIENT-SECRET"), max_tokens=5)
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert r.model == name and r.usage.completion_tokens <= 5
        hang_up_mid_body(url, "env-key")
        assert client.chat.completions.create(model=name, messages=user("hi"), max_tokens=2).choices
    finally:
        proc.send_signal(2)  # SIGINT, as Ctrl+C
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out
    assert re.search(r"POST /v1/chat/completions 200 prompt_tokens=\d+", out) and "PATIENT" not in out
    assert "POST /v1/completions 499" in out and "Traceback" not in out, out


def test_run_errors_are_clear(tmp_path):
    with pytest.raises(MedGPTError, match="no model given"):
        run(Config())
    # the index loads before the model (there is no model "m"): a missing one fails at once, saying how to build it
    with pytest.raises(MedGPTError, match=r"no knowledge-base index in .*medgpt rag index"):
        run(Config(model=ModelArgs(name_or_path="m"), rag=KnowledgeArgs(index_dir=str(tmp_path / "none"))))
    with pytest.raises(MedGPTError, match="--rag.index_dir needs --serve.engine hf"):
        run(Config(model=ModelArgs(name_or_path="m"), serve=ServeArgs(engine="vllm"),
                   rag=KnowledgeArgs(index_dir=str(tmp_path))))
    taken = bind("127.0.0.1", 0)
    with pytest.raises(MedGPTError, match=r"cannot listen on 127.0.0.1:\d+ .*--serve.port"):
        bind("127.0.0.1", taken.getsockname()[1])
    taken.close()


# -------------------------------------------------------------------------------------------- vLLM

def test_vllm_command(monkeypatch, tmp_path):
    from medgpt.data.templates import to_jinja
    from medgpt.serve import vllm

    monkeypatch.delenv("MEDGPT_API_KEY", raising=False)
    cfg = Config(model=ModelArgs(name_or_path="out/merged/", dtype="bfloat16"), template="chatml",
                 serve=ServeArgs(engine="vllm", host="0.0.0.0", port=9000, api_key="k3y",
                                 vllm_args="--max-model-len 4096 --gpu-memory-utilization 0.85"))
    argv, env = vllm.command(cfg)
    assert argv[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    i = argv.index("--chat-template")
    assert Path(argv[i + 1]).read_text(encoding="utf-8") == to_jinja("chatml")
    Path(argv[i + 1]).unlink()
    del argv[i:i + 2]
    assert argv[3:] == ["--model", "out/merged/", "--host", "0.0.0.0", "--port", "9000", "--served-model-name",
                        "merged", "--dtype", "bfloat16", "--max-model-len", "4096", "--gpu-memory-utilization", "0.85"]
    assert env == {"VLLM_API_KEY": "k3y"} and "k3y" not in " ".join(argv)  # `ps` never shows the key
    plain = Config(model=ModelArgs(name_or_path="m"), serve=ServeArgs(engine="vllm", model_name="med"))
    argv, env = vllm.command(plain)
    assert "--chat-template" not in argv and "--dtype" not in argv and argv[-1] == "med" and env == {}

    monkeypatch.setattr(vllm, "vllm_installed", lambda: True)
    ran = []
    monkeypatch.setattr(vllm.os, "execve", lambda exe, args, environ: ran.append((exe, args, environ)))
    monkeypatch.setenv("MEDGPT_API_KEY", "from-env")
    run(plain)  # --serve.engine vllm goes to the launcher
    assert ran[0][0] == sys.executable and ran[0][1] == argv and ran[0][2]["VLLM_API_KEY"] == "from-env"


def test_vllm_refuses_adapters_and_explains_a_missing_vllm(monkeypatch):
    from medgpt.serve import vllm

    with pytest.raises(MedGPTError, match=r"merged model.*medgpt merge --model.name_or_path base --model.adapter lora"):
        vllm.command(Config(model=ModelArgs(name_or_path="base", adapter="lora"), serve=ServeArgs(engine="vllm")))
    monkeypatch.setattr(vllm, "vllm_installed", lambda: False)
    with pytest.raises(MedGPTError, match=r"pip install 'medgpt\[vllm\]'"):
        run(Config(model=ModelArgs(name_or_path="m"), serve=ServeArgs(engine="vllm")))
