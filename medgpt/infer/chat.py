"""Chat with a model in the terminal; answers stream in as they are generated.

    medgpt chat --model.name_or_path outputs/demo/merge
    medgpt chat --model.name_or_path Qwen/Qwen2.5-0.5B-Instruct --model.adapter outputs/sft --chat.system "..."

The conversation is kept and sent whole each turn (the oldest turns are dropped when it outgrows the model's
context). Commands: /clear forgets the conversation, /system TEXT sets the system prompt (/system alone removes
it), /exit or Ctrl-D quits. Ctrl-C while an answer streams stops that answer and returns to the prompt.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from typing import IO, Optional

from medgpt.args import GenArgs, ModelArgs
from medgpt.config import arg, section
from medgpt.infer.engine import fit_context
from medgpt.utils import MedGPTError

HELP = "commands: /clear (forget the conversation), /system TEXT (set; alone: remove), /exit (or Ctrl-D), /help"


@dataclass
class ChatArgs:
    system: Optional[str] = arg(None, "System prompt the conversation starts with (/system changes it).")


@dataclass
class Config:
    model: ModelArgs = section(ModelArgs, "The model to chat with (a merged model, or a base + adapter).")
    template: str = arg("tokenizer", "Chat template name, or `tokenizer` to use the model's own.")
    gen: GenArgs = section(GenArgs, "Decoding settings.")
    only_cpu: bool = arg(False, "Run on the CPU even when a GPU is present.")
    chat: ChatArgs = section(ChatArgs, "The conversation.")


def _style(out: IO) -> dict[str, str]:
    """ANSI codes for a terminal that shows them; empty strings for pipes, files and NO_COLOR."""
    on = hasattr(out, "isatty") and out.isatty() and not os.environ.get("NO_COLOR")
    codes = {"you": "\033[1;32m", "bot": "\033[1;36m", "dim": "\033[2m", "off": "\033[0m"}
    return codes if on else {k: "" for k in codes}


def _read(prompt: str, stdin: IO, out: IO) -> Optional[str]:
    """One line of input, None at end of input. A real terminal gets line editing through input()."""
    if stdin is sys.stdin and out is sys.stdout and stdin.isatty():
        try:
            import readline  # noqa: F401  (arrow keys and history for input())
        except ImportError:
            pass
        try:
            return input(prompt)
        except EOFError:
            return None
    out.write(prompt)
    out.flush()
    line = stdin.readline()
    return line.rstrip("\r\n") if line else None


def fit(engine, messages: list[dict], gen: GenArgs) -> tuple[list[dict], GenArgs]:
    """The conversation and decoding settings that fit the context (engine.fit_context: oldest turns go first)."""
    messages, budget = fit_context(engine, messages, gen.max_new_tokens)
    return messages, replace(gen, max_new_tokens=budget)


def repl(engine, gen: GenArgs, system: Optional[str] = None, stdin: Optional[IO] = None,
         out: Optional[IO] = None) -> list[dict]:
    """Chat until /exit or end of input (default: the terminal); returns the conversation (system first)."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    c = _style(out)
    history: list[dict] = []

    def note(text: str) -> None:
        out.write(f"{c['dim']}{text}{c['off']}\n")

    note(f"chatting with {engine.name}. {HELP}")
    while True:
        try:
            line = _read(f"{c['you']}you>{c['off']} ", stdin, out)
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt, like a shell
            out.write("\n")
            note("(/exit or Ctrl-D to quit)")
            continue
        if line is None:
            out.write("\n")
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, rest = text.partition(" ")
            if cmd in ("/exit", "/quit"):
                break
            if cmd == "/clear":
                history = []
                note("(conversation cleared)")
            elif cmd == "/system":
                system = rest.strip() or None
                note(f"(system prompt set: {system})" if system else "(system prompt removed)")
            else:
                note(HELP if cmd == "/help" else f"unknown command {cmd}. {HELP}")
            continue

        history.append({"role": "user", "content": text})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        try:
            messages, turn_gen = fit(engine, messages, gen)
        except MedGPTError as e:
            history.pop()
            note(str(e))
            continue
        history = [m for m in messages if m["role"] != "system"]
        out.write(f"{c['bot']}assistant>{c['off']} ")
        out.flush()
        reply = ""
        stream = engine.stream(messages, turn_gen)
        try:
            for delta in stream:
                reply += delta
                out.write(delta)
                out.flush()
            out.write("\n")
        except KeyboardInterrupt:  # stop this answer, keep what was shown
            out.write("\n")
            note("(stopped)")
        finally:
            stream.close()  # tells the generating thread to stop and waits for it
        if reply:
            history.append({"role": "assistant", "content": reply})
        else:
            history.pop()  # nothing was answered: the question is not part of the conversation
    out.flush()
    return ([{"role": "system", "content": system}] if system else []) + history


def run(cfg: Config) -> int:
    """Interactive chat in the terminal (streaming; /clear, /system TEXT, /exit)."""
    from medgpt.infer.engine import Engine

    engine = Engine.load(cfg.model, cfg.template, cfg.only_cpu)
    repl(engine, cfg.gen, cfg.chat.system)
    return 0
