"""Reward sources for the online RL stages (`medgpt grpo`, `medgpt rloo`, `medgpt ppo`).

    medgpt grpo configs/tiny/grpo.yaml --reward.model out/rm --reward.functions format,repetition \
        --reward.weights 1,0.5,0.5

Every source has TRL's reward-function signature, `f(prompts, completions, **kwargs) -> list[float]`:
prompts are conversations (lists of messages) or plain strings, completions are `[{"role": "assistant",
"content": str}]` lists or plain strings, and extra dataset columns (e.g. `answer`) arrive as keyword lists.

    RewardModel(path)       the output of `medgpt rm` (full or LoRA), scoring with its own tokenizer and template
    answer_match            1.0 when the reference answer is in the reply (MCQ letters, numbers, text)   [0, 1]
    length                  1.0 inside a length band, tapering linearly outside                          [0, 1]
    format                  0.5 for ending a sentence + 0.5 for no leaked role headers / open markup      [0, 1]
    repetition              minus the fraction of repeated 3-grams                                       [-1, 0]
    build_rewards(reward_args) -> (functions, weights)   what the stages hand to the trainer

Length and repetition count *units*: one per CJK character, one per word otherwise, so Chinese and English
replies of the same substance get about the same count (roughly a token count in either language).
"""

from __future__ import annotations

import difflib
import math
import os
import re
import unicodedata
from pathlib import Path
from typing import Callable

from medgpt.data.text import units
from medgpt.utils import MedGPTError, log

# ----------------------------------------------------------------------------------------------- text helpers



def completion_text(completion) -> str:
    """The reply text of a completion: a plain string, one message, or a list of (assistant) messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content") or "")
    return "\n".join(str(m.get("content") or "") for m in completion if m.get("role", "assistant") == "assistant")


def normalize(text: str) -> str:
    """Case-folded letters and digits only (NFKC first: full-width Ｂ is B). Spaces, punctuation and symbols
    go, so "Ｏ型 血。" and "o型血" compare equal."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(ch for ch in text if unicodedata.category(ch)[0] in "LN")


# ----------------------------------------------------------------------------------------------- answer_match

_LETTER_ANSWER = re.compile(r"[(\[【]?\s*([A-Ja-j])\s*[)\]】]?\s*[.:]?")  # the whole reference answer
_NUMBER_ANSWER = re.compile(r"[-+]?\d+(?:\.\d+)?")
_NUMBERS = re.compile(r"(?<![\d.])[-+]?\d+(?:\.\d+)?(?![\d])")
# Where a reply states its choice, most explicit first. Letters are upper-case only: "the answer is a stroke"
# must not read as choice A.
_CHOICE = [
    re.compile(r"(?:答案|选项|选择|应选|选|(?i:answer|option|choice))\s*(?:(?i:is)|是|为)?\s*:?\s*[(\[【]?\s*"
               r"([A-J])(?![A-Za-z])"),
    re.compile(r"\s*[(\[【]?\s*([A-Ja-j])\s*[)\]】]?\s*[.:。]?\s*"),          # the whole reply is a letter
    re.compile(r"\s*(?:[(\[【]\s*([A-J])\s*[)\]】]|([A-J])\s*[.:、,)])"),    # "B. ...", "(B) ...", "B、..."
    re.compile(r"[(\[【]\s*([A-J])\s*[)\]】]"),                              # "(B)" anywhere
]


def chosen_letter(text: str) -> str | None:
    """The option letter a reply picks ("B", "(B)", "答案：B", "The answer is B", "B. Aspirin"), or None."""
    text = unicodedata.normalize("NFKC", text)
    for i, pattern in enumerate(_CHOICE):
        m = pattern.fullmatch(text) if i == 1 else pattern.match(text) if i == 2 else pattern.search(text)
        if m:
            return next(g for g in m.groups() if g).upper()
    return None


