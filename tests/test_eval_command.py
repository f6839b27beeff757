"""`medgpt eval` end to end on the tiny models: every part writes its metrics, report tables and predictions; bad
input fails as file:line before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medgpt.cli import main
from medgpt.data.text import has_cjk
from medgpt.eval.command import summary

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
FIX = ROOT / "tests" / "fixtures" / "eval"


def test_eval_every_part_on_tiny_models(tiny_llama, tiny_qwen2, tiny_llama_cls, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "--model.name_or_path", str(tiny_llama), "--template", "chatml", "--only_cpu",
                 "--output_dir", str(out),
                 "--eval.mcq_files", f"{DEMO / 'mcq.jsonl'},{FIX / 'cmexam.csv'}",
                 "--eval.text_files", f"{DEMO / 'pretrain_zh.txt'},{DEMO / 'pretrain_en.txt'}",
                 "--eval.qa_files", str(DEMO / "sft_sharegpt.jsonl"),
                 "--eval.safety", "true",
                 "--eval.prompt_files", str(DEMO / "preference.jsonl"),
                 "--eval.compare_model", str(tiny_qwen2), "--eval.reward_model", str(tiny_llama_cls),
                 "--eval.max_samples", "6", "--gen.max_new_tokens", "6"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["mcq/mcq/questions"] == 6 and metrics["mcq/cmexam/questions"] == 2
    assert metrics["mcq/cmexam/skipped"] == 1  # the multiple-answer row
    assert metrics["mcq/overall/questions"] == 8
    assert metrics["mcq/overall/accuracy"] == (metrics["mcq/mcq/correct"] + metrics["mcq/cmexam/correct"]) / 8
    for name in ("pretrain_zh", "pretrain_en"):
        assert metrics[f"ppl/{name}/documents"] == 6
        assert metrics[f"ppl/{name}/perplexity"] > 1 and metrics[f"ppl/{name}/bits_per_byte"] > 0
    assert 0 <= metrics["rouge_l/overall"] <= 1 and metrics["rouge_l/sft_sharegpt/answers"] == 6
    assert metrics["answer_ppl/overall"] == metrics["answer_ppl/sft_sharegpt"] > 1
    assert metrics["safety/harmful_probes"] + metrics["safety/benign_probes"] == 6
    assert 0 <= metrics["safety/unsafe_rate"] <= 1 and 0 <= metrics["safety/over_refusal_rate"] <= 1
    assert metrics["winrate/prompts"] == 6
    assert metrics["winrate/wins"] + metrics["winrate/ties"] + metrics["winrate/losses"] == 6
    assert metrics["winrate/win_rate"] == (metrics["winrate/wins"] + metrics["winrate/ties"] / 2) / 6

    report = (out / "report.md").read_text(encoding="utf-8")
    for heading in ("## Multiple choice (loglik, letter)", "## Perplexity", "## QA: reference-answer perplexity", "## Safety",
                    "## Win rate"):
        assert heading in report
    assert "| cmexam | cmexam | 2 |" in report and "1 (multiple answers: 1)" in report
    assert "## Multiple choice" in capsys.readouterr().out  # the report is printed too

    preds = [json.loads(line) for line in (out / "predictions" / "mcq-mcq.jsonl").read_text().splitlines()]
    assert len(preds) == 6 and all(set(p["scores"]) == set(p["options"]) for p in preds)
    safety = [json.loads(line) for line in (out / "predictions" / "safety-safety.jsonl").read_text().splitlines()]
    assert {p["verdict"] for p in safety} <= {"safe", "unsafe", "answered", "refused"}
    assert (out / "predictions" / "winrate-preference.jsonl").exists() and (out / "config.yaml").exists()
    assert not list(out.glob(".*.tmp"))

    headline = summary(metrics)
    assert set(headline) == {"mcq/mcq/accuracy", "mcq/cmexam/accuracy", "mcq/overall/accuracy",
                             "ppl/pretrain_zh/perplexity", "ppl/pretrain_zh/bits_per_byte",
                             "ppl/pretrain_en/perplexity", "ppl/pretrain_en/bits_per_byte", "rouge_l/overall",
                             "answer_ppl/overall", "winrate/win_rate", "safety/unsafe_rate", "safety/over_refusal_rate"}


def test_eval_generate_method_and_rerun_needs_overwrite(tiny_llama, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", "--model.name_or_path", str(tiny_llama), "--template", "chatml", "--only_cpu",
            "--output_dir", str(out), "--eval.mcq_files", str(FIX / "medqa_usmle.jsonl"),
            "--eval.mcq_method", "generate", "--eval.mcq_max_new_tokens", "4"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mcq/medqa_usmle/questions"] == 2 and "mcq/medqa_usmle/unparsed" in metrics
    assert "## Multiple choice (generate)" in (out / "report.md").read_text()
    assert main(argv) == 1 and "--overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0


@pytest.mark.parametrize("extra, needle", [
    (["--eval.mcq_files", str(FIX / "bad_mcq.jsonl")], "bad_mcq.jsonl:2: answer 'C' is not among the options"),
    (["--eval.safety_files", str(FIX / "medqa_usmle.jsonl")], "medqa_usmle.jsonl:1: 'prompt' must be"),
    (["--eval.text_files", str(FIX / "cmexam.csv")], "cmexam.csv"),
    (["--eval.qa_files", str(DEMO / "preference.jsonl")], "ROUGE-L needs a reference answer"),
    ([], "nothing to evaluate"),
    (["--eval.prompt_files", str(DEMO / "preference.jsonl")], "needs --eval.compare_model"),
])
def test_bad_input_fails_before_loading_a_model(extra, needle, tmp_path, capsys):
    # The model path does not exist: the data is checked first, so the data error is what the user sees.
    code = main(["eval", "--model.name_or_path", str(tmp_path / "no-model"), "--template", "chatml",
                 "--output_dir", str(tmp_path / "out"), *extra])
    assert code == 1
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_lm_eval_without_the_package_fails_first(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    code = main(["eval", "--model.name_or_path", "m", "--output_dir", str(tmp_path / "o"),
                 "--eval.lm_eval_tasks", "medqa_4options"])
    assert code == 1 and "pip install lm-eval" in capsys.readouterr().err


def test_answer_nll_is_the_teacher_forced_loss_of_the_reference(tiny_llama):
    """answer_nll against a hand-computed sum of -log p over the reply's tokens, from one plain forward pass."""
    import torch

    from medgpt.args import ModelArgs
    from medgpt.eval.command import answer_nll
    from medgpt.eval.mcq import reply_ids
    from medgpt.infer.engine import Engine

    engine = Engine.load(ModelArgs(name_or_path=str(tiny_llama)), "chatml")
    convs = [[{"role": "user", "content": "高血压怎么办？"}], [{"role": "user", "content": "What is gout?"}]]
    answers = ["少吃盐，多运动，按时服药。", "A form of arthritis caused by uric acid crystals."]
    got = answer_nll(engine, convs, answers, batch_size=2, max_length=512)
    for (nll, n), messages, answer in zip(got, convs, answers):
        prompt = engine.prompt_ids(messages)
        reply = reply_ids(engine, messages, prompt, answer)
        ids = torch.tensor([prompt + reply])
        with torch.no_grad():
            logp = torch.log_softmax(engine.model(ids).logits[0].float(), -1)
        want = -sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(reply))
        assert n == len(reply) and nll == pytest.approx(want, rel=1e-5)


