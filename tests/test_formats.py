"""Formats: every record shape -> its canonical record, and every one-line RecordError."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medgpt.data.formats import RecordError, as_kind, detect_format, kind_of, to_canonical

FIX = Path(__file__).parent / "fixtures" / "data"


def fixture(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIX / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def s(text):
    return {"role": "system", "content": text}


def error(obj, fmt="auto", columns=None) -> str:
    with pytest.raises(RecordError) as e:
        to_canonical(obj, fmt, columns)
    return str(e.value)


# ----------------------------------------------------------------------------- chat shapes

def test_alpaca_input_system_history():
    records = json.loads((FIX / "alpaca.json").read_text(encoding="utf-8"))
    assert [detect_format(r) for r in records] == ["alpaca"] * 3
    assert to_canonical(records[0], "alpaca") == {"messages": [
        u("What is hypertension?"), a("Blood pressure that stays at or above 140/90 mmHg.")]}
    assert to_canonical(records[1], "alpaca")["messages"] == [
        s("You are a careful medical assistant."),
        u("Summarize the note.\n\nPatient reports chest pain radiating to the left arm."),
        a("Possible cardiac chest pain; needs an urgent ECG.")]
    assert to_canonical(records[2], "alpaca")["messages"] == [
        u("我血压高怎么办？"), a("建议低盐饮食并按时复诊。"), u("那应该吃什么药？"), a("请遵医嘱服用降压药。")]


def test_sharegpt_both_role_spellings_and_system():
    first, second = fixture("sharegpt.jsonl")
    assert detect_format(first) == detect_format(second) == "sharegpt"
    assert to_canonical(first)["messages"] == [s("You are a medical assistant."), u("What causes anemia?"),
                                               a("Most often iron deficiency.")]
    assert to_canonical(second)["messages"] == [u("我头痛。"), a("持续多久了？"), u("两天。"), a("建议就医检查。")]
    # from/value turns under "messages" are ShareGPT too
    assert detect_format({"messages": [{"from": "human", "value": "hi"}]}) == "sharegpt"


def test_openai_string_and_list_content():
    first, second = fixture("openai.jsonl")
    assert detect_format(first) == "openai"
    assert to_canonical(first)["messages"][0] == s("Answer briefly.")
    assert to_canonical(second)["messages"] == [u("Is a fever of 39 C serious?\nI am an adult."),
                                                a("Drink fluids; see a doctor if it lasts over 3 days.")]
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                          a("ok")]}
    assert error(image) == "messages turn 1 ('user'): content part of type 'image_url' is not supported (text only)"


def test_qa_variants():
    records = fixture("qa.jsonl")
    assert [detect_format(r) for r in records] == ["qa"] * 5
    out = [to_canonical(r, "qa")["messages"] for r in records]
    assert out[0] == [s("Be concise."), u("What is HbA1c?"), a("Average blood glucose over about three months.")]
    assert out[1] == [u("感冒需要吃抗生素吗？"), a("普通感冒多为病毒感染，一般不需要抗生素。")]
    assert out[2] == [u("What does BMI measure?"), a("Weight relative to height.")]
    assert out[3] == [u("Define tachycardia."), a("A heart rate above 100 beats per minute.")]
    assert out[4] == [u("What is a normal body temperature?"), a("About 36.5 to 37.5 C.")]


def test_column_mapping():
    obj = {"q": "What is gout?", "ans": "A form of arthritis.", "sys": "Be brief."}
    columns = {"prompt": "q", "response": "ans", "system": "sys"}
    assert to_canonical(obj, "auto", columns) == {"messages": [s("Be brief."), u("What is gout?"),
                                                               a("A form of arthritis.")]}
    # LLaMA-Factory style: prompt = instruction, query = input
    obj = {"ins": "Translate to English.", "inp": "发烧", "out": "fever"}
    assert to_canonical(obj, "qa", {"prompt": "ins", "query": "inp", "response": "out"})["messages"] == [
        u("Translate to English.\n\n发烧"), a("fever")]
    assert error(obj, "auto", {"prompt": "question"}) == ("column 'question' (mapped to 'prompt' by "
                                                          "--data.columns) is missing; keys seen: ins, inp, out")


# ----------------------------------------------------------------------------- preference

def test_preference_string_messages_and_question_shapes():
    plain, multi, question = fixture("preference.jsonl")
    assert {detect_format(r) for r in (plain, multi, question)} == {"preference"}
    assert to_canonical(plain) == {"prompt": [u("Can I take ibuprofen with an empty stomach?")],
                                   "chosen": [a("Better with food; it can irritate the stomach.")],
                                   "rejected": [a("Yes, always fine.")]}
    # multi-turn prompt with a system message; chosen repeats the prompt turns (minus system): stripped
    out = to_canonical(multi)
    assert out["prompt"] == [s("You are a pharmacist."), u("I have a headache."), a("How long has it lasted?"),
                             u("Two days.")]
    assert out["chosen"] == [a("See a doctor if it persists.")]
    assert out["rejected"] == [a("Ignore it.")]
    assert to_canonical(question) == {"prompt": [s("你是医生。"), u("高血压患者可以喝咖啡吗？")],
                                      "chosen": [a("适量饮用一般可以，但应监测血压。")],
                                      "rejected": [a("随便喝。")]}


def test_preference_hh_style_strings_and_lists():
    strings, lists = fixture("hh.jsonl")
    out = to_canonical(strings)
    assert out["prompt"] == [u("I cut my finger."), a("Press on it with a clean cloth."), u("It is still bleeding.")]
    assert out["chosen"] == [a("Keep pressing for 10 minutes; if it does not stop, get care.")]
    assert out["rejected"] == [a("Just ignore it.")]
    assert to_canonical(lists) == {"prompt": [u("Is 38 C a fever?")], "chosen": [a("Yes, a mild one.")],
                                   "rejected": [a("No.")]}
    other = {"chosen": [u("A?"), a("yes")], "rejected": [u("B?"), a("no")]}
    assert error(other) == "'chosen' and 'rejected' do not share the same turns up to the last user turn"


def test_preference_errors():
    assert error({"prompt": "q", "chosen": "same", "rejected": "same"}) == "'chosen' and 'rejected' are identical"
    assert error({"prompt": "q", "chosen": "", "rejected": "x"}) == "field 'chosen' is empty"
    assert error({"prompt": [u("q"), a("x")], "chosen": "c", "rejected": "r"}) == (
        "prompt ends with an 'assistant' turn but must end with a 'user' turn")
    assert error({"prompt": "q", "chosen": [u("other"), a("c")], "rejected": "r"}).startswith(
        "chosen turn 1 is 'user' but only assistant replies may follow the prompt")




def test_preference_medicalgpt_conversations_with_string_replies():
    """MedicalGPT's data/reward shape: the prompt as ShareGPT turns, chosen/rejected as plain strings."""
    plain, empty_system, system, multi, system_turn, _ = fixture("medicalgpt_reward.jsonl")
    assert {detect_format(r) for r in (plain, system, multi)} == {"preference"}
    out = to_canonical(plain)
    assert out == {"prompt": [u(plain["conversations"][0]["value"])], "chosen": [a(plain["chosen"])],
                   "rejected": [a(plain["rejected"])]}
    assert to_canonical(empty_system)["prompt"][0]["role"] == "user"  # "system": "" means none
    assert to_canonical(system)["prompt"][0] == {"role": "system", "content": system["system"]}
    assert [m["role"] for m in to_canonical(multi)["prompt"]] == ["user", "assistant", "user"]
    assert to_canonical(system_turn)["prompt"][0] == {"role": "system", "content": "You are a careful pharmacist."}
    # LLaMA-Factory's ranking variant: each reply a single ShareGPT turn
    turn = {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "good"},
            "rejected": {"from": "gpt", "value": "bad"}}
    assert to_canonical(turn) == {"prompt": [u("q")], "chosen": [a("good")], "rejected": [a("bad")]}
    ends_with_reply = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "x"}],
                       "chosen": "c", "rejected": "r"}
    assert error(ends_with_reply) == "prompt ends with an 'assistant' turn but must end with a 'user' turn"
    assert error({**plain, "conversations": [{"from": "human", "value": " "}]}) == (
        "conversations turn 1 ('user') is empty")
