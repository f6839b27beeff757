"""rm: 2 steps on the tiny reward models (full, LoRA), exact eval accuracy, reloading, what is scored, refusals."""

from __future__ import annotations

import json
import math

import pytest
from stagekit import DEMO, FIXTURES, QUICK, assert_all_changed, assert_artifacts, run_stage

from medgpt.cli import main

PAIRS = FIXTURES / "preference.jsonl"


def rewards(model, tokenizer, records) -> list[tuple[float, float]]:
    """(chosen, rejected) rewards of each record, scored one sequence at a time (no padding involved)."""
    import torch

    from medgpt.data.pairs import scored_ids

    out = []
    with torch.no_grad():
        for rec in records:
            pair = []
            for side in ("chosen", "rejected"):
                ids = scored_ids(rec["prompt"] + rec[side], "chatml", tokenizer)
                pair.append(model(torch.tensor([ids])).logits.squeeze().item())
            out.append(tuple(pair))
    return out


def test_rm_full_reloads_and_scores(tiny_llama_cls, tmp_path, tracked):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from medgpt.data.validate import load_records

    out = tmp_path / "out"
    run_stage("rm", "--model.name_or_path", tiny_llama_cls, "--data.train_files", f"{PAIRS},{DEMO}/preference.jsonl",
              "--data.max_samples", 12, "--data.eval_files", PAIRS, "--finetune.type", "full", "--template", "chatml",
              "--output_dir", out, *QUICK, "--train.max_length", 512)
    assert_all_changed(tracked)
    metrics = assert_artifacts(out, adapter=False)
    assert metrics["global_step"] == 2 and 0.0 <= metrics["eval_accuracy"] <= 1.0

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    scores = rewards(model, tokenizer, load_records([str(PAIRS)], "preference"))
    assert all(math.isfinite(c) and math.isfinite(r) for c, r in scores)
    # metrics.json's accuracy is exact: the batched, padded eval agrees with scoring each pair on its own.
    assert metrics["eval_accuracy"] == pytest.approx(sum(c > r for c, r in scores) / len(scores))


@pytest.mark.parametrize("arch", ["tiny_llama_cls", "tiny_qwen2_cls"])
def test_rm_lora_adapter_loads_through_peft(arch, request, tmp_path, tracked):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from medgpt.data.validate import load_records

    base = request.getfixturevalue(arch)
    out = tmp_path / "out"
    run_stage("rm", "--model.name_or_path", base, "--data.train_files", DEMO / "preference.jsonl",
              "--data.max_samples", 24, "--data.eval_split", 0.25, "--finetune.type", "lora", "--template", "chatml",
              "--output_dir", out, *QUICK, "--train.max_length", 512)
    assert_all_changed(tracked)
    assert any("score" in name for name in tracked["before"])  # the head trains fully, not through LoRA
    metrics = assert_artifacts(out, adapter=True)
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0

    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, num_labels=1), out)
    scores = rewards(model.eval(), AutoTokenizer.from_pretrained(out), load_records([str(PAIRS)], "preference"))
    assert all(math.isfinite(c) and math.isfinite(r) for c, r in scores)


def test_scored_ids_end_at_the_end_of_turn(tokenizer):
    """The reward model scores what the policy emits: our template's rendering, up to the reply's <|im_end|>."""
    from medgpt.data.pairs import scored_ids
    from medgpt.data.templates import apply_template

    rec = json.loads(PAIRS.read_text(encoding="utf-8").splitlines()[0])
    messages = [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["chosen"]}]
    ids = scored_ids(messages, "chatml", tokenizer)
    assert tokenizer.convert_ids_to_tokens(ids[-1]) == "<|im_end|>"
    apply_template(tokenizer, "chatml")  # what the saved tokenizer (and so TRL, vLLM, ...) renders
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(ids) == text.removesuffix("\n")


def test_long_prompt_loses_oldest_turns_not_the_reply(tokenizer):
    from medgpt.data.pairs import reward_pairs_dataset as pairs_dataset
    from medgpt.data.templates import encode
    from medgpt.data.validate import load_records

    rec = load_records([str(PAIRS)], "preference")[1]  # system, user, assistant, user -> reply
    full = max(len(encode(rec["prompt"] + rec[side], "chatml", tokenizer).input_ids) for side in ("chosen", "rejected"))
    row = pairs_dataset([rec], "chatml", tokenizer, max_length=full - 1)[0]
    text = tokenizer.decode(row["chosen_ids"])
    assert "You are a pharmacist." in text and "How long has it lasted?" not in text
    assert text.endswith("Two days.<|im_end|>\n<|im_start|>assistant\nSee a doctor if it persists.<|im_end|>")


def test_rm_refuses_text_data(tiny_llama_cls, tmp_path, capsys):
    code = main(["rm", "--model.name_or_path", str(tiny_llama_cls), "--data.train_files", str(FIXTURES / "corpus.txt"),
                 "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "rm needs preference records {prompt, chosen, rejected}" in err and "holds text" in err
