"""The OpenAI wire format for `medgpt serve` (medgpt/serve/api.py): request fields in, response bodies out.

    gen, stop = sampling(body, defaults)         # temperature, top_p, seed, stop, ... over the --gen.* defaults
    max_new = budget(body, len(prompt_ids), ...) # max_tokens checked against the server's limits and the context
    messages = to_messages(body["messages"])     # OpenAI messages -> the engine's {"role", "content": str}
    raise APIError(400, "...", param="n")        # answered as {"error": {"message", "type", "param", "code"}}

Plain functions over plain dicts, so every rule is testable without a server. Fields are checked by hand rather
than by a pydantic model: each refusal names the field and says what it must be, in the words a client sees.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Optional

from medgpt.args import GenArgs
from medgpt.utils import MedGPTError

logger = logging.getLogger("medgpt.serve")


class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}} with a status."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 429: "rate_limit_error"}.get(
            self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def engine_error(e: BaseException) -> APIError:
    """What a client is told when generation failed: our own errors verbatim, anything else only that it did."""
    if isinstance(e, MedGPTError):
        return APIError(400, str(e))
    logger.error("generation failed", exc_info=e)
    return APIError(500, "The model failed to generate an answer (internal error; see the server log).")


def bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param, code)


# ------------------------------------------------------------------------------------------ request fields

def field(body: dict, name: str, types: tuple, ok=lambda v: True, what: str = ""):
    """body[name] when it has one of `types` and passes `ok`; None when absent; else a 400 naming the field."""
    value = body.get(name)
    if value is None:
        return None
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types) or not ok(value):
        raise bad(f"'{name}' must be {what}; got {json.dumps(value)[:60]}.", param=name)
    return value


NUMBER = (int, float)


def sampling(body: dict, defaults: GenArgs) -> tuple[GenArgs, list[str]]:
    """The request's decoding settings over the server's defaults, and its stop strings."""
    if field(body, "n", (int,), what="an integer") not in (None, 1):
        raise bad("Only n=1 is supported: send one request per answer you want.", param="n")
    temperature = field(body, "temperature", NUMBER, lambda v: 0 <= v <= 2, "a number from 0 to 2")
    top_p = field(body, "top_p", NUMBER, lambda v: 0 < v <= 1, "a number above 0 and at most 1")
    # top_k and repetition_penalty are not OpenAI fields; vLLM takes them too (the openai client's extra_body).
    top_k = field(body, "top_k", (int,), lambda v: v >= 0, "an integer >= 0 (0: no limit)")
    penalty = field(body, "repetition_penalty", NUMBER, lambda v: 0 < v <= 10, "a number above 0 (1: off)")
    seed = field(body, "seed", (int,), what="an integer")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and len(stop) <= 4
                                 and all(isinstance(s, str) and s for s in stop)):
        raise bad("'stop' must be a non-empty string or a list of at most 4 of them.", param="stop")
    gen = replace(defaults,
                  temperature=defaults.temperature if temperature is None else float(temperature),
                  top_p=defaults.top_p if top_p is None else float(top_p),
                  top_k=defaults.top_k if top_k is None else top_k,
                  repetition_penalty=defaults.repetition_penalty if penalty is None else float(penalty),
                  seed=defaults.seed if seed is None else seed)
    return gen, stop or []


def budget(body: dict, prompt_tokens: int, defaults: GenArgs, serve, context: int, param: str) -> int:
    """The request's max_tokens, checked against the server's limits (`serve`: ServeArgs) and the model's context."""
    if prompt_tokens > serve.max_prompt_tokens:
        raise bad(f"The prompt is {prompt_tokens} tokens; this server accepts at most {serve.max_prompt_tokens} "
                  f"(--serve.max_prompt_tokens). Shorten it.", param=param, code="context_length_exceeded")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    asked = field(body, name, (int,), lambda v: v >= 1, "an integer >= 1")
    if asked is not None and asked > serve.max_tokens:
        raise bad(f"'{name}' is {asked}; this server allows at most {serve.max_tokens} (--serve.max_tokens).",
                  param=name)
    if asked is not None and prompt_tokens + asked > context:
        raise bad(f"The model's context is {context} tokens, but the prompt ({prompt_tokens}) plus {name} "
                  f"({asked}) needs {prompt_tokens + asked}. Shorten the prompt or lower {name}.",
                  param=name, code="context_length_exceeded")
    room = min(defaults.max_new_tokens, serve.max_tokens, context - prompt_tokens)
    if asked is None and room < 1:
        raise bad(f"The prompt ({prompt_tokens} tokens) fills the model's context of {context} tokens: "
                  f"no room for an answer. Shorten it.", param=param, code="context_length_exceeded")
    return asked if asked is not None else room


