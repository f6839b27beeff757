"""`medgpt pipeline`: a tiny recipe end to end (tokenizer -> sft -> merge -> sample), skipping, restarting,
failing steps, and a recipe checked in full before its first step runs."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from medgpt.cli import main
from medgpt.config import parse_argv
from medgpt.pipeline import Config, load
from medgpt.report import check_goals
from medgpt.utils import MedGPTError

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "fixtures" / "data"
QUICK = {"train.max_steps": 2, "train.warmup": 0, "train.learning_rate": 1e-2, "train.batch_size": 2,
         "train.save_steps": 0, "train.logging_steps": 1, "train.max_length": 256, "train.tensorboard": False}
QUESTIONS = ["高血压患者要注意什么？", "What are the signs of a stroke?"]


def recipe(tmp_path: Path, base: Path, **changes) -> Path:
    """tokenizer train -> sft (LoRA, 2 steps) -> merge -> sample on the tiny Llama; `changes` edit step args."""
    text = tmp_path / "corpus.txt"
    text.write_text((DATA / "corpus.txt").read_text(encoding="utf-8"), encoding="utf-8")
    steps = [
        {"name": "tok", "command": "tokenizer train",
         "args": {"data.train_files": str(text), "tokenizer.vocab_size": 300, "tokenizer.min_frequency": 1}},
        {"name": "sft", "command": "sft",
         "args": {"model.name_or_path": "${base}", "data.train_files": str(DATA / "sharegpt.jsonl"),
                  "finetune.type": "lora", "template": "chatml", **QUICK}},
        {"name": "merge", "command": "merge",
         "args": {"model.name_or_path": "${base}", "model.adapter": "${steps.sft.output_dir}"}},
        {"name": "answers", "command": "sample",
         "args": {"model.name_or_path": "${steps.merge.output_dir}", "questions": QUESTIONS, "gen.max_new_tokens": 6}},
    ]
    for name, args in changes.items():
        next(s for s in steps if s["name"] == name)["args"].update(args)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "vars": {"base": str(base)},
                                    "steps": steps}, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def pipeline(capsys, *argv) -> tuple[int, str]:
    code = main(["pipeline", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*")
            if p.is_file() and p.name not in ("report.md", "summary.json")}  # the run's own reports


def test_run_skip_change_restart(tmp_path, tiny_llama, capsys):
    path, out = recipe(tmp_path, tiny_llama), tmp_path / "out"
    code, text = pipeline(capsys, path)
    assert code == 0, text
    assert "$ medgpt tokenizer train --data.train_files" in text  # each command printed, ready to copy
    assert f"$ medgpt merge --model.name_or_path {tiny_llama} --model.adapter {out / 'sft'}" in text
    rows = [json.loads(line) for line in (out / "answers" / "samples.jsonl").read_text().splitlines()]
    assert [r["question"] for r in rows] == QUESTIONS and all(isinstance(r["answer"], str) for r in rows)
    report = (out / "report.md").read_text()
    for name in ("tok", "sft", "merge", "answers"):
        assert re.search(rf"\| {name} \| .* \| ran \| \d+\.\d s \|", report), report
    assert "train_loss" in report and "![sft loss](sft/loss.png)" in report
    assert f"**Q:** {QUESTIONS[1]}" in report
    marker = json.loads((out / "sft" / "pipeline_step.json").read_text())
    assert marker["argv"][-2:] == ["--output_dir", str(out / "sft")]

    # again: everything is complete, nothing is touched
    before = mtimes(out)
    code, text = pipeline(capsys, path)
    assert code == 0, text
    assert all(f"skip {n} (complete)" in text for n in ("tok", "sft", "merge", "answers")), text
    assert "===" not in text and mtimes(out) == before
    assert re.search(r"\| sft \| sft \| skipped \| \d+\.\d s \| train_loss", (out / "report.md").read_text())

    # a changed arg of step 2: step 1 skipped, 2 and everything after it rerun (with --overwrite)
    path = recipe(tmp_path, tiny_llama, sft={"train.learning_rate": 5e-3})
    code, text = pipeline(capsys, path)
    assert code == 0, text
    assert "skip tok (complete)" in text
    assert "step 2/4: sft (settings changed: train.learning_rate)" in text
    assert "--overwrite" in text and "step 3/4: merge" in text and "step 4/4: answers" in text
    after = mtimes(out)
    assert all(after[k] == v for k, v in before.items() if k.startswith("tok/"))
    assert after["merge/model.safetensors"] != before["merge/model.safetensors"]

    # --from (alias of --from_step) reruns that step even though it is complete
    code, text = pipeline(capsys, path, "--from", "answers")
    assert code == 0, text
    assert [n for n in ("tok", "sft", "merge") if f"skip {n} (complete)" in text] == ["tok", "sft", "merge"]
    assert "step 4/4: answers (--from_step)" in text
    assert mtimes(out)["answers/samples.jsonl"] != after["answers/samples.jsonl"]

    # --only merge leaves answers stale; the next plain run sees that and reruns it
    code, text = pipeline(capsys, path, "--only", "merge")
    assert code == 0 and "step 3/4: merge (--only)" in text and "skip answers (not in --only)" in text, text
    code, text = pipeline(capsys, path)
    assert code == 0 and "skip merge (complete)" in text and "step 4/4: answers (step merge ran after it)" in text


def test_failing_step_stops_the_pipeline(tmp_path, tiny_llama, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n')
    path, out = recipe(tmp_path, tiny_llama, sft={"data.train_files": str(bad)}), tmp_path / "out"
    code, text = pipeline(capsys, path)
    assert code == 1
    assert "pipeline step 'sft' (2 of 4) exited with code 1" in text
    assert f"medgpt sft --model.name_or_path {tiny_llama} --data.train_files {bad}" in text  # to rerun it alone
    assert "step 3/4" not in text and not (out / "merge").exists()
    report = (out / "report.md").read_text()
    assert "| tok | tokenizer train | ran |" in report and "| sft | sft | failed |" in report
    assert "| merge | merge | pending |" in report
    assert not (out / "sft" / "pipeline_step.json").exists()


@pytest.mark.parametrize("edit, needle", [
    ({"command": "evall"}, "recipe step 'answers': unknown command 'evall'. Valid commands: data validate"),
    ({"command": "sft", "args": {"train.max_step": 2}}, "Did you mean 'train.max_steps'"),
    ({"command": "sft", "args": {"train.max_steps": "two"}}, "'train.max_steps': 'two' is not a valid int"),
    ({"command": "sample", "args": {"model.name_or_path": "x", "gen.max_new_token": 2, "questions": ["q"]}},
     "Did you mean 'gen.max_new_tokens'"),
    ({"arg": {}}, "recipe step 'answers': unknown key 'arg'; a step has name, command, config, args. Did you mean"),
    ({"command": "sample", "args": {"model.name_or_path": "x"}}, "no questions"),
])
def test_a_bad_late_step_fails_before_the_first_runs(tmp_path, tiny_llama, capsys, edit, needle):
    path = recipe(tmp_path, tiny_llama)
    data = yaml.safe_load(path.read_text())
    data["steps"][-1].update(edit)
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    code, text = pipeline(capsys, path)
    assert code == 1 and needle in text, text
    assert not (tmp_path / "out").exists()  # nothing ran


def steps_of(tmp_path: Path, steps: list, vars: dict | None = None):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "o"), "vars": vars or {}, "steps": steps}))
    return load(parse_argv(Config, [str(path)]))[1]


def test_references(tmp_path):
    merge = {"name": "m", "command": "merge", "args": {"model.adapter": "${steps.a.output_dir}",
                                                        "model.name_or_path": "${vars.base}/x"}}
    steps = steps_of(tmp_path, [{"name": "a", "command": "sft", "args": {"train.max_steps": "${n}"}}, merge],
                     {"base": "B", "n": 3})
    assert steps[0].parsed.train.max_steps == 3 and steps[0].out == tmp_path / "o" / "a"
    assert steps[1].parsed.model.adapter == str(tmp_path / "o" / "a")
    assert steps[1].parsed.model.name_or_path == "B/x" and steps[1].refs == {"a"}
    with pytest.raises(MedGPTError, match=r"step 'm', args.model.adapter: unknown reference \$\{steps.b.output_dir"
                                          r"\}: no earlier step is named 'b' \(earlier steps: a\)"):
        steps_of(tmp_path, [{"name": "a", "command": "sft"}, {**merge, "args": {"model.adapter": "${steps.b.output_dir}"}}])
    with pytest.raises(MedGPTError, match=r"refers to step 'm', which does not come before it"):
        steps_of(tmp_path, [{"name": "a", "command": "sft", "args": {"model.adapter": "${steps.m.output_dir}"}}, merge])
    with pytest.raises(MedGPTError, match=r"no var named 'bse' \(vars: base\).*Did you mean 'base'"):
        steps_of(tmp_path, [{"name": "a", "command": "sft", "args": {"model.name_or_path": "${bse}"}}], {"base": "B"})
    with pytest.raises(MedGPTError, match="appears twice"):
        steps_of(tmp_path, [{"name": "a", "command": "sft"}, {"name": "a", "command": "rm"}])


def test_only_needs_its_inputs(tmp_path, tiny_llama, capsys):
    code, text = pipeline(capsys, recipe(tmp_path, tiny_llama), "--only", "answers")
    assert code == 1 and "uses the output of step 'merge', which is not complete" in text
    code, text = pipeline(capsys, recipe(tmp_path, tiny_llama), "--from_step", "nope")
    assert code == 1 and "no step named 'nope'" in text


def test_gpu_recipe_loads_without_network(tmp_path, capsys):
    """The shipped GPU recipe: parsed and every step checked (hub ids are only names here), then a dry run."""
    path = ROOT / "configs" / "pipeline" / "qwen2.5-0.5b-lora.yaml"
    steps = load(parse_argv(Config, [str(path)]))[1]
    assert [s.command for s in steps] == ["sft", "rm", "dpo", "merge", "sample"]
    assert steps[0].parsed.finetune.type == "lora"
    assert steps[2].parsed.model.adapter == str(steps[0].out)
    assert steps[3].parsed.model.adapter == str(steps[2].out)
    code, text = pipeline(capsys, "--recipe", path, "--dry_run", "--output_dir", tmp_path / "o")
    assert code == 0, text
    assert text.count("would run") == 5 and f"--output_dir {tmp_path / 'o' / 'dpo'}" in text
    assert not (tmp_path / "o").exists()


def test_demo_recipe_never_trains_on_what_it_evaluates(tmp_path, capsys):
    """`make demo` (configs/demo.yaml): the real model, evaluated before and after with the same yardstick, and
    no training step reads a held-out file, the safety probes or the MCQ items."""
    path = ROOT / "configs" / "demo.yaml"
    steps = load(parse_argv(Config, [str(path), "--output_dir", str(tmp_path / "demo")]))[1]
    by_name = {s.name: s for s in steps}
    assert [s.command for s in steps][:6] == ["rag index", "eval", "sft", "rm", "dpo", "merge"]
    assert by_name["sft"].parsed.model.name_or_path.endswith("smollm2-135m-instruct")
    assert by_name["dpo"].parsed.model.adapter == str(by_name["sft"].out)
    before, after = by_name["eval_before"].parsed.eval, by_name["eval_after"].parsed.eval
    assert dataclasses.replace(after, rag_without=False) == before  # the same yardstick, one extra view after
    assert before.lang == "en" and all(by_name[s].parsed.data.lang == before.lang for s in ("sft", "rm", "dpo"))
    cfg = load(parse_argv(Config, [str(path)]))[0]
    assert cfg.goals == {"heldout_ppl": "-10%", "unsafe_rate": "-25pt", "over_refusal": "<= 0.1"}  # the bar
    held = {str((ROOT / f).resolve()) for f in ["data/demo/safety.jsonl", "data/demo/mcq.jsonl",
                                                *before.qa_files, *before.rag_files]}
    held |= {str(p.resolve()) for p in (ROOT / "data/demo/heldout").glob("*")}
    for s in steps:
        data = getattr(s.parsed, "data", None)
        for f in (data.train_files + data.eval_files) if data is not None else []:
            assert str((ROOT / f).resolve()) not in held and "heldout" not in f, (s.name, f)
    code, text = pipeline(capsys, str(path), "--dry_run", "--output_dir", tmp_path / "demo")
    assert code == 0, text


def test_quickstart_recipe_is_the_whole_pipeline(tmp_path, capsys):
    """`make demo-scratch`'s recipe: every step checked before anything runs, in the documented order."""
    path = ROOT / "configs" / "quickstart.yaml"
    steps = load(parse_argv(Config, [str(path), "--output_dir", str(tmp_path / "demo")]))[1]
    assert [s.command for s in steps] == ["tokenizer train", "pack", "pack", "pt", "sft", "eval", "rm", "ppo",
                                          "dpo", "orpo", "merge", "eval", "sample"]
    by_name = {s.name: s for s in steps}
    assert by_name["pretrain"].parsed.model.init == "llama"
    assert [p["data"] for p in by_name["pretrain"].parsed.pt.phases] == [
        {str(by_name["pack"].out): 1}, {str(by_name["pack"].out): 1, str(by_name["pack_chat"].out): 9}]
    assert by_name["eval_final"].parsed.eval == by_name["eval_sft"].parsed.eval  # the same yardstick twice
    assert by_name["ppo"].parsed.reward.model == str(by_name["rm"].out)
    assert by_name["merge"].parsed.model.adapter == str(by_name["orpo"].out)
    code, text = pipeline(capsys, str(path), "--dry_run", "--output_dir", tmp_path / "demo")
    assert code == 0, text
    assert text.count("would run") == 13


