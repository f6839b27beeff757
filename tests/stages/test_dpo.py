"""dpo: 2 steps on the tiny model (full and LoRA), TRL's ids are our template's ids, bad data and options refused."""

from __future__ import annotations

import json
import math

import pytest
from stagekit import FIXTURES, QUICK, assert_all_changed, assert_artifacts, run_stage

from medgpt.cli import main

# Plain-string, multi-turn (with system) and Chinese question/response pairs, and HH-style whole conversations.
DATA = f"{FIXTURES}/preference.jsonl,{FIXTURES}/hh.jsonl"
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen")


@pytest.fixture()
def trainers(monkeypatch):
    """Every Trainer whose train() ran, so a test can look at the dataset TRL built; `refs` holds the frozen
    reference adapter's parameters as they were when training started."""
    from transformers import Trainer

    seen, original = [], Trainer.train

    def train(self, *args, **kwargs):
        self.refs = {n: (p.detach().clone(), p.requires_grad) for n, p in self.model.named_parameters() if ".ref." in n}
        seen.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train", train)
    return seen


@pytest.mark.parametrize("ft", ["full", "lora"])
def test_dpo_trains_and_saves(ft, tiny_llama, tmp_path, tracked):
    out = tmp_path / "out"
    run_stage("dpo", "--model.name_or_path", tiny_llama, "--data.train_files", DATA, "--finetune.type", ft,
              "--template", "chatml", "--output_dir", out, *QUICK)
    assert_all_changed(tracked)
    metrics = assert_artifacts(out, adapter=ft == "lora")
    assert metrics["global_step"] == 2
    for key in REWARDS:
        assert math.isfinite(metrics[key]), (key, metrics)
    if ft == "lora":  # only the trained adapter is saved, not TRL's frozen "ref" copy
        assert not (out / "ref").exists()


def test_trl_ids_are_our_template(tiny_llama, tmp_path, trainers):
    """What TRL trains on: prompt ids = encode_prompt, prompt + chosen ids = encode ids; the scored reply is our
    trained span (reply + <|im_end|>) plus the template's separator, never a prompt token."""
    from medgpt.args import ModelArgs
    from medgpt.data.templates import IGNORE_INDEX, encode, encode_prompt, get_template
    from medgpt.data.validate import load_records
    from medgpt.model.load import load_tokenizer

    run_stage("dpo", "--model.name_or_path", tiny_llama, "--data.train_files", DATA, "--finetune.type", "lora",
              "--template", "chatml", "--output_dir", tmp_path / "out", *QUICK, "--train.max_steps", "1")
    (trainer,) = trainers
    tok, template = load_tokenizer(ModelArgs(name_or_path=str(tiny_llama))), get_template("chatml")
    separator = tok("\n", add_special_tokens=False)["input_ids"]
    records = load_records(DATA.split(","), "preference")
    assert len(trainer.train_dataset) == len(records) == 5
    for rec, row in zip(records, trainer.train_dataset):
        assert row["prompt_ids"] == encode_prompt(rec["prompt"], template, tok)
        for side in ("chosen", "rejected"):
            enc = encode(rec["prompt"] + rec[side], template, tok)
            completion = row[f"{side}_ids"]
            assert row["prompt_ids"] + completion == enc.input_ids
            span = [t for t in enc.labels[len(row["prompt_ids"]):] if t != IGNORE_INDEX]
            assert completion == span + separator
            assert tok.decode(span).endswith("<|im_end|>")


