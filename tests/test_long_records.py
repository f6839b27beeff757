"""Records far longer than --train.max_length are dropped by character count, before the tokenizer sees them:
tokenizing one 50 MB record took 14.6 GB of memory."""

from __future__ import annotations

import pytest

from medgpt.data.prepare import char_limit, chat_dataset, fit_prompt
from medgpt.data.templates import encode, get_template


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


@pytest.fixture()
def seen(tokenizer, monkeypatch):
    """Lengths of every text the tokenizer is asked to tokenize."""
    lengths, original = [], type(tokenizer).__call__

    def call(self, text, *args, **kwargs):
        lengths.append(len(text) if isinstance(text, str) else max(map(len, text)))
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", call)
    return lengths


def test_char_limit_is_safe(tokenizer):
    """The densest text there is (the longest vocabulary entry, repeated) still needs more than max_length
    tokens at char_limit characters, so nothing that could fit is ever dropped."""
    piece = tokenizer.convert_tokens_to_string([max(tokenizer.get_vocab(), key=len)])
    limit = char_limit(tokenizer, 64)
    text = (piece * (limit // len(piece) + 1))[:limit + 1]
    assert len(tokenizer(text, add_special_tokens=False).input_ids) > 64
    assert limit < 100_000  # and it is small enough to matter


def test_chat_dataset_never_tokenizes_a_huge_record(tokenizer, seen, capsys):
    template, huge = get_template("chatml"), "胸痛。" * 100_000
    records = [{"messages": [u("头痛怎么办？"), a("多休息。")]},
               {"messages": [u(huge), a("请就医。")]},  # drop: cannot fit, dropped and counted
               {"messages": [u("发烧了。"), a("多喝水。"), u(huge), a("请就医。")]}]  # drop: keeps exchange 1
    ds = chat_dataset(records, template, tokenizer, max_length=64, overlong="drop")
    assert len(ds) == 2 and max(seen) < char_limit(tokenizer, 64)
    assert ds[1]["input_ids"] == encode(records[2]["messages"][:2], template, tokenizer).input_ids
    out = capsys.readouterr().out
    assert "dropped 1 of 3 conversations" in out and "1 of 3 conversations lost their last exchanges" in out
    seen.clear()
    ds = chat_dataset(records, template, tokenizer, max_length=64)  # truncate: every record trains
    assert len(ds) == 3 and max(seen) < 2 * char_limit(tokenizer, 64)  # the text is cut at the limit first


def test_fit_prompt_never_tokenizes_a_huge_reply_or_prompt(tokenizer, seen):
    template, huge = get_template("chatml"), "x" * 300_000
    assert fit_prompt([u("q")], [[a(huge)]], template, tokenizer, 64) is None
    assert fit_prompt([u(huge), a("ok"), u("q")], [[a("r")]], template, tokenizer, 64) == [u("q")]
    assert fit_prompt([u(huge)], [], template, tokenizer, None, 32) is None
    assert not seen or max(seen) < char_limit(tokenizer, 64)
    cut = fit_prompt([u(huge)], [[a("r")]], template, tokenizer, 64, None, "truncate")
    assert cut and " … " in cut[0]["content"] and max(seen) < 2 * char_limit(tokenizer, 64)
