"""--data.overlong: records longer than --train.max_length are truncated (the default, as TRL's keep_start and
MedicalGPT do) or, with `drop`, keep whole exchanges only; counted either way (log and metrics.json)."""

from __future__ import annotations

import json

import pytest

from medgpt.data import prepare
from medgpt.data.pairs import encode_pair, reward_pairs_dataset, scored_ids
from medgpt.data.prepare import chat_dataset, cut_prompt, fit_prompt, prompt_dataset
from medgpt.data.templates import IGNORE_INDEX, encode, encode_prompt, get_template

CHATML = get_template("chatml")


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


LONG_ANSWER = " ".join(f"Step {i}: rest, drink water and check the temperature." for i in range(40))
LONG_PROMPT = "Note begins. " + " ".join(f"Day {i} the fever was {37 + i % 3} degrees." for i in range(60)) + \
    " What should I do now?"


@pytest.fixture(autouse=True)
def _counts():
    prepare.FIT_COUNTS.clear()
    yield
    prepare.FIT_COUNTS.clear()


def test_a_long_answer_trains_up_to_the_cut_without_its_end_of_turn(tokenizer, capsys):
    """keep_start: the first max_length tokens of the whole conversation, labels unchanged, so the cut answer has no
    end-of-turn token to learn."""
    messages = [u("How do I treat a fever?"), a(LONG_ANSWER)]
    full = encode(messages, CHATML, tokenizer)
    assert len(full.input_ids) > 64
    ds = chat_dataset([{"messages": messages}], CHATML, tokenizer, max_length=64)
    assert ds[0]["input_ids"] == full.input_ids[:64] and ds[0]["labels"] == full.labels[:64]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ds[0]["input_ids"].count(im_end) == 1  # the user turn's; the answer's was cut away
    assert "1 of 1 conversations were truncated (--data.overlong truncate" in capsys.readouterr().out
    assert prepare.FIT_COUNTS == {"train_records_truncated": 1}
    with pytest.raises(Exception, match="none of the 1 conversations fits"):
        chat_dataset([{"messages": messages}], CHATML, tokenizer, max_length=64, overlong="drop")
    assert prepare.FIT_COUNTS["train_records_dropped"] == 1


def test_whole_exchanges_train_whole_and_the_next_answer_up_to_the_cut(tokenizer):
    messages = [u("Fever?"), a("Drink water."), u("And then?"), a(LONG_ANSWER)]
    full = encode(messages, CHATML, tokenizer)
    first = encode(messages[:2], CHATML, tokenizer)
    ds = chat_dataset([{"messages": messages}], CHATML, tokenizer, max_length=80)
    row = ds[0]
    assert row["input_ids"] == full.input_ids[:80] and row["labels"][:len(first.labels)] == first.labels
    assert sum(x != IGNORE_INDEX for x in row["labels"]) > sum(x != IGNORE_INDEX for x in first.labels)
    # drop keeps the first exchange only, and says so
    ds = chat_dataset([{"messages": messages}], CHATML, tokenizer, max_length=80, overlong="drop")
    assert ds[0]["input_ids"] == first.input_ids
    assert prepare.FIT_COUNTS == {"train_records_truncated": 1, "train_records_cut_short": 1}


def test_a_cut_off_user_turn_is_not_kept(tokenizer):
    """When the cut lands in a user turn, its untrained tokens are not kept: the row ends at the last trained token."""
    messages = [u("Fever?"), a("Drink water."), u(LONG_PROMPT), a("See a doctor.")]
    first = encode(messages[:2], CHATML, tokenizer)
    row = chat_dataset([{"messages": messages}], CHATML, tokenizer, max_length=64)[0]
    last = max(i for i, x in enumerate(first.labels) if x != IGNORE_INDEX)
    assert row["input_ids"] == first.input_ids[:last + 1]


def test_a_prompt_too_long_alone_loses_its_middle_and_the_answer_trains_whole(tokenizer):
    messages = [{"role": "system", "content": "Be careful."}, u(LONG_PROMPT), a("See a doctor today.")]
    row = chat_dataset([{"messages": messages}], CHATML, tokenizer, max_length=96)[0]
    text = tokenizer.decode(row["input_ids"])
    assert len(row["input_ids"]) <= 96
    assert "Be careful." in text and "Note begins." in text and "What should I do now?" in text and " … " in text
    assert text.endswith("See a doctor today.<|im_end|>")  # the answer fits: whole, with its end-of-turn
    assert "Day 30 " not in text


