"""merge: base + LoRA adapter -> a plain HF model dir with the same outputs; clear refusals for bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from medgpt.cli import main
from medgpt.utils import MedGPTError

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"
QUICK = ["--train.max_steps", "2", "--train.warmup", "0", "--train.learning_rate", "1e-2", "--train.batch_size", "2",
         "--train.save_steps", "0", "--train.logging_steps", "1", "--train.max_length", "128",
         "--train.tensorboard", "false"]


def medgpt(*argv) -> int:
    return main([str(a) for a in argv])


def merge(base, adapter, out, *extra):
    """Run `medgpt merge` in-process through its run() so refusals surface as MedGPTError."""
    from medgpt.config import parse_argv
    from medgpt.model import merge as M

    argv = ["--model.adapter", str(adapter), "--output_dir", str(out), *map(str, extra)]
    if base is not None:
        argv = ["--model.name_or_path", str(base), *argv]
    return M.run(parse_argv(M.Config, argv))


@pytest.fixture(scope="module")
def lora_sft(tiny_llama, tmp_path_factory) -> Path:
    """A real LoRA adapter: `medgpt sft` for 2 steps (the adapter dir also holds the tokenizer + chat template)."""
    out = tmp_path_factory.mktemp("sft-lora") / "out"
    code = medgpt("sft", "--model.name_or_path", tiny_llama, "--data.train_files", f"{FIXTURES}/sharegpt.jsonl",
                  "--finetune.type", "lora", "--template", "chatml", "--output_dir", out, *QUICK)
    assert code == 0
    return out


@pytest.fixture(scope="module")
def merged(lora_sft, tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "model"
    assert merge(tiny_llama, lora_sft, out) == 0
    return out


def _ids() -> torch.Tensor:
    return torch.tensor([[40, 77, 123, 300, 512, 901], [64, 65, 66, 700, 31, 250]])  # no special/pad tokens


def _reference(base, adapter, task="causal_lm"):
    from medgpt.args import ModelArgs
    from medgpt.model.load import load_model

    return load_model(ModelArgs(name_or_path=str(base), adapter=str(adapter), dtype="float32"), None, task=task).eval()


def test_merged_dir_is_plain_model_with_same_logits(merged, lora_sft, tiny_llama):
    from transformers import AutoModelForCausalLM

    names = {p.name for p in merged.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer_config.json",
            "config.yaml"} <= names, names
    assert not any(n.startswith("adapter_") for n in names), names
    assert not any(n.endswith((".bin", ".pt")) for n in names), names
    assert [p.name for p in merged.parent.iterdir()] == ["model"], "temp dir left beside the output"

    ids = _ids()
    model = AutoModelForCausalLM.from_pretrained(merged).eval()  # no flags, no peft
    assert not hasattr(model, "peft_config")
    with torch.no_grad():
        got = model(ids).logits
        want = _reference(tiny_llama, lora_sft)(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()(ids).logits
    assert not torch.allclose(want, base, atol=1e-4), "the adapter did not change the model: trivial merge"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    conf = json.loads((merged / "config.json").read_text())
    assert conf["merged_from"][0]["adapter"] == str(lora_sft.resolve())
    assert "quantization_config" not in conf


def test_merged_tokenizer_keeps_chat_template(merged, lora_sft):
    from transformers import AutoTokenizer

    tok, trained = AutoTokenizer.from_pretrained(merged), AutoTokenizer.from_pretrained(lora_sft)
    assert tok.chat_template and tok.chat_template == trained.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_merge_via_cli_and_base_from_adapter_config(lora_sft, tmp_path):
    """The CLI path works, and without --model.name_or_path the adapter's recorded base is used."""
    out = tmp_path / "m"
    assert medgpt("merge", "--model.adapter", lora_sft, "--output_dir", out) == 0
    assert (out / "model.safetensors").is_file()


