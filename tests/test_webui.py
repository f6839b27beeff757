"""`medgpt webui`: the streaming reply generator on the tiny model (with and without a knowledge base, audit
logs), and the real page in headless Chromium.

The browser tests need Debian's chromium (`make browser`, which `make test` runs) and the playwright package
(the `dev` extra); they never download a browser. Screenshots go to outputs/test-artifacts/ (gitignored).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
from dataclasses import replace
from pathlib import Path

import pytest

from medgpt.args import GenArgs, ModelArgs
from medgpt.rag.answer import KnowledgeArgs, fit_augment
from medgpt.serve.webui import (
    DISCLAIMER,
    LOGIN_CLIENT,
    SOURCES_TITLE,
    Config,
    LoginGuard,
    WebUIArgs,
    build_ui,
    fit_context,
    launch,
    parse_auth,
    stream_reply,
    to_messages,
)
from medgpt.utils import MedGPTError

ROOT = Path(__file__).resolve().parents[1]
KNOWLEDGE = ROOT / "data" / "demo" / "knowledge"
ARTIFACTS = ROOT / "outputs" / "test-artifacts"
GREEDY = GenArgs(temperature=0, max_new_tokens=24, repetition_penalty=1.0)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def engine(tiny_llama):
    from medgpt.infer.engine import Engine

    return Engine.load(ModelArgs(name_or_path=str(tiny_llama)), template="chatml", only_cpu=True)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


# ------------------------------------------------------------------------------------ no browser

def test_stream_reply_grows_to_the_engines_answer(engine):
    history = [user("高血压是什么？")]
    steps = list(stream_reply(engine, history, "You are a doctor.", GREEDY))
    expected = engine.chat([{"role": "system", "content": "You are a doctor."}, user("高血压是什么？")], GREEDY).text
    assert expected.strip()  # the tiny model's gibberish, but not nothing
    answers = [s[-1]["content"] for s in steps]
    assert len(steps) > 2 and all(s[:-1] == history and s[-1]["role"] == "assistant" for s in steps)
    assert answers[-1] == expected  # streamed with the system prompt: the same text as one greedy call
    assert all(b.startswith(a) for a, b in zip(answers, answers[1:])) and len(set(answers)) > 2  # really grows
    assert history == [user("高血压是什么？")]  # the caller's list is not modified


def test_stream_reply_reads_gradio_content_parts_and_skips_nothing_to_answer(engine):
    # Gradio 6 hands content over as a list of parts; metadata keys must not reach the template.
    history = [{"role": "user", "content": [{"type": "text", "text": "发热怎么办"}], "metadata": None, "options": None}]
    assert to_messages(history, " ") == [user("发热怎么办")]
    *_, last = stream_reply(engine, history, "", GREEDY)
    assert last[-1]["content"] == engine.chat([user("发热怎么办")], GREEDY).text
    done = history + [{"role": "assistant", "content": "ok"}]
    assert list(stream_reply(engine, done, "", GREEDY)) == [done]  # last turn is the assistant's: nothing to do
    assert list(stream_reply(engine, [], "", GREEDY)) == [[]]


def test_fit_context_drops_oldest_turns_then_shrinks_the_budget(engine):
    long = "血压 " * 60
    chat = [{"role": "system", "content": "S"}]
    for i in range(6):
        chat += [user(f"{i} {long}"), {"role": "assistant", "content": long}]
    chat.append(user("last question"))
    assert len(engine.prompt_ids(chat)) + 100 > engine.max_context  # really too long for the 512-token model
    kept, budget = fit_context(engine, chat, 100)
    assert budget == 100 and kept[0] == chat[0] and kept[-1] == chat[-1] and kept[1]["role"] == "user"
    assert kept[1:] == chat[len(chat) - len(kept) + 1:]  # a suffix of whole turns
    assert len(engine.prompt_ids(kept)) + 100 <= engine.max_context
    one, budget = fit_context(engine, [user(long * 2)], 500)  # one turn: nothing to drop, a smaller answer
    assert budget == engine.max_context - len(engine.prompt_ids(one)) < 500
    with pytest.raises(MedGPTError, match="Send a shorter one"):
        fit_context(engine, [user(long * 5)], 10)  # 600 tokens > 512


def test_closing_the_reply_closes_the_engine_stream(engine, monkeypatch):
    """Stop / Clear / a closed tab close the reply generator; that must reach engine.stream, which then cancels
    generation and releases the model (tests/test_engine.py checks that part)."""
    closed = []

    def endless(messages, gen):
        try:
            while True:
                yield "a"
        finally:
            closed.append(True)

    monkeypatch.setattr(engine, "stream", endless)
    reply = stream_reply(engine, [user("hi")], "", GREEDY)
    assert [next(reply)[-1]["content"] for _ in range(3)] == ["a", "aa", "aaa"]
    reply.close()
    assert closed == [True]


@pytest.fixture(scope="module")
def index():
    from medgpt.rag.index import Index

    docs = [str(KNOWLEDGE / f) for f in ("pain_relievers.md", "gaoxueya_zh.md", "warfarin.md")]
    return Index.build(docs, chunk_chars=60, chunk_overlap=0)[0]  # short passages: two fit the tiny context


def spy_stream(monkeypatch, engine) -> list[list[dict]]:
    """Wrap engine.stream: the returned list gets the messages of every call (what the model saw)."""
    seen, real = [], engine.stream

    def spy(messages, gen):
        seen.append(messages)
        return real(messages, gen)

    monkeypatch.setattr(engine, "stream", spy)
    return seen


def test_stream_reply_answers_from_the_knowledge_base(engine, index, monkeypatch):
    seen = spy_stream(monkeypatch, engine)
    question, system = "What is the maximum dose of paracetamol?", {"role": "system", "content": "S"}
    history = [user(question)]
    steps = list(stream_reply(engine, history, "S", GREEDY, index=index, rag=KnowledgeArgs(top_k=4)))
    expected, sources = fit_augment(engine, [system, user(question)], index, 4, GREEDY.max_new_tokens)
    assert seen == [expected] and 2 <= len(sources) < 4  # numbered passages, as many as fit the context
    assert "[1] " + sources[0]["where"] in expected[-1]["content"]
    assert sources[0]["source"].endswith("pain_relievers.md")
    answer = engine.chat(expected, GREEDY).text

    # the answer streams, then the sources follow it as a titled note; the question stays as typed
    *growing, last = steps
    assert all(s[:-1] == history and s[-1]["role"] == "assistant" and "metadata" not in s[-1] for s in growing)
    assert growing[-1][-1]["content"] == answer and len(growing) > 2
    assert last[:-1] == growing[-1] and last[0] == user(question)
    note = last[-1]
    assert note["role"] == "assistant" and note["metadata"] == {"title": SOURCES_TITLE}
    for s in sources:
        assert f"- **[{s['n']}]** `{s['where']}` — {s['heading']}" in note["content"].splitlines()

    # the next turn: the model gets the original question and the answer, never the passages or the sources note
    follow = last + [user("And for children?")]
    assert to_messages(follow, "S") == [system, user(question), {"role": "assistant", "content": answer},
                                        user("And for children?")]
    *_, again = stream_reply(engine, follow, "S", GREEDY)  # the knowledge box unticked: index None
    assert seen[-1] == to_messages(follow, "S") and again[:-1] == follow

    # no passage matches: a note says so
    *_, none = stream_reply(engine, [user("zzqx")], "", GREEDY, index=index)
    assert none[-1]["metadata"]["title"] == SOURCES_TITLE and "No passage" in none[-1]["content"]
    assert seen[-1] == [user("zzqx")]


def test_the_page_has_a_knowledge_box_only_with_an_index(engine, index):
    pytest.importorskip("gradio", reason="gradio is missing: pip install -e '.[serve]'")

    def ids(ui) -> set:
        return {getattr(b, "elem_id", None) for b in ui.blocks.values()}

    with_index = build_ui(engine, Config(), index)
    box = next(b for b in with_index.blocks.values() if getattr(b, "elem_id", None) == "knowledge")
    assert box.value is True and "使用知识库" in box.label
    assert "knowledge" not in ids(build_ui(engine, Config())) and "chat" in ids(with_index)


@pytest.mark.parametrize("scrub", [True, False])
def test_log_chats_writes_scrubbed_exchanges_to_stderr(engine, index, monkeypatch, capsys, scrub):
    monkeypatch.setattr(engine, "stream", lambda messages, gen: iter(["请致电", " 139-1234-5678", " 复诊"]))
    question = "我的身份证号11010519491231002X，电话13812345678，头痛怎么办？"
    list(stream_reply(engine, [user(question)], "", GREEDY, log_chats=True, scrub_logs=scrub))
    captured = capsys.readouterr()
    assert captured.err.startswith("chat ") and "chat " not in captured.out
    record = json.loads(captured.err[len("chat "):])
    if scrub:
        assert record == {"question": "我的身份证号[ID]，电话[PHONE]，头痛怎么办？",
                          "answer": "请致电 [PHONE] 复诊", "finish": "done"}
    else:
        assert record == {"question": question, "answer": "请致电 139-1234-5678 复诊", "finish": "done"}

    reply = stream_reply(engine, [user("What is the maximum dose of paracetamol?")], "", GREEDY, index=index,
                         log_chats=True, scrub_logs=scrub)
    next(reply)
    reply.close()  # Stop: the exchange is logged as it stood, with the sources it was given
    record = json.loads(capsys.readouterr().err[len("chat "):])
    assert record["answer"] == "请致电" and record["finish"] == "stopped"
    assert record["sources"] and all(re.fullmatch(r".+\.md:\d+", w) for w in record["sources"])
    list(stream_reply(engine, [user(question)], "", GREEDY))  # log_chats off (the default): nothing
    assert capsys.readouterr().err == ""


def test_parse_auth():
    assert parse_auth(None) is None and parse_auth("") is None
    assert parse_auth("doc:pa:ss") == ("doc", "pa:ss")
    for bad in ("doc", "doc:", ":pw"):
        with pytest.raises(MedGPTError, match="user:password"):
            parse_auth(bad)


def test_login_guard_locks_out_a_client_after_repeated_failures(capsys):
    now = [1000.0]
    guard = LoginGuard("doctor", "s3cret", max_failures=3, lockout_s=60, clock=lambda: now[0])

    def login(client: str, user: str = "doctor", password: str = "wrong") -> bool:
        token = LOGIN_CLIENT.set(client)
        try:
            return guard(user, password)
        finally:
            LOGIN_CLIENT.reset(token)

    assert not login("10.0.0.1") and not login("10.0.0.1", "nurse", "s3cret")  # wrong password, wrong user
    assert login("10.0.0.1", password="s3cret")  # two failures: still allowed, and the count starts over
    assert not login("10.0.0.1") and not login("10.0.0.1") and "".join(capsys.readouterr()) == ""
    now[0] += 61  # those two fell out of the window
    assert not login("10.0.0.1") and not login("10.0.0.1") and not login("10.0.0.1")  # three in a row: locked
    assert "3 failed logins from 10.0.0.1; refusing it for 60 s" in capsys.readouterr().out
    assert not login("10.0.0.1", password="s3cret")  # refused, right password or not
    assert login("10.0.0.2", password="s3cret")  # another address is not affected
    now[0] += 59
    assert not login("10.0.0.1", password="s3cret")
    now[0] += 2
    assert login("10.0.0.1", password="s3cret")  # the lockout is over
    free = LoginGuard("doctor", "s3cret", max_failures=0)  # 0: no limit
    assert not any(free("doctor", "wrong") for _ in range(20)) and free("doctor", "s3cret")
    assert free("doctor", "s3cre") is False and free("doctor", "s3cret!") is False and free("", "") is False


def test_login_attempts_are_limited_per_client_over_http(serve, monkeypatch):
    """The guard sits behind Gradio's real /login route, which only sees the address through remember_client."""
    import httpx

    monkeypatch.setenv("MEDGPT_WEBUI_AUTH", "doctor:s3cret-pass")
    url = serve(Config(gen=GREEDY, webui=WebUIArgs(max_login_failures=3)))

    def login(password: str, source: str = "127.0.0.1") -> httpx.Response:
        with httpx.Client(transport=httpx.HTTPTransport(local_address=source)) as http:  # the client's address
            return http.post(url + "login", data={"username": "doctor", "password": password})

    assert login("s3cret-pass").status_code == 200 and login("wrong").status_code == 400
    assert login("s3cret-pass").status_code == 200  # a right login clears the count
    assert [login("wrong").status_code for _ in range(3)] == [400] * 3
    refused = login("s3cret-pass")  # locked out: the right password no longer lets it in
    assert refused.status_code == 400 and not refused.cookies
    assert login("s3cret-pass", source="127.0.0.2").status_code == 200  # another address (loopback is 127/8)


