"""Preference pairs and labelled answers -> the datasets the preference stages train on. One rule for all of
them (data/prepare.py `fit_pair` + `fit_records`): a prompt too long for the limits loses its oldest exchanges
(the system message stays). If that is not enough, `--data.overlong truncate` (the default) cuts the middle of the
last user turn and then the tails of the replies at max_length (a cut reply has no end-of-turn token to learn),
while `drop` drops the record. Either way it is counted. Each trainer then takes its own row shape:

    reward_pairs_dataset   rm            Dataset(chosen_ids, rejected_ids), each cut at its end-of-turn token
    preference_dataset     orpo, simpo   Dataset(chosen_/rejected_ input_ids, labels): only the final reply trains
    message_pairs_dataset  dpo           Dataset(prompt, chosen, rejected) as messages (TRL tokenizes them)
    labelled_dataset       kto           Dataset(prompt, completion, label) as messages
"""

from __future__ import annotations

from medgpt.data.prepare import fit_pair, fit_records
from medgpt.data.templates import IGNORE_INDEX, encode, encode_prompt
from medgpt.utils import MedGPTError, log


def scored_ids(messages: list[dict], template, tokenizer) -> list[int] | None:
    """The ids a reward model scores for a conversation ending with an assistant reply: everything up to and
    including that reply's end-of-turn token (the template's separator after it is not generated, so not scored).
    None when the conversation has no trained reply."""
    enc = encode(messages, template, tokenizer)
    if enc is None:
        return None
    last = max(i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX)
    return enc.input_ids[:last + 1]


def reward_pairs_dataset(records: list[dict], template, tokenizer, max_length: int, what: str = "train",
                         overlong: str = "truncate"):
    """Preference records -> Dataset(chosen_ids, rejected_ids), the pre-tokenized form RewardTrainer takes as is.

    Too long for max_length: see the module docstring (a cut reply is scored at its last kept token)."""
    from datasets import Dataset

    def fit(rec):
        prompt, how = fit_pair(rec, template, tokenizer, max_length, overlong=overlong)
        if prompt is None:
            return None, ""
        chosen = scored_ids(prompt + rec["chosen"], template, tokenizer)
        rejected = scored_ids(prompt + rec["rejected"], template, tokenizer)
        ok = chosen is not None and rejected is not None
        return ({"chosen_ids": chosen[:max_length], "rejected_ids": rejected[:max_length]} if ok else None), how

    rows = fit_records(records, fit, what=what, unit="pairs", limits=f"--train.max_length {max_length}")
    n_tokens = sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
    log(f"{what}: {len(rows)} pairs, {n_tokens:,} tokens")
    return Dataset.from_list(rows)


def _runs(labels: list[int]) -> int:
    """Number of contiguous trained stretches (one per assistant turn: role headers between turns never train)."""
    return sum(1 for i, x in enumerate(labels) if x != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX))


def encode_response(prompt: list[dict], response: list[dict], template, tokenizer) -> tuple[list, list] | None:
    """ids, labels of prompt + response where only the response trains; None if nothing of it trains.

    The prompt's ids (rendered with the generation prompt) are normally an exact prefix of the full ids. If BPE
    merges across the prompt/reply boundary they are not: we then mask the common prefix only; the merged token
    starts inside the prompt, so `encode` already leaves it untrained. Either way the result must have exactly
    one trained stretch per response turn; a template that renders the prompt differently once a reply follows
    (so earlier turns would leak into the loss) is refused.
    """
    enc = encode(prompt + response, template, tokenizer)  # no max_length: see the module docstring
    if enc is None:
        return None
    prompt_ids = encode_prompt(prompt, template, tokenizer)
    n = 0
    for a, b in zip(prompt_ids, enc.input_ids):
        if a != b:
            break
        n += 1
    labels = [IGNORE_INDEX] * n + enc.labels[n:]
    if _runs(labels) == 0:
        return None
    if _runs(labels) != sum(m["role"] == "assistant" for m in response):
        raise MedGPTError(
            "This chat template renders a prompt differently once a reply follows it (the prompt's tokens are not "
            "a prefix of prompt + reply), so the reply to train on cannot be located. Pick a named template with "
            "--template NAME (e.g. chatml) instead of the tokenizer's own.")
    return enc.input_ids, labels


