"""orpo: 2 steps on the tiny model (full / LoRA) on fixture + demo pairs; 20 steps on 4 pairs raise the margin."""

from __future__ import annotations

from functools import partial

import pytest
from stagekit import DEMO, FIXTURES, QUICK, assert_all_changed, assert_artifacts, run_stage

DATA = f"{FIXTURES}/preference.jsonl,{DEMO}/preference.jsonl"
# The demo pairs are ~400 tokens with the tests' 1k-vocab tokenizer (QUICK's 256 would drop them all).
LONG = ["--train.max_length", "640"]


@pytest.mark.parametrize("ft", ["full", "lora"])
def test_orpo_trains_and_saves(ft, tiny_llama, tmp_path, tracked):
    out = tmp_path / "out"
    run_stage("orpo", "--model.name_or_path", tiny_llama, "--data.train_files", DATA, "--data.max_samples", "8",
              "--data.eval_split", "0.25", "--finetune.type", ft, "--template", "chatml", "--output_dir", out,
              *QUICK, *LONG)
    assert_all_changed(tracked)
    metrics = assert_artifacts(out, adapter=ft == "lora")
    assert metrics["global_step"] == 2
    for key in ("rewards/accuracies", "rewards/margins", "log_odds_ratio", "nll", "eval_loss",
                "eval_rewards/accuracies", "eval_log_odds_ratio"):
        assert key in metrics, key
    assert 0 <= metrics["rewards/accuracies"] <= 1


PAIRS = [
    ("Can I take ibuprofen on an empty stomach?", "Better with food; it can irritate the stomach.", "Always fine."),
    ("高血压患者可以喝咖啡吗？", "适量饮用一般可以，但应监测血压。", "随便喝。"),
    ("Chest pain spreading to my left arm?", "Call emergency services now.", "Sleep it off."),
    ("How much paracetamol per day?", "Adults: no more than 4 g in 24 hours.", "As much as you like."),
]


def fit_margin(model_dir, tokenizer_dir, tmp_path, loss_fn, steps=20):
    """eval rewards/margins on 4 fixed pairs before and after `steps` full fine-tuning steps on them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from medgpt.data.pairs import preference_dataset
    from medgpt.train.preference import PreferenceCollator, PreferenceTrainer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    records = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
                "rejected": [{"role": "assistant", "content": r}]} for p, c, r in PAIRS]
    ds = preference_dataset(records, "chatml", tok, 256)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                             per_device_eval_batch_size=4, learning_rate=3e-3, lr_scheduler_type="constant",
                             save_strategy="no", report_to=[], use_cpu=True, logging_steps=5, seed=0)
    trainer = PreferenceTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args, loss_fn=loss_fn,
                                train_dataset=ds, eval_dataset=ds, data_collator=PreferenceCollator(tok.pad_token_id))
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    return before, after


def test_orpo_raises_the_margin(tiny_llama, tokenizer_dir, tmp_path):
    from medgpt.train.losses import orpo_loss

    before, after = fit_margin(tiny_llama, tokenizer_dir, tmp_path / "orpo", partial(orpo_loss, beta=1.0))
    assert after["eval_loss"] < before["eval_loss"]
    assert after["eval_rewards/margins"] > before["eval_rewards/margins"] + 0.1, (before, after)
    assert after["eval_rewards/accuracies"] == 1.0
    # The NLL term alone also lifts chosen over rejected; the odds-ratio term must push the log-odds further
    # (with its sign flipped, the log-odds gain collapses to ~0).
    _, nll_only = fit_margin(tiny_llama, tokenizer_dir, tmp_path / "nll", partial(orpo_loss, beta=0.0))
    assert after["eval_log_odds_chosen"] > nll_only["eval_log_odds_chosen"] + 0.5, (after, nll_only)
