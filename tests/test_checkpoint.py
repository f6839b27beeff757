"""medgpt/train/checkpoint.py: the one checkpoint format of our own loops (pretrain, ppo)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from medgpt.train import checkpoint as kit
from medgpt.train.run import COMPLETE, completed_checkpoints
from medgpt.utils import MedGPTError


def _model(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama)


def test_round_trip_restores_weights_optimizer_rngs_and_keeps_the_newest(tiny_llama, tmp_path):
    from medgpt.outdir import prepare_output_dir

    tmp_path = prepare_output_dir(str(tmp_path / "out"), False, command="pt")  # checkpoints count in a dir of ours
    model = _model(tiny_llama)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    opt.step()
    for step in (1, 2, 3):
        kit.save_checkpoint(tmp_path, step, model.save_pretrained, opt, {"step": step, "history": [step]}, keep=2)
    assert [p.name for p in completed_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert (tmp_path / "checkpoint-3" / COMPLETE).read_text() == "3"
    draws = (random.random(), np.random.rand(), torch.rand(1).item())  # what the RNGs give after the save

    other = _model(tiny_llama)
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    opt2 = torch.optim.AdamW(other.parameters(), lr=1e-3)
    kit.load_weights(other, tmp_path / "checkpoint-3")
    state = kit.load_checkpoint(tmp_path / "checkpoint-3", opt2, "cpu")
    assert state == {"step": 3, "history": [3]}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws  # the run goes on as it would have


def test_weights_of_another_model_are_refused(tiny_llama, tiny_qwen2, tmp_path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny_qwen2).save_pretrained(tmp_path)
    with pytest.raises(MedGPTError, match="was written by a different model"):
        kit.load_weights(_model(tiny_llama), tmp_path)