def test_cut_prompt_keeps_the_most_that_fits(tokenizer):
    prompt = [u(LONG_PROMPT)]
    for budget in (24, 40, 77):
        cut = cut_prompt(prompt, CHATML, tokenizer, budget)
        n = len(encode_prompt(cut, CHATML, tokenizer))
        assert n <= budget
        longer = [u(prepare._cut_middle(LONG_PROMPT, len(cut[0]["content"]) - 2))]  # 3 for " … ", +1 character
        assert len(encode_prompt(longer, CHATML, tokenizer)) > budget or len(cut[0]["content"]) >= len(LONG_PROMPT)
    assert cut_prompt([{"role": "system", "content": LONG_PROMPT}, u("q")], CHATML, tokenizer, 16) is None


def test_pairs_keep_the_prompt_budget_and_cut_the_reply_tails(tokenizer):
    """rm and orpo/simpo: the prompt is cut to leave the replies at least half of max_length, then each reply's tail
    is cut at max_length (no end-of-turn); drop refuses the pair."""
    rec = {"prompt": [u(LONG_PROMPT)], "chosen": [a(LONG_ANSWER)], "rejected": [a("No idea.")]}
    row, how = encode_pair(rec, CHATML, tokenizer, 96)
    assert how == "truncated"
    assert len(row["chosen_input_ids"]) == 96 and len(row["rejected_input_ids"]) <= 96
    rejected_text = tokenizer.decode(row["rejected_input_ids"])
    assert rejected_text.rstrip("\n").endswith("No idea.<|im_end|>")  # short reply: whole
    prompt_ids = encode_prompt(fit_prompt(rec["prompt"], [rec["chosen"], rec["rejected"]], CHATML, tokenizer, 96,
                                          None, "truncate"), CHATML, tokenizer)
    assert len(prompt_ids) <= 48 and row["chosen_input_ids"][:len(prompt_ids)] == prompt_ids
    assert all(x != IGNORE_INDEX for x in row["chosen_labels"][len(prompt_ids):])
    assert encode_pair(rec, CHATML, tokenizer, 96, "drop") == (None, "")
    ds = reward_pairs_dataset([rec], CHATML, tokenizer, 96)
    assert len(ds[0]["chosen_ids"]) == 96
    assert ds[0]["rejected_ids"] == scored_ids(fit_prompt(rec["prompt"], [rec["chosen"], rec["rejected"]], CHATML,
                                                          tokenizer, 96, None, "truncate") + rec["rejected"],
                                               CHATML, tokenizer)


def test_oldest_turns_go_before_anything_is_cut(tokenizer):
    rec = {"prompt": [u(LONG_PROMPT), a("Rest."), u("Still hot?")], "chosen": [a("Yes.")], "rejected": [a("No.")]}
    row, how = encode_pair(rec, CHATML, tokenizer, 64)
    assert how == "shortened" and "Note begins" not in tokenizer.decode(row["chosen_input_ids"])


def test_prompts_of_online_rl_are_cut_not_dropped(tokenizer, capsys):
    records = [{"prompt": [u(LONG_PROMPT)]}, {"prompt": [u("Fever?")]}]
    ds = prompt_dataset(records, CHATML, tokenizer, 40)
    assert len(ds) == 2 and len(encode_prompt(ds[0]["prompt"], CHATML, tokenizer)) <= 40
    assert ds[1]["prompt"] == records[1]["prompt"]
    assert prepare.FIT_COUNTS == {"train_records_truncated": 1}
    with pytest.raises(Exception, match="none"):
        prompt_dataset(records[:1], CHATML, tokenizer, 40, overlong="drop")


def test_sft_writes_what_it_truncated_into_metrics(tiny_llama, tmp_path):
    from medgpt.cli import main

    data = tmp_path / "long.jsonl"
    data.write_text("\n".join(json.dumps({"messages": m}) for m in (
        [u("Fever?"), a("Drink water.")], [u("How do I treat a fever?"), a(LONG_ANSWER)])) + "\n")
    out = tmp_path / "out"
    assert main(["sft", "--model.name_or_path", str(tiny_llama), "--data.train_files", str(data), "--template",
                 "chatml", "--train.max_length", "64", "--train.max_steps", "1", "--train.batch_size", "2",
                 "--finetune.type", "full", "--output_dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_records_truncated"] == 1 and metrics["train_records_dropped"] == 0