def _numbers(text: str) -> list[float]:
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", unicodedata.normalize("NFKC", text))  # 1,000 -> 1000
    return [float(x) for x in _NUMBERS.findall(text)]


def _matches(answer: str, reply: str) -> bool:
    answer = unicodedata.normalize("NFKC", answer).strip()
    if m := _LETTER_ANSWER.fullmatch(answer):
        return chosen_letter(reply) == m.group(1).upper()
    if _NUMBER_ANSWER.fullmatch(answer.replace(",", "")):
        # As a number, not a substring: "8" must not match "18" or "800 mg", and "22.90" does match "22.9".
        want = float(answer.replace(",", ""))
        return any(math.isclose(x, want, rel_tol=1e-9, abs_tol=1e-9) for x in _numbers(reply))
    want = normalize(answer)
    return bool(want) and want in normalize(reply)


def answer_match(prompts, completions, answer=None, **kwargs) -> list[float]:
    """1.0 when the record's reference `answer` is in the reply, else 0.0 (records without an answer: 0.0).

    An option letter ("B", "(B)") must be the letter the reply picks: "B", "(B)", "B. ...", "答案：B",
    "the answer is (B)". A number must appear as a number ("8" matches "8 tablets", not "18"). Any other answer
    must appear in the reply after normalization: case-folded, without spaces, punctuation or symbols, full-width
    characters made half-width (so "O型血" matches "答：o 型 血。").
    """
    answers = answer if answer is not None else [None] * len(completions)
    return [1.0 if isinstance(a, str) and a.strip() and _matches(a, completion_text(c)) else 0.0
            for c, a in zip(completions, answers)]


# ----------------------------------------------------------------------------------------------- length

def length(prompts, completions, min_len: int = 20, max_len: int = 300, **kwargs) -> list[float]:
    """1.0 for replies of min_len..max_len units (a unit: one CJK character or one word), tapering linearly
    outside: n/min_len below the band, down to 0.0 at twice max_len above it. Range [0, 1]."""
    scores = []
    for c in completions:
        n = len(units(completion_text(c)))
        if n < min_len:
            scores.append(n / min_len)
        elif n > max_len:
            scores.append(max(0.0, 1.0 - (n - max_len) / max_len))
        else:
            scores.append(1.0)
    return scores


# ----------------------------------------------------------------------------------------------- format

_SENTENCE_END = set(".!?。！？…")
_CLOSERS = "\"'”’)）]】」』*"  # may follow the final punctuation: 。」  .)  **注意。**
# A reply that goes on to write the next turn itself: chat-template markers, or a line that is a role header.
_ROLE_HEADER = re.compile(
    r"<\|(?:im_start|im_end|eot_id|start_header_id|end_header_id|user|assistant|system|end)\|>|\[/?INST\]"
    r"|^\s*(?:user|assistant|system|human|用户|助手)\s*(?:[:：]|$)|^\s*###\s*(?:instruction|response)",
    re.IGNORECASE | re.MULTILINE)


def _well_formed(text: str) -> bool:
    """No leaked role headers and no markup left open (code fences, <think> blocks, ** bold)."""
    return (not _ROLE_HEADER.search(text) and text.count("```") % 2 == 0
            and text.count("<think>") == text.count("</think>") and text.count("**") % 2 == 0)


def format(prompts, completions, **kwargs) -> list[float]:  # noqa: A001 (TRL logs rewards by function name)
    """0.0 for an empty reply; otherwise 0.5 if it ends with sentence-final punctuation (. ! ? 。！？…, closing
    quotes/brackets/bold markers may follow) plus 0.5 if it is well formed: no chat-template markers or role
    header lines ("User:", "assistant", "### Instruction") from writing the next turn itself, and no markup left
    open (odd ``` fences or ** markers, <think> without </think>). Values: 0, 0.5, 1."""
    scores = []
    for c in completions:
        text = completion_text(c).strip()
        if not text:
            scores.append(0.0)
            continue
        ends = text.rstrip(_CLOSERS)[-1:] in _SENTENCE_END
        scores.append(0.5 * ends + 0.5 * _well_formed(text))
    return scores