def test_eval_steps_show_before_and_after(tmp_path, tiny_llama, capsys):
    """Two `eval` steps (the base, then the merged model) become one before/after table in report.md."""
    path = recipe(tmp_path, tiny_llama)
    data = yaml.safe_load(path.read_text())
    ev = {"template": "chatml", "eval.mcq_files": str(ROOT / "data/demo/mcq.jsonl"), "eval.max_samples": 6,
          "eval.qa_files": str(ROOT / "data/demo/heldout/qa.jsonl"), "gen.max_new_tokens": 4}
    data["goals"] = {"mcq_accuracy": ">= 0", "heldout_ppl": "-99%"}  # met whatever happens / never met
    data["steps"].insert(1, {"name": "before", "command": "eval", "args": {"model.name_or_path": "${base}", **ev}})
    data["steps"].append({"name": "after", "command": "eval",
                          "args": {"model.name_or_path": "${steps.merge.output_dir}", **ev}})
    data["steps"][-2]["args"].update(questions_file=str(DATA / "sharegpt.jsonl"), max_questions=1)  # answers
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    code, text = pipeline(capsys, path)
    assert code == 0, text
    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    before = json.loads((tmp_path / "out" / "before" / "metrics.json").read_text())["mcq/overall/accuracy"]
    after = json.loads((tmp_path / "out" / "after" / "metrics.json").read_text())["mcq/overall/accuracy"]
    assert "| metric | before | after | change (before -> after) |" in report
    row = next(line for line in report.splitlines() if line.startswith("| mcq/overall/accuracy |"))
    assert row == f"| mcq/overall/accuracy | {before:.4g} | {after:.4g} | {after - before:+.4g} |"
    # answers with a reference: the score in the step table, the reference on one line under the answer
    scored = [json.loads(x) for x in (tmp_path / "out" / "answers" / "samples.jsonl").read_text().splitlines()][-1]
    assert re.search(r"\| answers \| sample \| ran \| .* \| rouge_l [0-9.]+, rouge_l_answers 1 \|", report), report
    assert f"Reference (ROUGE-L {scored['rouge_l']:.2f}): {' '.join(scored['reference'].split())[:300]}" in report
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["mcq_accuracy_before"] == before and summary["mcq_accuracy_after"] == after
    assert summary["model"] == str(tiny_llama) and summary["heldout_ppl_before"] > 1
    assert [(g["goal"], g["met"]) for g in summary["goals"]] == [("mcq_accuracy", True), ("heldout_ppl", False)]
    assert summary["goals_met"] is False and summary["evals"] == 2
    assert f"of {len(data['steps'])} steps; {summary['seconds']:.1f} s of step time in all." in report
    assert "## Verdict" in report and "Goals: not all met." in report and "| heldout_ppl | -99% |" in report
    assert re.search(r"- \*\*Improved:\*\* .*\n- \*\*Worse:\*\* .*\n- \*\*Unchanged:\*\* ", report), report
    # the first three held-out questions, answered by the model before and after, with the reference
    qa = [json.loads(x) for x in (ROOT / "data/demo/heldout/qa.jsonl").read_text(encoding="utf-8").splitlines()]
    section = report.split("## Held-out answers, before vs after (qa)")[1].split("\n## ")[0]
    assert [q["question"] for q in qa[:3]] == re.findall(r"\*\*Q:\*\* (.*)", section)
    assert section.count("Before (ROUGE-L") == section.count("After (ROUGE-L") == 3
    assert set(summary["steps"]) == {s["name"] for s in data["steps"]}
    assert summary["seconds"] == pytest.approx(sum(s["seconds"] for s in summary["steps"].values()), abs=0.5)
    code, text = pipeline(capsys, path)  # complete: both eval steps are skipped the second time
    assert code == 0 and "=== step" not in text  # complete: nothing reruns, the eval steps included