# ----------------------------------------------------------------------------- prompt, mcq, text

def test_prompt_only():
    with_answer, with_solution, bare = fixture("prompt.jsonl")
    assert [detect_format(r) for r in (with_answer, with_solution, bare)] == ["prompt"] * 3
    assert to_canonical(with_answer)["answer"] == "8"
    assert to_canonical(with_solution) == {"prompt": [s("Think step by step."), u("BMI of 70 kg at 1.75 m?")],
                                           "answer": "22.9"}
    assert to_canonical(bare) == {"prompt": [u("Explain what a stroke is.")]}
    assert to_canonical({"prompt": "2+2?", "answer": 4})["answer"] == "4"
    assert error({"prompt": [u("q"), a("x")]}) == (
        "prompt ends with an 'assistant' turn but must end with a 'user' turn")


def test_mcq_dict_list_text_and_index_answers():
    by_letter, by_text, by_index = fixture("mcq.jsonl")
    assert {detect_format(r) for r in (by_letter, by_text, by_index)} == {"mcq"}
    assert to_canonical(by_letter) == {"question": "Which vitamin deficiency causes scurvy?",
                                       "options": {"A": "Vitamin A", "B": "Vitamin C", "C": "Vitamin D",
                                                   "D": "Vitamin K"}, "answer": "B", "subject": "nutrition"}
    assert to_canonical(by_text)["answer"] == "A"
    assert to_canonical(by_text)["options"]["D"] == "缺乏运动"
    assert to_canonical(by_index)["answer"] == "B"
    flat = {"question": "Q?", "A": "x", "B": "y", "C": "z", "E": "", "answer": "(c)"}
    assert detect_format(flat) == "mcq"
    assert to_canonical(flat) == {"question": "Q?", "options": {"A": "x", "B": "y", "C": "z"}, "answer": "C"}
    assert error({**flat, "answer": "F"}) == "answer 'F' is not among the options A, B, C"
    assert error({**flat, "answer": 7}) == "answer '7' is not among the options A, B, C"


