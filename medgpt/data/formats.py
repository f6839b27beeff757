"""Raw records -> canonical records, keyed on each record's shape, never on a dataset's name.

    medgpt data validate data/sft.jsonl --data.format alpaca --data.columns prompt=question,response=answer

Canonical kinds (DESIGN.md):
    text        {"text": str}
    chat        {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    preference  {"prompt": [messages ending with user], "chosen": [assistant msgs], "rejected": [...]}
                (read from prompt/chosen/rejected, question/response_chosen/response_rejected, HH-RLHF
                conversations, or MedicalGPT's {"conversations": [ShareGPT turns], "chosen": str, "rejected": str})
    prompt      {"prompt": [messages ending with user], "answer"?: str}   (a bare {"question": str} too)
    mcq         {"question": str, "options": {"A": str, ...}, "answer": "A", "subject"?: str}

Every problem in a record raises `RecordError` with a one-line reason; validate.py adds `file:line:`.
Turns are numbered from 1, counting a system message.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial

FORMATS = ("text", "alpaca", "sharegpt", "openai", "qa", "preference", "labelled", "prompt", "mcq")
_KIND = {"text": "text", "alpaca": "chat", "sharegpt": "chat", "openai": "chat", "qa": "chat",
         "preference": "preference", "labelled": "labelled", "prompt": "prompt", "mcq": "mcq"}
SHAPES = {"text": "text records {text}",
          "chat": "chat records {messages} (or alpaca/sharegpt/openai/question-answer records)",
          "preference": "preference records {prompt, chosen, rejected}",
          "labelled": "labelled records {prompt, completion, label: true|false} (KTO's unpaired feedback)",
          "prompt": "prompt records {prompt, answer?}",
          "mcq": "multiple-choice records {question, options, answer}"}
# Which kinds a record can be turned into by `as_kind` (besides its own).
CONVERSIONS = {"chat": ("prompt",), "preference": ("chat", "prompt"), "prompt": ("chat",), "mcq": ("prompt", "chat")}

ROLES = {"system": "system", "developer": "system", "user": "user", "human": "user",
         "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
         "model": "assistant", "bard": "assistant"}
# (question key, answer key) pairs of question-answer records, first match wins.
QA_PAIRS = (("question", "answer"), ("问", "答"), ("prompt", "response"), ("prompt", "completion"),
            ("query", "response"), ("input", "output"))
LABELLED_REPLIES = ("completion", "response", "answer")  # the answer a labelled record judges
LETTERS = "ABCDEFGHIJ"
CONVERSATION_KEYS = ("conversations", "conversation", "messages")


class RecordError(ValueError):
    """One record is malformed; the message is a one-line reason."""


def kind_of(fmt: str) -> str:
    """'text', 'chat', 'preference', 'prompt' or 'mcq' for a format name."""
    if fmt not in _KIND:
        raise ValueError(f"unknown format '{fmt}'; known: {', '.join(FORMATS)}")
    return _KIND[fmt]


def record_kind(record: dict) -> str:
    """The kind of a canonical record, from its keys."""
    for key, kind in (("messages", "chat"), ("chosen", "preference"), ("options", "mcq"), ("label", "labelled"),
                      ("prompt", "prompt"), ("text", "text")):
        if key in record:
            return kind
    raise RecordError(f"not a canonical record; keys: {', '.join(record)}")


def apply_columns(obj: dict, columns: dict[str, str] | None) -> dict:
    """Rename the user's keys to ours: `columns` maps canonical key -> the user's key."""
    if not columns:
        return obj
    out = dict(obj)
    for ours, theirs in columns.items():
        if theirs not in obj:
            raise RecordError(f"column '{theirs}' (mapped to '{ours}' by --data.columns) is missing; "
                              f"keys seen: {', '.join(obj)}")
        del out[theirs]
    for ours, theirs in columns.items():
        out[ours] = obj[theirs]
    return out


def _has(obj: dict, key: str) -> bool:
    return obj.get(key) is not None


def detect_format(obj: dict) -> str | None:
    """The format of one raw record from its keys and shape, or None when it fits none."""
    if not isinstance(obj, dict):
        return None
    if (_has(obj, "chosen") and _has(obj, "rejected")) or _has(obj, "response_chosen"):
        return "preference"
    if "label" in obj and any(_has(obj, k) for k in LABELLED_REPLIES):
        return "labelled"
    for key in CONVERSATION_KEYS:
        turns = obj.get(key)
        if isinstance(turns, list):
            first = turns[0] if turns and isinstance(turns[0], dict) else {}
            return "sharegpt" if key != "messages" or "from" in first or "value" in first else "openai"
    if _has(obj, "question") and (_has(obj, "options") or (_has(obj, "A") and _has(obj, "B"))):
        return "mcq"
    if _has(obj, "instruction") and _has(obj, "output"):
        return "alpaca"
    if any(_has(obj, q) and _has(obj, a) for q, a in QA_PAIRS):
        return "qa"
    if _has(obj, "prompt") or _has(obj, "question"):  # a bare question (no answer, no options) is a prompt
        return "prompt"
    if isinstance(obj.get("text"), str) or (isinstance(obj.get("content"), str) and "role" not in obj):
        return "text"
    return None


# ----------------------------------------------------------------------------- fields and messages

def _field(obj: dict, key: str) -> str:
    """A required, non-empty string field."""
    value = obj.get(key)
    if value is None:
        raise RecordError(f"missing field '{key}'")
    if not isinstance(value, str):
        raise RecordError(f"field '{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RecordError(f"field '{key}' is empty")
    return value


def _optional(obj: dict, key: str) -> str | None:
    """An optional string field: None when absent, null or empty."""
    value = obj.get(key)
    if value is None or value == "":
        return None
    return _field(obj, key)


def _content(content, where: str) -> str:
    if isinstance(content, list):  # OpenAI content parts: keep text, refuse images/audio/files
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text" or not isinstance(part.get("text"), str):
                raise RecordError(f"{where}: content part of type '{kind}' is not supported (text only)")
            texts.append(part["text"])
        content = "\n".join(texts)
    if content is None:
        raise RecordError(f"{where} has no content")
    if not isinstance(content, str):
        raise RecordError(f"{where}: content must be a string, got {type(content).__name__}")
    if not content.strip():
        raise RecordError(f"{where} is empty")
    return content


def _turns(turns, label: str) -> list[dict]:
    """A list of {role, content} or {from, value} turns -> canonical messages (roles mapped)."""
    if not isinstance(turns, list):
        raise RecordError(f"'{label}' must be a list of messages, got {type(turns).__name__}")
    out = []
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise RecordError(f"{label} turn {i} must be an object, got {type(turn).__name__}")
        role = turn.get("role", turn.get("from"))
        if role is None:
            raise RecordError(f"{label} turn {i} has no 'role' (or 'from')")
        if not isinstance(role, str) or role.lower() not in ROLES:
            raise RecordError(f"{label} turn {i}: unsupported role '{role}' (use system, user or assistant; "
                              "tool and function turns are not supported)")
        role = ROLES[role.lower()]
        content = turn["content"] if "content" in turn else turn.get("value")
        out.append({"role": role, "content": _content(content, f"{label} turn {i} ('{role}')")})
    return out


def check_messages(messages: list[dict], label: str = "conversation", ends_with: str | None = "assistant") -> None:
    """System first (optional), then user/assistant alternating from user, ending with `ends_with`."""
    if not messages:
        raise RecordError(f"empty {label}")
    expected, previous = "user", None
    for i, m in enumerate(messages, 1):
        role = m["role"]
        if role == "system":
            if i != 1:
                raise RecordError(f"{label} turn {i} is 'system' but a system message must come first")
            continue
        if role != expected:
            after = f"after '{previous}'" if previous else "first (after the optional system message)"
            raise RecordError(f"{label} turn {i} is '{role}' but '{expected}' was expected {after}")
        expected, previous = ("assistant" if role == "user" else "user"), role
    if previous is None:
        raise RecordError(f"{label} has no user turn")
    if ends_with and previous != ends_with:
        article = {"user": "a", "assistant": "an"}
        raise RecordError(f"{label} ends with {article[previous]} '{previous}' turn but must end with "
                          f"{article[ends_with]} '{ends_with}' turn")


def _with_system(messages: list[dict], system: str | None) -> list[dict]:
    if system is None:
        return messages
    if messages and messages[0]["role"] == "system":
        raise RecordError("record has both a 'system' field and a system message")
    return [{"role": "system", "content": system}] + messages


def _prompt_messages(obj: dict, key: str) -> list[dict]:
    """A prompt given as a string or as messages (plus an optional top-level system) -> messages."""
    value = obj.get(key)
    messages = _turns(value, key) if isinstance(value, list) else [{"role": "user", "content": _field(obj, key)}]
    return _with_system(messages, _optional(obj, "system"))


def _history(obj: dict) -> list[dict]:
    """Alpaca/LLaMA-Factory `history`: [[user, assistant], ...] before the current turn."""
    history = obj.get("history") or []
    out = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise RecordError(f"history[{i}] must be a [user, assistant] pair")
        out += [{"role": "user", "content": _content(pair[0], f"history[{i}] user")},
                {"role": "assistant", "content": _content(pair[1], f"history[{i}] assistant")}]
    return out


# ----------------------------------------------------------------------------- one converter per format

def _text(obj: dict) -> dict:
    return {"text": _field(obj, "text" if "text" in obj else "content")}


def _alpaca(obj: dict) -> dict:
    user = _field(obj, "instruction")
    extra = _optional(obj, "input")
    if extra:
        user = f"{user}\n\n{extra}"
    messages = _history(obj) + [{"role": "user", "content": user},
                                {"role": "assistant", "content": _field(obj, "output")}]
    return {"messages": _with_system(messages, _optional(obj, "system"))}


def _chat(obj: dict, keys: tuple[str, ...]) -> dict:
    key = next((k for k in keys if k in obj), keys[0])
    if obj.get(key) is None:
        raise RecordError(f"missing field '{key}'")
    return {"messages": _with_system(_turns(obj[key], key), _optional(obj, "system"))}


def _qa(obj: dict) -> dict:
    q, a = next(((q, a) for q, a in QA_PAIRS if _has(obj, q) and _has(obj, a)), QA_PAIRS[0])
    prompt = _prompt_messages(obj, q)
    if q == "prompt" and _optional(obj, "query"):  # LLaMA-Factory columns: prompt=instruction, query=input
        prompt[-1] = {"role": "user", "content": f"{prompt[-1]['content']}\n\n{obj['query']}"}
    reply = obj.get(a)
    reply = _turns(reply, a) if isinstance(reply, list) else [{"role": "assistant", "content": _field(obj, a)}]
    system = prompt[:1] if prompt[0]["role"] == "system" else []
    return {"messages": system + _history(obj) + prompt[len(system):] + reply}


def _parse_hh(text: str, label: str) -> list[dict]:
    """HH-RLHF strings: '\\n\\nHuman: ...\\n\\nAssistant: ...' -> messages."""
    parts = re.split(r"(?:^|\n\n)(Human|Assistant):[ \t]?", text.strip("\n"))
    if len(parts) < 3 or parts[0].strip():
        raise RecordError(f"'{label}' must be a conversation (a list of messages or Human:/Assistant: text) "
                          "when there is no 'prompt' field")
    return [{"role": "user" if role == "Human" else "assistant",
             "content": _content(content.strip(), f"{label} turn {i}")}
            for i, (role, content) in enumerate(zip(parts[1::2], parts[2::2]), 1)]


def _reply(obj: dict, key: str, prompt: list[dict]) -> list[dict]:
    """chosen/rejected as a string or messages; prompt turns repeated in front of the reply are dropped."""
    value = obj.get(key)
    if isinstance(value, dict):  # LLaMA-Factory ranking data: one {"from": "gpt", "value": ...} turn
        value = [value]
    if not isinstance(value, list):
        return [{"role": "assistant", "content": _field(obj, key)}]
    messages = _turns(value, key)
    without_system = prompt[1:] if prompt and prompt[0]["role"] == "system" else prompt
    for prefix in (prompt, without_system):
        if prefix and messages[:len(prefix)] == prefix:
            return messages[len(prefix):]
    return messages


def _preference(obj: dict) -> dict:
    if _has(obj, "response_chosen") or _has(obj, "response_rejected"):
        prompt = _prompt_messages(obj, "question")
        chosen = [{"role": "assistant", "content": _field(obj, "response_chosen")}]
        rejected = [{"role": "assistant", "content": _field(obj, "response_rejected")}]
    elif _has(obj, "prompt"):
        prompt = _prompt_messages(obj, "prompt")
        chosen, rejected = _reply(obj, "chosen", prompt), _reply(obj, "rejected", prompt)
    elif (key := next((k for k in CONVERSATION_KEYS if isinstance(obj.get(k), list)), None)) is not None:
        # MedicalGPT / LLaMA-Factory: the prompt as ShareGPT turns, chosen and rejected as the replies
        prompt = _with_system(_turns(obj[key], key), _optional(obj, "system"))
        chosen, rejected = _reply(obj, "chosen", prompt), _reply(obj, "rejected", prompt)
    else:  # HH style: two whole conversations that share everything up to the last user turn
        convs = []
        for key in ("chosen", "rejected"):
            value = obj.get(key)
            if value is None:
                raise RecordError(f"missing field '{key}'")
            convs.append(_turns(value, key) if isinstance(value, list) else _parse_hh(_field(obj, key), key))
        users = [i for i, m in enumerate(convs[0]) if m["role"] == "user"]
        if not users:
            raise RecordError("'chosen' has no user turn to split the prompt from the reply")
        cut = users[-1] + 1
        prompt = _with_system(convs[0][:cut], _optional(obj, "system"))
        if convs[1][:cut] != convs[0][:cut]:
            raise RecordError("'chosen' and 'rejected' do not share the same turns up to the last user turn")
        chosen, rejected = convs[0][cut:], convs[1][cut:]
    check_messages(prompt, "prompt", ends_with="user")
    for label, reply in (("chosen", chosen), ("rejected", rejected)):
        if not reply:
            raise RecordError(f"'{label}' has no assistant reply after the prompt")
        for i, m in enumerate(reply, 1):
            if m["role"] != "assistant":
                raise RecordError(f"{label} turn {i} is '{m['role']}' but only assistant replies may follow "
                                  "the prompt (repeat the prompt turns exactly, or give just the reply)")
    if chosen == rejected:
        raise RecordError("'chosen' and 'rejected' are identical")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _prompt(obj: dict) -> dict:
    prompt = _prompt_messages(obj, "prompt" if "prompt" in obj else "question")
    check_messages(prompt, "prompt", ends_with="user")
    record = {"prompt": prompt}
    for key in ("answer", "solution"):
        value = obj.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # numeric reference answers (GSM8K-style) are compared as text
        if value is not None:
            record["answer"] = _field({key: value}, key)
            break
    return record


def _options(obj: dict) -> dict[str, str]:
    options = obj.get("options")
    if options is None:  # flat A, B, C, ... columns
        options = {letter: obj[letter] for letter in LETTERS if obj.get(letter) not in (None, "")}
    elif isinstance(options, list):
        options = dict(zip(LETTERS, options))
    elif not isinstance(options, dict):
        raise RecordError(f"'options' must be an object or a list, got {type(options).__name__}")
    out = {}
    for key, value in options.items():
        letter = str(key).strip().upper()
        if len(letter) != 1 or not letter.isalpha():
            raise RecordError(f"option key '{key}' is not a letter")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        out[letter] = _content(value, f"option {letter}")
    if len(out) < 2:
        raise RecordError("a multiple-choice question needs at least two options")
    return out


def _mcq(obj: dict) -> dict:
    question, options = _field(obj, "question"), _options(obj)
    answer = obj.get("answer")
    if answer is None:
        raise RecordError("missing field 'answer'")
    letter = None
    if isinstance(answer, int) and not isinstance(answer, bool):  # a 0-based option index
        letter = LETTERS[answer] if 0 <= answer < len(options) else None
    elif isinstance(answer, str):
        match = re.fullmatch(r"\(?([A-Za-z])[).:]?", answer.strip())
        if match and match.group(1).upper() in options:
            letter = match.group(1).upper()
        else:
            letter = next((k for k, v in options.items() if v.strip() == answer.strip()), None)
    if letter not in options:
        raise RecordError(f"answer '{answer}' is not among the options {', '.join(options)}")
    record = {"question": question, "options": options, "answer": letter}
    if isinstance(obj.get("subject"), str):
        record["subject"] = obj["subject"]
    return record


def _labelled(obj: dict) -> dict:
    """{prompt, completion|response|answer, label, system?} -> {"prompt": messages, "completion": [assistant
    message], "label": bool}: one answer judged desirable (true) or not (false), for KTO."""
    label = obj.get("label")
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):  # CSV/TSV cells are strings
        label = label.strip().lower() == "true"
    if not isinstance(label, bool):
        got = "it is missing" if label is None else f"got {label!r}"
        raise RecordError(f"field 'label' must be true (a desirable answer) or false (an undesirable one); {got}")
    reply = next((k for k in LABELLED_REPLIES if obj.get(k) is not None), None)
    if reply is None:
        raise RecordError("missing field 'completion' (or 'response' / 'answer'): the answer being labelled")
    if obj.get("prompt") is None:
        raise RecordError("missing field 'prompt' (map another column onto it with --data.columns prompt=NAME)")
    messages = _qa({"prompt": obj["prompt"], "completion": obj[reply], "system": obj.get("system")})["messages"]
    check_messages(messages)  # roles and turn order
    return {"prompt": messages[:-1], "completion": messages[-1:], "label": label}


_CONVERTERS: dict[str, Callable[[dict], dict]] = {
    "text": _text,
    "alpaca": _alpaca,
    "sharegpt": partial(_chat, keys=CONVERSATION_KEYS),
    "openai": partial(_chat, keys=("messages",)),
    "qa": _qa,
    "preference": _preference,
    "labelled": _labelled,
    "prompt": _prompt,
    "mcq": _mcq,
}


def to_canonical(obj: dict, fmt: str = "auto", columns: dict[str, str] | None = None) -> dict:
    """One raw record -> its canonical record. `fmt='auto'` detects the format of this record alone."""
    if not isinstance(obj, dict):
        raise RecordError(f"a record must be an object, got {type(obj).__name__}")
    obj = apply_columns(obj, columns)
    if fmt in (None, "auto"):
        fmt = detect_format(obj)
        if fmt is None:
            raise RecordError(f"cannot tell the record format; keys seen: {', '.join(obj)}")
    if fmt not in _CONVERTERS:
        raise RecordError(f"unknown format '{fmt}'; known: {', '.join(FORMATS)}")
    record = _CONVERTERS[fmt](obj)
    if "messages" in record:
        check_messages(record["messages"])
    return record


# ----------------------------------------------------------------------------- kind conversions

def render_mcq(record: dict) -> str:
    """The question followed by one 'A. option' line per option."""
    return "\n".join([record["question"]] + [f"{k}. {v}" for k, v in record["options"].items()])


def can_convert(have: str, want: str) -> bool:
    return have == want or want in CONVERSIONS.get(have, ())


def as_kind(record: dict, kind: str) -> dict:
    """A canonical record as another kind where that is natural (e.g. preference -> chat = prompt + chosen)."""
    have = record_kind(record)
    if have == kind:
        return record
    if not can_convert(have, kind):
        raise RecordError(f"{SHAPES[kind]} are needed; this is one of the {SHAPES[have]}")
    if have == "chat":  # -> prompt: the last assistant turn becomes the reference answer
        messages = record["messages"]
        return {"prompt": messages[:-1], "answer": messages[-1]["content"]}
    if have == "preference":
        prompt = [dict(m) for m in record["prompt"]]
        return {"messages": prompt + record["chosen"]} if kind == "chat" else {"prompt": prompt}
    if have == "prompt":  # -> chat needs the answer
        if "answer" not in record:
            raise RecordError("a prompt record needs an 'answer' to be used as a chat record")
        return {"messages": record["prompt"] + [{"role": "assistant", "content": record["answer"]}]}
    question = [{"role": "user", "content": render_mcq(record)}]  # mcq
    if kind == "prompt":
        return {"prompt": question, "answer": record["answer"]}
    letter = record["answer"]
    return {"messages": question + [{"role": "assistant", "content": f"{letter}. {record['options'][letter]}"}]}