def test_goals_against_hand_computed_figures():
    """-10%: relative to before; -25pt: points of a rate; <= / >=: a bound on the last eval; None: not measured."""
    summary = {"heldout_ppl_before": 16.94, "heldout_ppl_after": 15.24, "unsafe_rate_before": 0.8,
               "unsafe_rate_after": 0.56, "over_refusal_before": 0.0, "over_refusal_after": 0.1,
               "mcq_accuracy_before": 0.25, "mcq_accuracy_after": 0.3, "rouge_l_before": 0.1}
    goals = {"heldout_ppl": "-10%", "unsafe_rate": "-25pt", "over_refusal": "<= 0.1", "mcq_accuracy": "+5pt",
             "rouge_l": "+1%"}
    got = {g["goal"]: g["met"] for g in check_goals(goals, summary)}
    assert got == {"heldout_ppl": True, "unsafe_rate": False, "over_refusal": True, "mcq_accuracy": True,
                   "rouge_l": None}  # 15.24 <= 16.94 * 0.9 = 15.246; 0.56 > 0.8 - 0.25; no rouge_l after
    assert check_goals({"heldout_ppl": "-10%"}, {**summary, "heldout_ppl_after": 15.25})[0]["met"] is False
    assert check_goals({"over_refusal": "<= 0.1"}, {**summary, "over_refusal_after": 0.11})[0]["met"] is False


