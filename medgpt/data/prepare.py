"""Canonical records -> tokenized `datasets.Dataset`s that trainers consume.

Validation happens before this (see validate.load_records), so every record here is well formed. These
functions only tokenize, and report what they had to drop and why. Text too long to fit is dropped by its
character count before the tokenizer sees it (`char_limit`): tokenizing one 50 MB record takes gigabytes.
"""

from __future__ import annotations

import functools
from typing import Iterable

from medgpt.data.templates import IGNORE_INDEX, encode
from medgpt.utils import MedGPTError, log


@functools.lru_cache(maxsize=8)
def _longest_entry(tokenizer, vocab_size: int) -> int:
    return max((len(t) for t in tokenizer.get_vocab()), default=1)


def char_limit(tokenizer, max_tokens: int) -> int:
    """Characters that cannot fit in `max_tokens` tokens: no token covers more characters than its vocabulary
    entry spells (byte-level, SentencePiece and WordPiece entries are at least as long as the text they cover);
    x4 leaves room for normalizers that merge characters (NFC composes at most 3 into 1)."""
    return 4 * max_tokens * _longest_entry(tokenizer, len(tokenizer))


def _chars(messages: list[dict]) -> int:
    return sum(len(m["content"]) for m in messages)


def _within(messages: list[dict], limit: int) -> list[dict]:
    """The longest prefix of whole exchanges with at most `limit` characters of content ([] when not even the
    first): `encode` would drop the rest too, but only after tokenizing all of it."""
    total, end = 0, 0
    for i, m in enumerate(messages, 1):
        total += len(m["content"])
        if total > limit:
            break
        end = i if m["role"] == "assistant" else end
    return messages[:end]


# What happened to records that did not fit, per split and kind, since the run started (train/run.py resets it
# and writes it into metrics.json): {"train_records_truncated": 3, "train_records_dropped": 1, ...}.
FIT_COUNTS: dict[str, int] = {}

# How fit_records words each kind in the log.
_FIT_KINDS = {
    "shortened": "lost their oldest prompt turns",
    "truncated": "were truncated (--data.overlong truncate: a prompt too long on its own loses the middle of its "
                 "last turn, an answer past the limit its tail, which then has no end-of-turn token to learn)",
    "cut_short": "lost their last exchanges (--data.overlong drop keeps whole exchanges only)",
}


def fit_records(records: list, fit, *, what: str, unit: str, limits: str) -> list[dict]:
    """The rule every stage applies to records that may not fit its length limits, in one place.

    `fit(record)` returns (row, how): the encoded row, or None when the record cannot fit at all; `how` says
    what fitting took: "" (nothing), or a key of _FIT_KINDS. Every kind and every dropped record is counted in the
    log (`unit`: "conversations", "pairs", ...; `limits`: the flags that set the limits) and in FIT_COUNTS; no
    record fitting at all is an error. Returns the rows."""
    rows, counts = [], {}
    for rec in records:
        row, how = fit(rec)
        how = "dropped" if row is None else how
        if how:
            counts[how] = counts.get(how, 0) + 1
        if row is not None:
            rows.append(row)
    for how, n in counts.items():
        FIT_COUNTS[f"{what}_records_{how}"] = FIT_COUNTS.get(f"{what}_records_{how}", 0) + n
        if how != "dropped":
            log(f"{what}: {n} of {len(records)} {unit} {_FIT_KINDS[how]} to fit {limits}")
    if counts.get("dropped"):
        log(f"{what}: dropped {counts['dropped']} of {len(records)} {unit} that do not fit {limits} even "
            f"shortened (raise it to keep them)")
    if not rows:
        raise MedGPTError(f"{what}: none of the {len(records)} {unit} fits {limits}. Raise it.")
    return rows


def fit_pair(record: dict, template, tokenizer, max_length: int | None, max_prompt_length: int | None = None,
             replies: tuple[str, ...] = ("chosen", "rejected"), overlong: str = "drop") -> tuple[list[dict] | None, str]:
    """(prompt, how): a preference (or KTO) record's prompt fitted to the limits with each of its replies
    (`fit_prompt`), or (None, ""). how: "shortened" when it lost turns, "truncated" when its last turn was cut
    (overlong="truncate" only; replies that still overflow are then cut at max_length by the caller, or by TRL).
    The one pair rule of rm, dpo, orpo, simpo and kto."""
    answers = [record[r] for r in replies]
    prompt = fit_prompt(record["prompt"], answers, template, tokenizer, max_length, max_prompt_length, overlong)
    if prompt is None:
        return None, ""
    return prompt, fit_kind(prompt, record["prompt"])


