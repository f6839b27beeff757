"""simpo: 2 steps on the tiny model (full / LoRA); the objective and its option checks; 20 steps raise the margin."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from stagekit import QUICK, assert_all_changed, assert_artifacts, run_stage
from test_orpo import DATA, LONG, fit_margin

from medgpt.cli import main
from medgpt.stages.simpo import SimPOArgs, simpo_objective


@pytest.mark.parametrize("ft", ["full", "lora"])
def test_simpo_trains_and_saves(ft, tiny_llama, tmp_path, tracked):
    out = tmp_path / "out"
    extra = ["--simpo.sft_weight", "0.5"] if ft == "lora" else ["--simpo.loss_type", "hinge"]
    run_stage("simpo", "--model.name_or_path", tiny_llama, "--data.train_files", DATA, "--data.max_samples", "8",
              "--data.eval_split", "0.25", "--finetune.type", ft, "--template", "chatml", "--output_dir", out,
              *extra, *QUICK, *LONG)
    assert_all_changed(tracked)
    metrics = assert_artifacts(out, adapter=ft == "lora")
    assert metrics["global_step"] == 2
    for key in ("rewards/accuracies", "rewards/margins", "nll", "eval_loss", "eval_rewards/accuracies"):
        assert key in metrics, key


def test_objective_adds_weighted_nll():
    chosen, rejected = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    from medgpt.train.losses import simpo_loss

    plain, metrics = simpo_objective(chosen, rejected, -chosen, args=SimPOArgs())
    want, _ = simpo_loss(chosen, rejected, beta=2.0, gamma=0.5)
    torch.testing.assert_close(plain, want)
    assert metrics["nll"].item() == pytest.approx(1.5)
    mixed, _ = simpo_objective(chosen, rejected, -chosen, args=SimPOArgs(sft_weight=0.4))
    torch.testing.assert_close(mixed, want + 0.4 * 1.5)


@pytest.mark.parametrize("flags, needle", [
    (["--simpo.label_smoothing", "0.6"], "must be at least 0 and below 0.5"),
    (["--simpo.loss_type", "hinge", "--simpo.label_smoothing", "0.1"], "only applies to"),
    (["--simpo.beta", "0"], "must be above 0"),
])
def test_bad_options_fail_before_loading(flags, needle, tmp_path, capsys):
    code = main(["simpo", "--model.name_or_path", str(tmp_path / "none"), "--data.train_files", "x.jsonl",
                 "--output_dir", str(tmp_path / "out"), *flags])
    assert code != 0
    assert needle in capsys.readouterr().err


def test_simpo_raises_the_margin(tiny_llama, tokenizer_dir, tmp_path):
    # SimPO has no NLL term, so a rising margin is the loss's own doing (a flipped sign would lower it).
    before, after = fit_margin(tiny_llama, tokenizer_dir, tmp_path, partial(simpo_objective, args=SimPOArgs()))
    assert after["eval_loss"] < before["eval_loss"]
    assert after["eval_rewards/margins"] > before["eval_rewards/margins"] + 0.5, (before, after)
    assert after["eval_rewards/accuracies"] == 1.0
