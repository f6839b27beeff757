"""Multiple-choice accuracy: which option the model picks, by log-likelihood or by its generated letter.

    medgpt eval --model.name_or_path DIR --eval.mcq_files data/demo/mcq.jsonl                  # loglik, letter
    medgpt eval ... --eval.mcq_target option          # score "B. option text" per byte instead of the letter
    medgpt eval ... --eval.mcq_method generate        # greedy answer, first option letter parsed from it

The prompt is one user turn in the model's chat template: the question, one "A. option" line per option, and an
instruction to answer with the letter (Chinese when the question contains CJK characters):

    <user>  以下哪种疫苗是减毒活疫苗？\nA. 灭活流感疫苗\nB. ...\n请直接回答正确选项的字母。
    <assistant>  C

Scoring (`--eval.mcq_method loglik`, one forward pass per batch, no sampling):
- `--eval.mcq_target letter` (default): the sum log-probability of the letter as the start of the assistant reply;
  the highest wins. This is what an instruction-following model is asked to write, and one pass scores every
  option (each letter is read from the same next-token distribution).
- `--eval.mcq_target option`: the reply "B. option text" (the form `mcq -> chat` records take), its summed
  log-probability divided by its UTF-8 byte length (lm-eval's acc_norm), so long options are not penalised.
The reply is tokenized the way training tokenizes it: rendered with the template after the prompt, then the
tokens after the prompt's own ids are the ones scored.

`--eval.mcq_method generate`: greedy generation (`--eval.mcq_max_new_tokens`), then the chosen letter is parsed
("B", "(B)", "答案：B", "The answer is B", "B. ..."); a reply with no letter counts as wrong ("unparsed").
Ties (equal scores) go to the earlier letter. A prompt longer than the window loses its oldest tokens (counted).
"""

from __future__ import annotations

import math
from dataclasses import replace

from medgpt.data.formats import render_mcq
from medgpt.data.text import has_cjk

INSTRUCTION_EN = "Answer with the letter of the correct option."
INSTRUCTION_ZH = "请直接回答正确选项的字母。"


def mcq_messages(record: dict, system: str | None = None) -> list[dict]:
    """The question as a conversation that ends with the user turn."""
    instruction = INSTRUCTION_ZH if has_cjk(record["question"]) else INSTRUCTION_EN
    messages = [{"role": "user", "content": f"{render_mcq(record)}\n{instruction}"}]
    return ([{"role": "system", "content": system}] if system else []) + messages


def reply_text(record: dict, letter: str, target: str) -> str:
    return letter if target == "letter" else f"{letter}. {record['options'][letter]}"


def _render(engine, messages: list[dict], add_generation_prompt: bool) -> str:
    from medgpt.data.templates import render

    template = engine.template
    if template.from_tokenizer:
        return engine.tokenizer.apply_chat_template(messages, tokenize=False,
                                                    add_generation_prompt=add_generation_prompt)
    return render(template, messages, bos_token=engine.tokenizer.bos_token, eos_token=engine.tokenizer.eos_token,
                  add_generation_prompt=add_generation_prompt).text


def reply_ids(engine, messages: list[dict], prompt_ids: list[int], reply: str) -> list[int]:
    """The ids of `reply` as the assistant's answer after `messages`, tokenized as in training: the whole
    conversation rendered once, cut after the reply text (not its end-of-turn token), minus the prompt's ids.
    Falls back to the reply text (with whatever the template writes before it) tokenized alone when the
    tokenizer merges across the prompt boundary."""
    prompt_text = _render(engine, messages, True)
    full = _render(engine, messages + [{"role": "assistant", "content": reply}], False)
    head = full[len(prompt_text):] if full.startswith(prompt_text) else reply
    reply_part = head[:head.find(reply) + len(reply)] if reply in head else reply
    ids = engine.text_ids(prompt_text + reply_part)
    if ids[:len(prompt_ids)] == prompt_ids and len(ids) > len(prompt_ids):
        return ids[len(prompt_ids):]
    return engine.text_ids(reply_part)


def score_loglik(engine, records: list[dict], target: str = "letter", *, batch_size: int = 16,
                 max_length: int = 2048, system: str | None = None) -> tuple[list[dict], int]:
    """Each record's option scores and pick by log-likelihood: ([{pred, scores}], prompts cut to fit)."""
    from medgpt.eval.scoring import logprobs

    requests, sizes, cut = [], [], 0
    for rec in records:
        messages = mcq_messages(rec, system)
        prompt = engine.prompt_ids(messages)
        replies = {letter: reply_text(rec, letter, target) for letter in rec["options"]}
        conts = [reply_ids(engine, messages, prompt, text) for text in replies.values()]
        cut += len(prompt) + max(len(c) for c in conts) > max_length
        requests.append((prompt, conts))
        sizes.append([len(text.encode("utf-8")) for text in replies.values()])
    scores = logprobs(engine.model, requests, pad_id=engine.pad_id, batch_size=batch_size, max_length=max_length,
                      progress="mcq")
    out = []
    for rec, row, size in zip(records, scores, sizes):
        if target == "option":
            row = [s / n for s, n in zip(row, size)]
        letters = list(rec["options"])
        best = max(range(len(row)), key=lambda i: (row[i], -i))  # ties: the earlier letter
        out.append({"pred": letters[best], "scores": dict(zip(letters, row))})
    return out, cut


def score_generate(engine, records: list[dict], gen, *, batch_size: int = 16, max_new_tokens: int = 16,
                   system: str | None = None) -> tuple[list[dict], int]:
    """Each record's greedy reply and the letter parsed from it (None: no option letter found)."""
    from medgpt.eval.scoring import generate_answers
    from medgpt.train.rewards import chosen_letter

    greedy = replace(gen, temperature=0.0, max_new_tokens=max_new_tokens)
    results, cut = generate_answers(engine, [mcq_messages(r, system) for r in records], greedy, batch_size,
                                    progress="mcq")
    out = []
    for rec, result in zip(records, results):
        letter = chosen_letter(result.text)
        out.append({"pred": letter if letter in rec["options"] else None, "reply": result.text})
    return out, cut


def accuracy(records: list[dict], picks: list[dict]) -> dict:
    """Counts and accuracy of picks against the records' answers."""
    correct = sum(p["pred"] == r["answer"] for r, p in zip(records, picks))
    unparsed = sum(p["pred"] is None for p in picks)
    n = len(records)
    return {"questions": n, "correct": correct, "unparsed": unparsed, "accuracy": correct / n if n else math.nan}