def test_run_without_a_model_is_a_clear_error(capsys):
    from medgpt.cli import main

    assert main(["webui", str(ROOT / "configs" / "tiny" / "webui.yaml")]) == 1
    assert "--model.name_or_path" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ browser

def chromium() -> str:
    pytest.importorskip("gradio", reason="gradio is missing: pip install -e '.[serve]'")
    pytest.importorskip("playwright", reason="playwright is missing: pip install -e '.[dev]'")
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("no chromium on PATH: `make browser` installs Debian's (apt-get install chromium)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def serve(engine):
    """Launch build_ui(engine, cfg) on a free port in a background thread; yields its URL."""
    started = []

    def start(cfg: Config, index=None) -> str:
        ui = build_ui(engine, cfg, index)
        launch(ui, replace(cfg.webui, port=free_port()), block=False)
        started.append(ui)
        return ui.local_url

    yield start
    for ui in started:
        ui.close()


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module (starting it is the slow part); each test gets a fresh context."""
    from playwright.sync_api import sync_playwright

    executable = chromium()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})  # own cookies: logged out
    yield context.new_page()
    context.close()


def visible_text(s: str) -> str:
    """Letters, digits and CJK only: what survives Markdown rendering of the model's gibberish."""
    return re.sub(r"[^\w\u4e00-\u9fff]", "", s)


@pytest.mark.timeout(120)
def test_page_streams_an_answer_in_chromium(engine, serve, page, monkeypatch):
    monkeypatch.delenv("MEDGPT_WEBUI_AUTH", raising=False)  # no login page here, whatever the environment says
    url = serve(Config(gen=replace(GREEDY, max_new_tokens=32), webui=WebUIArgs(title="MedGPT test")))
    offsite = []
    page.on("request", lambda r: None if r.url.startswith(url.rstrip("/")) or r.url.startswith("data:")
            else offsite.append(r.url))
    page.goto(url)
    disclaimer = page.locator("#disclaimer")
    disclaimer.wait_for(state="visible", timeout=30_000)
    assert "Not medical advice" in disclaimer.inner_text() and "不构成医疗建议" in disclaimer.inner_text()

    page.locator("#message textarea").fill("高血压是什么？")
    page.locator("#message textarea").press("Enter")
    bot = page.locator("#chat .message.bot").last  # the assistant's bubble
    bot.wait_for(state="visible", timeout=30_000)
    expected = engine.chat([{"role": "system", "content": WebUIArgs().system}, user("高血压是什么？")],
                           replace(GREEDY, max_new_tokens=32)).text
    page.wait_for_function("([sel, n]) => { const b = document.querySelectorAll(sel); "
                           "return b.length && b[b.length - 1].innerText.trim().length >= n; }",
                           arg=["#chat .message.bot", 1], timeout=30_000)
    page.locator("#chat .pending").wait_for(state="detached", timeout=30_000)  # streaming finished
    shown = bot.inner_text()
    assert visible_text(shown) and visible_text(shown) == visible_text(expected)
    assert "高血压是什么？" in page.locator("#chat .message.user").last.inner_text()

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "webui.png"), full_page=True)

    page.locator("#clear").click()
    page.locator("#chat .message").first.wait_for(state="detached", timeout=10_000)
    assert not offsite, f"the page reached outside the server: {offsite[:5]}"