# ----------------------------------------------------------------------------------------------- repetition

def repetition(prompts, completions, n: int = 3, **kwargs) -> list[float]:
    """Minus the fraction of repeated n-grams of units (3-grams of characters in Chinese, of words in English):
    -(1 - distinct / total). 0.0 for varied text (and replies shorter than n + 1 units), approaching -1.0 for a
    reply that loops: "好好好好好好" (4 trigrams, 1 distinct) gets -0.75. Range [-1, 0]."""
    scores = []
    for c in completions:
        u = units(completion_text(c))
        grams = [tuple(u[i:i + n]) for i in range(len(u) - n + 1)]
        scores.append(len(set(grams)) / len(grams) - 1.0 if len(grams) > 1 else 0.0)
    return scores


RULES: dict[str, Callable] = {"answer_match": answer_match, "length": length, "format": format,
                              "repetition": repetition}


# ----------------------------------------------------------------------------------------------- reward model

def _default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"  # the device this process trains on
    return "cpu"


def _messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _reply(completion) -> list[dict]:
    if isinstance(completion, str):
        return [{"role": "assistant", "content": completion}]
    if isinstance(completion, dict):
        return [completion]
    return list(completion)


class RewardModel:
    """A trained reward model (the output of `medgpt rm`, full or LoRA) as a reward function: one scalar per
    (prompt, reply), rendered with the reward model's own tokenizer and chat template.

    What is scored matches `medgpt rm`: the conversation up to and including the reply's end-of-turn token (the
    whitespace separator the template writes after it is not scored: generation stops at the end-of-turn
    token). Longer than max_length tokens: the start is cut, since the reward is read at the last token.
    `template` (a named template) is used only when the reward tokenizer has no chat template of its own (a reward
    model trained elsewhere); without one, chatml is assumed and said so.
    """

    __name__ = "reward_model"  # TRL logs each reward under its function's name

    def __init__(self, path: str, device=None, max_length: int = 1024, *, batch_size: int = 8, template=None):
        import torch

        from medgpt.data.templates import apply_template, get_template
        from medgpt.model.load import load_reward_model

        self.model, self.tokenizer = load_reward_model(path)
        self.device = torch.device(device or _default_device())
        self.model.to(self.device)
        self.max_length, self.batch_size = max_length, batch_size
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"
        if not self.tokenizer.chat_template:
            named = template is not None and not get_template(template).from_tokenizer
            name = template if named else "chatml"
            log(f"reward model {path}: its tokenizer has no chat template; rendering with "
                f"{getattr(name, 'name', name)}")
            apply_template(self.tokenizer, name)

    def render(self, prompt, completion) -> str:
        text = self.tokenizer.apply_chat_template(_messages(prompt) + _reply(completion), tokenize=False)
        return text.rstrip()  # cut after the end-of-turn token, as `medgpt rm` scored (scored_ids)

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        import torch

        texts = [self.render(p, c) for p, c in zip(prompts, completions)]
        scores: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[i:i + self.batch_size], add_special_tokens=False, padding=True,
                                   truncation=True, max_length=self.max_length, return_tensors="pt")
            with torch.inference_mode():
                logits = self.model(**batch.to(self.device)).logits[:, 0]
            scores += logits.float().cpu().tolist()
        return scores


# ----------------------------------------------------------------------------------------------- build

def _function_names(reward_args) -> list[str]:
    return [n.strip() for n in reward_args.functions if n and n.strip()]