def test_text_and_content():
    text, content = fixture("text.jsonl")
    assert detect_format(text) == detect_format(content) == "text"
    assert to_canonical(content) == {"text": "肝脏是人体最大的实质性器官。"}
    assert error({"text": "  "}) == "field 'text' is empty"
    assert error({"text": 3}, "text") == "field 'text' must be a string, got int"


# ----------------------------------------------------------------------------- record checks

@pytest.mark.parametrize("obj, message", [
    ({"instruction": "", "output": "x"}, "field 'instruction' is empty"),
    ({"messages": []}, "empty conversation"),
    ({"messages": [u("a"), u("b")]}, "conversation turn 2 is 'user' but 'assistant' was expected after 'user'"),
    ({"messages": [u("a"), a("b"), u("c"), a("d"), a("e")]},
     "conversation turn 5 is 'assistant' but 'user' was expected after 'assistant'"),
    ({"messages": [a("hi"), u("q")]},
     "conversation turn 1 is 'assistant' but 'user' was expected first (after the optional system message)"),
    ({"messages": [u("a"), s("b"), a("c")]}, "conversation turn 2 is 'system' but a system message must come first"),
    ({"messages": [u("a"), a("b"), u("c")]},
     "conversation ends with a 'user' turn but must end with an 'assistant' turn"),
    ({"messages": [s("only")]}, "conversation has no user turn"),
    ({"messages": [u("a"), {"role": "tool", "content": "b"}]},
     "messages turn 2: unsupported role 'tool' (use system, user or assistant; tool and function turns are not "
     "supported)"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "observation", "value": "b"}]},
     "conversations turn 2: unsupported role 'observation' (use system, user or assistant; tool and function "
     "turns are not supported)"),
    ({"messages": [u("a"), {"role": "assistant", "content": 5}]},
     "messages turn 2 ('assistant'): content must be a string, got int"),
    ({"messages": [u("a"), a(" ")]}, "messages turn 2 ('assistant') is empty"),
    ({"system": "s", "messages": [s("t"), u("a"), a("b")]}, "record has both a 'system' field and a system message"),
    ({"instruction": "q", "output": "x", "history": [["only one"]]}, "history[0] must be a [user, assistant] pair"),
])
def test_record_errors(obj, message):
    assert error(obj) == message


