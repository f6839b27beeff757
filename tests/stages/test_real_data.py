"""Real-world data through the training stages: a few bad records are skipped and counted, not fatal; MedicalGPT's
reward files train the preference stages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from stagekit import FIXTURES, QUICK, assert_artifacts, run_stage

from medgpt.cli import main

MEDICALGPT = f"{FIXTURES}/medicalgpt_reward.jsonl"


def sharegpt_with_bad(tmp_path: Path, n_bad: int) -> Path:
    """60 ShareGPT records, the last `n_bad` of the first ones with an empty user turn (as scraped files have)."""
    rows = [{"conversations": [{"from": "human", "value": f"问题{i}：高血压患者每天吃多少盐合适？"},
                               {"from": "gpt", "value": "每天不超过5克。"}]} for i in range(60)]
    for i in range(30, 30 + n_bad):
        rows[i]["conversations"][0]["value"] = ""
    path = tmp_path / "sharegpt.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_sft_skips_one_bad_record_in_sixty(tiny_llama, tmp_path, capsys):
    data, out = sharegpt_with_bad(tmp_path, 1), tmp_path / "out"
    run_stage("sft", "--model.name_or_path", tiny_llama, "--data.train_files", data, "--finetune.type", "lora",
              "--template", "chatml", "--output_dir", out, *QUICK)
    metrics = assert_artifacts(out, adapter=True)
    assert metrics["invalid_records"] == 1 and metrics["global_step"] == 2
    logged = capsys.readouterr().out
    assert "skipped 1 invalid record of 60 read" in logged
    assert f"{data}:31: conversations turn 1 ('user') is empty" in logged


def test_sft_refuses_too_many_bad_records_before_loading_a_model(tiny_llama, tmp_path, capsys, monkeypatch):
    import medgpt.model.load as load

    def no_model(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the data was refused")

    monkeypatch.setattr(load, "load_model", no_model)
    monkeypatch.setattr(load, "load_tokenizer", no_model)
    data, out = sharegpt_with_bad(tmp_path, 6), tmp_path / "out"
    code = main(["sft", "--model.name_or_path", str(tiny_llama), "--data.train_files", str(data),
                 "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert "6 invalid records of 60 read (10.0%), more than --data.max_invalid 0.05 (5%) allows" in err
    assert f"{data}:31: conversations turn 1 ('user') is empty" in err and "raise --data.max_invalid to 0.1 to train" in err
    assert not out.exists()
    # the same file trains when the user raises the threshold; 0 makes one bad record fatal
    assert main(["sft", "--model.name_or_path", str(tiny_llama), "--data.train_files",
                 str(sharegpt_with_bad(tmp_path, 1)), "--data.max_invalid", "0", "--output_dir", str(out)]) == 1
    assert "the data has 1 error" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["dpo", "rm"])
def test_preference_stages_train_on_medicalgpt_reward_files(stage, tiny_llama, tiny_llama_cls, tmp_path):
    out = tmp_path / "out"
    model = tiny_llama_cls if stage == "rm" else tiny_llama
    run_stage(stage, "--model.name_or_path", model, "--data.train_files", MEDICALGPT, "--finetune.type", "lora",
              "--template", "chatml", "--output_dir", out, *QUICK)
    metrics = assert_artifacts(out, adapter=True)
    assert metrics["invalid_records"] == 0


def test_every_preference_loader_reads_medicalgpt_reward_files():
    """orpo and simpo load exactly as dpo and rm do (load_splits, preference); kto splits each pair in two."""
    from medgpt.args import DataArgs
    from medgpt.data.validate import load_splits
    from medgpt.stages.kto import load_examples

    train, _, invalid = load_splits(DataArgs(train_files=[MEDICALGPT]), "preference", purpose="orpo")
    assert (len(train), invalid) == (6, 0)
    assert train[3]["prompt"][-1] == {"role": "user", "content": "No fever, but it is worse at night."}
    examples, _, invalid = load_examples(DataArgs(train_files=[MEDICALGPT]), seed=0)
    assert (len(examples), sum(e["label"] for e in examples), invalid) == (12, 6, 0)