def fit_kind(prompt: list[dict], original: list[dict]) -> str:
    """What fit_prompt did: "truncated" when it had to cut the last user turn (cut_prompt builds a new one; the
    replies may then overflow too), "shortened" when it dropped turns, "" when nothing."""
    if prompt[-1] is not original[-1]:
        return "truncated"
    return "shortened" if len(prompt) < len(original) else ""


def _clip(messages: list[dict], limit: int) -> list[dict]:
    """The conversation cut at `limit` characters of content (text beyond them can never fit, see char_limit), ending
    with an assistant turn (possibly cut); [] when no assistant turn starts within the limit."""
    out, total = [], 0
    for m in messages:
        if total >= limit:
            break
        out.append(m if total + len(m["content"]) <= limit else {**m, "content": m["content"][:limit - total]})
        total += len(m["content"])
    while out and out[-1]["role"] != "assistant":
        out.pop()
    return out


def _head(enc, max_length: int) -> dict | None:
    """The first max_length tokens of an encoded conversation, without trailing untrained tokens (a cut-off user
    turn); None when nothing in them trains."""
    labels = enc.labels[:max_length]
    last = max((i for i, x in enumerate(labels) if x != IGNORE_INDEX), default=-1)
    return {"input_ids": enc.input_ids[:last + 1], "labels": labels[:last + 1]} if last >= 0 else None


def truncate_chat(messages: list[dict], template, tokenizer, max_length: int) -> dict | None:
    """--data.overlong truncate for a conversation longer than max_length: its first max_length tokens (as TRL's
    keep_start), so every exchange that fits trains whole and the next one's answer trains up to the cut, without an
    end-of-turn token. When the first prompt alone fills max_length, its last user turn loses its middle first, so
    the first answer keeps at least half of max_length (`fit_prompt`). None when even that cannot fit (a system
    message longer than max_length)."""
    limit = char_limit(tokenizer, max_length)
    clipped = _clip(messages, limit)
    row = _head(encode(clipped, template, tokenizer), max_length) if clipped else None
    if row is not None:
        return row
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    answer = _clip(messages[first:first + 1], limit)
    prompt = fit_prompt(messages[:first], [answer], template, tokenizer, max_length, None, "truncate")
    return _head(encode(prompt + answer, template, tokenizer), max_length) if prompt and answer else None


def chat_dataset(records: list[dict], template, tokenizer, max_length: int, what: str = "train",
                 overlong: str = "truncate"):
    """Records with `messages` -> Dataset(input_ids, labels). Conversations longer than max_length are truncated
    (`truncate_chat`), or with overlong="drop" keep their leading whole exchanges (dropped when not even the first
    fits); either way counted (fit_records)."""
    from datasets import Dataset

    limit = char_limit(tokenizer, max_length)

    def fit(rec):
        messages, enc = rec["messages"], None
        if _chars(messages) <= limit:
            enc = encode(messages, template, tokenizer)
            if enc is not None and len(enc.input_ids) <= max_length:
                return {"input_ids": enc.input_ids, "labels": enc.labels}, ""
        if overlong == "truncate":
            # Already encoded whole (nothing to clip): its head is truncate_chat's first answer, without a second encode.
            row = _head(enc, max_length) if enc is not None else None
            return row or truncate_chat(messages, template, tokenizer, max_length), "truncated"
        messages = _within(messages, limit)
        enc = encode(messages, template, tokenizer, max_length=max_length) if messages else None
        return ({"input_ids": enc.input_ids, "labels": enc.labels} if enc is not None else None), "cut_short"

    rows = fit_records(records, fit, what=what, unit="conversations", limits=f"--train.max_length {max_length}")
    n_trained = sum(sum(1 for x in r["labels"] if x != IGNORE_INDEX) for r in rows)
    n_total = sum(len(r["input_ids"]) for r in rows)
    log(f"{what}: {len(rows)} conversations, {n_total:,} tokens, {n_trained:,} trained ({n_trained / n_total:.0%})")
    return Dataset.from_list(rows)


