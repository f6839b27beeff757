"""A chat web page for a model: `medgpt webui configs/tiny/webui.yaml --model.name_or_path DIR`.

Gradio Blocks: a chat with streaming answers, a system-prompt box, temperature / top-p / max-new-tokens controls,
stop and clear buttons, and a bilingual notice that answers are not medical advice. It is a thin shell over the
one generation engine (medgpt/infer/engine.py): `stream_reply` feeds the conversation to `engine.stream` and
yields the chat with the answer growing. `build_ui(engine, cfg)` makes the page without launching it, so tests
(and other apps) can mount or launch it themselves.

With `--rag.index_dir` (a `medgpt rag index` directory) a "Use knowledge base" box (on by default) answers from
the knowledge base: the model's copy of the question gets the best passages, numbered (medgpt/rag/answer.py, as
`medgpt rag ask`), and the answer is followed by a "Sources" note listing them as file:line and heading. The chat
itself keeps the question as typed, and the sources note is never sent back to the model.
`--webui.log_chats` writes each question and answer to stderr for audits, scrubbed of personal identifiers.

Safe defaults: it binds 127.0.0.1, Gradio's analytics and share links are off (nothing leaves the machine), an
optional `user:password` (--webui.auth or MEDGPT_WEBUI_AUTH) puts a login page in front, where one client address
gets --webui.max_login_failures wrong tries before a lockout (LoginGuard), and the queue runs one answer at a time
with a bounded number of waiting requests.
"""

from __future__ import annotations

import hmac
import json
import os
import sys
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Iterator, Optional

from medgpt.args import GenArgs, ModelArgs
from medgpt.config import arg, section
from medgpt.infer.engine import fit_context
from medgpt.rag.answer import KnowledgeArgs, load_knowledge
from medgpt.utils import MedGPTError, log

AUTH_ENV = "MEDGPT_WEBUI_AUTH"

DISCLAIMER = (
    "**Not medical advice.** Answers are written by a language model and can be wrong or out of date. "
    "See a doctor for diagnosis and treatment; in an emergency call your local emergency number now.\n\n"
    "**不构成医疗建议。** 回答由语言模型生成，可能有误或已过时。诊断和治疗请咨询医生；"
    "如遇紧急情况，请立即拨打急救电话（120）。"
)


@dataclass
class WebUIArgs:
    host: str = arg("127.0.0.1", "Address to bind. 0.0.0.0 exposes the page to your network: set auth then.")
    port: int = arg(7860, "Port to listen on.", min=1, max=65535)
    auth: Optional[str] = arg(None, f"`user:password` for a login page (also read from ${AUTH_ENV}, which "
                              "keeps the password out of your shell history).")
    max_login_failures: int = arg(5, "With auth: wrong logins from one client address within login_lockout_s "
                                  "seconds before that address is refused for login_lockout_s seconds, right "
                                  "password or not (0: no limit).", min=0)
    login_lockout_s: float = arg(300.0, "With auth: the window the failures are counted in, and how long a client "
                                 "that reached max_login_failures is refused.", above=0)
    share: bool = arg(False, "Ask Gradio for a public *.gradio.live link (needs internet; sends traffic through "
                      "Gradio's servers). Off by default.")
    title: str = arg("MedGPT", "Page title.")
    system: str = arg("You are a careful medical assistant. Answer clearly, say when you are unsure, and advise "
                      "seeing a doctor when symptoms are serious.", "Default system prompt (editable on the page).")
    max_input_chars: int = arg(4000, "Longest message a user may send, in characters.", min=1)
    max_queue: int = arg(16, "Most requests waiting for the model at once; more are refused with 'queue full'.", min=1)
    log_chats: bool = arg(False, "Log each question and answer to stderr (for audits); scrubbed of personal "
                          "identifiers unless --webui.scrub_logs false.")
    scrub_logs: bool = arg(True, "With log_chats: replace personal identifiers (ID, phone, medical record and card "
                           "numbers, e-mails, birth dates, names) with [TYPE] placeholders.")


@dataclass
class Config:
    model: ModelArgs = section(ModelArgs, "The model to chat with (a merged model, or a base + adapter).")
    template: str = arg("tokenizer", "Chat template name, or `tokenizer` to use the model's own.")
    gen: GenArgs = section(GenArgs, "Decoding defaults; temperature, top_p and max_new_tokens are sliders.")
    only_cpu: bool = arg(False, "Run on the CPU even when a GPU is available.")
    webui: WebUIArgs = section(WebUIArgs, "The web server.")
    rag: KnowledgeArgs = section(KnowledgeArgs, "Knowledge base: answer from your own documents, citing them.")


