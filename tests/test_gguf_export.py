"""model export: HF dir -> one GGUF + Ollama Modelfile; loads back in transformers with the same logits and
tokenizer; clear refusals that touch nothing.

Tolerances (logits of tiny random models, |logit| ~0.3):
- f16: identical (max |diff| < 1e-5) to the HF model with its matrices rounded to float16, and within 1e-3 of the
  float32 original;
- q8_0: within 2% of the largest |logit| of the float32 original (8-bit blocks of 32 values).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from medgpt.cli import main

IDS = torch.tensor([[40, 77, 123, 300, 512, 901], [64, 65, 66, 700, 31, 250]])  # no special/pad tokens
TEXTS = ["高血压是指血压持续高于140/90 mmHg，需要长期管理。", "Paracetamol: adults should not take more than 4 g.",
         "如果出现胸痛 (chest pain)，请立即拨打120！\n\n  spaces  and\ttabs"]
SYSTEM = "You are a careful medical assistant."
# SmolLM2's chat template (ChatML, with a default system prompt when none is given)
SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def export(model, out, *extra) -> int:
    return main(["model", "export", "--model.name_or_path", str(model), "--output_dir", str(out), *map(str, extra)])


def load_gguf(out: Path, name: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def hf(model_dir, f16: bool = False):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if f16:  # what the f16 file holds: matrices rounded to float16, vectors (norms, biases) float32
        for p in model.parameters():
            if p.dim() > 1:
                p.data = p.data.half().float()
    return model


def reader(path: Path):
    import gguf

    return gguf.GGUFReader(path)


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory, tokenizer_dir) -> Path:
    """SmolLM2-shaped (tied embeddings, ChatML template with a default system prompt), wide enough for Q8_0."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = SMOL_TEMPLATE
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    out = tmp_path_factory.mktemp("smol") / "smol-chat"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def smol_q8(chat_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "q8"
    assert export(chat_llama, out, "--export.quant", "q8_0") == 0
    return out


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_f16_round_trip_logits(fixture, request, tmp_path):
    src = request.getfixturevalue(fixture)
    assert export(src, tmp_path / "out", "--export.format", "gguf", "--export.quant", "f16") == 0
    name = f"{src.name}-f16.gguf"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".medgpt-output.json", "Modelfile",
                                                                    "config.yaml", name]
    got = logits(load_gguf(tmp_path / "out", name))
    assert (got - logits(hf(src, f16=True))).abs().max() < 1e-5
    assert (got - logits(hf(src))).abs().max() < 1e-3


def test_llama_q_k_are_stored_permuted(tiny_llama, tmp_path):
    """The file holds llama.cpp's rope layout (q/k rows permuted), which the loader undoes: logits match above."""
    from safetensors.torch import load_file

    assert export(tiny_llama, tmp_path / "out") == 0
    r = reader(tmp_path / "out" / f"{tiny_llama.name}-f16.gguf")
    stored = {t.name: torch.from_numpy(t.data.astype("float32").copy()) for t in r.tensors}
    weights = load_file(str(tiny_llama / "model.safetensors"))
    q = weights["model.layers.0.self_attn.q_proj.weight"].half().float()
    assert not torch.equal(stored["blk.0.attn_q.weight"], q)
    assert torch.equal(stored["blk.0.attn_q.weight"].sort(0).values, q.sort(0).values)  # same rows, reordered
    assert torch.equal(stored["blk.0.attn_v.weight"], weights["model.layers.0.self_attn.v_proj.weight"].half().float())


def test_q8_0_round_trip_tied(smol_q8, chat_llama):
    import gguf

    name = "smol-chat-q8_0.gguf"
    r = reader(smol_q8 / name)
    types = {t.name: t.tensor_type for t in r.tensors}
    assert "output.weight" not in types  # tied: token_embd only
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    model = load_gguf(smol_q8, name)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    want = logits(hf(chat_llama))
    assert (logits(model) - want).abs().max() < 0.02 * want.abs().max()