def to_messages(value) -> list[dict]:
    """OpenAI messages -> the engine's {"role", "content": str}: text parts joined, `developer` read as system,
    back-to-back turns of one role merged (the templates expect user and assistant to alternate)."""
    if not isinstance(value, list) or not value:
        raise bad("'messages' must be a non-empty list of {\"role\", \"content\"} objects.", param="messages")
    out: list[dict] = []
    for i, m in enumerate(value):
        role = m.get("role") if isinstance(m, dict) else None
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise bad(f"messages[{i}]: role must be system, user or assistant (tools are not supported); "
                      f"got {json.dumps(role)[:40]}.", param=f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad(f"messages[{i}]: only text content parts are supported.", param=f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}]: content must be a string or a list of text parts.",
                      param=f"messages[{i}].content")
        if out and out[-1]["role"] == role:
            out[-1]["content"] += "\n\n" + content
        else:
            out.append({"role": role, "content": content})
    return out


MAX_DEPTH = 64  # OpenAI request bodies nest about 6 levels deep; far deeper only aims at recursive code


async def read_json(request, limit: int) -> dict:
    """The request's JSON object, refusing bodies over `limit` bytes before reading them whole.

    Only `Content-Type: application/json` is read: a web page can POST text/plain or a form to a server on
    localhost from another site without a CORS preflight, but not JSON, so this keeps other sites' pages out."""
    from starlette.requests import ClientDisconnect

    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise APIError(415, f"Send the body as JSON, with the header `Content-Type: application/json` (got "
                            f"{json.dumps(media_type[:60]) if media_type else 'none'}).", code="unsupported_media_type")
    declared = request.headers.get("content-length", "")
    too_big = ("The request body is {} bytes; this server accepts at most {} (--serve.max_body_bytes). "
               "Send a shorter prompt.")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, too_big.format(int(declared), limit), code="request_too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, too_big.format(f"more than {limit}", limit), code="request_too_large")
            chunks.append(chunk)
    except ClientDisconnect:  # gone mid-body: nobody reads the answer, but the request log says what happened
        raise APIError(499, "The client closed the connection before sending the whole body.") from None
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"The request body is not valid JSON ({e}).") from None
    except RecursionError:
        raise bad(f"The request body is nested too deeply (at most {MAX_DEPTH} levels).") from None
    if not isinstance(body, dict):
        raise bad("The request body must be a JSON object.")
    check_tree(body)
    return body


def check_tree(body: dict) -> None:
    """A 400 for JSON nested deeper than MAX_DEPTH (recursive code, such as the log's scrubber, would crash on
    it) or holding a lone surrogate: the escape "\\ud800" without its pair parses, but is no Unicode text that a
    tokenizer or a log could encode. Walked with a stack, so the check itself cannot recurse too deeply."""
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise bad(f"The request body is nested too deeply (at most {MAX_DEPTH} levels).")
            stack.extend((v, depth + 1) for v in ([*value, *value.values()] if isinstance(value, dict) else value))
        elif isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise bad("The request body holds a lone surrogate (a \\ud800-\\udfff escape without its pair): "
                          "not valid Unicode text.") from None


# ------------------------------------------------------------------------------------------ responses

def finish_reason(result) -> str:
    """The engine's finish reason as clients know it: the repetition guard's cut reads as a normal stop."""
    return "length" if result.finish_reason == "length" else "stop"


def usage(result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def completion(chat: bool, rid: str, created: int, model: str, result, sources: Optional[list] = None) -> dict:
    """A whole `chat.completion` or `text_completion` body; `sources` (knowledge-base passages) as a top-level
    field that OpenAI clients keep as an extra (`response.model_extra["sources"]`)."""
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                  "finish_reason": finish_reason(result)}
    else:
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish_reason(result)}
    body = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": [choice], "usage": usage(result)}
    if sources is not None:
        body["sources"] = sources
    return body


def chunk(chat: bool, rid: str, created: int, model: str, text: Optional[str] = None, *, role: bool = False,
          finish: Optional[str] = None, with_usage: bool = False, counts: Optional[dict] = None,
          sources: Optional[list] = None) -> dict:
    """One streamed chunk: the role (first chat chunk), a text delta, the finish reason (text None), or with
    `counts` the usage chunk (no choices). With `with_usage` (stream_options.include_usage) every chunk carries a
    `usage` key, null until the last, as OpenAI's do. `sources` goes on the chunk with the finish reason."""
    if counts is not None:
        choices = []
    elif chat:
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
    data = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": choices}
    if with_usage or counts is not None:
        data["usage"] = counts
    if sources is not None:
        data["sources"] = sources
    return data


def sse(data: dict) -> str:
    """A server-sent event line pair."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