@pytest.mark.timeout(120)
def test_page_shows_the_sources_under_the_answer(engine, index, serve, page, monkeypatch):
    monkeypatch.delenv("MEDGPT_WEBUI_AUTH", raising=False)
    url = serve(Config(gen=replace(GREEDY, max_new_tokens=8)), index)
    page.goto(url)
    box = page.locator("#knowledge input[type=checkbox]")
    box.wait_for(state="visible", timeout=30_000)
    assert box.is_checked() and "使用知识库" in page.locator("#knowledge").inner_text()
    page.locator("#message textarea").fill("What is the maximum dose of paracetamol?")
    page.locator("#message textarea").press("Enter")
    note = page.locator("#chat").get_by_text(SOURCES_TITLE)
    note.wait_for(state="visible", timeout=30_000)
    page.locator("#chat .pending").wait_for(state="detached", timeout=30_000)
    page.locator("#chat .thought li").first.wait_for(state="visible", timeout=10_000)  # the list, not only its title
    chat = page.locator("#chat").inner_text()
    assert re.search(r"\[1\]\s*\S*pain_relievers\.md:\d+", chat) and "[2]" in chat
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "webui-knowledge.png"), full_page=True)


@pytest.mark.timeout(120)
def test_login_page_refuses_a_wrong_password(serve, page, monkeypatch):
    monkeypatch.setenv("MEDGPT_WEBUI_AUTH", "doctor:s3cret-pass")  # the env form: no password on the command line
    url = serve(Config(gen=GREEDY))
    import httpx

    for path in ("config", "gradio_api/info"):  # the API behind the page needs the login too
        assert httpx.get(url + path).status_code == 401
    page.goto(url)
    page.get_by_label("username").fill("doctor")
    page.get_by_label("password").fill("wrong")
    page.get_by_role("button", name="Login").click()
    page.get_by_text("Incorrect Credentials").wait_for(timeout=10_000)
    assert not page.locator("#disclaimer").is_visible()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "webui-login.png"))
    page.get_by_label("username").fill("doctor")
    page.get_by_label("password").fill("s3cret-pass")
    page.get_by_role("button", name="Login").click()
    page.locator("#disclaimer").wait_for(state="visible", timeout=30_000)
    assert DISCLAIMER.split("**")[1] in page.locator("#disclaimer").inner_text()
