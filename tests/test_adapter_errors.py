"""--model.adapter misuse: one check in model/load.py gives every command the same clear error, and
--finetune.type full with an adapter follows one rule everywhere (the adapter is merged in, then every weight trains)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medgpt.args import FinetuneArgs, ModelArgs
from medgpt.cli import main
from medgpt.model.load import load_model
from medgpt.utils import MedGPTError

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"
QUICK = ["--train.max_steps", "1", "--train.warmup", "0", "--train.batch_size", "2", "--train.save_steps", "0",
         "--train.logging_steps", "1", "--train.max_length", "512", "--data.max_samples", "4"]


@pytest.fixture(scope="module")
def lora_dir(tiny_llama, tmp_path_factory) -> Path:
    """A real LoRA adapter on the tiny model, with random (non-zero) B so that it changes the outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    net = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                         LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    out = tmp_path_factory.mktemp("lora")
    net.save_pretrained(out)
    return out


def _not_adapters(root: Path, tiny_llama: Path, lora_dir: Path) -> dict[str, tuple[Path, str]]:
    """Directories that are not a usable adapter, with what the error must say."""
    empty = root / "empty"
    empty.mkdir()
    no_weights = root / "no_weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text((lora_dir / "adapter_config.json").read_text())
    return {"missing": (root / "nope", "does not exist"),
            "empty": (empty, "it has no adapter_config.json"),
            "full": (tiny_llama, "is a full model, not a LoRA adapter (no adapter_config.json)"),
            "no_weights": (no_weights, "has adapter_config.json but no adapter weights")}


COMMANDS = {
    "sft": ["sft", "--data.train_files", DEMO / "sft_alpaca.json", *QUICK],
    "dpo": ["dpo", "--data.train_files", DEMO / "preference.jsonl", *QUICK],
    "eval": ["eval", "--eval.mcq_files", DEMO / "mcq.jsonl", "--eval.max_samples", "2"],
    "merge": ["merge"],
}


@pytest.mark.parametrize("kind", ["missing", "empty", "full", "no_weights"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_not_an_adapter_is_one_clear_error_in_every_command(command, kind, tiny_llama, lora_dir, tmp_path, capsys):
    """eval and dpo used to end in a peft traceback for a dir without adapter_config.json."""
    adapter, needle = _not_adapters(tmp_path, tiny_llama, lora_dir)[kind]
    argv = [*COMMANDS[command], "--model.name_or_path", tiny_llama, "--model.adapter", adapter,
            "--output_dir", tmp_path / "out"]
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(adapter) in errors[0] and needle in errors[0], err


def test_full_finetune_merges_the_adapter_and_trains_every_weight(tiny_llama, lora_dir):
    import torch

    args = ModelArgs(name_or_path=str(tiny_llama), adapter=str(lora_dir), dtype="float32")
    want = load_model(args).eval()  # inference: base + frozen adapter
    net = load_model(args, FinetuneArgs(type="full")).eval()
    assert not hasattr(net, "peft_config"), "full fine-tuning must train plain weights, not a PEFT wrapper"
    names = [n for n, _ in net.named_parameters()]
    assert not any("lora_" in n for n in names)
    assert all(p.requires_grad for p in net.parameters())
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.allclose(net(ids).logits, want(ids).logits, atol=1e-5), "the merge lost the adapter"


STAGES = {"sft": DEMO / "sft_alpaca.json", "dpo": DEMO / "preference.jsonl", "kto": DEMO / "preference.jsonl",
          "orpo": DEMO / "preference.jsonl", "simpo": DEMO / "preference.jsonl", "pt": DEMO / "pretrain_en.txt",
          "grpo": FIXTURES / "prompt.jsonl", "rloo": FIXTURES / "prompt.jsonl", "rm": DEMO / "preference.jsonl"}
# After QUICK so these win: one group of 4 short completions per step, a rule reward.
RL = {s: [f"--{s}.num_generations", "4", f"--{s}.max_completion_length", "4", "--train.batch_size", "4",
          "--reward.functions", "length"] for s in ("grpo", "rloo")}


@pytest.mark.parametrize("ft", ["full", "lora"])
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_adapter_rule_is_the_same_in_every_stage(stage, ft, tiny_llama, lora_dir, tmp_path, capsys):
    """--model.adapter: LoRA keeps training that adapter (saved as an adapter, its weights moved); full
    fine-tuning folds it in, trains every weight and saves a plain model. Decided once, in model/load.py."""
    from safetensors.torch import load_file

    out = tmp_path / "out"
    code = main([str(a) for a in [stage, "--model.name_or_path", tiny_llama, "--model.adapter", lora_dir,
                                  "--finetune.type", ft, "--data.train_files", STAGES[stage],
                                  *(["--template", "chatml"] if stage != "pt" else []), "--output_dir", out, *QUICK,
                                  *(["--train.learning_rate", "0.01"] if ft == "lora" else []), *RL.get(stage, [])]])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    if ft == "full":
        assert f"merged {lora_dir} into the base" in captured.out  # the rule is logged
        assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    else:
        before = load_file(lora_dir / "adapter_model.safetensors")
        after = load_file(out / "adapter_model.safetensors")
        assert set(before) <= set(after), "the loaded adapter's modules must be the ones that keep training"
        assert any(not (after[k] == before[k]).all() for k in before), "the loaded adapter did not train"


def test_adapter_of_another_base_is_a_clear_error(tiny_llama, lora_dir, tmp_path):
    """A LoRA trained on one model loaded onto a base of another width: peft's size-mismatch RuntimeError."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    conf = json.loads((tiny_llama / "config.json").read_text())
    wide = LlamaConfig(vocab_size=conf["vocab_size"], hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1)
    base = tmp_path / "wide"
    AutoModelForCausalLM.from_config(wide).save_pretrained(base)
    with pytest.raises(MedGPTError, match=r"does not fit the base .*size mismatch.*adapter_config.json says"):
        load_model(ModelArgs(name_or_path=str(base), adapter=str(lora_dir)), FinetuneArgs(type="lora"))


def test_full_finetune_with_adapter_runs_through_ppo(tiny_llama, lora_dir, tmp_path):
    """ppo folded the adapter in by itself before; now load_model does it, once, for every stage."""
    out = tmp_path / "out"
    code = main([str(a) for a in ["ppo", "--model.name_or_path", tiny_llama, "--model.adapter", lora_dir,
                                  "--finetune.type", "full", "--data.train_files", FIXTURES / "prompt.jsonl",
                                  "--reward.functions", "length", "--template", "chatml", "--output_dir", out,
                                  "--ppo.max_new_tokens", "4", *QUICK]])
    assert code == 0
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
