"""ppo: 2 steps on the tiny model (full, LoRA, LoRA on an SFT adapter), a learning check on a toy reward, resume
after a kill mid-save, and clear refusals.

The loop is our own (medgpt/train/ppo.py), not a transformers.Trainer, so `ppo_tracked` below snapshots the
trainable parameters of the policy and the value model around `PPOTrainer.train` the way stagekit's `tracked`
does around `Trainer.train`. Every rollout samples at temperature 1.0 from a random tiny policy, so scores and
advantages differ within each batch and every parameter gets a gradient; runs are seeded, hence deterministic.
"""

from __future__ import annotations

import json
import math

import pytest
from stagekit import FIXTURES, QUICK, assert_all_changed, assert_artifacts, run_stage

from medgpt.cli import main

# After QUICK so these win: 4 prompts per PPO step, 8 sampled tokens each.
RL = ["--ppo.max_new_tokens", "8", "--ppo.temperature", "1.0", "--train.batch_size", "4", "--template", "chatml"]
PROMPTS = FIXTURES / "prompt.jsonl"


@pytest.fixture()
def ppo_tracked(monkeypatch):
    """Trainable parameters of policy and value model before and after PPOTrainer.train, and the trainer."""
    from medgpt.train.ppo import PPOTrainer

    snaps: dict = {}
    original = PPOTrainer.train

    def params(self):
        return {f"{tag}.{n}": p.detach().clone() for tag, m in (("policy", self.policy), ("value", self.value_model))
                for n, p in m.named_parameters() if p.requires_grad}

    def train(self, *args, **kwargs):
        snaps["before"] = params(self)
        result = original(self, *args, **kwargs)
        snaps["after"], snaps["trainer"] = params(self), self
        return result

    monkeypatch.setattr(PPOTrainer, "train", train)
    return snaps


def history(out) -> list[dict]:
    return json.loads((out / "trainer_state.json").read_text())["history"]


