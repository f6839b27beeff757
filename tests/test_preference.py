"""Preference pairs for the reference-free trainers: which tokens train, truncation, padding, and a golden check
that PreferenceTrainer's single concatenated forward pass gives exactly `losses.orpo_loss` of separate passes.

    python -m pytest tests/test_preference.py -q
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

import medgpt.data.pairs as P
from medgpt.data.pairs import encode_pair, encode_response, preference_dataset
from medgpt.data.templates import IGNORE_INDEX, encode, encode_prompt
from medgpt.train.losses import orpo_loss, sequence_logps
from medgpt.train.preference import PreferenceCollator
from medgpt.utils import MedGPTError


def msg(role, content):
    return {"role": role, "content": content}


MULTI = {
    "prompt": [msg("system", "You are a pharmacist."), msg("user", "I have a headache."),
               msg("assistant", "How long has it lasted?"), msg("user", "Two days.")],
    "chosen": [msg("assistant", "See a doctor if it persists.")],
    "rejected": [msg("assistant", "Ignore it.")],
}
SHORT = {"prompt": [msg("user", "Ibuprofen on an empty stomach?")],
         "chosen": [msg("assistant", "Better with food.")], "rejected": [msg("assistant", "Always fine.")]}


def trained(tokenizer, labels) -> str:
    return tokenizer.decode([x for x in labels if x != IGNORE_INDEX])


# Qwen2's own ChatML jinja (no {% generation %} markers): `--template tokenizer` finds the reply by prefix rendering.
QWEN2_JINJA = (r"{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
               r"{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
               r"{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
               r"{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize("template", ["chatml", "tokenizer"])
def test_multi_turn_pair_trains_only_the_final_reply(tokenizer, template):
    tokenizer.chat_template = QWEN2_JINJA
    row, shortened = encode_pair(MULTI, template, tokenizer, max_length=1024)
    assert not shortened
    prompt_ids = encode_prompt(MULTI["prompt"], template, tokenizer)
    for side, reply in (("chosen", "See a doctor if it persists."), ("rejected", "Ignore it.")):
        ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
        assert ids[:len(prompt_ids)] == prompt_ids  # the prompt is an exact prefix here
        assert all(x == IGNORE_INDEX for x in labels[:len(prompt_ids)])
        assert trained(tokenizer, labels) == reply + "<|im_end|>"
        assert ids == encode(MULTI["prompt"] + MULTI[side], template, tokenizer).input_ids
    # plain SFT encoding would also train the earlier assistant turn; a preference pair must not
    sft = encode(MULTI["prompt"] + MULTI["chosen"], template, tokenizer)
    assert "How long has it lasted?" in trained(tokenizer, sft.labels)


def test_bpe_boundary_merge_masks_the_common_prefix(tokenizer, monkeypatch):
    # Simulate a tokenizer that merges the last prompt token with the reply: the prompt is no longer a prefix.
    real = P.encode_prompt
    monkeypatch.setattr(P, "encode_prompt", lambda *a: real(*a)[:-1] + [real(*a)[-1] + 1])
    ids, labels = encode_response(MULTI["prompt"], MULTI["chosen"], "chatml", tokenizer)
    assert trained(tokenizer, labels) == "See a doctor if it persists.<|im_end|>"


def test_template_that_renders_the_prompt_differently_is_refused(tokenizer, monkeypatch):
    # The prompt diverges at its first token: the earlier assistant turn would train too, so we refuse.
    real = P.encode_prompt
    monkeypatch.setattr(P, "encode_prompt", lambda *a: [real(*a)[0] + 1] + real(*a)[1:])
    with pytest.raises(MedGPTError, match="--template NAME"):
        encode_response(MULTI["prompt"], MULTI["chosen"], "chatml", tokenizer)


def test_long_prompt_loses_oldest_exchanges_then_pair_is_dropped(tokenizer):
    full, _ = encode_pair(MULTI, "chatml", tokenizer, max_length=1024)
    n = max(len(full["chosen_input_ids"]), len(full["rejected_input_ids"]))
    row, how = encode_pair(MULTI, "chatml", tokenizer, max_length=n - 1)
    assert how == "shortened"
    text = tokenizer.decode(row["chosen_input_ids"])
    assert "You are a pharmacist." in text and "Two days." in text  # system and last user turn kept
    assert "headache" not in text and "How long" not in text  # the oldest exchange is gone, whole
    assert trained(tokenizer, row["chosen_labels"]) == "See a doctor if it persists.<|im_end|>"
    assert encode_pair(MULTI, "chatml", tokenizer, max_length=8, overlong="drop") == (None, "")
    with pytest.raises(MedGPTError, match="--train.max_length"):
        preference_dataset([MULTI], "chatml", tokenizer, max_length=8)


def test_collator_pads_right_and_never_trains_padding(tokenizer):
    rows = [encode_pair(r, "chatml", tokenizer, 1024)[0] for r in (MULTI, SHORT)]
    batch = PreferenceCollator(pad_id=tokenizer.pad_token_id)(rows)
    seqs = [rows[0]["chosen_input_ids"], rows[1]["chosen_input_ids"],
            rows[0]["rejected_input_ids"], rows[1]["rejected_input_ids"]]  # chosen rows, then rejected rows
    width = max(map(len, seqs))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (4, width)
    for i, ids in enumerate(seqs):
        assert batch["input_ids"][i, :len(ids)].tolist() == ids
        assert batch["attention_mask"][i].tolist() == [1] * len(ids) + [0] * (width - len(ids))
        assert (batch["input_ids"][i, len(ids):] == tokenizer.pad_token_id).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert batch["labels"][0].tolist()[:len(seqs[0])] == rows[0]["chosen_labels"]


def test_trainer_loss_equals_orpo_loss_of_separate_passes(tiny_llama, tokenizer, tmp_path):
    """The concatenated, padded forward pass gives the loss of one unpadded pass per sequence."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from medgpt.train.preference import PreferenceTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    rows = [encode_pair(r, "chatml", tokenizer, 1024)[0] for r in (MULTI, SHORT)]
    batch = PreferenceCollator(pad_id=tokenizer.pad_token_id)(rows)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = PreferenceTrainer(model=model, args=args, loss_fn=partial(orpo_loss, beta=0.25))
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)

        def avg_logp(ids, labels):
            logits = model(input_ids=torch.tensor([ids])).logits
            return sequence_logps(logits, torch.tensor([labels]), average=True)[0]

        chosen = torch.stack([avg_logp(r["chosen_input_ids"], r["chosen_labels"]) for r in rows])
        rejected = torch.stack([avg_logp(r["rejected_input_ids"], r["rejected_labels"]) for r in rows])
        want, want_metrics = orpo_loss(chosen, rejected, -chosen, beta=0.25)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    logged = trainer._metrics["eval"]  # model.eval(): metrics go to the eval bucket
    assert logged["rewards/accuracies"] == [pytest.approx(want_metrics["rewards/accuracies"].item())]
    assert logged["log_odds_ratio"] == [pytest.approx(want_metrics["log_odds_ratio"].item(), rel=1e-5)]
    assert logged["nll"] == [pytest.approx(-chosen.mean().item(), rel=1e-5)]
    # prediction_step gives the same loss and the averaged metrics reach the logs with the eval_ prefix
    step_loss, logits, labels = trainer.prediction_step(model, batch, prediction_loss_only=True)
    torch.testing.assert_close(step_loss, want, rtol=1e-5, atol=1e-6)
    logs = {}
    trainer.log(logs)
    assert logs["eval_rewards/accuracies"] == pytest.approx(want_metrics["rewards/accuracies"].item())
    assert not trainer._metrics["eval"]
