"""The chat templates MedGPT knows, as data: one frozen `Template` per model family.

    medgpt sft configs/tiny/sft.yaml --template qwen

A template is a handful of format strings. How they are put together, and which characters train, lives in
`medgpt/data/templates.py`; this file is only the table. A conversation renders as

    bos + system + (user + assistant_prefix + ASSISTANT + separator)* [+ assistant_prefix]

where ASSISTANT (the `assistant` field: the reply plus its end-of-turn token) is the only trained text.
`assistant_prefix` is not trained and is exactly the generation prompt, so the text a model is trained to
continue is byte for byte the text inference gives it.

Placeholders: `{content}` (the message text), `{system}` (only in `system_in_user`), `{bos}` / `{eos}` (the
tokenizer's own bos/eos tokens; "" when it has none). Literal braces are written `{{` and `}}`.

Each entry follows the family's published Hugging Face chat template (tokenizer_config.json). Where that
template does something a format string cannot (strip the content, emit an eos only at the very end, ...)
the entry's comment says what we do instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from string import Formatter


@dataclass(frozen=True)
class Template:
    name: str
    user: str = ""
    """A user turn, e.g. "<|im_start|>user\\n{content}<|im_end|>\\n"."""
    assistant: str = "{content}"
    """The trained part of an assistant turn: the reply and its end-of-turn token, e.g. "{content}<|im_end|>"."""
    assistant_prefix: str = ""
    """Untrained text before each reply; also the generation prompt, e.g. "<|im_start|>assistant\\n"."""
    separator: str = ""
    """Untrained text after each assistant turn (after its end-of-turn token), e.g. "\\n"."""
    system: str | None = None
    """A system turn; None for families without a system role (then `system_in_user` is used)."""
    system_in_user: str | None = None
    """How those families fold the system text into the first user message, e.g. "{system}\\n\\n{content}"."""
    bos: str = ""
    """Text at the very start, e.g. "{bos}" or "<|begin_of_text|>"."""
    default_system: str | None = None
    """System text used when the conversation has none (None: no system turn at all)."""
    special_tokens: tuple[str, ...] = ()
    """Literal tokens the template writes that must be single tokens of the tokenizer."""
    stop: tuple[str, ...] = ()
    """Extra strings that end generation at inference (the tokenizer's eos always does)."""
    from_tokenizer: bool = False
    """True only for the `tokenizer` entry: use the tokenizer's own jinja chat_template."""

    def __post_init__(self):
        if self.from_tokenizer:
            return
        allowed = {"bos", "eos"}
        check = {"user": (self.user, allowed | {"content"}), "assistant": (self.assistant, allowed | {"content"}),
                 "assistant_prefix": (self.assistant_prefix, allowed), "separator": (self.separator, allowed),
                 "bos": (self.bos, allowed), "system": (self.system or "", allowed | {"content"}),
                 "system_in_user": (self.system_in_user or "", allowed | {"system", "content"})}
        for field, (fmt, ok) in check.items():
            used = {name for _, name, _, _ in Formatter().parse(fmt) if name is not None}
            if used - ok:
                raise ValueError(f"template {self.name!r}: field {field} uses unknown placeholders {sorted(used - ok)}")
        if "{content}" not in self.user or "{content}" not in self.assistant:
            raise ValueError(f"template {self.name!r}: user and assistant must contain {{content}}")
        if (self.system is None) == (self.system_in_user is None):
            raise ValueError(f"template {self.name!r}: set exactly one of system / system_in_user")


CHATML = Template(
    name="chatml",
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n",
    assistant_prefix="<|im_start|>assistant\n",
    assistant="{content}<|im_end|>",
    separator="\n",
    special_tokens=("<|im_start|>", "<|im_end|>"),
    stop=("<|im_end|>",),
)

# Qwen2.5-Instruct: ChatML, and its template inserts this system prompt when the conversation has none. The
# model was tuned with it, so `qwen` keeps it; plain `chatml` (and `yi`) add nothing. Qwen2 used
# "You are a helpful assistant." instead. Tool calls are not rendered.
QWEN = dataclasses.replace(
    CHATML, name="qwen", default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")

# Yi-*-Chat: plain ChatML, no default system prompt.
YI = dataclasses.replace(CHATML, name="yi")

# FastChat's vicuna_v1.1: "SYSTEM USER: q ASSISTANT: a</s>USER: ...". The generation prompt ends at the colon
# (FastChat writes "ASSISTANT:" with no space), so the space before the reply is trained text.
VICUNA = Template(
    name="vicuna",
    bos="{bos}",
    system="{content} ",
    user="USER: {content} ",
    assistant_prefix="ASSISTANT:",
    assistant=" {content}{eos}",
    default_system=("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions."),
    stop=("USER:",),
)

# Stanford Alpaca's prompt, multi-turn as LLaMA-Factory extends it: each reply ends with eos, turns are
# separated by a blank line.
ALPACA = Template(
    name="alpaca",
    bos="{bos}",
    system="{content}\n\n",
    user="### Instruction:\n{content}\n\n",
    assistant_prefix="### Response:\n",
    assistant="{content}{eos}",
    separator="\n\n",
    default_system=("Below is an instruction that describes a task. "
                    "Write a response that appropriately completes the request."),
    stop=("### Instruction:",),
)

# Llama-2-chat: "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nq [/INST] a </s><s>[INST] q2 [/INST]". Every user turn
# starts with bos. The official template strips each message (content.strip()); we keep the text as is.
LLAMA2 = Template(
    name="llama2",
    user="{bos}[INST] {content} [/INST]",
    system_in_user="<<SYS>>\n{system}\n<</SYS>>\n\n{content}",
    assistant=" {content} {eos}",
    stop=("[INST]",),
)

# Meta-Llama-3-Instruct. The official template trims each message (| trim); we keep the text as is. Llama 3.1's
# "Cutting Knowledge Date" system block and tool calls are not rendered.
LLAMA3 = Template(
    name="llama3",
    bos="<|begin_of_text|>",
    system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
    user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
    assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
    assistant="{content}<|eot_id|>",
    special_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    stop=("<|eot_id|>",),
)

# Mistral-7B-Instruct v0.1/v0.2: "<s>[INST] q [/INST]a</s>[INST] q2 [/INST]". Those templates reject a system
# message; we fold it into the first user turn as "S\n\nq", as Mistral's later templates do.
MISTRAL = Template(
    name="mistral",
    bos="{bos}",
    user="[INST] {content} [/INST]",
    system_in_user="{system}\n\n{content}",
    assistant="{content}{eos}",
    stop=("[INST]",),
)

# ChatGLM3-6B: "[gMASK]sop<|system|>\n S<|user|>\n q<|assistant|>\n a". The generation prompt is
# "<|assistant|>"; the model writes "\n a" and stops by emitting the next <|user|>. A format string cannot train
# a token that belongs to the next turn, so each reply ends with eos (as LLaMA-Factory's efficient_eos does; eos
# is one of the model's stop ids). Deviation: multi-turn history then holds that eos after each reply.
CHATGLM3 = Template(
    name="chatglm3",
    bos="[gMASK]sop",
    system="<|system|>\n {content}",
    user="<|user|>\n {content}",
    assistant_prefix="<|assistant|>",
    assistant="\n {content}{eos}",
    special_tokens=("[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>"),
    stop=("<|user|>", "<|observation|>"),
)

# GLM-4-9B-Chat: like ChatGLM3 without the space, "[gMASK]<sop><|system|>\nS<|user|>\nq<|assistant|>\na". Same
# eos deviation as chatglm3 (GLM-4's own finetune script trains a closing <|user|> instead).
GLM4 = Template(
    name="glm4",
    bos="[gMASK]<sop>",
    system="<|system|>\n{content}",
    user="<|user|>\n{content}",
    assistant_prefix="<|assistant|>",
    assistant="\n{content}{eos}",
    special_tokens=("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>"),
    stop=("<|user|>", "<|observation|>"),
)

# Baichuan2-Chat: system text, then <reserved_106> (user id 195) q <reserved_107> (assistant id 196) a. Its
# build_chat_input puts no eos between turns; its fine-tune script trains eos after each reply, which we write
# into the text (deviation: history holds that eos).
BAICHUAN2 = Template(
    name="baichuan2",
    system="{content}",
    user="<reserved_106>{content}",
    assistant_prefix="<reserved_107>",
    assistant="{content}{eos}",
    special_tokens=("<reserved_106>", "<reserved_107>"),
)

# Gemma-it: no system role; the system text is folded into the first user turn as "S\n\nq" (as Gemma 3's
# template does; Gemma 1/2 reject a system message). The official template trims each message; we do not.
GEMMA = Template(
    name="gemma",
    bos="{bos}",
    user="<start_of_turn>user\n{content}<end_of_turn>\n",
    system_in_user="{system}\n\n{content}",
    assistant_prefix="<start_of_turn>model\n",
    assistant="{content}<end_of_turn>",
    separator="\n",
    special_tokens=("<start_of_turn>", "<end_of_turn>"),
    stop=("<end_of_turn>",),
)

# DeepSeek-LLM-Chat: "<｜begin▁of▁sentence｜>S\n\nUser: q\n\nAssistant: a<｜end▁of▁sentence｜>User: ...".
# The generation prompt is "Assistant:" (no space), so the space before the reply is trained.
DEEPSEEK = Template(
    name="deepseek",
    bos="<｜begin▁of▁sentence｜>",
    system="{content}\n\n",
    user="User: {content}\n\n",
    assistant_prefix="Assistant:",
    assistant=" {content}<｜end▁of▁sentence｜>",
    special_tokens=("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    stop=("User:",),
)

# Phi-3-mini-instruct. Deviation: its template appends eos after the last turn when there is no generation
# prompt; we do not (replies end with <|end|>, which is what the model emits and what inference stops on).
PHI3 = Template(
    name="phi3",
    system="<|system|>\n{content}<|end|>\n",
    user="<|user|>\n{content}<|end|>\n",
    assistant_prefix="<|assistant|>\n",
    assistant="{content}<|end|>",
    separator="\n",
    special_tokens=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    stop=("<|end|>",),
)

# Zephyr-7B-beta: every turn ends with the tokenizer's eos and a newline. Its <|user|> markers are plain text
# in the Zephyr vocabulary, so no special tokens are required.
ZEPHYR = Template(
    name="zephyr",
    system="<|system|>\n{content}{eos}\n",
    user="<|user|>\n{content}{eos}\n",
    assistant_prefix="<|assistant|>\n",
    assistant="{content}{eos}",
    separator="\n",
    stop=("<|user|>",),
)

# For base models with no chat format of their own:
#     "{bos}System: S\nHuman: q\nAssistant: a{eos}\nHuman: q2\nAssistant:"
# The prompt ends at "Assistant:" so the reply's first word keeps its usual leading-space token.
DEFAULT = Template(
    name="default",
    bos="{bos}",
    system="System: {content}\n",
    user="Human: {content}\n",
    assistant_prefix="Assistant:",
    assistant=" {content}{eos}",
    separator="\n",
    stop=("Human:",),
)

# `--template tokenizer`: the tokenizer's own jinja chat_template decides the text; see templates.py.
TOKENIZER = Template(name="tokenizer", from_tokenizer=True)

TEMPLATES: dict[str, Template] = {t.name: t for t in (
    CHATML, QWEN, YI, VICUNA, ALPACA, LLAMA2, LLAMA3, MISTRAL, CHATGLM3, GLM4, BAICHUAN2, GEMMA, DEEPSEEK, PHI3,
    ZEPHYR, DEFAULT, TOKENIZER)}