def text_blocks(texts: Iterable[str], tokenizer, block_size: int):
    """Continued-pretraining blocks: documents joined with EOS, cut into `block_size` pieces (the tail that
    does not fill a block is dropped). Yields lists of ids, so a corpus never has to fit in memory."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise MedGPTError("this tokenizer has no eos token, so documents cannot be separated. Set one in its "
                          "tokenizer_config.json (eos_token).")
    buf: list[int] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
            ids = [tokenizer.bos_token_id] + ids
        buf.extend(ids)
        buf.append(eos)
        while len(buf) >= block_size:
            yield buf[:block_size]
            buf = buf[block_size:]


def fit_prompt(prompt: list[dict], replies: list[list[dict]], template, tokenizer, max_length: int | None,
               max_prompt_length: int | None = None, overlong: str = "drop") -> list[dict] | None:
    """The prompt of a preference/KTO/online-RL record, shortened by whole turns until it fits; None when it cannot.

    Fits means: prompt + each reply is at most `max_length` tokens, and the prompt with its generation prompt is
    at most `max_prompt_length` (when set). The oldest (user, assistant) exchanges go first; a system message and
    the last user turn always stay. Replies are never cut here: a reply without its end-of-turn token would teach
    the model not to stop. (`encode`'s own truncation drops turns from the end, which would cut the reply away.)

    overlong="truncate": when even the last user turn does not fit, it loses its middle (`cut_prompt`) until the
    prompt leaves the longest reply its length or half of max_length, whichever is more; the caller then cuts
    replies that still overflow at max_length.
    """
    from medgpt.data.templates import encode_prompt

    head = prompt[:1] if prompt[0]["role"] == "system" else []
    turns = prompt[len(head):]
    # Character counts first (see char_limit), so text that cannot fit is never tokenized.
    limit = char_limit(tokenizer, max_length) if max_length is not None else None
    prompt_limit = char_limit(tokenizer, max_prompt_length) if max_prompt_length is not None else None
    for start in range(0, len(turns), 2):
        candidate = head + turns[start:]
        if max_prompt_length is not None and (_chars(candidate) > prompt_limit or len(
                encode_prompt(candidate, template, tokenizer)) > max_prompt_length):
            continue
        if max_length is None or all(_chars(candidate + reply) <= limit and
                                     _n_tokens(candidate + reply, template, tokenizer) <= max_length
                                     for reply in replies):
            return candidate
    if overlong != "truncate":
        return None
    budget = max_prompt_length or max_length
    if max_length is not None:
        longest = max((_reply_tokens(r, template, tokenizer, limit) for r in replies), default=0)
        budget = min(budget, max(max_length - longest, max_length - max_length // 2))
    return cut_prompt(head + turns[-1:], template, tokenizer, budget)


def _reply_tokens(reply: list[dict], template, tokenizer, limit: int) -> int:
    """Tokens a reply adds after a prompt (its text cut at `limit` characters first: more never fits)."""
    from medgpt.data.templates import encode_prompt

    probe = [{"role": "user", "content": "?"}]
    return _n_tokens(probe + _clip(reply, limit), template, tokenizer) - len(encode_prompt(probe, template, tokenizer))


def _cut_middle(text: str, keep: int) -> str:
    """`text` keeping `keep` of its characters, half from each end, joined by an ellipsis (the middle is cut:
    instructions tend to stand at the start of a long prompt and the question at its end)."""
    if keep >= len(text):
        return text
    head = (keep + 1) // 2
    return text[:head] + " … " + text[len(text) - (keep - head):]


def cut_prompt(prompt: list[dict], template, tokenizer, budget: int) -> list[dict] | None:
    """The prompt with the middle of its last user turn cut so that it renders, with the generation prompt, into at
    most `budget` tokens; None when not even an empty last turn fits (a system message that long)."""
    from medgpt.data.templates import encode_prompt

    last = prompt[-1]

    def keeping(k: int) -> list[dict]:
        return prompt[:-1] + [{**last, "content": _cut_middle(last["content"], k)}]

    def fits(k: int) -> bool:
        return len(encode_prompt(keeping(k), template, tokenizer)) <= budget

    lo, hi = 0, min(len(last["content"]), char_limit(tokenizer, budget))
    if fits(hi):
        return keeping(hi)
    if not fits(0):
        return None
    while hi - lo > 1:  # fits(lo) and not fits(hi): the most characters that fit
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return keeping(lo)


def _n_tokens(messages: list[dict], template, tokenizer) -> int:
    enc = encode(messages, template, tokenizer)  # no max_length: the whole conversation
    return len(enc.input_ids) if enc is not None else 0


def prompt_dataset(records: list[dict], template, tokenizer, max_prompt_length: int, what: str = "train",
                   overlong: str = "truncate"):
    """Prompt records -> Dataset(prompt[, answer]) for TRL's online trainers (GRPO, RLOO), which render each prompt
    with the tokenizer's chat template themselves (set it to ours with `apply_template` first). Prompts longer
    than max_prompt_length tokens lose their oldest exchanges (`fit_prompt`); one whose last user turn alone does
    not fit loses its middle (overlong="truncate") or is dropped ("drop"); counted either way. `answer` is kept
    (None where a record has none) for answer_match."""
    from datasets import Dataset

    keep_answer = any("answer" in r for r in records)

    def fit(rec):
        prompt = fit_prompt(rec["prompt"], [], template, tokenizer, None, max_prompt_length, overlong)
        if prompt is None:
            return None, ""
        return {"prompt": prompt, **({"answer": rec.get("answer")} if keep_answer else {})}, fit_kind(prompt, rec["prompt"])

    rows = fit_records(records, fit, what=what, unit="prompts", limits=f"{max_prompt_length} tokens "
                       f"(--train.max_length minus the completion length)")
    log(f"{what}: {len(rows)} prompts" + (f", {sum(r['answer'] is not None for r in rows)} with a reference answer"
                                          if keep_answer else ""))
    return Dataset.from_list(rows)


# ----------------------------------------------------------------------------- packing

def pack(dataset, max_length: int):
    """Best-fit-decreasing packing of tokenized samples into rows of at most `max_length` tokens.

    Each row keeps `seq_lengths`, so `PackedCollator` can restart position ids per sample: transformers then
    builds a block-diagonal causal mask (sdpa, eager) or variable-length kernels (flash-attention) and no token
    attends to another sample. Rows stay separate in the batch, so attention costs B x L^2, never (B*L)^2.
    """
    import bisect

    from datasets import Dataset

    samples = sorted(range(len(dataset)), key=lambda i: -len(dataset[i]["input_ids"]))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row index), kept sorted for the best-fit search
    lengths = [len(x) for x in dataset["input_ids"]]
    for i in samples:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, r = free.pop(k)
            rows[r].append(i)
            bisect.insort(free, (space - n, r))
        else:
            rows.append([i])
            bisect.insort(free, (max_length - n, len(rows) - 1))
    ids, labels = dataset["input_ids"], dataset["labels"]
    packed = [{"input_ids": [t for i in row for t in ids[i]], "labels": [t for i in row for t in labels[i]],
               "seq_lengths": [lengths[i] for i in row]} for row in rows]
    log(f"packed {len(dataset)} samples into {len(packed)} rows of <= {max_length} tokens "
        f"({sum(lengths) / (len(packed) * max_length):.0%} full)")
    return Dataset.from_list(packed)


class PackedCollator:
    """Right-pads rows of packed samples; position ids restart at every sample (and at the padding, which thus
    forms its own block and never mixes with real tokens). No attention mask: transformers derives the
    per-sample mask from the position ids. The first token of each sample is never a target, so no sample
    learns to predict across a boundary. With real_tokens, each batch also says how many of its tokens are not
    padding and how many samples it holds (`real_tokens`, `real_samples`; train/speed.py counts them and takes
    them out before the model sees the batch).

    flatten: the batch becomes one row holding all its samples, with no padding at all (padding-free, as TRL's
    `padding_free`). Same samples, same loss; only for a model that attends per sample (model/attention.py on
    CPU), where a longer row costs no more attention and the padding it saves is pure gain."""

    def __init__(self, pad_token_id: int, real_tokens: bool = False, flatten: bool = False):
        self.pad_token_id = pad_token_id
        self.real_tokens = real_tokens
        self.flatten = flatten

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        real = sum(len(e["input_ids"]) for e in examples)
        samples = sum(len(e.get("seq_lengths") or [0]) for e in examples)
        if self.flatten and len(examples) > 1:
            examples = [{"input_ids": [t for e in examples for t in e["input_ids"]],
                         "labels": [t for e in examples for t in e["labels"]],
                         "seq_lengths": [n for e in examples for n in e.get("seq_lengths") or [len(e["input_ids"])]]}]
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        pos = torch.zeros((len(examples), width), dtype=torch.long)
        for r, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[r, :n] = torch.tensor(e["input_ids"])
            labels[r, :n] = torch.tensor(e["labels"])
            start = 0
            for length in list(e.get("seq_lengths") or [n]) + [width - n]:
                pos[r, start:start + length] = torch.arange(length)
                if start < n:
                    labels[r, start] = IGNORE_INDEX
                start += length
        # use_cache=False: with a KV cache present, transformers skips packed-sequence detection and the samples
        # of a row would attend to each other (the Trainer turns the cache off too; this keeps any caller safe).
        batch = {"input_ids": ids, "labels": labels, "position_ids": pos, "use_cache": False}
        if self.real_tokens:
            batch["real_tokens"], batch["real_samples"] = real, samples
        return batch
