"""Reward sources: each rule on hand-made cases with known values, build_rewards' errors, RewardModel on the tiny
reward model (full and LoRA adapter)."""

from __future__ import annotations

import math
import shutil

import pytest

from medgpt.args import RewardArgs
from medgpt.train.rewards import (
    RULES,
    RewardModel,
    answer_match,
    build_rewards,
    check_rewards,
    chosen_letter,
    format,
    length,
    repetition,
    units,
)
from medgpt.utils import MedGPTError


def msg(text: str) -> list[dict]:
    """A completion as TRL passes it for conversational prompts."""
    return [{"role": "assistant", "content": text}]


# ----------------------------------------------------------------------------------------------- answer_match

@pytest.mark.parametrize("reply", ["B", "(B)", "b", " B. ", "答案：B", "答案是 B。", "正确答案为（B）", "我选B",
                                   "The answer is B.", "The correct answer is (B) because...", "Answer: B",
                                   "B. Aspirin reduces clotting.", "B、阿司匹林", "Aspirin (B) is right."])
def test_answer_match_letter_patterns(reply):
    assert answer_match([], [msg(reply)], answer=["B"]) == [1.0]
    assert answer_match([], [reply], answer=["(b)"]) == [1.0]  # plain strings; answer given as "(b)"


@pytest.mark.parametrize("reply", ["A stroke is a medical emergency.", "the answer is a stroke", "C", "答案：C",
                                   "Both options are wrong.", "Vitamin B12 deficiency", ""])
def test_answer_match_letter_misses(reply):
    assert answer_match([], [msg(reply)], answer=["B"]) == [0.0]


def test_chosen_letter_prefers_the_stated_answer():
    assert chosen_letter("A. is wrong; 答案：C") == "C"
    assert chosen_letter("(A) and (D) look close, but (D) fits") == "A"  # first bracketed letter
    assert chosen_letter("A stroke") is None


def test_answer_match_text_chinese_and_english():
    replies = ["答：O 型血。", "Oxygen, given early.", "高血压的诊断标准是140/90 mmHg", "Hypertension!", "低血压"]
    answers = ["o型血", "OXYGEN", "140/90mmHg", "hyper-tension", "高血压"]
    assert answer_match([], [msg(r) for r in replies], answer=answers) == [1.0, 1.0, 1.0, 1.0, 0.0]


def test_answer_match_numbers_are_numbers():
    replies = ["At most 8 tablets.", "18 tablets", "800 mg", "BMI ≈ 22.9", "1,000 mg a day", "最多８片"]
    answers = ["8", "8", "8", "22.90", "1000", "8"]
    assert answer_match([], replies, answer=answers) == [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]


def test_answer_match_without_answers_is_zero():
    assert answer_match([], ["B", "8"]) == [0.0, 0.0]  # no answer column at all
    assert answer_match([], ["B", "8", "x"], answer=[None, "", "  "]) == [0.0, 0.0, 0.0]


# ----------------------------------------------------------------------------------------------- length

def test_units_count_cjk_characters_and_words():
    assert units("高血压, high blood-pressure!") == ["高", "血", "压", "high", "blood", "pressure"]


def test_length_band_and_taper():
    replies = ["好" * 10, "好" * 20, "word " * 300, "word " * 450, "word " * 600, "word " * 900, ""]
    assert length([], [msg(r) for r in replies]) == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0, 0.0, 0.0])


def test_length_band_is_configurable_and_bilingual():
    zh, en = "高血压需要长期管理", "hypertension needs lifelong care and regular checks every day"  # 9 units each
    assert length([], [zh, en], min_len=3, max_len=6) == pytest.approx([0.5, 0.5])
    assert length([], [zh, en], min_len=10, max_len=20) == pytest.approx([0.9, 0.9])


# ----------------------------------------------------------------------------------------------- format

@pytest.mark.parametrize("reply,score", [
    ("高血压需要长期管理。", 1.0), ("Call emergency services now!", 1.0), ("Is it serious?", 1.0),
    ("他说：“请休息。”", 1.0), ("**注意：立即就医。**", 1.0), ("See a doctor (soon).", 1.0),
    ("Rest and drink fluids", 0.5), ("", 0.0), ("   ", 0.0),
    ("好的。\nUser: 还有问题吗？", 0.5), ("Sure.\n<|im_start|>user\nthanks.", 0.5), ("Sure.\nassistant\nMore.", 0.5),
    ("```python\nprint(1)\n", 0.0), ("<think>hmm. Rest.", 0.5), ("**Rest.", 0.5), ("Sure.\n### Instruction: go.", 0.5),
])
def test_format(reply, score):
    assert format([], [msg(reply)]) == [score]


# ----------------------------------------------------------------------------------------------- repetition

def test_repetition_penalizes_loops_not_variety():
    replies = ["好好好好好好", "高血压是一种常见的慢性病", "the cat the cat the cat", "Rest, drink fluids and see a doctor.",
               "hi", "请" * 200]
    scores = repetition([], [msg(r) for r in replies])
    assert scores[:5] == pytest.approx([-0.75, 0.0, -0.5, 0.0, 0.0])  # 4 trigrams 1 distinct; 4 words-3grams 2
    assert -1.0 < scores[5] < -0.99
    assert all(-1.0 <= s <= 0.0 for s in scores)


def test_rules_table():
    assert set(RULES) == {"answer_match", "length", "format", "repetition"}
    for name, fn in RULES.items():
        assert fn.__doc__ and fn.__name__ == name  # TRL logs rewards/<__name__>/mean


# ----------------------------------------------------------------------------------------------- build_rewards