def check_groups(train, section: str, num_generations: int, max_completion_length: int, has_eval: bool,
                 why_two: str, why_together: str) -> None:
    """TRL's rule for GRPO/RLOO, as a MedGPTError: every optimizer step (and eval batch) holds whole groups of
    replies. `section` names the options (grpo, rloo); the two `why` texts say what the group is for."""
    g = num_generations
    flag = f"--{section}.num_generations"
    if g < 2:
        raise MedGPTError(f"{flag} {g}: {why_two}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = train.batch_size * train.gradient_accumulation_steps * world
    if per_step % g:
        raise MedGPTError(
            f"completions per step = --train.batch_size {train.batch_size} x --train.gradient_accumulation_steps "
            f"{train.gradient_accumulation_steps} x {world} process(es) = {per_step}, which is not a multiple of "
            f"{flag} {g}: each prompt's {g} replies {why_together} and must land in the same step. Set "
            f"--train.batch_size to a multiple of {g} (e.g. {g}), or change {flag}.")
    if has_eval and (train.eval_batch_size * world) % g:
        raise MedGPTError(f"--train.eval_batch_size {train.eval_batch_size} x {world} process(es) is not a "
                          f"multiple of {flag} {g}; evaluation samples whole groups too. Set "
                          f"--train.eval_batch_size to a multiple of {g}.")
    if train.max_length <= max_completion_length:
        raise MedGPTError(f"--train.max_length {train.max_length} leaves no room for a prompt next to "
                          f"--{section}.max_completion_length {max_completion_length}. Raise max_length.")


def check_rewards(reward_args, records: list[dict] | None = None) -> list[str]:
    """Validate `--reward.*` without loading anything (so a typo fails before any model loads); returns the
    source names in order: "reward_model" (when given), then each function. With `records`, also checks that
    answer_match has reference answers to compare with."""
    names = _function_names(reward_args)
    for name in names:
        if name not in RULES:
            near = difflib.get_close_matches(name, RULES, n=1)
            hint = f" Did you mean {near[0]}?" if near else ""
            raise MedGPTError(f"unknown reward function '{name}' in --reward.functions. Valid: "
                              f"{', '.join(RULES)}.{hint}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise MedGPTError(f"--reward.functions lists {', '.join(twice)} more than once; give each once and set "
                          f"its share with --reward.weights.")
    if reward_args.model and not Path(reward_args.model).exists():
        raise MedGPTError(f"--reward.model {reward_args.model} does not exist. Pass the output dir of `medgpt rm`.")
    sources = (["reward_model"] if reward_args.model else []) + names
    if not sources:
        raise MedGPTError(f"no reward source given. Add --reward.model DIR (the output of `medgpt rm`) and/or "
                          f"--reward.functions NAME,... (built-in rules: {', '.join(RULES)}).")
    weights = reward_args.weights
    if weights and len(weights) != len(sources):
        raise MedGPTError(f"--reward.weights has {len(weights)} value(s) but there are {len(sources)} reward "
                          f"sources ({', '.join(sources)}): give one weight per source, the reward model first.")
    if any(not math.isfinite(w) for w in weights):
        raise MedGPTError(f"--reward.weights must be finite numbers, got {list(weights)}.")
    if records is not None and "answer_match" in names and not any(r.get("answer") for r in records):
        raise MedGPTError("--reward.functions answer_match compares replies with each record's reference "
                          "answer, but no training record has one. Use prompt records with an `answer` (or "
                          "`solution`) field, MCQ or chat data, or drop answer_match.")
    return sources


def build_rewards(reward_args, *, template=None, device=None, max_length: int = 1024
                  ) -> tuple[list[Callable], list[float]]:
    """The reward functions and their weights, from `--reward.*`: the reward model first (when given), then each
    rule in the order listed; weights default to 1.0 each. `template` and `max_length` go to the RewardModel
    (the template only matters when the reward tokenizer has none of its own)."""
    check_rewards(reward_args)
    funcs: list[Callable] = []
    if reward_args.model:
        funcs.append(RewardModel(reward_args.model, device=device, max_length=max_length, template=template))
    funcs += [RULES[name] for name in _function_names(reward_args)]
    weights = [float(w) for w in reward_args.weights] or [1.0] * len(funcs)
    return funcs, weights