@pytest.mark.parametrize("ft, clip", [("full", "1.0"), ("lora", "1.0"), ("lora", "0")])
def test_ppo_reward_model_trains_and_saves(ft, clip, tiny_llama, tiny_llama_cls, tmp_path, ppo_tracked):
    """--train.max_grad_norm 0 means no clipping, as in every other stage (it used to zero every gradient)."""
    out = tmp_path / "out"
    run_stage("ppo", "--model.name_or_path", tiny_llama, "--data.train_files", PROMPTS, "--finetune.type", ft,
              "--reward.model", tiny_llama_cls, "--output_dir", out, *QUICK, *RL, "--train.max_grad_norm", clip)
    assert_all_changed(ppo_tracked)
    assert any(n.startswith("value.") for n in ppo_tracked["before"]), "the value model must train too"
    metrics = assert_artifacts(out, adapter=ft == "lora")
    assert metrics["global_step"] == 2
    steps = history(out)
    assert [h["step"] for h in steps] == [1, 2]
    assert metrics["seconds_per_step"] == steps[1]["seconds"] > 0  # rollout + update; step 1 warms up
    for key in ("score", "kl", "policy_loss", "value_loss", "clipfrac", "approx_kl", "entropy", "response_length"):
        assert all(math.isfinite(h[key]) for h in steps), key
    # The first rollout's policy IS the reference (a frozen copy / the adapters switched off): KL exactly 0.
    assert steps[0]["kl"] == 0.0
    value_files = {p.name for p in (out / "value_model").iterdir()}
    assert ("adapter_model.safetensors" if ft == "lora" else "model.safetensors") in value_files
    if ft == "full":  # the saved model stops at the template's end-of-turn token too
        assert len(json.loads((out / "generation_config.json").read_text())["eos_token_id"]) == 2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_ppo_lora_on_sft_adapter_keeps_sft_as_reference(tiny_llama, tmp_path, ppo_tracked):
    """With --model.adapter the reference is base + that (frozen) adapter, not the bare base: KL starts at 0."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    sft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                         LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))  # B != 0
    sft.save_pretrained(tmp_path / "sft")
    out = tmp_path / "out"
    run_stage("ppo", "--model.name_or_path", tiny_llama, "--model.adapter", tmp_path / "sft", "--finetune.type",
              "lora", "--data.train_files", PROMPTS, "--reward.functions", "length,repetition", "--output_dir", out,
              *QUICK, *RL)
    assert_all_changed(ppo_tracked)
    assert_artifacts(out, adapter=True)
    assert history(out)[0]["kl"] == 0.0
    assert not (out / "ref").exists(), "the frozen reference copy of the adapter must not be saved"
    trainer = ppo_tracked["trainer"]
    assert not any(p.requires_grad for n, p in trainer.policy.named_parameters() if ".ref." in n)


def _ascii_letters(prompts, completions, **kwargs) -> list[float]:
    """Toy reward: the share of ASCII letters in the reply. A random tiny policy scores ~0.5 (its byte-level BPE
    vocabulary is half English, half Chinese); shifting probability onto English tokens is a vocabulary-level
    signal it can learn in a few dozen PPO steps."""
    texts = [c[0]["content"] for c in completions]
    return [sum(ch.isascii() and ch.isalpha() for ch in t) / max(len(t), 1) for t in texts]


@pytest.mark.slow  # 30 PPO steps of 8 prompts: a few seconds on 2 cores
@pytest.mark.parametrize("seed", [42, 1, 2])
def test_ppo_learns_a_toy_reward(seed, tiny_llama, tmp_path, monkeypatch):
    from medgpt.train import rewards

    monkeypatch.setitem(rewards.RULES, "ascii_letters", _ascii_letters)
    data = tmp_path / "prompts.jsonl"
    questions = ["What is a fever?", "How do I treat a cold?", "Is aspirin safe?", "What causes headaches?",
                 "高血压怎么办？", "How much water per day?", "感冒吃什么药？", "What is BMI?"]
    data.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))
    out = tmp_path / "out"
    run_stage("ppo", "--model.name_or_path", tiny_llama, "--data.train_files", data, "--finetune.type", "full",
              "--reward.functions", "ascii_letters", "--template", "chatml", "--output_dir", out,
              "--train.max_steps", "30", "--train.batch_size", "8", "--train.learning_rate", "1e-2",
              "--train.seed", str(seed),
              "--train.warmup", "0", "--train.lr_scheduler", "constant", "--train.save_steps", "0",
              "--train.logging_steps", "5", "--train.max_length", "256", "--ppo.max_new_tokens", "8",
              "--ppo.kl_coef", "0.01", "--ppo.missing_eos_penalty", "none")
    metrics = json.loads((out / "metrics.json").read_text())
    # mean score of the first 5 vs the last 5 steps
    assert metrics["score_last"] > metrics["score_first"] + 0.15, metrics


def test_ppo_resume_skips_half_written_checkpoint(tiny_llama, tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    argv = ["ppo", "--model.name_or_path", tiny_llama, "--data.train_files", PROMPTS, "--finetune.type", "full",
            "--reward.functions", "length,repetition", "--output_dir", out, *QUICK, *RL, "--train.max_steps", "4",
            "--train.save_steps", "2", "--ppo.ppo_epochs", "2", "--train.tensorboard", "false"]
    run_stage(*argv)
    assert (out / "checkpoint-2" / ".complete").exists() and (out / "checkpoint-4" / ".complete").exists()
    straight = load_file(out / "model.safetensors")
    (out / "checkpoint-4" / ".complete").unlink()  # as if killed while writing checkpoint-4
    capsys.readouterr()
    run_stage(*argv, "--resume")
    log = capsys.readouterr().out
    assert "removing incomplete checkpoint checkpoint-4" in log and "resuming from" in log and "checkpoint-2" in log
    assert "resumed at PPO step 2 of 4" in log
    assert [h["step"] for h in history(out)] == [1, 2, 3, 4]
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 4
    assert (out / "checkpoint-4" / ".complete").exists()
    resumed = load_file(out / "model.safetensors")
    # optimizer, scheduler, RNG and data order restored: steps 3-4 replay exactly
    assert all((straight[k] == resumed[k]).all() for k in straight)


@pytest.mark.parametrize("extra, message", [
    ([], "no reward source given"),
    (["--reward.functions", "length", "--ppo.num_mini_batches", "3"], "must be divisible by"),
])
def test_ppo_refuses_clearly(extra, message, tiny_llama, tmp_path, capsys):
    code = main(["ppo", "--model.name_or_path", str(tiny_llama), "--data.train_files", str(PROMPTS),
                 "--output_dir", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists(), "the check runs before the run starts"