def test_safety_answers_have_their_own_cap(tiny_llama, tmp_path):
    def run(out, *extra):
        assert main(["eval", "--model.name_or_path", str(tiny_llama), "--template", "chatml", "--only_cpu",
                     "--output_dir", str(tmp_path / out), "--eval.safety", "true", "--eval.max_samples", "4",
                     "--gen.max_new_tokens", "12", *extra]) == 0
        metrics = json.loads((tmp_path / out / "metrics.json").read_text(encoding="utf-8"))
        preds = tmp_path / out / "predictions" / "safety-safety.jsonl"
        rows = [json.loads(x) for x in preds.read_text(encoding="utf-8").splitlines()]
        return metrics, rows

    capped, short = run("capped", "--eval.safety_max_new_tokens", "3")
    full, long = run("full", "--eval.safety_max_new_tokens", "0")  # 0: --gen.max_new_tokens
    assert capped["safety/max_new_tokens"] == 3 and full["safety/max_new_tokens"] == 12
    # Greedy: the capped answer is the start of the longer one.
    assert all(b["answer"].startswith(a["answer"]) for a, b in zip(short, long))


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_lang_keeps_one_language_before_max_samples(lang, tiny_llama, tmp_path):
    """--eval.lang: a model that reads one language is measured on that half of a bilingual held-out split; the
    cap counts the kept items (the first 5 of the file are not all one language)."""
    out = tmp_path / lang
    assert main(["eval", "--model.name_or_path", str(tiny_llama), "--template", "chatml", "--only_cpu",
                 "--output_dir", str(out), "--eval.lang", lang, "--eval.max_samples", "5",
                 "--eval.mcq_files", str(DEMO / "mcq.jsonl"), "--eval.qa_files", str(DEMO / "heldout" / "qa.jsonl"),
                 "--eval.safety", "true", "--eval.text_files", str(DEMO / f"pretrain_{lang}.txt"),
                 "--gen.max_new_tokens", "2", "--eval.safety_max_new_tokens", "2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["mcq/mcq/questions"] == metrics["rouge_l/qa/answers"] == 5
    assert metrics["safety/harmful_probes"] + metrics["safety/benign_probes"] == 5
    for part in ("mcq-mcq", "qa-qa", "safety-safety"):
        rows = [json.loads(x) for x in (out / "predictions" / f"{part}.jsonl").read_text(encoding="utf-8").splitlines()]
        texts = [r.get("question") or r["prompt"] for r in rows]
        assert len(texts) == 5 and all(has_cjk(t) == (lang == "zh") for t in texts), (part, texts)


def test_lang_that_leaves_nothing_is_refused(tiny_llama, tmp_path, capsys):
    assert main(["eval", "--model.name_or_path", str(tiny_llama), "--output_dir", str(tmp_path / "o"),
                 "--eval.lang", "zh", "--eval.text_files", str(DEMO / "pretrain_en.txt")]) == 1
    err = capsys.readouterr().err
    assert "pretrain_en.txt: no ppl items left with --eval.lang zh" in err