def test_q8_0_keeps_narrow_rows_f16(tiny_llama, tmp_path):
    """hidden_size 16 is not a multiple of Q8_0's block of 32: those matrices stay f16 (as llama.cpp does)."""
    import gguf

    assert export(tiny_llama, tmp_path / "out", "--export.quant", "q8_0") == 0
    name = f"{tiny_llama.name}-q8_0.gguf"
    types = {t.name: t.tensor_type for t in reader(tmp_path / "out" / name).tensors}
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0  # rows of 32
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16  # rows of 16
    want = logits(hf(tiny_llama))
    assert (logits(load_gguf(tmp_path / "out", name)) - want).abs().max() < 0.02 * want.abs().max()


def test_metadata_and_tokenizer_round_trip(smol_q8, chat_llama):
    from transformers import AutoTokenizer

    name = "smol-chat-q8_0.gguf"
    f = reader(smol_q8 / name).fields
    value = {k: f[k].contents() for k in f if not k.startswith("tokenizer.ggml.merges")}
    assert value["general.architecture"] == "llama" and value["llama.block_count"] == 2
    assert value["llama.embedding_length"] == 64 and value["llama.feed_forward_length"] == 128
    assert value["llama.attention.head_count"] == 4 and value["llama.attention.head_count_kv"] == 2
    assert value["llama.context_length"] == 256 and value["llama.vocab_size"] == 1024
    assert value["tokenizer.ggml.model"] == "gpt2" and value["tokenizer.ggml.pre"] == "gpt-2"
    assert value["tokenizer.ggml.add_bos_token"] is False
    assert value["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert value["tokenizer.ggml.token_type"][:3] == [3, 3, 3] and set(value["tokenizer.ggml.token_type"][12:]) == {1}

    got = AutoTokenizer.from_pretrained(smol_q8, gguf_file=name)
    want = AutoTokenizer.from_pretrained(chat_llama)
    for text in TEXTS + ["<|im_start|>user\n头痛怎么办？<|im_end|>"]:
        assert got(text).input_ids == want(text).input_ids, text
    assert got.decode(got(TEXTS[0]).input_ids) == TEXTS[0]
    assert (got.eos_token, got.pad_token) == (want.eos_token, want.pad_token)
    chat = [{"role": "user", "content": "头痛怎么办？ What helps?"}]
    assert got.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        want.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


# ----------------------------------------------------------------------------- Modelfile

def test_modelfile_chatml(smol_q8):
    text = (smol_q8 / "Modelfile").read_text(encoding="utf-8")
    assert "FROM ./smol-chat-q8_0.gguf\n" in text
    assert 'TEMPLATE """{{- range $i, $_ := .Messages }}' in text and "<|im_start|>{{ .Role }}\n" in text
    assert f'SYSTEM """{SYSTEM}"""\n' in text
    assert 'PARAMETER stop "<|im_end|>"\n' in text and 'PARAMETER stop "<|im_start|>"\n' in text


def test_modelfile_chatml_without_default_system(tiny_qwen2, tmp_path):
    from transformers import AutoTokenizer

    src = tmp_path / "qwen-chat"
    shutil.copytree(tiny_qwen2, src)
    tok = AutoTokenizer.from_pretrained(src)
    tok.chat_template = SMOL_TEMPLATE.replace(SYSTEM, "").replace("loop.first and", "false and")
    tok.save_pretrained(src)
    assert export(src, tmp_path / "out") == 0
    text = (tmp_path / "out" / "Modelfile").read_text(encoding="utf-8")
    assert "TEMPLATE" in text and "SYSTEM" not in text and 'PARAMETER stop "<|im_end|>"' in text


def test_modelfile_without_chat_template(tiny_llama, tmp_path):
    assert export(tiny_llama, tmp_path / "out") == 0
    text = (tmp_path / "out" / "Modelfile").read_text(encoding="utf-8")
    assert f"FROM ./{tiny_llama.name}-f16.gguf" in text and "no chat template" in text
    commands = [line.split()[0] for line in text.splitlines() if line and not line.startswith("#")]
    assert commands == ["FROM", "PARAMETER"], commands
    assert 'PARAMETER stop "<|endoftext|>"' in text


# ----------------------------------------------------------------------------- refusals

def _refused(capsys, model, out, *extra, expect: tuple[str, ...]) -> str:
    capsys.readouterr()  # drop what building the fixture printed
    assert export(model, out, *extra) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    for word in expect:
        assert word in err, (word, err)
    return err


def _variant(src: Path, dest: Path, **config_changes) -> Path:
    shutil.copytree(src, dest)
    conf = json.loads((dest / "config.json").read_text())
    conf.update(config_changes)
    (dest / "config.json").write_text(json.dumps(conf))
    return dest


def test_refuses_adapter_dir(tiny_llama, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "x"}))
    _refused(capsys, adapter, tmp_path / "out", expect=("LoRA adapter", "medgpt merge"))
    _refused(capsys, tiny_llama, tmp_path / "out", "--model.adapter", adapter, expect=("medgpt merge",))
    assert not (tmp_path / "out").exists()


