"""grpo: 2 steps on the tiny model, LoRA and full, with rule rewards and with a reward model; clear errors.

Why every parameter can change: the tiny random policy samples 8-token replies at temperature 1.0, so rewards
differ within each group of 4 (the `length` reward is units / 20 below its band; the random reward model gives
continuous scores) and the advantages are non-zero. Runs are seeded, hence deterministic.
LoRA's A matrices get no gradient in step 1 (B starts at 0) and move in step 2, which is why 2 steps are run.
"""

from __future__ import annotations

import json

from stagekit import DEMO, FIXTURES, QUICK, assert_all_changed, assert_artifacts, run_stage

from medgpt.cli import main

# After QUICK so these win: batch_size counts completions, one group of 4 per step.
RL = ["--grpo.num_generations", "4", "--grpo.max_completion_length", "8", "--grpo.temperature", "1.0",
      "--train.batch_size", "4", "--template", "chatml"]


def test_grpo_rules_lora(tiny_llama, tmp_path, tracked):
    out = tmp_path / "out"
    run_stage("grpo", "--model.name_or_path", tiny_llama, "--data.train_files", FIXTURES / "prompt.jsonl",
              "--finetune.type", "lora", "--reward.functions", "length,repetition", "--output_dir", out, *QUICK, *RL)
    assert_all_changed(tracked)
    metrics = assert_artifacts(out, adapter=True)
    assert metrics["global_step"] == 2
    # generation-fed trainers have no token counts, but still report their pace (step 2: step 1 warms up)
    assert metrics["seconds_per_step"] > 0 and metrics["speed_steps"] == 1 and "tokens_per_second" not in metrics
    assert not (out / "ref").exists(), "TRL's reference adapter copy must not be saved"


def test_grpo_reward_model_full(tiny_llama, tiny_llama_cls, tmp_path, tracked):
    out = tmp_path / "out"
    run_stage("grpo", "--model.name_or_path", tiny_llama, "--data.train_files", DEMO / "preference.jsonl",
              "--data.max_samples", "8", "--finetune.type", "full", "--reward.model", tiny_llama_cls,
              "--output_dir", out, *QUICK, *RL)
    assert_all_changed(tracked)
    assert_artifacts(out, adapter=False)
    # generation stops at the template's end-of-turn token too, and the saved model keeps that
    generation = json.loads((out / "generation_config.json").read_text())
    assert len(generation["eos_token_id"]) == 2


def test_grpo_batch_not_divisible(tiny_llama, tmp_path, capsys):
    code = main(["grpo", "--model.name_or_path", str(tiny_llama), "--data.train_files", str(FIXTURES / "prompt.jsonl"),
                 "--reward.functions", "length", "--grpo.num_generations", "4", "--train.batch_size", "2",
                 "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "not a multiple of --grpo.num_generations 4" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists(), "the check runs before the run starts"


def test_grpo_unknown_reward(tiny_llama, tmp_path, capsys):
    code = main(["grpo", "--model.name_or_path", str(tiny_llama), "--data.train_files", str(FIXTURES / "prompt.jsonl"),
                 "--reward.functions", "lenght", "--output_dir", str(tmp_path / "out")])
    assert code == 1 and "Did you mean length?" in capsys.readouterr().err


def test_trl_renders_our_prompt_and_stops_at_end_of_turn(tokenizer):
    """GRPO/RLOO hand TRL raw conversations; after apply_template TRL's rendering is exactly encode_prompt."""
    from medgpt.data.templates import apply_template, encode_prompt, stop_token_ids

    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "头痛怎么办？"}]
    apply_template(tokenizer, "chatml")
    trl_ids = tokenizer.apply_chat_template(conversation=[prompt], add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"][0]
    assert list(trl_ids) == encode_prompt(prompt, "chatml", tokenizer)
    assert stop_token_ids("chatml", tokenizer) == [tokenizer.eos_token_id,
                                                  tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_prompt_dataset_fits_prompts(tokenizer):
    from medgpt.data.prepare import prompt_dataset
    from medgpt.data.templates import encode_prompt

    turn = [{"role": "user", "content": "很长的旧问题。" * 20}, {"role": "assistant", "content": "旧回答。" * 20}]
    short = [{"role": "user", "content": "发烧了怎么办？"}]
    records = [{"prompt": turn + short, "answer": "B"}, {"prompt": short}, {"prompt": [turn[0]]}]
    budget = len(encode_prompt(short, "chatml", tokenizer)) + 5
    ds = prompt_dataset(records, "chatml", tokenizer, budget, overlong="drop")
    assert ds["prompt"] == [short, short]  # the old exchange went; the long single question was dropped
    assert ds["answer"] == ["B", None]
    ds = prompt_dataset(records, "chatml", tokenizer, budget)  # truncate (default): the long question loses its middle
    assert ds["prompt"][:2] == [short, short] and ds["answer"] == ["B", None, None]
    cut = ds["prompt"][2][0]["content"]
    assert " … " in cut and len(encode_prompt(ds["prompt"][2], "chatml", tokenizer)) <= budget
