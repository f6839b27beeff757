"""Chat templates: golden strings, jinja == render byte for byte, masks, tokenizer mode, truncation.

    python -m pytest tests/test_templates.py -q
"""

from __future__ import annotations

import dataclasses

import jinja2
import pytest
from transformers import AutoTokenizer

from medgpt.data.templates import (
    IGNORE_INDEX,
    TEMPLATES,
    _label_by_offsets,
    _label_by_segments,
    apply_template,
    check_tokenizer,
    encode,
    encode_prompt,
    get_template,
    get_template_for,
    render,
    to_jinja,
)
from medgpt.utils import MedGPTError

NAMED = [name for name, t in TEMPLATES.items() if not t.from_tokenizer]


def msg(role, content):
    return {"role": role, "content": content}


SYSTEM = "You are a careful doctor."
TWO_TURNS = [msg("system", SYSTEM), msg("user", "Hi"), msg("assistant", "Hello."),
             msg("user", "Fever?"), msg("assistant", "Rest.")]
CONVERSATIONS = [
    [msg("user", "What is hypertension?"), msg("assistant", "Blood pressure at or above 140/90 mmHg.")],
    TWO_TURNS,
    [msg("system", "你是一名医生。"), msg("user", "高血压怎么办？"), msg("assistant", "低盐饮食，规律服药。"),
     msg("user", "需要复查吗？"), msg("assistant", "每三个月复查一次血压。"), msg("user", "谢谢"),
     msg("assistant", "不客气，祝您健康。")],
    [msg("user", "头痛")],  # ends with a user turn: a prompt
    [msg("system", SYSTEM), msg("user", "Chest pain radiating to the left arm?")],
]

# One exact string per template for TWO_TURNS with bos "<s>" and eos "</s>" (written from each family's template).
GOLDEN = {
    "chatml": ("<|im_start|>system\nYou are a careful doctor.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
               "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nFever?<|im_end|>\n"
               "<|im_start|>assistant\nRest.<|im_end|>\n"),
    "vicuna": "<s>You are a careful doctor. USER: Hi ASSISTANT: Hello.</s>USER: Fever? ASSISTANT: Rest.</s>",
    "alpaca": ("<s>You are a careful doctor.\n\n### Instruction:\nHi\n\n### Response:\nHello.</s>\n\n"
               "### Instruction:\nFever?\n\n### Response:\nRest.</s>\n\n"),
    "llama2": ("<s>[INST] <<SYS>>\nYou are a careful doctor.\n<</SYS>>\n\nHi [/INST] Hello. </s>"
               "<s>[INST] Fever? [/INST] Rest. </s>"),
    "llama3": ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a careful doctor.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nFever?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nRest.<|eot_id|>"),
    "mistral": "<s>[INST] You are a careful doctor.\n\nHi [/INST]Hello.</s>[INST] Fever? [/INST]Rest.</s>",
    "chatglm3": ("[gMASK]sop<|system|>\n You are a careful doctor.<|user|>\n Hi<|assistant|>\n Hello.</s>"
                 "<|user|>\n Fever?<|assistant|>\n Rest.</s>"),
    "glm4": ("[gMASK]<sop><|system|>\nYou are a careful doctor.<|user|>\nHi<|assistant|>\nHello.</s>"
             "<|user|>\nFever?<|assistant|>\nRest.</s>"),
    "baichuan2": ("You are a careful doctor.<reserved_106>Hi<reserved_107>Hello.</s>"
                  "<reserved_106>Fever?<reserved_107>Rest.</s>"),
    "gemma": ("<s><start_of_turn>user\nYou are a careful doctor.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
              "Hello.<end_of_turn>\n<start_of_turn>user\nFever?<end_of_turn>\n<start_of_turn>model\n"
              "Rest.<end_of_turn>\n"),
    "deepseek": ("<｜begin▁of▁sentence｜>You are a careful doctor.\n\nUser: Hi\n\n"
                 "Assistant: Hello.<｜end▁of▁sentence｜>User: Fever?\n\nAssistant: Rest.<｜end▁of▁sentence｜>"),
    "phi3": ("<|system|>\nYou are a careful doctor.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n"
             "<|user|>\nFever?<|end|>\n<|assistant|>\nRest.<|end|>\n"),
    "zephyr": ("<|system|>\nYou are a careful doctor.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello.</s>\n"
               "<|user|>\nFever?</s>\n<|assistant|>\nRest.</s>\n"),
    "default": ("<s>System: You are a careful doctor.\nHuman: Hi\nAssistant: Hello.</s>\n"
                "Human: Fever?\nAssistant: Rest.</s>\n"),
}
GOLDEN["qwen"] = GOLDEN["yi"] = GOLDEN["chatml"]