# ----------------------------------------------------------------------------------------- conversation

def text_of(content) -> str:
    """Plain text of a chat message's content: Gradio hands it over as a string or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "") if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "".join(text_of(part) for part in content)
    return ""


SOURCES_TITLE = "Sources / 来源"


def is_note(message: dict) -> bool:
    """A titled message (the sources under an answer): shown in the chat, never part of the conversation."""
    return bool((message.get("metadata") or {}).get("title"))


def to_messages(history: list[dict], system: str = "") -> list[dict]:
    """The engine's messages from a Gradio chat history (extra keys such as metadata dropped, notes skipped)."""
    messages = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
    for m in history:
        if m.get("role") in ("user", "assistant") and not is_note(m):
            messages.append({"role": m["role"], "content": text_of(m.get("content"))})
    return messages


def with_knowledge(engine, messages: list[dict], index, rag: KnowledgeArgs,
                   max_new_tokens: int) -> tuple[list[dict], list[dict]]:
    """`messages` with the knowledge base's passages in the last user turn, and the passages (sources).

    The passages are sized against the system prompt and the question alone, then the oldest turns make room
    for them (fit_context): an answer from the documents matters more than the start of a long chat."""
    from medgpt.rag.answer import fit_augment

    system = messages[:1] if messages[0]["role"] == "system" else []
    last, sources = fit_augment(engine, system + messages[-1:], index, rag.top_k, max_new_tokens, mode=rag.mode)
    return messages[:-1] + last[-1:], sources


def sources_markdown(sources: list[dict]) -> str:
    """The numbered passages as a small markdown list: `[n] file:line — heading`."""
    if not sources:
        return ("*No passage in the knowledge base matches: this answer does not come from it. / "
                "知识库中没有匹配的资料。*")
    return "\n".join(f"- **[{s['n']}]** `{s['where']}`" + (f" — {s['heading']}" if s.get("heading") else "")
                     for s in sources)


def log_chat(question: str, answer: str, sources: Optional[list[dict]], finish: str, scrub: bool) -> None:
    """One JSON line on stderr: the question, the answer, the sources' file:line, and how the answer ended."""
    if scrub:
        from medgpt.data.pii import scrub as scrub_text

        question, answer = scrub_text(question)[0], scrub_text(answer)[0]
    record = {"question": question, "answer": answer, "finish": finish}
    if sources is not None:
        record["sources"] = [s["where"] for s in sources]
    log("chat " + json.dumps(record, ensure_ascii=False), file=sys.stderr)


def stream_reply(engine, history: list[dict], system: str, gen: GenArgs, *, index=None,
                 rag: Optional[KnowledgeArgs] = None, log_chats: bool = False,
                 scrub_logs: bool = True) -> Iterator[list[dict]]:
    """Answer the last user message of `history`: yield the chat with the assistant's reply growing.

    With `index` (a loaded knowledge base; `rag` gives top_k and mode) the model sees the question with numbered
    passages, and the last yield adds a sources note (an assistant message titled SOURCES_TITLE) after the
    answer. `log_chats` writes the exchange to stderr when it ends (also when it is stopped).
    Nothing to answer (empty chat, or the last message is not the user's) yields the history unchanged once.
    """
    if not history or history[-1].get("role") != "user" or not text_of(history[-1].get("content")).strip():
        yield history
        return
    messages = to_messages(history, system)
    sources = None
    if index is not None:
        messages, sources = with_knowledge(engine, messages, index, rag or KnowledgeArgs(), gen.max_new_tokens)
    messages, budget = fit_context(engine, messages, gen.max_new_tokens)
    text, finish = "", "stopped"
    try:
        # Breaking off (Stop, Clear, a closed tab) closes this generator, which closes engine.stream: generation
        # stops at the next token and frees the model for the next request.
        for delta in engine.stream(messages, replace(gen, max_new_tokens=budget)):
            text += delta
            yield history + [{"role": "assistant", "content": text}]
        finish = "done"
        answer = [{"role": "assistant", "content": text if text.strip() else "*(empty answer / 空回答)*"}]
        if sources is not None:
            answer.append({"role": "assistant", "content": sources_markdown(sources),
                           "metadata": {"title": SOURCES_TITLE}})
        if len(answer) > 1 or not text.strip():
            yield history + answer
    finally:
        if log_chats:
            log_chat(text_of(history[-1].get("content")), text, sources, finish, scrub_logs)