def test_adapter_continues_and_reference_is_the_adapter(tiny_llama, tmp_path, trainers):
    """--model.adapter + LoRA: the loaded adapter trains, and TRL's frozen 'ref' copy of it is the reference."""
    import torch

    sft = tmp_path / "sft"
    run_stage("dpo", "--model.name_or_path", tiny_llama, "--data.train_files", DATA, "--finetune.type", "lora",
              "--template", "chatml", "--output_dir", sft, *QUICK)  # any adapter will do as the "SFT" one
    out = tmp_path / "out"
    run_stage("dpo", "--model.name_or_path", tiny_llama, "--model.adapter", sft, "--data.train_files", DATA,
              "--finetune.type", "lora", "--template", "chatml", "--output_dir", out, *QUICK)
    from safetensors.torch import load_file

    loaded = load_file(sft / "adapter_model.safetensors")
    refs = {n.replace(".ref.", "."): v for n, v in trainers[-1].refs.items()}
    assert len(refs) == len(loaded)
    for name, value in loaded.items():  # the reference adapter is a frozen copy of the adapter we loaded
        ref, requires_grad = next(v for n, v in refs.items() if n.endswith(name.removeprefix("base_model.model.")))
        assert not requires_grad and torch.equal(ref.cpu(), value)
    trained = load_file(out / "adapter_model.safetensors")
    assert trained.keys() == loaded.keys()
    assert any(not torch.equal(trained[k], loaded[k]) for k in loaded)


@pytest.mark.parametrize("argv, needle", [
    (["--data.train_files", f"{FIXTURES}/text.jsonl"], "dpo needs preference records {prompt, chosen, rejected}"),
    (["--dpo.loss_type", "sigmoid,ipo", "--dpo.loss_weights", "1"], "1 values for 2 loss types"),
    (["--dpo.loss_type", "exo_pair"], "needs --dpo.label_smoothing > 0"),
    (["--dpo.loss_type", "dpo"], "not one of: sigmoid, hinge"),
    (["--dpo.rpo_alpha", "1", "--dpo.loss_type", "sigmoid,sft"], "already has"),
    (["--finetune.type", "full", "--model.adapter", "x"], "adapter directory x does not exist"),
])
def test_refusals(argv, needle, tiny_llama, tmp_path, capsys):
    base = ["dpo", "--model.name_or_path", str(tiny_llama), "--data.train_files", DATA, "--template", "chatml",
            "--output_dir", str(tmp_path / "out")]
    assert main(base + argv) == 1
    err = capsys.readouterr().err
    assert needle in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()  # refused before any output was written


def test_losses_rpo_and_eval(tiny_llama, tmp_path):
    """Several TRL losses at once plus RPO's NLL term reach TRL; held-out pairs give eval rewards."""
    from medgpt.stages.dpo import DPOArgs, losses

    assert losses(DPOArgs(loss_type=["sigmoid", "bco_pair"], rpo_alpha=0.5)) == (
        ["sigmoid", "bco_pair", "sft"], [1.0, 1.0, 0.5])
    out = tmp_path / "out"
    run_stage("dpo", "--model.name_or_path", tiny_llama, "--data.train_files", DATA, "--finetune.type", "lora",
              "--template", "chatml", "--dpo.loss_type", "ipo,hinge", "--dpo.loss_weights", "0.5,0.5",
              "--dpo.rpo_alpha", "1", "--data.eval_split", "0.4", "--output_dir", out, *QUICK)
    saved = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(saved["train_loss"]) and "rewards/margins" in saved
    assert math.isfinite(saved["eval_loss"]) and math.isfinite(saved["eval_rewards/accuracies"])


def test_long_prompts_lose_oldest_turns(tokenizer):
    """fit_prompt: whole exchanges go from the start (the system message and last user turn stay); a pair that
    cannot fit even then is dropped (None), never cut inside a reply."""
    from medgpt.data.prepare import fit_prompt
    from medgpt.data.templates import encode, encode_prompt, get_template

    template = get_template("chatml")
    system = [{"role": "system", "content": "You are a doctor."}]
    history = [{"role": "user", "content": "First question " * 20}, {"role": "assistant", "content": "Answer " * 20},
               {"role": "user", "content": "Second question?"}]
    reply = [[{"role": "assistant", "content": "Short reply."}]]
    prompt = system + history
    full = len(encode(prompt + reply[0], template, tokenizer).input_ids)
    assert fit_prompt(prompt, reply, template, tokenizer, full) == prompt
    assert fit_prompt(prompt, reply, template, tokenizer, full - 1) == system + history[2:]
    short = len(encode_prompt(system + history[2:], template, tokenizer))
    assert fit_prompt(prompt, reply, template, tokenizer, None, max_prompt_length=short) == system + history[2:]
    assert fit_prompt(prompt, reply, template, tokenizer, 5) is None