def test_undetectable_record():
    assert error({"foo": 1, "bar": 2}) == "cannot tell the record format; keys seen: foo, bar"
    assert error({"instruction": "q"}, "alpaca") == "missing field 'output'"  # with the file's format given
    assert detect_format({"foo": 1}) is None


# ----------------------------------------------------------------------------- kinds

def test_kind_of():
    assert [kind_of(f) for f in ("text", "alpaca", "sharegpt", "openai", "qa", "preference", "prompt", "mcq")] == [
        "text", "chat", "chat", "chat", "chat", "preference", "prompt", "mcq"]


def test_as_kind_conversions():
    chat = {"messages": [s("sys"), u("q"), a("ans")]}
    assert as_kind(chat, "chat") is chat
    assert as_kind(chat, "prompt") == {"prompt": [s("sys"), u("q")], "answer": "ans"}
    pref = {"prompt": [u("q")], "chosen": [a("good")], "rejected": [a("bad")]}
    assert as_kind(pref, "chat") == {"messages": [u("q"), a("good")]}
    assert as_kind(pref, "prompt") == {"prompt": [u("q")]}
    mcq = {"question": "Q?", "options": {"A": "x", "B": "y"}, "answer": "B"}
    assert as_kind(mcq, "prompt") == {"prompt": [u("Q?\nA. x\nB. y")], "answer": "B"}
    assert as_kind(mcq, "chat") == {"messages": [u("Q?\nA. x\nB. y"), a("B. y")]}
    assert as_kind({"prompt": [u("q")], "answer": "4"}, "chat") == {"messages": [u("q"), a("4")]}


def test_as_kind_impossible_names_the_shape_needed():
    with pytest.raises(RecordError, match=r"preference records \{prompt, chosen, rejected\} are needed; "
                                          r"this is one of the text records \{text\}"):
        as_kind({"text": "x"}, "preference")
    with pytest.raises(RecordError, match="needs an 'answer'"):
        as_kind({"prompt": [u("q")]}, "chat")
    with pytest.raises(RecordError, match=r"text records \{text\} are needed"):
        as_kind({"messages": [u("q"), a("x")]}, "text")


def test_a_bare_question_is_a_prompt_record():
    """{question, source} (the knowledge-base questions of data/demo/heldout) used to be an unknown format, which
    failed `medgpt data validate data/demo` and `data clean data/demo`."""
    from medgpt.data.formats import detect_format, to_canonical

    obj = {"question": "What is gout?", "source": "gout.md", "lang": "en"}
    assert detect_format(obj) == "prompt"
    assert to_canonical(obj, "prompt") == {"prompt": [{"role": "user", "content": "What is gout?"}]}


def test_labelled_records_are_a_kind_of_the_shared_reader(tmp_path):
    """KTO's unpaired feedback {prompt, completion|response|answer, label} is read by the same loader as every
    other kind (it had a reader of its own in stages/kto.py), so `data validate` checks it too."""
    from medgpt.data.formats import detect_format, record_kind, to_canonical
    from medgpt.data.validate import load_records

    obj = {"prompt": "Is 38.5 C a fever?", "response": "Yes, above 38 C is a fever.", "label": "TRUE",
           "system": "You are a nurse."}
    assert detect_format(obj) == "labelled"
    rec = to_canonical(obj)
    assert record_kind(rec) == "labelled" and rec["label"] is True
    assert rec["prompt"] == [{"role": "system", "content": "You are a nurse."},
                             {"role": "user", "content": "Is 38.5 C a fever?"}]
    assert rec["completion"] == [{"role": "assistant", "content": "Yes, above 38 C is a fever."}]
    path = tmp_path / "feedback.jsonl"
    path.write_text(json.dumps(obj) + "\n" + json.dumps({**obj, "label": False}) + "\n", encoding="utf-8")
    assert [r["label"] for r in load_records([str(path)], "labelled")] == [True, False]