def encode_pair(record: dict, template, tokenizer, max_length: int, overlong: str = "truncate") -> tuple[dict | None, str]:
    """(row, how): the tokenized pair, or None if it cannot fit; how: what fitting took (`fit_pair`).

    Too long: the prompt loses its oldest exchanges first (`fit_prompt`, the rule every preference stage uses),
    then, with overlong="truncate", the middle of its last turn and the replies' tails."""
    prompt, how = fit_pair(record, template, tokenizer, max_length, overlong=overlong)
    if prompt is None:
        return None, ""
    chosen = encode_response(prompt, record["chosen"], template, tokenizer)
    rejected = encode_response(prompt, record["rejected"], template, tokenizer)
    if chosen is None or rejected is None:
        return None, ""  # a reply with nothing to train (cannot happen with a well-formed record)
    n = max_length
    return {"chosen_input_ids": chosen[0][:n], "chosen_labels": chosen[1][:n],
            "rejected_input_ids": rejected[0][:n], "rejected_labels": rejected[1][:n]}, how


def preference_dataset(records: list[dict], template, tokenizer, max_length: int, what: str = "train",
                       overlong: str = "truncate"):
    """Preference records -> Dataset(chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels)."""
    from datasets import Dataset

    rows = fit_records(records, lambda rec: encode_pair(rec, template, tokenizer, max_length, overlong), what=what,
                       unit="pairs", limits=f"--train.max_length {max_length}")
    n_tokens = sum(len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in rows)
    log(f"{what}: {len(rows)} preference pairs, {n_tokens:,} tokens (chosen + rejected)")
    return Dataset.from_list(rows)


def message_pairs_dataset(records: list[dict], template, tokenizer, max_length: int, max_prompt_length: int | None,
                          what: str = "train", overlong: str = "truncate"):
    """Preference records -> Dataset(prompt, chosen, rejected) of messages whose prompt fits (see fit_prompt); TRL
    cuts replies that still overflow at max_length (its keep_start truncation of the tokenized pair)."""
    from datasets import Dataset

    for i, rec in enumerate(records, 1):
        if len(rec["chosen"]) != 1 or len(rec["rejected"]) != 1:
            raise MedGPTError(f"{what} pair {i}: chosen and rejected must each be one assistant reply, got "
                              f"{len(rec['chosen'])} and {len(rec['rejected'])} messages. Put earlier turns "
                              f"in the prompt.")

    def fit(rec):
        prompt, how = fit_pair(rec, template, tokenizer, max_length, max_prompt_length, overlong=overlong)
        row = {"prompt": prompt, "chosen": rec["chosen"], "rejected": rec["rejected"]} if prompt is not None else None
        return row, how

    limits = f"--train.max_length {max_length}" + (f" / --dpo.max_prompt_length {max_prompt_length}"
                                                   if max_prompt_length else "")
    rows = fit_records(records, fit, what=what, unit="pairs", limits=limits)
    log(f"{what}: {len(rows)} preference pairs")
    return Dataset.from_list(rows)


def labelled_dataset(examples: list[dict], template, tokenizer, max_length: int, max_prompt_length: int | None,
                     what: str = "train", overlong: str = "truncate"):
    """KTO examples -> Dataset(prompt, completion, label) whose prompts fit (see fit_prompt); TRL cuts completions
    that still overflow at max_length."""
    from datasets import Dataset

    def fit(ex):
        prompt, how = fit_pair(ex, template, tokenizer, max_length, max_prompt_length, ("completion",), overlong)
        return ({**ex, "prompt": prompt} if prompt is not None else None), how

    limits = f"--train.max_length {max_length}" + (f" / --kto.max_prompt_length {max_prompt_length}"
                                                   if max_prompt_length else "")
    rows = fit_records(examples, fit, what=what, unit="examples", limits=limits)
    n_good = sum(r["label"] for r in rows)
    log(f"{what}: {len(rows)} examples, {n_good} desirable, {len(rows) - n_good} undesirable")
    return Dataset.from_list(rows)
