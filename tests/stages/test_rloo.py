"""rloo: 2 steps on the tiny model, LoRA and full, with rule rewards and with a reward model (and eval data);
clear errors.

Why every parameter can change: the tiny random policy samples 8-token replies at temperature 1.0, so the
`length` reward (units / 20 below the band) and the random reward model's scores differ within each group of
4, and a reply's leave-one-out advantage (its reward minus the mean of the other 3) is non-zero. Runs are
seeded, hence deterministic.
LoRA's A matrices get no gradient in step 1 (B starts at 0) and move in step 2, which is why 2 steps are run.
"""

from __future__ import annotations

from stagekit import DEMO, FIXTURES, QUICK, assert_all_changed, assert_artifacts, run_stage

from medgpt.cli import main

# After QUICK so these win: batch_size counts completions, one group of 4 per step.
RL = ["--rloo.num_generations", "4", "--rloo.max_completion_length", "8", "--rloo.temperature", "1.0",
      "--train.batch_size", "4", "--template", "chatml"]


def test_rloo_rules_lora(tiny_llama, tmp_path, tracked):
    out = tmp_path / "out"
    run_stage("rloo", "--model.name_or_path", tiny_llama, "--data.train_files", FIXTURES / "prompt.jsonl",
              "--finetune.type", "lora", "--reward.functions", "length,repetition", "--output_dir", out, *QUICK, *RL)
    assert_all_changed(tracked)
    metrics = assert_artifacts(out, adapter=True)
    assert metrics["global_step"] == 2
    assert not (out / "ref").exists(), "TRL's reference adapter copy must not be saved"


def test_rloo_reward_model_full(tiny_llama, tiny_llama_cls, tmp_path, tracked):
    out = tmp_path / "out"
    run_stage("rloo", "--model.name_or_path", tiny_llama, "--data.train_files", DEMO / "preference.jsonl",
              "--data.max_samples", "8", "--data.eval_split", "0.25", "--finetune.type", "full",
              "--reward.model", tiny_llama_cls, "--reward.functions", "length", "--reward.weights", "1,0.5",
              "--output_dir", out, *QUICK, *RL)
    assert_all_changed(tracked)
    metrics = assert_artifacts(out, adapter=False)
    assert "eval_reward" in metrics, metrics


def test_rloo_batch_not_divisible(tiny_llama, tmp_path, capsys):
    code = main(["rloo", "--model.name_or_path", str(tiny_llama), "--data.train_files", str(FIXTURES / "prompt.jsonl"),
                 "--reward.functions", "length", "--rloo.num_generations", "4", "--train.batch_size", "2",
                 "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "not a multiple of --rloo.num_generations 4" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists(), "the check runs before the run starts"


def test_rloo_unknown_reward(tiny_llama, tmp_path, capsys):
    code = main(["rloo", "--model.name_or_path", str(tiny_llama), "--data.train_files", str(FIXTURES / "prompt.jsonl"),
                 "--reward.functions", "lenght", "--output_dir", str(tmp_path / "out")])
    assert code == 1 and "Did you mean length?" in capsys.readouterr().err