def test_refuses_other_architectures(tiny_llama_cls, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, MistralConfig

    cfg = MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "mistral")
    _refused(capsys, tmp_path / "mistral", tmp_path / "out",
             expect=("MistralForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM"))
    _refused(capsys, tiny_llama_cls, tmp_path / "out", expect=("LlamaForSequenceClassification", "reward"))
    assert not (tmp_path / "out").exists()


def test_refuses_quantized_and_missing(tiny_llama, tmp_path, capsys):
    q4 = _variant(tiny_llama, tmp_path / "q4", quantization_config={"quant_method": "bitsandbytes",
                                                                   "load_in_4bit": True})
    _refused(capsys, q4, tmp_path / "out", expect=("quantized", "bitsandbytes", "full-precision"))
    _refused(capsys, tmp_path / "nope", tmp_path / "out", expect=("does not exist", "local HF model dir"))
    assert not (tmp_path / "out").exists()


def test_refuses_sentencepiece_tokenizer(tiny_llama, tmp_path, capsys):
    src = tmp_path / "sp"
    shutil.copytree(tiny_llama, src)
    (src / "tokenizer.json").unlink()
    (src / "tokenizer.model").write_bytes(b"\x00")
    _refused(capsys, src, tmp_path / "out", expect=("SentencePiece", "byte-level BPE"))


def test_refuses_tokenizer_past_embeddings_and_output_into_model(tokenizer_dir, tiny_llama, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    small = tmp_path / "small-vocab"
    cfg = LlamaConfig(vocab_size=512, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(small)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(small)
    _refused(capsys, small, tmp_path / "out", expect=("only 512 embeddings", "resize_token_embeddings"))
    assert not (tmp_path / "out").exists()
    before = sorted(p.name for p in tiny_llama.iterdir())
    _refused(capsys, tiny_llama, tiny_llama, "--overwrite", expect=("is the model being exported",))
    assert sorted(p.name for p in tiny_llama.iterdir()) == before


def test_foreign_output_dir_untouched(tiny_llama, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    _refused(capsys, tiny_llama, out, expect=("not empty", "--output_dir"))
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


def test_rerun_needs_overwrite(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    assert export(tiny_llama, out) == 0
    _refused(capsys, tiny_llama, out, expect=("--overwrite",))
    assert export(tiny_llama, out, "--overwrite", "--export.quant", "q8_0") == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [".medgpt-output.json", "Modelfile", "config.yaml", f"{tiny_llama.name}-q8_0.gguf"], names


# ----------------------------------------------------------------------------- pure helpers

def test_chatml_detected_when_bos_is_im_start(tokenizer):
    """SmolLM2's bos_token is <|im_start|>: the template's first <|im_start|> is not a BOS to strip."""
    from medgpt.model.gguf_export import chatml_system

    tokenizer.chat_template = SMOL_TEMPLATE
    tokenizer.bos_token = "<|im_start|>"
    assert chatml_system(tokenizer) == (True, SYSTEM)
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    assert chatml_system(tokenizer) == (False, None)


def test_pre_tokenizer_names():
    from medgpt.model.gguf_export import _QWEN2_SPLIT, pre_tokenizer_name

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    smollm = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    qwen2 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _QWEN2_SPLIT}, "behavior": "Isolated"}, dict(byte_level, use_regex=False)]}
    assert pre_tokenizer_name({"pre_tokenizer": byte_level}) == "gpt-2"
    assert pre_tokenizer_name({"pre_tokenizer": smollm}) == "smollm"
    assert pre_tokenizer_name({"pre_tokenizer": qwen2}) == "qwen2"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}}) == "default"
    assert pre_tokenizer_name({"pre_tokenizer": dict(byte_level, use_regex=False)}) == "default"
