"""Knowledge-base retrieval: sentence chunking, BM25 (hand-computed), loaders, demo-leaflet retrieval, the index
on disk (round trip, re-index of unchanged documents), prompts with numbered passages, and `medgpt rag search`."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import pytest

from medgpt.cli import main
from medgpt.rag import bm25 as bm25_mod
from medgpt.rag.answer import augment, build_prompt, fit_augment, format_sources, language
from medgpt.rag.bm25 import BM25, tokenize
from medgpt.rag.chunk import Segment, chunk_segments, split_sentences
from medgpt.rag.index import Hit, Index
from medgpt.rag.loaders import find_documents, load_document
from medgpt.utils import MedGPTError

ROOT = Path(__file__).resolve().parents[1]
KNOWLEDGE = ROOT / "data" / "demo" / "knowledge"
FIX = ROOT / "tests" / "fixtures" / "rag"
ENDS = "。！？；.!?…"


# ------------------------------------------------------------------------------------------- sentences

@pytest.mark.parametrize("text, sentences", [
    ("高血压很常见。多数人没有症状！要定期测量吗？要；每年至少一次",
     ["高血压很常见。", "多数人没有症状！", "要定期测量吗？", "要；", "每年至少一次"]),
    ("他说：“按时吃药。”然后走了。", ["他说：“按时吃药。”", "然后走了。"]),
    ("Take 2.5 mg daily. See a doctor, e.g. your GP. Done!", ["Take 2.5 mg daily.", "See a doctor, e.g. your GP.", "Done!"]),
    ('He said "stop." Then left?! ok', ['He said "stop."', "Then left?!", "ok"]),
    ("No ending punctuation", ["No ending punctuation"]),
])
def test_split_sentences_zh_and_en(text, sentences):
    assert split_sentences(text) == sentences


def test_chunks_pack_whole_sentences_with_overlap():
    units = [f"s{i}xxxxxx." for i in range(6)]  # six 10-character sentences on one line
    seg = [Segment(" ".join(units), 7)]
    with_overlap = chunk_segments(seg, chunk_chars=25, overlap=1)
    assert [c.text for c in with_overlap] == [f"{units[i]} {units[i + 1]}" for i in range(5)]
    without = chunk_segments(seg, chunk_chars=25, overlap=0)
    assert [c.text for c in without] == [f"{units[i]} {units[i + 1]}" for i in (0, 2, 4)]
    assert all(c.line == 7 for c in with_overlap)


def test_chunk_lines_headings_and_groups():
    segs = [Segment("第一句。第二句。", 3, "A", 1), Segment("第三句！", 4, "A", 1),
            Segment("Fourth. Fifth one.", 9, "A > B", 2), Segment("Six. 7th.", 10, "A > B", 2)]
    chunks = chunk_segments(segs, chunk_chars=10, overlap=1)
    assert [(c.text, c.line, c.heading) for c in chunks] == [
        ("第一句。第二句。", 3, "A"),        # packed up to 10 characters
        ("第二句。\n第三句！", 3, "A"),      # starts with the overlap sentence (line 3); a new line joins with \n
        ("Fourth.", 9, "A > B"),             # a new section never shares a chunk; no overlap across it
        ("Fifth one.", 9, "A > B"),          # a one-sentence chunk is not repeated whole
        ("Six. 7th.", 10, "A > B"),          # "Fifth one." (10 chars) is over half a chunk: not repeated
    ]


def test_overlong_sentence_is_cut_at_spaces():
    long = " ".join(["word"] * 100)  # 499 characters, no punctuation
    chunks = chunk_segments([Segment(long, 1)], chunk_chars=50, overlap=0)
    assert all(len(c.text) <= 50 for c in chunks)
    assert " ".join(c.text for c in chunks) == long


def _check_chunk_against_file(chunk, lines: list[str]):
    """The chunk starts at a sentence start on its own line and ends at a sentence end."""
    pieces = chunk.text.split("\n")
    first = lines[chunk.line - 1].strip()
    at = first.find(pieces[0])
    assert at >= 0, (chunk.line, pieces[0], first)
    assert at == 0 or first[:at].rstrip()[-1] in ENDS + "”’」』）)\"'", (chunk.line, first[:at])
    last = pieces[-1]
    where = [ln.strip() for ln in lines[chunk.line - 1:] if last in ln]
    assert where, last
    rest = where[0][where[0].find(last) + len(last):]
    assert rest == "" or last[-1] in ENDS + "”’」』）)\"'", (last, rest)


@pytest.mark.parametrize("name", ["gaoxueya_zh.md", "pain_relievers.md", "warfarin.md", "ertong_fare_zh.md"])
def test_leaflet_chunks_respect_sentences_and_lines(name):
    path = KNOWLEDGE / name
    lines = path.read_text(encoding="utf-8").splitlines()
    chunks = chunk_segments(load_document(str(path)), chunk_chars=300, overlap=1)
    assert len(chunks) > 5
    for c in chunks:
        _check_chunk_against_file(c, lines)
        assert c.heading and not c.heading.startswith("#")
        assert len(c.text) <= 300 or "\n" not in c.text  # only a single over-long line may exceed the target


# ------------------------------------------------------------------------------------------------ BM25

def test_bm25_known_answer():
    docs = [["fever", "child", "fever"], ["fever", "adult"], ["cough", "child", "night", "rest"]]
    bm = BM25(docs, k1=1.5, b=0.75)
    # Hand computation: N=3, avgdl=3, idf(fever)=idf(child)=ln(1 + 1.5/2.5)=ln(1.6)=0.4700036
    # d1: fever tf=2, |d|=3 -> 2*2.5/(2+1.5)=1.4285714; child tf=1 -> 2.5/2.5=1 -> 0.4700036*2.4285714
    # d2: fever tf=1, |d|=2 -> norm 1.5*(0.25+0.5)=1.125 -> 2.5/2.125=1.1764706
    # d3: child tf=1, |d|=4 -> norm 1.5*(0.25+1)=1.875 -> 2.5/2.875=0.8695652
    idf = math.log(1.6)
    expected = [idf * (2 * 2.5 / 3.5 + 1.0), idf * 2.5 / 2.125, idf * 2.5 / 2.875]
    assert bm.scores(["fever", "child"]).tolist() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx([1.1414373, 0.5529454, 0.4086988], rel=1e-6)
    assert bm.scores(["fever", "fever", "child"]).tolist() == pytest.approx(expected, rel=1e-6)  # distinct terms
    assert bm.scores(["unknown"]).tolist() == [0, 0, 0]
    assert bm.idf("cough") == pytest.approx(math.log(1 + 2.5 / 1.5))


def test_tokenize_english_chinese_and_fallback():
    assert tokenize("What are the doses of Paracetamol: 500mg, therapies!") == ["dose", "paracetamol", "500mg", "therapy"]
    assert tokenize("高血压 hypertension", "bigram") == ["高血", "血压", "hypertension"]
    assert tokenize("的", "bigram") == []
    assert tokenize("痛", "bigram") == ["痛"]
    if bm25_mod.jieba_available():
        toks = tokenize("高血压的诊断标准是什么", "jieba")
        assert {"高血压", "血压", "诊断", "标准"} <= set(toks) and not {"的", "是", "什么"} & set(toks)


# --------------------------------------------------------------------------------------------- loaders

def test_markdown_headings_and_lines(tmp_path):
    md = tmp_path / "a.md"
    md.write_text("# Title\n\nIntro line.\n\n## Part **B**\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n- item one\n", encoding="utf-8")
    segs = load_document(str(md))
    assert [(s.text, s.line, s.heading) for s in segs] == [
        ("Intro line.", 3, "Title"), ("| a | b |", 7, "Title > Part B"), ("| 1 | 2 |", 9, "Title > Part B"),
        ("- item one", 11, "Title > Part B")]
    assert segs[0].group != segs[1].group


def test_jsonl_records_text_content_and_formats(tmp_path):
    f = tmp_path / "kb.jsonl"
    f.write_text("\n".join([
        json.dumps({"text": "Gout affects the big toe.", "title": "Gout"}),
        "",
        json.dumps({"content": "痛风常累及大脚趾。"}),
        json.dumps({"instruction": "What lowers uric acid?", "output": "Allopurinol."}),
    ]) + "\n", encoding="utf-8")
    segs = load_document(str(f))
    assert [(s.text, s.line, s.heading) for s in segs] == [
        ("Gout affects the big toe.", 1, "Gout"), ("痛风常累及大脚趾。", 3, ""),
        ("What lowers uric acid?", 4, ""), ("Allopurinol.", 4, "")]
    assert len({s.group for s in segs}) == 3  # one group per record
    f.write_text('{"text": "ok"}\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(MedGPTError, match=r"kb.jsonl:2: malformed JSON"):
        load_document(str(f))


def test_pdf_fixture_pages_and_unwrapped_lines():
    pytest.importorskip("pypdf")
    segs = load_document(str(FIX / "leaflet.pdf"))
    assert [(s.text, s.line) for s in segs] == [
        ("Gout Leaflet", 1),  # a short line ends its paragraph; wrapped lines join back with a space
        ("Gout is a painful arthritis caused by uric acid crystals in a joint, most often the big toe. "
         "Attacks start suddenly at night.", 1),
        ("Treatment", 2),
        ("During an attack, rest the joint and take an anti-inflammatory medicine such as naproxen. "
         "Allopurinol lowers uric acid over months and prevents new attacks.", 2)]
    chunks = chunk_segments(segs, 300, 1)
    assert {c.line for c in chunks} == {1, 2}  # pages never share a chunk


def test_damaged_pdf_and_docx_are_clear_errors(tmp_path):
    pytest.importorskip("pypdf")
    bad = tmp_path / "bad.pdf"
    bad.write_bytes((FIX / "leaflet.pdf").read_bytes()[:200])
    with pytest.raises(MedGPTError, match=r"bad.pdf: cannot read this PDF"):
        load_document(str(bad))
    pytest.importorskip("docx")
    fake = tmp_path / "fake.docx"
    fake.write_text("not a zip", encoding="utf-8")
    with pytest.raises(MedGPTError, match=r"fake.docx: cannot read this .docx"):
        load_document(str(fake))


def test_missing_optional_readers_name_the_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pypdf", None)  # as if the rag extra were not installed
    monkeypatch.setitem(sys.modules, "docx", None)
    with pytest.raises(MedGPTError, match=r"needs pypdf: pip install 'medgpt\[rag\]'"):
        load_document(str(FIX / "leaflet.pdf"))
    with pytest.raises(MedGPTError, match=r"needs python-docx"):
        load_document(str(tmp_path / "x.docx"))


def test_docx_paragraph_numbers_headings_and_tables(tmp_path):
    docx = pytest.importorskip("docx")
    d = docx.Document()
    d.add_heading("Asthma", level=1)                         # paragraph 1
    d.add_paragraph("Asthma narrows the airways. It is common.")  # 2
    d.add_paragraph("")                                       # 3 (empty, still counted)
    d.add_heading("Inhalers", level=2)                        # 4
    d.add_paragraph("Use the reliever inhaler during an attack.")  # 5
    table = d.add_table(rows=1, cols=2)
    table.rows[0].cells[0].text, table.rows[0].cells[1].text = "Salbutamol", "reliever"
    path = tmp_path / "asthma.docx"
    d.save(path)
    segs = load_document(str(path))
    assert [(s.text, s.line, s.heading) for s in segs] == [
        ("Asthma narrows the airways. It is common.", 2, "Asthma"),
        ("Use the reliever inhaler during an attack.", 5, "Asthma > Inhalers"),
        ("Salbutamol | reliever", 5, "Asthma > Inhalers")]


def test_find_documents_and_file_errors(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("B.", encoding="utf-8")
    (tmp_path / "a.txt").write_text("A.", encoding="utf-8")
    (tmp_path / "skip.csv").write_text("x", encoding="utf-8")
    (tmp_path / ".hidden.md").write_text("x", encoding="utf-8")
    assert find_documents([str(tmp_path)]) == [str(tmp_path / "a.txt"), str(tmp_path / "sub" / "b.md")]
    with pytest.raises(MedGPTError, match="unsupported document type '.csv'"):
        find_documents([str(tmp_path / "skip.csv")])
    with pytest.raises(MedGPTError, match="not found"):
        find_documents([str(tmp_path / "nope.md")])
    bad = tmp_path / "bad.txt"
    bad.write_bytes("第一行\n".encode("utf-8") + b"\xff\xfe\xfa\x80 broken\n")
    with pytest.raises(MedGPTError, match=r"bad.txt:2"):
        load_document(str(bad))


def test_empty_documents_fail_clearly(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    assert main(["rag", "index", str(tmp_path / "empty.txt"), "--rag.index_dir", str(tmp_path / "idx")]) == 1
    assert "no text found" in capsys.readouterr().err
    assert not (tmp_path / "idx").exists()
    assert main(["rag", "index", "--rag.index_dir", str(tmp_path / "idx")]) == 1
    assert "no documents given" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ demo retrieval

DEMO_QUERIES = [
    ("高血压 诊断标准", "gaoxueya_zh.md"),
    ("paracetamol maximum dose", "pain_relievers.md"),
    ("What is the target INR on warfarin?", "warfarin.md"),
    ("孩子发烧怎么办", "ertong_fare_zh.md"),
    ("chest pain spreading to the left arm", "heart_attack.md"),
    ("糖尿病 饮食", "tangniaobing_zh.md"),
    ("how to do CPR on an adult", "cpr_and_choking.md"),
]


@pytest.fixture(scope="module")
def demo_index():
    index, stats = Index.build([str(KNOWLEDGE)])
    assert stats["docs"] == 28 and stats["indexed"] == 28
    return index


@pytest.mark.parametrize("query, expected", DEMO_QUERIES)
def test_demo_queries_rank_the_right_leaflet_first(demo_index, query, expected):
    hits = demo_index.search(query, 5)
    assert Path(hits[0].source).name == expected, [h.where for h in hits]
    assert hits[0].score >= hits[-1].score > 0


def test_bigram_fallback_still_finds_chinese_leaflets(monkeypatch):
    monkeypatch.setattr("medgpt.rag.index.default_tokenizer", lambda: "bigram")
    index, _ = Index.build([str(KNOWLEDGE / n) for n in ("gaoxueya_zh.md", "tangniaobing_zh.md",
                                                         "ertong_fare_zh.md", "naocuzhong_zh.md")])
    assert index.tokenizer == "bigram"
    for query, expected in DEMO_QUERIES:
        if language(query) == "zh":
            assert Path(index.search(query, 1)[0].source).name == expected


# ------------------------------------------------------------------------------------- on disk

def _corpus(tmp_path) -> Path:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "gout.md").write_text("# Gout\n\nGout causes sudden joint pain. Allopurinol lowers uric acid.\n",
                                  encoding="utf-8")
    (docs / "asthma.txt").write_text("Asthma narrows the airways.\nA reliever inhaler opens them.\n",
                                     encoding="utf-8")
    (docs / "zh.md").write_text("# 痛风\n\n痛风发作时关节剧痛。别嘌醇可以降低尿酸。\n", encoding="utf-8")
    return docs


def test_round_trip_keeps_chunks_hashes_and_results(tmp_path):
    docs = _corpus(tmp_path)
    built, _ = Index.build([str(docs)], chunk_chars=40)
    built.save(tmp_path / "idx")
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["chunks.jsonl", "meta.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    loaded = Index.load(tmp_path / "idx")
    assert loaded.chunks == built.chunks
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text(encoding="utf-8"))
    gout = next(d for d in meta["docs"] if d["path"].endswith("gout.md"))
    assert gout["sha256"] == hashlib.sha256((docs / "gout.md").read_bytes()).hexdigest()
    assert meta["settings"]["chunk_chars"] == 40 and meta["settings"]["embedder"] is None
    for q in ("uric acid", "reliever inhaler", "别嘌醇 尿酸"):
        assert [(h.where, h.score) for h in loaded.search(q, 3)] == [(h.where, h.score) for h in built.search(q, 3)]
    hit = loaded.search("reliever inhaler", 1)[0]
    assert hit == Hit("A reliever inhaler opens them.", str(docs / "asthma.txt"), 2, hit.score, "")
    assert loaded.search("uric acid", 1)[0].heading == "Gout"
    gout_chunk = next(c for c in loaded.chunks if c["heading"] == "Gout")
    assert gout_chunk["tokens"][:3] == ["gout", "gout", "gout"]  # the heading counts twice, then "Gout causes"


def test_load_errors(tmp_path, monkeypatch):
    with pytest.raises(MedGPTError, match="no knowledge-base index"):
        Index.load(tmp_path)
    docs = _corpus(tmp_path)
    built, _ = Index.build([str(docs)])
    built.save(tmp_path / "idx")
    lines = (tmp_path / "idx" / "chunks.jsonl").read_text(encoding="utf-8").splitlines()
    (tmp_path / "idx" / "chunks.jsonl").write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")
    with pytest.raises(MedGPTError, match="inconsistent"):
        Index.load(tmp_path / "idx")
    built.save(tmp_path / "idx")
    if built.tokenizer == "jieba":  # queries must be cut like the passages were
        with monkeypatch.context() as m:
            m.setattr("medgpt.rag.index.jieba_available", lambda: False)
            with pytest.raises(MedGPTError, match=r"built with jieba.*pip install 'medgpt\[rag\]'"):
                Index.load(tmp_path / "idx")
    (tmp_path / "notindex").mkdir()
    (tmp_path / "notindex" / "thesis.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(MedGPTError, match="not a medgpt knowledge-base index"):
        built.save(tmp_path / "notindex")
    assert (tmp_path / "notindex" / "thesis.txt").exists()


def test_reindex_reuses_unchanged_documents(tmp_path, capsys, monkeypatch):
    docs = _corpus(tmp_path)
    idx = str(tmp_path / "idx")
    assert main(["rag", "index", str(docs), "--rag.index_dir", idx]) == 0
    assert "3 read, 0 unchanged" in capsys.readouterr().out
    before = (tmp_path / "idx" / "chunks.jsonl").stat().st_mtime_ns

    read = []
    real = load_document
    monkeypatch.setattr("medgpt.rag.index.load_document", lambda p, *a: read.append(p) or real(p, *a))
    assert main(["rag", "index", str(docs), "--rag.index_dir", idx]) == 0
    assert "up to date: 3 documents unchanged" in capsys.readouterr().out
    assert read == [] and (tmp_path / "idx" / "chunks.jsonl").stat().st_mtime_ns == before

    (docs / "asthma.txt").write_text("Asthma narrows the airways.\nSpacers help children.\n", encoding="utf-8")
    (docs / "zh.md").unlink()
    assert main(["rag", "index", str(docs), "--rag.index_dir", idx]) == 0
    assert "(1 read, 1 unchanged, 1 removed, 0 empty, 0 unreadable)" in capsys.readouterr().out
    assert read == [str(docs / "asthma.txt")]
    index = Index.load(idx)
    assert Path(index.search("spacers children", 1)[0].source).name == "asthma.txt"
    assert not index.search("别嘌醇", 3)

    assert main(["rag", "index", str(docs), "--rag.index_dir", idx, "--rag.chunk_chars", "100"]) == 0
    assert "2 read, 0 unchanged" in capsys.readouterr().out  # other settings: everything is re-read


# --------------------------------------------------------------------------------------------- prompts

def test_language_detection():
    assert language("高血压的诊断标准是什么？") == "zh"
    assert language("paracetamol 一天最多吃多少？") == "zh"
    assert language("What does 高血压 mean for my heart?") == "en"
    assert language("What is the maximum dose?") == "en"


HITS = [Hit("Maximum 4 g in 24 hours.", "kb/pain.md", 13, 9.5, "Pain > Paracetamol"),
        Hit("Avoid alcohol.", "kb/liver.txt", 2, 3.1, "")]


def test_prompt_has_numbered_passages_and_bilingual_instruction():
    en = build_prompt("What is the maximum dose?", HITS)
    assert en.startswith("Answer the question using only the numbered passages below.")
    assert "[1] kb/pain.md:13 (Pain > Paracetamol)\nMaximum 4 g in 24 hours.\n\n[2] kb/liver.txt:2\nAvoid alcohol." in en
    assert en.endswith("Question: What is the maximum dose?")
    zh = build_prompt("扑热息痛一天最多吃多少？", HITS)
    assert zh.startswith("请仅根据下面编号的资料回答问题") and "[n]" in zh and zh.endswith("问题：扑热息痛一天最多吃多少？")
    assert format_sources([{"n": 1, "where": "kb/pain.md:13", "heading": "Pain"}], "zh") == "来源：\n[1] kb/pain.md:13 (Pain)"


class _FakeIndex:
    def __init__(self, hits):
        self.hits, self.queries = hits, []

    def search(self, query, k, mode="hybrid"):
        self.queries.append(query)
        return self.hits[:k]


def test_augment_rewrites_only_the_last_user_turn():
    messages = [{"role": "system", "content": "Be careful."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "What is the maximum dose?"}]
    fake = _FakeIndex(HITS)
    out, sources = augment(messages, fake, top_k=2)
    assert fake.queries == ["What is the maximum dose?"]
    assert out[:3] == messages[:3] and messages[3]["content"] == "What is the maximum dose?"  # input untouched
    assert out[3]["content"] == build_prompt("What is the maximum dose?", HITS)
    assert [(s["n"], s["where"], s["heading"]) for s in sources] == [(1, "kb/pain.md:13", "Pain > Paracetamol"),
                                                                   (2, "kb/liver.txt:2", "")]
    assert augment(messages, _FakeIndex([]), 2) == (messages, [])


def test_fit_augment_drops_passages_that_do_not_fit():
    class Engine:  # one "token" per character
        max_context = 0

        def prompt_ids(self, messages):
            return list(messages[-1]["content"])

    question = [{"role": "user", "content": "What is the maximum dose?"}]
    engine = Engine()
    full = len(build_prompt("What is the maximum dose?", HITS))
    engine.max_context = full + 10
    assert len(fit_augment(engine, question, _FakeIndex(HITS), 2, max_new_tokens=10)[1]) == 2
    engine.max_context = full + 9
    assert len(fit_augment(engine, question, _FakeIndex(HITS), 2, max_new_tokens=10)[1]) == 1


# ---------------------------------------------------------------------------------------------- search

def test_search_command_prints_ranked_passages(tmp_path, capsys):
    idx = str(tmp_path / "idx")
    assert main(["rag", "index", str(KNOWLEDGE / "pain_relievers.md"), str(KNOWLEDGE / "gaoxueya_zh.md"),
                 "--rag.index_dir", idx]) == 0
    capsys.readouterr()
    assert main(["rag", "search", "paracetamol maximum dose", "--rag.index_dir", idx, "--rag.top_k", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert re.match(r"1\. \d+\.\d{4}  \S+/pain_relievers\.md:\d+  \[Using Paracetamol, Ibuprofen and Aspirin Safely > ",
                    out[0]), out[0]
    assert out[1].startswith("   ") and "maximum" in out[1].lower()
    assert out[2].startswith("2. ")
    assert main(["rag", "search", "--query", "zzzz qqqq", "--rag.index_dir", idx]) == 0
    assert "no passage matches" in capsys.readouterr().out
    assert main(["rag", "search", "x", "--rag.index_dir", idx, "--rag.mode", "dense"]) == 1
    assert "no embeddings" in capsys.readouterr().err