def test_build_rewards_functions_default_weights():
    funcs, weights = build_rewards(RewardArgs(functions=["length", " repetition "]))
    assert funcs == [length, repetition] and weights == [1.0, 1.0]


@pytest.mark.parametrize("args,words", [
    (RewardArgs(functions=["lenght"]), ["unknown reward function 'lenght'", "Did you mean length?",
                                        "answer_match, length, format, repetition"]),
    (RewardArgs(functions=["length", "format"], weights=[1.0]), ["1 value(s)", "2 reward sources"]),
    (RewardArgs(), ["no reward source", "--reward.model", "--reward.functions"]),
    (RewardArgs(model="/no/such/rm"), ["--reward.model /no/such/rm does not exist"]),
    (RewardArgs(functions=["length", "length"]), ["length more than once"]),
    (RewardArgs(functions=["length"], weights=[float("nan")]), ["finite"]),
])
def test_build_rewards_errors(args, words):
    with pytest.raises(MedGPTError) as e:
        build_rewards(args)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_check_rewards_answer_match_needs_answers():
    records = [{"prompt": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(MedGPTError, match="no training record has one"):
        check_rewards(RewardArgs(functions=["answer_match"]), records)
    assert check_rewards(RewardArgs(functions=["answer_match"]), records + [{"prompt": [], "answer": "B"}]) \
        == ["answer_match"]


def test_build_rewards_reward_model_first(tiny_llama_cls):
    funcs, weights = build_rewards(RewardArgs(model=str(tiny_llama_cls), functions=["format"], weights=[2, 0.5]))
    assert isinstance(funcs[0], RewardModel) and funcs[1] is format and weights == [2.0, 0.5]
    assert funcs[0].__name__ == "reward_model"


# ----------------------------------------------------------------------------------------------- RewardModel

PROMPTS = [[{"role": "user", "content": "我头痛，怎么办？"}],
           [{"role": "system", "content": "You are careful."}, {"role": "user", "content": "Is 140/90 high?"}],
           [{"role": "user", "content": "Fever for three days?"}]]
REPLIES = [msg("多喝水，休息。"), msg("Yes, that is hypertension; see a doctor."), msg("See a doctor today.")]


@pytest.fixture(scope="module")
def rm(tiny_llama_cls):
    return RewardModel(str(tiny_llama_cls), batch_size=2)  # 2 < 3: scores must not depend on batching


def test_reward_model_scores(rm):
    scores = rm(PROMPTS, REPLIES)
    assert len(scores) == 3 and all(isinstance(s, float) and math.isfinite(s) for s in scores)
    assert len(set(scores)) == 3
    assert rm(PROMPTS[::-1], REPLIES[::-1]) == pytest.approx(scores[::-1], abs=1e-5)  # order preserved
    same = rm([PROMPTS[0]] * 3, [REPLIES[0]] * 3)
    assert same == pytest.approx([scores[0]] * 3, abs=1e-5)  # identical inputs, identical scores


def test_reward_model_plain_strings_are_one_user_turn(rm):
    assert rm(["Fever for three days?"], ["See a doctor today."]) == pytest.approx(rm(PROMPTS[2:], REPLIES[2:]),
                                                                                   abs=1e-6)


def test_reward_model_renders_up_to_end_of_turn(rm):
    # The fixture tokenizer has no chat template: chatml is assumed. The separator after <|im_end|> is not scored.
    assert rm.render(PROMPTS[0], REPLIES[0]) == \
        "<|im_start|>user\n我头痛，怎么办？<|im_end|>\n<|im_start|>assistant\n多喝水，休息。<|im_end|>"


def test_reward_model_uses_its_own_saved_template(tiny_llama_cls, tmp_path):
    from transformers import AutoTokenizer

    from medgpt.data.templates import apply_template

    path = tmp_path / "rm"
    shutil.copytree(tiny_llama_cls, path)
    tok = AutoTokenizer.from_pretrained(path)
    apply_template(tok, "vicuna")
    tok.save_pretrained(path)
    text = RewardModel(str(path), template="chatml").render(PROMPTS[0], REPLIES[0])  # its own wins over chatml
    assert "<|im_start|>" not in text and text.endswith("多喝水，休息。" + (tok.eos_token or ""))


def test_reward_model_from_lora_adapter(tiny_llama_cls, tmp_path, rm):
    from medgpt.args import FinetuneArgs, ModelArgs
    from medgpt.model.load import load_model, load_tokenizer

    args = ModelArgs(name_or_path=str(tiny_llama_cls))
    net = load_model(args, FinetuneArgs(type="lora"), task="seq_cls")
    for name, p in net.named_parameters():  # stand in for training: move the saved score head
        if p.requires_grad and "score" in name:
            p.data.add_(0.5)
    net.save_pretrained(tmp_path / "adapter")
    load_tokenizer(args).save_pretrained(tmp_path / "adapter")

    lora_rm = RewardModel(str(tmp_path / "adapter"))
    scores = lora_rm(PROMPTS, REPLIES)
    assert all(math.isfinite(s) for s in scores)
    assert scores != pytest.approx(rm(PROMPTS, REPLIES), abs=1e-4), "the adapter's score head was not loaded"


def test_reward_model_path_errors(tmp_path):
    with pytest.raises(MedGPTError, match="does not exist"):
        RewardModel(str(tmp_path / "missing"))
    with pytest.raises(MedGPTError, match="neither a model"):
        RewardModel(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text('{"base_model_name_or_path": "/gone/base"}')
    with pytest.raises(MedGPTError, match="/gone/base, which does not exist"):
        RewardModel(str(tmp_path))
