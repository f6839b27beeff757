"""The knowledge-base part of `medgpt eval`: citation parsing and judging on hand-made answers, and the whole part
(index -> retrieval -> answers through `medgpt rag ask`'s prompt -> metrics, report, predictions) on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medgpt.cli import main
from medgpt.eval.command import summary
from medgpt.eval.ragqa import judge, read_questions, tally
from medgpt.rag.answer import citations, cited_files
from medgpt.utils import MedGPTError

ROOT = Path(__file__).resolve().parents[1]
KNOWLEDGE = ROOT / "data" / "demo" / "knowledge"
QUESTIONS = ROOT / "tests" / "fixtures" / "eval" / "rag_questions.jsonl"
HELDOUT = ROOT / "data" / "demo" / "heldout" / "rag_questions.jsonl"

SOURCES = [{"n": 1, "source": "data/demo/knowledge/warfarin.md", "where": "warfarin.md:16"},
           {"n": 2, "source": "data/demo/knowledge/hypertension.md", "where": "hypertension.md:5"},
           {"n": 3, "source": "data/demo/knowledge/warfarin.md", "where": "warfarin.md:40"}]


def test_citations_read_every_marker_form():
    assert citations("Take it with food [2]. Not with alcohol [1, 3]【4】 ［5］.") == [2, 1, 3, 4, 5]
    assert citations("See [1][2] and [2-4].") == [1, 2, 3, 4]
    assert citations("资料显示[1，3]、[2]。") == [1, 3, 2]
    assert citations("No markers, a list [a] and a year 2024.") == []


def test_cited_files_by_marker_and_by_name():
    assert cited_files("The target is 2.0-3.0 [3].", SOURCES) == ["warfarin.md"]
    assert cited_files("Below 140/90 [2], see warfarin.md too.", SOURCES) == ["hypertension.md", "warfarin.md"]
    assert cited_files("A number outside the list [9] cites nothing.", SOURCES) == []


@pytest.mark.parametrize("answer,cited_right", [
    ("Aim for an INR of 2.0-3.0 [1].", True),
    ("Aim for an INR of 2.0-3.0 [2].", False),          # cites a passage, but from the wrong leaflet
    ("Aim for an INR of 2.0-3.0.", False),              # no citation at all
    ("Aim for 2.0-3.0 (Sources: warfarin.md:16).", True),
])
def test_judge_cited_right(answer, cited_right):
    row = judge({"question": "INR?", "source": "warfarin.md"}, SOURCES, answer)
    assert row["hit"] and row["hit_at_1"] and row["cited_right"] is cited_right


def test_judge_and_tally_retrieval():
    rows = [judge({"question": "q", "source": "hypertension.md"}, SOURCES, "x [2]"),   # hit, not at 1, cited
            judge({"question": "q", "source": "gout.md"}, SOURCES, "x [1]"),           # missed
            judge({"question": "q", "source": "warfarin.md"}, SOURCES, "x"),           # hit at 1, no citation
            judge({"question": "q", "source": "warfarin.md"}, [], "x")]                # nothing retrieved
    t = tally(rows)
    assert t["rag/questions"] == 4 and t["rag/hit_rate"] == 0.5 and t["rag/hit_at_1"] == 0.25
    assert t["rag/cited_right_rate"] == 0.25 and t["rag/cited_any_rate"] == 0.5


def test_read_questions_names_bad_lines(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question": "ok?", "source": "a/b/gout.md"}\n{"question": "no source"}\n{"source": "x.md"}\n',
                   encoding="utf-8")
    with pytest.raises(MedGPTError, match=r"2 bad RAG question\(s\)[\s\S]*q.jsonl:2: 'source'[\s\S]*q.jsonl:3"):
        read_questions(str(bad))
    assert read_questions(str(bad), max_samples=1)[0]["source"] == "gout.md"  # the file name, not the path


def test_heldout_questions_name_shipped_leaflets():
    questions = read_questions(str(HELDOUT))
    assert len(questions) == 24 and sum(q["lang"] == "zh" for q in questions) == 12
    assert all((KNOWLEDGE / q["source"]).is_file() for q in questions)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("rag") / "idx"
    docs = [str(KNOWLEDGE / n) for n in ("pain_relievers.md", "warfarin.md", "hypertension.md", "gaoxueya_zh.md")]
    assert main(["rag", "index", *docs, "--rag.index_dir", str(out)]) == 0
    return out


def test_eval_rag_part_on_tiny_model(tiny_llama, index_dir, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "--model.name_or_path", str(tiny_llama), "--template", "chatml", "--only_cpu",
                 "--output_dir", str(out), "--eval.rag_files", str(QUESTIONS), "--rag.index_dir", str(index_dir),
                 "--rag.top_k", "3", "--eval.rag_without", "true", "--gen.max_new_tokens", "6"]) == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["rag/questions"] == 8
    assert metrics["rag/hit_rate"] >= 0.75 and 0 <= metrics["rag/hit_at_1"] <= metrics["rag/hit_rate"]
    assert 0 <= metrics["rag/cited_right_rate"] <= metrics["rag/cited_any_rate"] <= 1
    assert {"rag/hit_rate", "rag/cited_right_rate"} <= set(summary(metrics))
    preds = [json.loads(line) for line in (out / "predictions" / "rag-rag_questions.jsonl").read_text().splitlines()]
    assert len(preds) == 8 and all(1 <= len(p["retrieved"]) <= 3 for p in preds)
    assert all("answer" in p and "answer_without_rag" in p and isinstance(p["cited"], list) for p in preds)
    assert sum(p["hit"] for p in preds) / 8 == metrics["rag/hit_rate"]
    assert "## Knowledge base" in (out / "report.md").read_text(encoding="utf-8")


def test_eval_rag_errors_before_the_model_loads(tiny_llama, index_dir, tmp_path, capsys):
    base = ["eval", "--model.name_or_path", str(tmp_path / "no-model"), "--output_dir", str(tmp_path / "o")]
    other = tmp_path / "q.jsonl"
    other.write_text('{"question": "Is gout painful?", "source": "gout.md"}\n', encoding="utf-8")
    cases = [(["--eval.rag_files", str(QUESTIONS)], "add --rag.index_dir"),
             (["--eval.safety", "true", "--rag.index_dir", str(index_dir)], "is for --eval.rag_files"),
             (["--eval.rag_files", str(other), "--rag.index_dir", str(index_dir)], "not in the index: gout.md")]
    for extra, needle in cases:
        assert main(base + extra) == 1
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
