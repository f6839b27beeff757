"""The paths only a real pretrained model exercises, on SmolLM2-135M-Instruct (the real-model kit, `make real-model`):
its own jinja template (with an injected default system prompt), tied embeddings through merge, LoRA on real
module names, a reward head on a real backbone, generation that stops at <|im_end|>, serving, GGUF round trip.

Kept to a few steps each on short sequences: the whole file takes about a minute and a half on 2 CPU cores.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medgpt.cli import main

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "data"
DEMO = ROOT / "data" / "demo"
pytestmark = pytest.mark.real
STEPS = ["--train.max_steps", "3", "--train.warmup", "0", "--train.learning_rate", "1e-3", "--train.batch_size", "2",
         "--train.save_steps", "0", "--train.logging_steps", "1", "--train.max_length", "192",
         "--train.tensorboard", "false", "--template", "tokenizer"]
CONVERSATION = [{"role": "user", "content": "高血压患者每天吃多少盐？"},
                {"role": "assistant", "content": "每天食盐不超过5克。"},
                {"role": "user", "content": "What about potassium?"},
                {"role": "assistant", "content": "Eat more vegetables and fruit, unless your kidneys are weak."}]


@pytest.fixture(scope="session")
def real_model() -> Path:
    path = Path(os.environ.get("MEDGPT_REAL_MODEL", ROOT / ".cache" / "real" / "smollm2-135m-instruct"))
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"no real model at {path}: run `make real-model` (fetched once, then offline)")
    return path


@pytest.fixture(scope="session")
def tokenizer(real_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_model)


def run(*argv) -> None:
    code = main([str(a) for a in argv])
    assert code == 0, f"medgpt {' '.join(map(str, argv))} exited {code}"


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture()
def tracked(monkeypatch):
    from transformers import Trainer

    snaps: dict = {}
    original = Trainer.train

    def train(self, *args, **kwargs):
        snaps["before"] = trainable(self.model)
        result = original(self, *args, **kwargs)
        snaps["after"] = trainable(self.model)
        return result

    monkeypatch.setattr(Trainer, "train", train)
    return snaps


def assert_trained(snaps: dict, out: Path) -> dict:
    unchanged = [n for n, t in snaps["before"].items() if torch.equal(t, snaps["after"][n])]
    assert snaps["before"] and not unchanged, f"{len(unchanged)} trainable tensors did not change: {unchanged[:3]}"
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics["train_loss"]), metrics
    return metrics


# ----------------------------------------------------------------------------- the model's own template

def test_labels_are_what_the_template_marks_as_assistant(tokenizer):
    """Our labels under --template tokenizer equal transformers' assistant mask for the same template with
    {% generation %} markers around each reply; the injected default system prompt never trains."""
    from medgpt.data.templates import IGNORE_INDEX, encode

    enc = encode(CONVERSATION, "tokenizer", tokenizer)
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    reply = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    assert reply in tokenizer.chat_template, "the shipped template changed: update the marked copy below"
    marked = tokenizer.chat_template.replace(reply, (
        "{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}{% generation %}"
        "{{message['content'] + '<|im_end|>'}}{% endgeneration %}{% else %}{{message['content'] + '<|im_end|>'}}"
        "{% endif %}{{'\n'}}"))
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False, chat_template=marked) == rendered
    want = tokenizer.apply_chat_template(CONVERSATION, chat_template=marked, return_dict=True,
                                         return_assistant_tokens_mask=True)
    assert enc.input_ids == list(want["input_ids"])
    assert [x != IGNORE_INDEX for x in enc.labels] == [bool(m) for m in want["assistant_masks"]]
    trained = tokenizer.decode([t for t, x in zip(enc.input_ids, enc.labels) if x != IGNORE_INDEX])
    assert trained == "每天食盐不超过5克。<|im_end|>Eat more vegetables and fruit, unless your kidneys are weak.<|im_end|>"


def test_generation_stops_at_end_of_turn(real_model):
    from medgpt.args import GenArgs, ModelArgs
    from medgpt.infer.engine import Engine

    engine = Engine.load(ModelArgs(name_or_path=str(real_model)), "tokenizer")
    prompts = [engine.prompt_ids([{"role": "user", "content": q}]) for q in ("Say hello in one word.", "Hi!")]
    for r in engine.generate(prompts, GenArgs(max_new_tokens=96, temperature=0.0)):
        assert r.finish_reason == "stop", r
        assert "<|im_start|>" not in r.text and "<|im_end|>" not in r.text and r.text.strip()


# ----------------------------------------------------------------------------- stages on the real model

@pytest.fixture(scope="module")
def sft_adapter(real_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real") / "sft"
    run("sft", "--model.name_or_path", real_model, "--data.train_files", DEMO / "sft_sharegpt.jsonl",
        "--data.max_samples", "12", "--finetune.type", "lora", "--output_dir", out, *STEPS)
    return out


def test_lora_sft_trains_real_modules(real_model, tmp_path, tracked):
    out = tmp_path / "sft"
    run("sft", "--model.name_or_path", real_model, "--data.train_files", DEMO / "sft_sharegpt.jsonl",
        "--data.max_samples", "12", "--finetune.type", "lora", "--output_dir", out, *STEPS)
    metrics = assert_trained(tracked, out)
    assert metrics["global_step"] == 3
    adapted = {m for n in tracked["before"] for m in re.findall(r"\.(\w+_proj)\.lora_", n)}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("lm_head" in n or "embed_tokens" in n for n in tracked["before"])
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(real_model)


def test_qlora_sft_trains(real_model, tmp_path, tracked):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    run("sft", "--model.name_or_path", real_model, "--data.train_files", DEMO / "sft_sharegpt.jsonl",
        "--data.max_samples", "8", "--finetune.type", "qlora", "--output_dir", out, *STEPS)
    assert_trained(tracked, out)


def test_merge_keeps_tied_embeddings_and_the_adapters_logits(real_model, sft_adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    run("merge", "--model.name_or_path", real_model, "--model.adapter", sft_adapter, "--output_dir", out)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # plain transformers
    assert merged.config.tie_word_embeddings
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    base = AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, sft_adapter).eval()
    ids = torch.tensor([[1, 4093, 198, 6121, 314, 1345, 30, 2, 198]])
    with torch.no_grad():
        want, got = with_adapter(ids).logits, merged(ids).logits
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert (got - AutoModelForCausalLM.from_pretrained(real_model)(ids).logits).abs().max() > 1e-3  # it did merge


def test_reward_model_on_the_real_backbone(real_model, tmp_path, tracked):
    out = tmp_path / "rm"
    run("rm", "--model.name_or_path", real_model, "--data.train_files", FIX / "medicalgpt_reward.jsonl",
        "--finetune.type", "lora", "--output_dir", out, *STEPS, "--train.max_steps", "2")
    assert_trained(tracked, out)
    assert any(n.startswith("base_model.model.score") for n in tracked["before"]), "the score head must train"


def test_dpo_continues_the_sft_adapter(real_model, sft_adapter, tmp_path, tracked):
    out = tmp_path / "dpo"
    run("dpo", "--model.name_or_path", real_model, "--model.adapter", sft_adapter, "--finetune.type", "lora",
        "--data.train_files", FIX / "medicalgpt_reward.jsonl", "--output_dir", out, *STEPS, "--train.max_steps", "2")
    assert_trained(tracked, out)
    start = dict(__import__("safetensors.torch", fromlist=["load_file"]).load_file(
        sft_adapter / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in start.items())


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_one_rl_step(stage, real_model, tmp_path):
    length = {"grpo": ["--grpo.max_completion_length", "12", "--grpo.num_generations", "2"],
              "ppo": ["--ppo.max_new_tokens", "12"]}[stage]
    out = tmp_path / stage
    run(stage, "--model.name_or_path", real_model, "--data.train_files", FIX / "prompt.jsonl",
        "--data.max_samples", "2", "--finetune.type", "lora", "--reward.functions", "length",
        "--output_dir", out, *STEPS, "--train.max_steps", "1", *length)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 1
    assert (out / "adapter_model.safetensors").is_file()


# ----------------------------------------------------------------------------- serving

def test_serve_answers_through_the_openai_client(real_model):
    import openai

    proc = subprocess.Popen([sys.executable, "-m", "medgpt.cli", "serve", "--model.name_or_path", str(real_model),
                             "--serve.port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT)
    try:
        url = None
        for line in proc.stdout:
            if m := re.search(r"at (http://127\.0\.0\.1:\d+/v1)", line):
                url = m.group(1)
                break
        assert url, "the server did not start"
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        deadline = time.monotonic() + 30
        while True:
            try:
                r = client.chat.completions.create(model=real_model.name, temperature=0, max_tokens=40,
                                                   messages=[{"role": "user", "content": "Say hello in one word."}])
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content.strip()
        assert "<|im_end|>" not in r.choices[0].message.content
    finally:
        proc.send_signal(2)
        proc.communicate(timeout=30)


# ----------------------------------------------------------------------------- GGUF round trip

def test_export_gguf_and_load_it_back(real_model, tmp_path):
    """export -> GGUF (f16) -> transformers' GGUF loader: the same next-token choices and close logits, tied."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "gguf"
    run("model", "export", "--model.name_or_path", real_model, "--export.quant", "f16", "--output_dir", out)
    (gguf,) = out.glob("*.gguf")
    assert "FROM ./" + gguf.name in (out / "Modelfile").read_text() and "<|im_end|>" in (out / "Modelfile").read_text()
    back = AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf.name, dtype=torch.float32).eval()
    hf = AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float32).eval()
    tok, tok_back = AutoTokenizer.from_pretrained(real_model), AutoTokenizer.from_pretrained(out, gguf_file=gguf.name)
    text = "<|im_start|>user\n高血压患者每天吃多少盐？ How much salt per day?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, return_tensors="pt").input_ids
    assert tok_back(text).input_ids == ids[0].tolist()
    with torch.no_grad():
        a, b = hf(ids).logits, back(ids).logits
    assert back.config.tie_word_embeddings
    assert (a - b).abs().max() < 0.1 and torch.equal(a.argmax(-1), b.argmax(-1))  # weights rounded to float16