def test_refuses_merging_twice(merged, lora_sft, tmp_path):
    with pytest.raises(MedGPTError, match="already merged model, not an adapter"):
        merge(merged, merged, tmp_path / "a")
    # the same adapter into a model that already contains it
    with pytest.raises(MedGPTError, match="already contains this adapter"):
        merge(merged, lora_sft, tmp_path / "b")
    # ... even when the adapter was copied elsewhere (identified by its weights, not its path)
    moved = tmp_path / "moved"
    shutil.copytree(lora_sft, moved)
    with pytest.raises(MedGPTError, match="already contains this adapter"):
        merge(merged, moved, tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_refuses_quantized_base(lora_sft, tiny_llama, tmp_path):
    """A 4-bit base dir (quantization_config in config.json): merge into the original base instead."""
    q = tmp_path / "base-4bit"
    shutil.copytree(tiny_llama, q)
    conf = json.loads((q / "config.json").read_text())
    conf["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (q / "config.json").write_text(json.dumps(conf))
    with pytest.raises(MedGPTError, match=r"quantized model.*original full-precision base"):
        merge(q, lora_sft, tmp_path / "out")


@pytest.mark.parametrize("what", ["missing", "not_adapter", "no_weights", "base_is_adapter"])
def test_refuses_bad_adapter_or_base(what, lora_sft, tiny_llama, tmp_path):
    base, adapter = tiny_llama, lora_sft
    needle = {"missing": "does not exist", "not_adapter": "full model, not a LoRA adapter",
              "no_weights": "no adapter weights", "base_is_adapter": "is a LoRA adapter, not a base model"}[what]
    if what == "missing":
        adapter = tmp_path / "nope"
    elif what == "not_adapter":
        adapter = tiny_llama
    elif what == "no_weights":
        adapter = tmp_path / "partial"
        adapter.mkdir()
        shutil.copy(lora_sft / "adapter_config.json", adapter)
    else:
        base = lora_sft
    with pytest.raises(MedGPTError, match=needle):
        merge(base, adapter, tmp_path / "out")


def test_refuses_adapter_of_another_model(lora_sft, tiny_llama, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = AutoConfig.from_pretrained(tiny_llama)
    conf.hidden_size, conf.head_dim = 32, 16  # same architecture and names, other shapes
    other = tmp_path / "other"
    AutoModelForCausalLM.from_config(conf).save_pretrained(other)
    with pytest.raises(MedGPTError, match=r"does not fit the base .*size mismatch"):
        merge(other, lora_sft, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]  # no output, no temp dir


def test_output_dir_needs_overwrite(lora_sft, tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    for flag in ((), ("--overwrite",)):  # a folder medgpt did not write is never merged into
        with pytest.raises(MedGPTError, match="medgpt did not write what it holds \\(keep.txt"):
            merge(tiny_llama, lora_sft, out, *flag)
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    out = tmp_path / "merged"
    assert merge(tiny_llama, lora_sft, out) == 0
    with pytest.raises(MedGPTError, match="not empty.*--overwrite"):
        merge(tiny_llama, lora_sft, out)
    (out / "notes.txt").write_text("mine")  # put there by the user after the first merge
    assert merge(tiny_llama, lora_sft, out, "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "out"]  # no temp dir beside them
    with pytest.raises(MedGPTError, match="is the base or adapter"):
        merge(tiny_llama, lora_sft, lora_sft, "--overwrite")


def test_seq_cls_adapter_merges_with_score_head(tiny_llama, tokenizer_dir, tmp_path):
    """A reward-model adapter (LoRA + the score head in modules_to_save) -> AutoModelForSequenceClassification."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from medgpt.args import FinetuneArgs, ModelArgs
    from medgpt.model.load import load_model

    torch.manual_seed(0)
    model = load_model(ModelArgs(name_or_path=str(tiny_llama)), FinetuneArgs(type="lora"), task="seq_cls")
    with torch.no_grad():  # stand in for training: every trainable tensor (LoRA A/B, score head) moves
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    adapter = tmp_path / "rm"
    model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"

    out = tmp_path / "merged"
    assert merge(tiny_llama, adapter, out) == 0
    assert not (out / "adapter_config.json").exists()
    ids = _ids()
    merged_rm = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert merged_rm.config.num_labels == 1
    with torch.no_grad():
        got = merged_rm(ids).logits
        want = _reference(tiny_llama, adapter, task="seq_cls")(ids).logits
    assert got.shape == (2, 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_merge_rm_stage_output(tiny_llama, tmp_path):
    """The LoRA output of `medgpt rm` merges into a reward model that scores exactly as the adapter does."""
    from transformers import AutoModelForSequenceClassification

    from medgpt.model.load import load_reward_model

    rm = tmp_path / "rm"
    assert medgpt("rm", "--model.name_or_path", tiny_llama, "--data.train_files", f"{FIXTURES}/preference.jsonl",
                  "--finetune.type", "lora", "--template", "chatml", "--output_dir", rm, *QUICK) == 0
    out = tmp_path / "rm-merged"
    assert medgpt("merge", "--model.adapter", rm, "--output_dir", out) == 0
    ids = _ids()
    merged_rm = AutoModelForSequenceClassification.from_pretrained(out).eval()
    reference, tokenizer = load_reward_model(str(rm), dtype="float32")
    assert merged_rm.config.pad_token_id == tokenizer.pad_token_id
    with torch.no_grad():
        torch.testing.assert_close(merged_rm(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)