# The well-known Qwen2 ChatML template, as it ships in Qwen2-*-Instruct (default system "You are a helpful
# assistant."), and the plain ChatML one from the transformers docs.
QWEN2_JINJA = (r"{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
               r"{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
               r"{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
               r"{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHATML_JINJA = (r"{% for message in messages %}"
                r"{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                r"{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Qwen2.5-Instruct's template without the tool branches.
QWEN25_JINJA = (r"{%- if messages[0]['role'] == 'system' %}"
                r"{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}{%- else %}"
                r"{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                r"<|im_end|>\n' }}{%- endif %}{%- for message in messages %}{%- if (message.role == 'user') or "
                r"(message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
                r"{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}"
                r"{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
# Rewrites earlier replies once a later turn exists (like templates that drop reasoning from history).
REWRITING_JINJA = (r"{% for message in messages %}{% if message['role'] == 'assistant' and not loop.last %}"
                   r"{{ '<|im_start|>assistant\n(earlier reply)<|im_end|>\n' }}{% else %}"
                   r"{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
                   r"{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def for_template(tokenizer, name, bos=None):
    """The test tokenizer with the template's special tokens (and optionally a bos) added."""
    tokenizer.add_tokens(list(get_template(name).special_tokens), special_tokens=True)
    if bos:
        tokenizer.add_special_tokens({"bos_token": bos})
    return tokenizer


def trained_runs(tokenizer, enc):
    """Decoded text of each maximal run of trained / untrained tokens: [(trained, text), ...]."""
    runs = []
    for token_id, label in zip(enc.input_ids, enc.labels):
        trained = label != IGNORE_INDEX
        if trained:
            assert label == token_id
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token_id)
        else:
            runs.append((trained, [token_id]))
    return [(trained, tokenizer.decode(ids, skip_special_tokens=False)) for trained, ids in runs]


# ------------------------------------------------------------------------------------------- render / golden


@pytest.mark.parametrize("name", NAMED)
def test_golden_string(name):
    rendered = render(name, TWO_TURNS, bos_token="<s>", eos_token="</s>")
    assert rendered.text == GOLDEN[name]
    t = get_template(name)
    # The trained spans are exactly each reply with its end-of-turn text.
    assert [rendered.text[a:b] for a, b in rendered.spans] == \
        [t.assistant.format(content=c, bos="<s>", eos="</s>") for c in ("Hello.", "Rest.")]


def test_every_template_has_a_golden_string():
    assert set(GOLDEN) == set(NAMED)


def test_default_system_prompts():
    convo = [msg("user", "Hi")]
    assert render("chatml", convo, bos_token=None, eos_token=None).text == "<|im_start|>user\nHi<|im_end|>\n"
    qwen = render("qwen", convo, bos_token=None, eos_token=None, add_generation_prompt=True).text
    assert qwen.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                           "assistant.<|im_end|>\n")
    assert qwen.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_chatml_equals_reference_jinjas(tokenizer):
    chatml, qwen = get_template("chatml"), get_template("qwen")
    qwen2 = dataclasses.replace(chatml, default_system="You are a helpful assistant.")
    cases = [(CHATML_JINJA, chatml), (QWEN2_JINJA, qwen2), (QWEN25_JINJA, qwen), (to_jinja(chatml), chatml)]
    for jinja, template in cases:
        tokenizer.chat_template = jinja
        for convo in CONVERSATIONS:
            for gen in (False, True):
                expected = render(template, convo, bos_token=None, eos_token=tokenizer.eos_token,
                                  add_generation_prompt=gen).text
                assert tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=gen) == expected


def test_get_template_unknown_lists_names():
    with pytest.raises(MedGPTError, match="chatml.*llama3.*tokenizer"):
        get_template("chatgpt")


def test_bad_role_order_raises_in_render_and_jinja(tokenizer):
    bad = [msg("user", "a"), msg("user", "b")]
    with pytest.raises(MedGPTError, match="role"):
        render("chatml", bad, bos_token=None, eos_token=None)
    apply_template(tokenizer, "chatml")
    for convo in (bad, [msg("assistant", "a")], [msg("user", "a"), msg("system", "late")]):
        with pytest.raises(jinja2.exceptions.TemplateError, match="alternating"):
            tokenizer.apply_chat_template(convo, tokenize=False)


# ------------------------------------------------------------------------------------- jinja == render, masks


@pytest.mark.parametrize("bos", [None, "<s>"])
@pytest.mark.parametrize("name", NAMED)
def test_jinja_matches_render_and_mask(tokenizer, name, bos):
    tok = for_template(tokenizer, name, bos)
    apply_template(tok, name)
    for convo in CONVERSATIONS:
        for gen in (False, True):
            expected = render(name, convo, bos_token=tok.bos_token, eos_token=tok.eos_token,
                              add_generation_prompt=gen).text
            assert tok.apply_chat_template(convo, tokenize=False, add_generation_prompt=gen) == expected
        if convo[-1]["role"] == "assistant":
            hf = tok.apply_chat_template(convo, return_dict=True, return_assistant_tokens_mask=True)
            enc = encode(convo, name, tok)
            assert list(hf["input_ids"]) == enc.input_ids
            assert list(hf["assistant_masks"]) == [int(label != IGNORE_INDEX) for label in enc.labels]


@pytest.mark.parametrize("name", NAMED)
def test_only_assistant_replies_train(tokenizer, name):
    tok = for_template(tokenizer, name, "<s>")
    t = get_template(name)
    for convo in CONVERSATIONS[:3]:
        enc = encode(convo, name, tok)
        assert len(enc.input_ids) == len(enc.labels) and tok.pad_token_id not in enc.input_ids
        trained = [text for is_trained, text in trained_runs(tok, enc) if is_trained]
        replies = [m["content"] for m in convo if m["role"] == "assistant"]
        # Every reply trains, as exactly its formatted text (reply + end-of-turn), and nothing else does.
        assert trained == [t.assistant.format(content=r, eos=tok.eos_token, bos=tok.bos_token) for r in replies]
        untrained = "".join(text for is_trained, text in trained_runs(tok, enc) if not is_trained)
        for m in convo:
            if m["role"] != "assistant":
                assert m["content"] in untrained


def test_chatml_mask_token_by_token(tokenizer):
    enc = encode(TWO_TURNS, "chatml", tokenizer)
    im_end, newline = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.encode("\n")[0]
    assert trained_runs(tokenizer, enc) == [
        (False, "<|im_start|>system\nYou are a careful doctor.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                "<|im_start|>assistant\n"),
        (True, "Hello.<|im_end|>"),
        (False, "\n<|im_start|>user\nFever?<|im_end|>\n<|im_start|>assistant\n"),
        (True, "Rest.<|im_end|>"),
        (False, "\n"),
    ]
    pieces = [tokenizer.decode([i]) for i in enc.input_ids]
    assistant_ims = [i for i, (t, label) in enumerate(zip(enc.input_ids, enc.labels)) if t == im_end
                     and label == im_end]
    assert len(assistant_ims) == 2  # both replies' <|im_end|> train; the system/user ones do not
    for i in assistant_ims:
        assert enc.input_ids[i + 1] == newline and enc.labels[i + 1] == IGNORE_INDEX
    user_tokens = {i for i, p in enumerate(pieces) if p in ("Hi", "Fever", "?", "user")}
    assert user_tokens and all(enc.labels[i] == IGNORE_INDEX for i in user_tokens)


def test_segment_fallback_matches_offsets(tokenizer):
    for convo in CONVERSATIONS[:3]:
        rendered = render("chatml", convo, bos_token=None, eos_token=tokenizer.eos_token)
        assert _label_by_segments(tokenizer, rendered) == _label_by_offsets(tokenizer, rendered)


def test_encode_prompt_matches_jinja(tokenizer):
    apply_template(tokenizer, "chatml")
    for convo in (CONVERSATIONS[3], CONVERSATIONS[4], TWO_TURNS[:4]):
        ids = encode_prompt(convo, "chatml", tokenizer)
        assert ids == list(tokenizer.apply_chat_template(convo, add_generation_prompt=True)["input_ids"])
        assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
        assert encode_prompt(convo, "tokenizer", tokenizer) == ids
    with pytest.raises(MedGPTError, match="end with a user"):
        encode_prompt(TWO_TURNS, "chatml", tokenizer)


def test_nothing_to_train_is_none(tokenizer):
    assert encode([msg("user", "Hi")], "chatml", tokenizer) is None
    assert encode([msg("system", "S"), msg("user", "Hi")], "chatml", tokenizer) is None


# ---------------------------------------------------------------------------------------------- tokenizer mode


def test_tokenizer_mode_derives_chatml_labels(tokenizer):
    tokenizer.chat_template = CHATML_JINJA  # no generation markers: spans come from prefix rendering
    for convo in CONVERSATIONS[:3]:
        assert encode(convo, "tokenizer", tokenizer) == encode(convo, "chatml", tokenizer)


def test_tokenizer_mode_uses_generation_markers(tokenizer):
    apply_template(tokenizer, "chatml")
    assert "{%- generation -%}" in tokenizer.chat_template
    for convo in CONVERSATIONS[:3]:
        assert encode(convo, "tokenizer", tokenizer) == encode(convo, "chatml", tokenizer)
    long = CONVERSATIONS[2]
    full = encode(long, "chatml", tokenizer)
    assert encode(long, "tokenizer", tokenizer, max_length=len(full.input_ids) - 1) == \
        encode(long[:5], "chatml", tokenizer)


def test_tokenizer_mode_refuses_rewriting_template(tokenizer):
    tokenizer.chat_template = REWRITING_JINJA
    with pytest.raises(MedGPTError, match="cannot be masked reliably.*--template NAME"):
        encode(TWO_TURNS, "tokenizer", tokenizer)


def test_tokenizer_mode_needs_a_chat_template(tokenizer):
    with pytest.raises(MedGPTError, match="no .*chat_template"):
        encode(TWO_TURNS, "tokenizer", tokenizer)
    with pytest.raises(MedGPTError, match="no .*chat_template"):
        apply_template(tokenizer, "tokenizer")


# -------------------------------------------------------------------------------------------------- truncation


def test_truncation_keeps_whole_turns(tokenizer):
    convo = [msg("system", "你是一名医生。")]
    for i in range(8):
        convo += [msg("user", f"第{i}个问题：高血压患者每天应该吃多少盐？"),
                  msg("assistant", f"第{i}个回答：每天不超过5克盐，并且规律监测血压。")]
    lengths = [len(encode(convo[:1 + 2 * k], "chatml", tokenizer).input_ids) for k in range(1, 9)]
    max_length = lengths[2] + (lengths[3] - lengths[2]) // 2  # room for 3 exchanges, not 4
    enc = encode(convo, "chatml", tokenizer, max_length=max_length)
    assert enc == encode(convo[:7], "chatml", tokenizer)
    assert len(enc.input_ids) <= max_length
    tail = "第2个回答：每天不超过5克盐，并且规律监测血压。<|im_end|>\n"
    assert tokenizer.decode(enc.input_ids).endswith(tail)
    last_trained = [label for label in enc.labels if label != IGNORE_INDEX][-1]
    assert last_trained == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert encode(convo, "chatml", tokenizer, max_length=lengths[-1]) == encode(convo, "chatml", tokenizer)
    assert encode(convo, "chatml", tokenizer, max_length=lengths[0] - 1) is None


def test_truncation_on_template_without_separator(tokenizer):
    tok = for_template(tokenizer, "llama3")
    convo = CONVERSATIONS[2]
    one = len(encode(convo[:3], "llama3", tok).input_ids)
    enc = encode(convo, "llama3", tok, max_length=one)
    assert tok.decode(enc.input_ids).endswith("低盐饮食，规律服药。<|eot_id|>")


# -------------------------------------------------------------------------------- tokenizer checks, saving


def test_check_tokenizer_refuses_llama3_on_chatml_tokenizer(tokenizer):
    check_tokenizer("chatml", tokenizer)
    assert get_template_for("chatml", tokenizer) is get_template("chatml")
    with pytest.raises(MedGPTError) as err:
        check_tokenizer("llama3", tokenizer)
    message = str(err.value)
    for token in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        assert token in message
    assert "--template tokenizer" in message and "chatml" in message
    with pytest.raises(MedGPTError, match="start_header_id"):
        get_template_for("llama3", tokenizer)
    with pytest.raises(MedGPTError, match="start_header_id"):
        apply_template(tokenizer, "llama3")
    assert tokenizer.chat_template is None


def test_saved_tokenizer_keeps_template(tokenizer, tmp_path):
    apply_template(tokenizer, "qwen")
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.chat_template == to_jinja("qwen")
    for convo in CONVERSATIONS:
        for gen in (False, True):
            text = reloaded.apply_chat_template(convo, tokenize=False, add_generation_prompt=gen)
            assert text == render("qwen", convo, bos_token=None, eos_token="<|endoftext|>",
                                  add_generation_prompt=gen).text
        if convo[-1]["role"] == "assistant":
            assert encode(convo, "tokenizer", reloaded) == encode(convo, "qwen", tokenizer)


def test_tokenizer_template_stops_at_its_own_end_of_turn(tokenizer):
    """EOS is <|endoftext|>, but a reply rendered by the tokenizer's own (ChatML) jinja ends with <|im_end|>:
    generation with --template tokenizer must stop there too."""
    from medgpt.data.templates import apply_template, stop_token_ids

    assert stop_token_ids("tokenizer", tokenizer) == [tokenizer.eos_token_id]  # no chat template: EOS only
    apply_template(tokenizer, "chatml")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end != tokenizer.eos_token_id
    assert stop_token_ids("tokenizer", tokenizer) == [tokenizer.eos_token_id, im_end]
    assert stop_token_ids("tokenizer", tokenizer) == stop_token_ids("chatml", tokenizer)