@pytest.mark.parametrize("goals, needle", [({"perplexity": "-10%"}, "recipe goal 'perplexity': not a summary figure"),
                                           ({"heldout_ppl": "lower"}, "recipe goal 'heldout_ppl: lower': write")])
def test_bad_goal_fails_before_anything_runs(goals, needle, tmp_path, tiny_llama, capsys):
    path = recipe(tmp_path, tiny_llama)
    data = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**data, "goals": goals}, allow_unicode=True, sort_keys=False))
    code, text = pipeline(capsys, path)
    assert code == 1 and needle in text and not (tmp_path / "out").exists()


def test_nested_args_pass_through_steps(tmp_path):
    """A phase list whose dict keys reference earlier steps reaches `pt` as real phases."""
    steps = [{"name": "tok", "command": "tokenizer train", "args": {"data.train_files": "x.txt"}},
             {"name": "pk", "command": "pack", "args": {"data.train_files": "x.txt",
                                                         "model.name_or_path": "${steps.tok.output_dir}"}},
             {"name": "pt", "command": "pt", "args": {
                 "model.init": "llama", "model.name_or_path": "${steps.tok.output_dir}",
                 "pt.phases": [{"name": "general", "steps": 3, "data": {"${steps.pk.output_dir}": 1}},
                               {"name": "anneal", "steps": 2, "data": {"${steps.pk.output_dir}": 1, "other": 2.5}}]}}]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "o"), "steps": steps}))
    pt = load(parse_argv(Config, [str(path)]))[1][2]
    pk = str(tmp_path / "o" / "pk")
    assert pt.parsed.pt.phases == [{"name": "general", "steps": 3, "data": {pk: 1}},
                                   {"name": "anneal", "steps": 2, "data": {pk: 1, "other": 2.5}}]


