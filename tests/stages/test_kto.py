"""kto: 2 LoRA steps from paired and from unpaired (labelled) data, balanced weights, clear errors for bad data."""

from __future__ import annotations

import json
import math

import pytest
from stagekit import FIXTURES, QUICK, assert_all_changed, assert_artifacts, run_stage

from medgpt.cli import main

PAIRS = f"{FIXTURES}/preference.jsonl,{FIXTURES}/hh.jsonl"  # 5 pairs -> 5 desirable + 5 undesirable examples
UNPAIRED = [
    {"prompt": "Can I take ibuprofen on an empty stomach?", "completion": "Better with food.", "label": True},
    {"prompt": [{"role": "system", "content": "You are a nurse."}, {"role": "user", "content": "I feel dizzy."}],
     "response": "Sit down and drink some water; call a doctor if it persists.", "label": True},
    {"prompt": "高血压患者可以喝咖啡吗？", "answer": "适量饮用一般可以，但应监测血压。", "label": True},
    {"prompt": "Is chest pain serious?", "completion": [{"role": "assistant", "content": "Never."}], "label": False},
]


@pytest.fixture()
def trainers(monkeypatch):
    """Every Trainer whose train() ran, so a test can look at the dataset TRL built."""
    from transformers import Trainer

    seen, original = [], Trainer.train

    def train(self, *args, **kwargs):
        seen.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train", train)
    return seen


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_kto_from_pairs(tiny_llama, tmp_path, tracked, trainers):
    from medgpt.args import ModelArgs
    from medgpt.data.templates import encode, get_template
    from medgpt.model.load import load_tokenizer

    out = tmp_path / "out"
    run_stage("kto", "--model.name_or_path", tiny_llama, "--data.train_files", PAIRS, "--finetune.type", "lora",
              "--template", "chatml", "--data.eval_split", "0.2", "--output_dir", out, *QUICK)
    assert_all_changed(tracked)
    metrics = assert_artifacts(out, adapter=True)
    assert metrics["global_step"] == 2 and not (out / "ref").exists()
    assert metrics["desirable_weight"] == metrics["undesirable_weight"] == 1.0  # 4 and 4: nothing to balance
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "kl", "eval_loss", "eval_kl"):
        assert math.isfinite(metrics[key]), (key, metrics)

    ds, held = trainers[0].train_dataset, trainers[0].eval_dataset
    assert sorted(ds["label"]) == [False] * 4 + [True] * 4
    assert sorted(held["label"]) == [False, True] and held[0]["prompt"] == held[1]["prompt"]  # a whole pair
    tok, template = load_tokenizer(ModelArgs(name_or_path=str(tiny_llama))), get_template("chatml")
    for row in ds:  # TRL tokenized exactly what our template encodes (see test_dpo for the reply span)
        ids = encode(row["prompt"] + row["completion"], template, tok).input_ids
        assert row["prompt_ids"] + row["completion_ids"] == ids


def test_kto_from_unpaired_file(tiny_llama, tmp_path, tracked):
    data = write_jsonl(tmp_path / "feedback.jsonl", UNPAIRED)
    out = tmp_path / "out"
    run_stage("kto", "--model.name_or_path", tiny_llama, "--data.train_files", data, "--finetune.type", "lora",
              "--template", "chatml", "--output_dir", out, *QUICK)
    assert_all_changed(tracked)
    metrics = assert_artifacts(out, adapter=True)
    # 3 desirable, 1 undesirable: the undesirable answers weigh 3x so both kinds count the same.
    assert (metrics["desirable_weight"], metrics["undesirable_weight"]) == (1.0, 3.0)


def test_unpaired_record_shapes():
    from medgpt.stages.kto import unpaired_example

    first = unpaired_example(UNPAIRED[1])
    assert first["prompt"][0] == {"role": "system", "content": "You are a nurse."}
    assert first["completion"] == [{"role": "assistant", "content": UNPAIRED[1]["response"]}] and first["label"]
    assert unpaired_example({"q": "Hi?", "completion": "Hello.", "label": "FALSE"}, {"prompt": "q"})["label"] is False


def test_balanced_weights():
    from medgpt.stages.kto import balanced_weights

    assert balanced_weights(10, 10) == (1.0, 1.0)
    assert balanced_weights(1, 3) == (3.0, 1.0)
    assert balanced_weights(3, 1) == (1.0, 3.0)
    d, u = balanced_weights(3, 7)
    assert 1 <= d * 3 / (u * 7) <= 4 / 3 and d == 2.34
    assert balanced_weights(3, 7, desirable=1.5) == (1.5, 1.0)  # a given weight is kept
    assert balanced_weights(0, 7) == (1.0, 1.0)


@pytest.mark.parametrize("bad, needle", [
    ({"prompt": "Hi?", "completion": "Hello."}, "feedback.jsonl:4: field 'label' must be true"),
    ({"prompt": "Hi?", "completion": "Hello.", "label": 1},
     "feedback.jsonl:4: field 'label' must be true (a desirable answer) or false (an undesirable one); got 1"),
    ({"prompt": "Hi?", "label": True}, "feedback.jsonl:4: missing field 'completion'"),
])
def test_bad_unpaired_records_name_the_line(bad, needle, tiny_llama, tmp_path, capsys):
    data = write_jsonl(tmp_path / "feedback.jsonl", [*UNPAIRED[:3], bad])  # the file reads as labelled records
    code = main(["kto", "--model.name_or_path", str(tiny_llama), "--data.train_files", data,
                 "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, needle", [
    (["--train.batch_size", "1"], "needs --train.batch_size >= 2"),
    (["--finetune.type", "full", "--model.adapter", "x"], "adapter directory x does not exist"),
])
def test_refusals(argv, needle, tiny_llama, tmp_path, capsys):
    base = ["kto", "--model.name_or_path", str(tiny_llama), "--data.train_files", PAIRS,
            "--output_dir", str(tmp_path / "out")]
    assert main(base + argv) == 1
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_text_refusal_names_both_shapes(tiny_llama, tmp_path, capsys):
    assert main(["kto", "--model.name_or_path", str(tiny_llama), "--data.train_files", f"{FIXTURES}/text.jsonl",
                 "--output_dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "preference records {prompt, chosen, rejected}" in err and "{prompt, completion, label" in err, err