# ------------------------------------------------------------------------------------------------ page

def build_ui(engine, cfg: Config, index=None):
    """The Gradio Blocks page for `engine`, not launched (see `launch`); `index`: a loaded knowledge base."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no telemetry, no version check
    import gradio as gr

    web = cfg.webui
    # Half the context at most, so a question always has room; a long chat loses its oldest turns (fit_context).
    max_tokens = max(2, min(max(cfg.gen.max_new_tokens, 2048), engine.max_context // 2))

    def add_user(message: str, history: list[dict]):
        message = (message or "").strip()
        if not message:
            return "", history
        if len(message) > web.max_input_chars:
            raise gr.Error(f"Message too long ({len(message)} characters; the limit is {web.max_input_chars}).")
        return "", history + [{"role": "user", "content": message}]

    def respond(history: list[dict], system: str, temperature: float, top_p: float, max_new_tokens: float,
                use_knowledge: bool = True):
        gen = replace(cfg.gen, temperature=float(temperature), top_p=float(top_p), max_new_tokens=int(max_new_tokens))
        try:
            yield from stream_reply(engine, history, system, gen, index=index if use_knowledge else None,
                                    rag=cfg.rag, log_chats=web.log_chats, scrub_logs=web.scrub_logs)
        except MedGPTError as e:
            raise gr.Error(str(e)) from None

    with gr.Blocks(title=web.title, analytics_enabled=False) as ui:
        gr.Markdown(f"# {web.title}\n`{engine.name}`")
        gr.Markdown(DISCLAIMER, elem_id="disclaimer")
        with gr.Row():
            with gr.Column(scale=3):
                chat = gr.Chatbot(label="Chat / 对话", elem_id="chat", height=480, buttons=["copy"],
                                  feedback_options=None)
                box = gr.Textbox(placeholder="Ask a medical question / 请输入您的问题 (Enter to send)",
                                 show_label=False, elem_id="message", max_length=web.max_input_chars,
                                 autofocus=True)
                with gr.Row():
                    send = gr.Button("Send / 发送", variant="primary", elem_id="send")
                    stop = gr.Button("Stop / 停止", elem_id="stop")
                    clear = gr.Button("Clear / 清空", elem_id="clear")
            with gr.Column(scale=1):
                system = gr.Textbox(value=web.system, label="System prompt / 系统提示", lines=4, elem_id="system")
                temperature = gr.Slider(0.0, 2.0, value=cfg.gen.temperature, step=0.05,
                                        label="Temperature (0 = greedy)", elem_id="temperature")
                top_p = gr.Slider(0.05, 1.0, value=cfg.gen.top_p, step=0.05, label="Top-p", elem_id="top_p")
                max_new = gr.Slider(1, max_tokens, value=min(cfg.gen.max_new_tokens, max_tokens), step=1,
                                    label="Max new tokens", elem_id="max_new_tokens")
                knowledge = None
                if index is not None:
                    knowledge = gr.Checkbox(value=True, label="Use knowledge base / 使用知识库",
                                            info=f"{len(index)} passages; answers cite them as [n]",
                                            elem_id="knowledge")

        settings = [chat, system, temperature, top_p, max_new] + ([knowledge] if knowledge is not None else [])
        answers = [trigger(add_user, [box, chat], [box, chat], queue=False).then(respond, settings, chat)
                   for trigger in (box.submit, send.click)]
        stop.click(None, cancels=answers)
        chat.clear(None, cancels=answers)  # the chat's own trash icon
        clear.click(lambda: ([], ""), None, [chat, box], cancels=answers, queue=False)
    return ui


def parse_auth(value: Optional[str]) -> Optional[tuple[str, str]]:
    """`user:password` -> (user, password); None or empty -> None (no login page)."""
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not (sep and user and password):
        raise MedGPTError(f"webui auth must look like user:password (from --webui.auth or ${AUTH_ENV}); "
                          f"got a value without a user, a ':' or a password.")
    return user, password


LOGIN_CLIENT: ContextVar[str] = ContextVar("medgpt_login_client", default="")  # the address of this request


def remember_client(app):
    """ASGI middleware: the client's address in LOGIN_CLIENT, for LoginGuard (Gradio passes the auth callable
    only the user name and password). Each request runs in its own task, so the value stays with it."""
    async def middleware(scope, receive, send):
        if scope["type"] == "http":
            LOGIN_CLIENT.set((scope.get("client") or ("",))[0])
        await app(scope, receive, send)

    return middleware


class LoginGuard:
    """Gradio's auth callable: one user and password, compared in constant time, and a brake on guessing. After
    `max_failures` wrong logins from one client address within `lockout_s` seconds, that address is refused for
    `lockout_s` seconds, right password or not (else a guesser would learn when it found it). A right login
    clears the address's count; max_failures 0 turns the brake off. Behind a proxy every client shares its address."""

    def __init__(self, user: str, password: str, max_failures: int = 5, lockout_s: float = 300.0,
                 clock=time.monotonic):
        self.user, self.password = user.encode(), password.encode()
        self.max_failures, self.lockout_s, self.clock = max_failures, lockout_s, clock
        self.failures: dict[str, list[float]] = {}  # address -> times of its recent wrong logins
        self.locked: dict[str, float] = {}  # address -> when it may try again
        self.lock = threading.Lock()

    def __call__(self, username: str, password: str) -> bool:
        client, now = LOGIN_CLIENT.get(), self.clock()
        with self.lock:
            if self.locked.get(client, now) > now:
                return False
            self.locked.pop(client, None)
            right = hmac.compare_digest(username.encode(), self.user)
            right &= hmac.compare_digest(password.encode(), self.password)  # both run: the time says nothing
            if right:
                self.failures.pop(client, None)
                return True
            recent = [t for t in self.failures.get(client, ()) if now - t < self.lockout_s] + [now]
            self.failures[client] = recent
            if self.max_failures and len(recent) >= self.max_failures:
                self.locked[client] = now + self.lockout_s
                del self.failures[client]
                log(f"webui: {len(recent)} failed logins from {client or 'a client'}; refusing it for "
                    f"{self.lockout_s:g} s")
            if len(self.failures) + len(self.locked) > 10_000:  # many addresses: forget those with nothing recent
                self.failures = {c: ts for c, ts in self.failures.items() if now - ts[-1] < self.lockout_s}
                self.locked = {c: t for c, t in self.locked.items() if t > now}
            return False