def test_sample_scores_answers_against_file_references(tmp_path, tiny_llama):
    from medgpt.eval.rouge import rouge_l
    from medgpt.eval.sample import SampleConfig, run_sample

    conversations = [[{"from": "human", "value": "发烧怎么办？"}, {"from": "gpt", "value": "多喝水，注意休息。"}],
                     [{"from": "human", "value": "What is a fever?"},
                      {"from": "gpt", "value": "A raised body temperature."}]]
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"conversations": c}, ensure_ascii=False) + "\n" for c in conversations),
                  encoding="utf-8")
    out = tmp_path / "answers"
    args = ["--model.name_or_path", str(tiny_llama), "--template", "chatml", "--gen.max_new_tokens", "5",
            "--output_dir", str(out)]
    assert run_sample(parse_argv(SampleConfig, [*args, "--questions", "Hello?", "--questions_file", str(qa)])) == 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["question"] for r in rows] == ["Hello?", "发烧怎么办？", "What is a fever?"]
    assert "reference" not in rows[0] and "rouge_l" not in rows[0]  # a question given inline has no reference
    assert [r["reference"] for r in rows[1:]] == ["多喝水，注意休息。", "A raised body temperature."]
    for r in rows[1:]:
        assert r["rouge_l"] == round(rouge_l(r["answer"], r["reference"]), 4)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rouge_l_answers"] == 2
    assert metrics["rouge_l"] == pytest.approx((rows[1]["rouge_l"] + rows[2]["rouge_l"]) / 2, abs=1e-4)

    # without references, the earlier score goes: it would describe other answers
    assert run_sample(parse_argv(SampleConfig, [*args, "--questions", "Hello?"])) == 0
    assert not (out / "metrics.json").exists()


def test_sample_is_a_command_and_a_list_with_commas_passes_as_json(tiny_llama, tmp_path):
    """`medgpt sample` runs on its own (the pipeline has no special case for it); a recipe's list whose items hold
    commas reaches the command whole, as JSON flow."""
    from medgpt.eval.sample import SampleConfig
    from medgpt.pipeline import _flag_value

    questions = ["Fever, cough and a sore throat: flu?", "What is BMI?"]
    flag = _flag_value(questions, "questions", "step")
    assert parse_argv(SampleConfig, ["--questions", flag]).questions == questions
    out = tmp_path / "s"
    assert main(["sample", questions[0], "--model.name_or_path", str(tiny_llama), "--template", "chatml",
                 "--gen.max_new_tokens", "3", "--output_dir", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["question"] for r in rows] == [questions[0]]
    assert main(["sample", "--model.name_or_path", str(tiny_llama), "--output_dir", str(tmp_path / "t")]) == 1