def launch(ui, web: WebUIArgs, block: bool = True):
    """Serve the page, behind a LoginGuard when there is a user:password. block=False returns once it is up."""
    from starlette.middleware import Middleware

    auth = parse_auth(web.auth or os.environ.get(AUTH_ENV))
    guard = LoginGuard(*auth, web.max_login_failures, web.login_lockout_s) if auth else None
    if web.host not in ("127.0.0.1", "localhost", "::1") and auth is None:
        log(f"warning: serving on {web.host} without a login: anyone who can reach this port can use the model. "
            f"Set --webui.auth user:password (or ${AUTH_ENV}).")
    ui.queue(max_size=web.max_queue, default_concurrency_limit=1)  # one answer at a time: the engine holds a lock
    try:
        # run_history off: Gradio would keep every question (health data) in the browser, with an upload option.
        return ui.launch(server_name=web.host, server_port=web.port, auth=guard, share=web.share, ssr_mode=False,
                         run_history=False, footer_links=["settings"], auth_message="MedGPT — sign in / 请登录",
                         prevent_thread_lock=not block, quiet=True,
                         app_kwargs={"middleware": [Middleware(remember_client)]})
    except OSError as e:
        raise MedGPTError(f"cannot serve on {web.host}:{web.port} ({e}). Is another server using the port? "
                          f"Choose another with --webui.port.") from None


def run(cfg: Config) -> int:
    from medgpt.infer.engine import Engine

    if not cfg.model.name_or_path:
        raise MedGPTError("no model given. Add --model.name_or_path DIR (a merged model or an HF model dir).")
    index = load_knowledge(cfg.rag)  # before the model: a missing index fails fast
    engine = Engine.load(cfg.model, cfg.template, only_cpu=cfg.only_cpu)
    if index is not None:
        log(f"knowledge base: {len(index)} passages from {cfg.rag.index_dir} (top {cfg.rag.top_k}, {cfg.rag.mode})")
    if cfg.webui.log_chats:
        log("questions and answers are logged to stderr" + (" (personal identifiers scrubbed)"
                                                             if cfg.webui.scrub_logs else ", unscrubbed"))
    ui = build_ui(engine, cfg, index)
    log(f"web UI on http://{cfg.webui.host}:{cfg.webui.port} (Ctrl+C to stop)")
    launch(ui, cfg.webui, block=True)
    return 0
