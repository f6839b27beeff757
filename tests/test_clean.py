"""`medgpt data clean` through the real CLI, and its pieces (MinHash/LSH, repetition rules) with known answers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from medgpt.cli import main
from medgpt.data import minhash
from medgpt.data.clean import CleanArgs, dup_line_frac, dup_ngram_frac, filter_reason, top_ngram_frac
from medgpt.data.minhash import normalize, units
from medgpt.data.text import record_text

ROOT = Path(__file__).resolve().parents[1]
VALID_ID = "11010519491231002X"

# Hand-written records, long enough for near-dedup (>= 50 characters), on different subjects.
ZH = ("高血压是以动脉血压持续升高为主要特征的慢性疾病，长期血压升高会损害心、脑、肾和眼底，"
      "建议定期测量血压，低盐饮食，规律运动，并在医生指导下长期服药。高血压患者还应限制饮酒、保持健康体重、"
      "保证充足睡眠，并学会在家中正确测量和记录血压，定期复诊以便医生调整治疗方案。")
EN = ("Type 2 diabetes is managed with diet, exercise and, when needed, medicines such as metformin; "
      "regular checks of blood sugar, kidneys, eyes and feet help catch complications early.")
OTHER = ("Influenza spreads through droplets. Annual vaccination is the best prevention, and people at high "
         "risk should see a doctor early when fever and cough begin.")
ASTHMA = ("Asthma is a long-term condition of the airways: a reliever inhaler eases sudden symptoms, while a daily "
          "preventer inhaler reduces inflammation and the number of attacks.")
GERD = "胃食管反流病常表现为烧心和反酸，睡前三小时避免进食、抬高床头、减重和戒烟可以减轻症状，必要时遵医嘱使用抑酸药。"


def near_copy(text: str, n_changes: int, seed: int = 0) -> str:
    """`text` with n_changes characters replaced, spread out so each change breaks distinct shingles."""
    chars = list(text)
    step = len(chars) // (n_changes + 1)
    for k in range(1, n_changes + 1):
        chars[k * step] = "※"
    return "".join(chars)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def chat(user: str, answer: str, **extra) -> dict:
    return {"conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": answer}], **extra}


def clean(*args: str) -> int:
    return main(["data", "clean", *map(str, args)])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------- MinHash / LSH

def shingles(text: str, n: int = 5) -> set[str]:
    return {text[i:i + n] for i in range(len(text) - n + 1)}


def test_optimal_bands_known_answer():
    bands, rows = minhash.optimal_bands(128, 0.8)
    assert (bands, rows) == (14, 9)
    # 1 - (1 - s^9)^14 at s = 0.85 and 0.5, computed by hand
    assert minhash.collision_probability(0.85, 14, 9) == pytest.approx(1 - (1 - 0.85**9) ** 14)
    assert minhash.collision_probability(0.85, 14, 9) > 0.97 > 0.03 > minhash.collision_probability(0.5, 14, 9)


def test_signature_estimates_jaccard():
    rng = random.Random(0)
    base = "".join(rng.choice("心肝脾肺肾血压糖尿病abcdefghij ") for _ in range(600))
    for changes in (5, 20, 60):
        other = near_copy(base, changes)
        true = minhash.jaccard(shingles(base), shingles(other))
        sig = minhash.signatures([base, other])
        estimate = float(np.mean(sig[0] == sig[1]))
        sigma = (true * (1 - true) / 128) ** 0.5
        assert abs(estimate - true) < 4 * sigma + 0.01, (changes, true, estimate)
    assert (minhash.signatures([base]) == minhash.signatures([base])).all()  # deterministic for a seed
    assert not (minhash.signatures([base], seed=1) == minhash.signatures([base], seed=2)).all()


def test_signatures_of_batches_match_single_records(monkeypatch):
    texts = [ZH, EN, OTHER, "短", ""]
    whole = minhash.signatures(texts)
    monkeypatch.setattr(minhash, "_BATCH_CELLS", 128)  # one record per batch
    assert (minhash.signatures(texts) == whole).all()
    assert (minhash.signatures([EN]) == whole[1]).all()


def test_near_duplicates_first_of_group_kept():
    texts = [ZH, EN, near_copy(ZH, 1), OTHER, near_copy(EN, 2), near_copy(OTHER, 40)]
    dups = minhash.near_duplicates(minhash.signatures([normalize(t) for t in texts]), 0.8)
    assert dups[:5] == [-1, -1, 0, -1, 1]
    assert dups[5] == -1  # 40 of ~150 characters changed: a different text


# ----------------------------------------------------------------------------- filters

def test_normalize_and_units():
    assert normalize("  Ｈｅｌｌｏ\tWORLD\n\n１２３ ") == "hello world 123"
    assert units("患者 BP 140/90 mmHg，好！") == ["患", "者", "bp", "140", "90", "mmhg", "好"]


def test_repetition_known_answers():
    assert dup_line_frac("a\nb\na\na\n\nc") == pytest.approx(2 / 5)
    assert dup_line_frac("") == 0.0
    # "好的" x 6: units 好,的 x 6 (12 chars); the 4-gram 好的好的 occurs 5 times; 5 * 4 chars / 12 -> capped at 1
    assert top_ngram_frac(units("好的" * 6), 4) == 1.0
    toks = "a b c d a b c d a b c d x y".split()  # (a b c d) 3 times: 12 of 14 chars
    assert top_ngram_frac(toks, 4) == pytest.approx(12 / 14)
    assert top_ngram_frac("a b c d a b c d x".split(), 4) == 0.0  # only twice: ordinary
    # a 3-unit gram repeated: units 0-3 and 4-7 are covered by (a b c), (b c d)... 8 of 10 chars
    assert dup_ngram_frac("a b c d a b c d x y".split(), 3) == pytest.approx(8 / 10)
    assert dup_ngram_frac(list("abcdefghij"), 3) == 0.0


def test_filter_reason():
    c = CleanArgs(min_chars=10, max_chars=200)
    assert filter_reason(["short"], c) == "too_short"
    assert filter_reason(["x" * 150, "y" * 60], c) == "too_long"  # length counts the whole record
    assert filter_reason([ZH], c) is None
    assert filter_reason(["我建议你尽快去医院就诊，明确病因后再用药。" * 4], c) == "repetitive"  # repeated 10-grams
    assert filter_reason(["谢谢医生\n谢谢医生\n谢谢医生\n好的"], c) == "repetitive"  # duplicate lines
    off = CleanArgs(max_dup_line_frac=1, max_top_ngram_frac=1, max_dup_ngram_frac=1)
    assert filter_reason(["我建议你尽快去医院就诊。" * 4], off) is None
    # parallel fields repeating one another are not repetition: judged per string
    options = ["60 mL/min/1.73 m²", "90 mL/min/1.73 m²", "30 mL/min/1.73 m²", "75 mL/min/1.73 m²"]
    assert filter_reason(["Metformin is contraindicated when eGFR falls below:"] + options, CleanArgs()) is None


def test_record_text_of_each_kind():
    assert record_text({"text": "t"}) == "t"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert record_text({"messages": messages}) == "q\na"
    assert record_text({"question": "q", "options": {"A": "x", "B": "y"}, "answer": "A"}) == "q\nx\ny"
    pref = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "c"}],
            "rejected": [{"role": "assistant", "content": "r"}]}
    assert record_text(pref) == "q\nc\nr"
    assert record_text({"prompt": [{"role": "user", "content": "q"}], "answer": "42"}) == "q\n42"


# ----------------------------------------------------------------------------- the command

def test_dedup_filters_pii_and_report(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    a = write_jsonl(tmp_path / "in" / "a.jsonl", [
        chat("高血压怎么办？", ZH, id=1, source="x"),
        chat("高血压怎么办？", ZH, id=2, source="y"),                             # exact duplicate
        chat("高血压怎么办？  ", ZH.replace("，", ","), id=3),                     # the same once normalised
        chat("高血压怎么办？", near_copy(ZH, 1), id=4),                          # near duplicate
        chat("Diabetes?", EN, id=5),
        chat("DIABETES?", "  " + EN.upper(), id=6),                             # the same once normalised
        chat("流感？", OTHER + f" 患者张三，电话13812345678，身份证{VALID_ID}。", id=7),
        chat("重复", "我建议你尽快去医院就诊，明确病因后再用药。" * 5, id=8),           # repetitive
        chat("hi", "ok", id=9),                                                  # too short with min_chars
    ])
    b = write_jsonl(tmp_path / "in" / "b.jsonl", [chat("Diabetes?", EN, id=10)])  # duplicate across files
    out = tmp_path / "out"
    assert clean(a, b, "--output_dir", out, "--clean.min_chars", "10") == 0
    printed = capsys.readouterr().out
    assert "total" in printed and "records/s" in printed

    kept = read_jsonl(out / "a.jsonl")
    assert [r["id"] for r in kept] == [1, 5, 7]
    assert kept[0] == chat("高血压怎么办？", ZH, id=1, source="x")  # same fields, untouched
    assert kept[2]["conversations"][1]["value"].endswith(" 患者[NAME]，电话[PHONE]，身份证[ID]。")
    assert read_jsonl(out / "b.jsonl") == []

    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    fa = report["files"][str(a)]
    assert fa["records_in"] == 9 and fa["records_out"] == 3 and fa["output"] == str(out / "a.jsonl")
    assert fa["removed"] == {"too_short": 1, "too_long": 0, "repetitive": 1, "exact_duplicate": 3,
                             "near_duplicate": 1, "contaminated": 0}
    assert fa["pii"] == {"ID": 1, "NAME": 1, "PHONE": 1}
    assert report["files"][str(b)]["removed"]["exact_duplicate"] == 1
    total = report["total"]
    assert total["records_in"] == 10 and total["records_out"] == 3 and total["removed"]["exact_duplicate"] == 4
    assert total["pii"] == {"ID": 1, "NAME": 1, "PHONE": 1} and total["contamination_hits"] == 0
    listed = {(r["line"], r["reason"], r.get("duplicate_of")) for r in report["removed_records"]}
    assert {(2, "exact_duplicate", f"{a}:1"), (3, "exact_duplicate", f"{a}:1"), (4, "near_duplicate", f"{a}:1"),
            (6, "exact_duplicate", f"{a}:5"), (8, "repetitive", None), (9, "too_short", None)} <= listed
    assert (1, "exact_duplicate", f"{a}:5") in {(r["line"], r["reason"], r.get("duplicate_of"))
                                                for r in report["removed_records"] if r["file"] == str(b)}
    assert (out / "config.yaml").is_file()


def test_switches_turn_steps_off(tmp_path):
    rows = [chat("q", ZH, id=1), chat("q", ZH, id=2), chat("q", near_copy(ZH, 1), id=3),
            chat("q", f"电话13812345678 {EN}", id=4)]
    src = write_jsonl(tmp_path / "a.jsonl", rows)
    assert clean(src, "--output_dir", tmp_path / "o", "--clean.exact_dedup", "false", "--clean.near_dedup", "false",
                 "--clean.scrub_pii", "false") == 0
    assert read_jsonl(tmp_path / "o" / "a.jsonl") == rows
    assert clean(src, "--output_dir", tmp_path / "p", "--clean.pii_types", "email") == 0
    assert "13812345678" in read_jsonl(tmp_path / "p" / "a.jsonl")[-1]["conversations"][1]["value"]


def test_formats_preserved(tmp_path):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    alpaca = [{"instruction": "什么是哮喘？", "input": "", "output": ASTHMA, "system": "你是医生"},
              {"instruction": "什么是哮喘？", "input": "", "output": ASTHMA, "system": "你是医生"},
              {"instruction": "Diabetes?", "input": "", "output": EN + " Email: me@example.com"}]
    (d / "sft.json").write_text(json.dumps(alpaca, ensure_ascii=False, indent=2), encoding="utf-8")
    (d / "corpus.txt").write_text(f"{ZH}\n\n{OTHER}\n{ZH}\n", encoding="utf-8")
    (d / "qa.csv").write_text(f"question,answer,tag\n反流？,{GERD},a\n反流？,{GERD},b\n", encoding="utf-8")
    pref = {"prompt": "Flu?", "chosen": "See a doctor early.", "rejected": "Ignore it.", "meta": {"k": 1}}
    write_jsonl(d / "sub" / "pref.jsonl", [pref])
    out = tmp_path / "out"
    assert clean(d, "--output_dir", out) == 0
    assert json.loads((out / "sft.json").read_text(encoding="utf-8")) == [
        alpaca[0], {**alpaca[2], "output": EN + " Email: [EMAIL]"}]
    assert (out / "corpus.txt").read_text(encoding="utf-8") == f"{ZH}\n{OTHER}\n"
    assert (out / "qa.csv").read_text(encoding="utf-8") == f"question,answer,tag\n反流？,{GERD},a\n"
    assert read_jsonl(out / "sub" / "pref.jsonl") == [pref]  # sub-folders mirrored, extra fields kept
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert {Path(p).name: f["format"] for p, f in report["files"].items()} == {
        "corpus.txt": "text", "qa.csv": "qa", "sft.json": "alpaca", "pref.jsonl": "preference"}


def test_txt_paragraphs_and_gbk_input(tmp_path):
    src = tmp_path / "notes.txt"
    src.write_bytes(f"{ZH}\n第二行\n\n{EN}\n\n{ZH}\n第二行\n".encode("gbk"))
    assert clean(src, "--output_dir", tmp_path / "o", "--data.text_mode", "paragraph") == 0
    assert (tmp_path / "o" / "notes.txt").read_text(encoding="utf-8") == f"{ZH}\n第二行\n\n{EN}\n"


def test_contamination_reported_then_dropped(tmp_path, capsys):
    question = "A 54-year-old man has crushing chest pain radiating to the left arm and sweating for one hour."
    evalset = write_jsonl(tmp_path / "eval.jsonl", [
        {"question": "Which vaccine prevents measles?", "options": {"A": "MMR", "B": "BCG"}, "answer": "A"},
        {"question": question, "options": {"A": "Myocardial infarction", "B": "Gastritis"}, "answer": "A"},
        {"question": "患者突发胸骨后压榨性疼痛伴大汗淋漓持续一小时，最可能的诊断是？",
         "options": {"A": "急性心肌梗死", "B": "胃炎"}, "answer": "A"}])
    train = write_jsonl(tmp_path / "train.jsonl", [
        chat("Case", f"Case: {question.lower()} The answer is myocardial infarction.", id=1),  # planted (en)
        chat("病例", "病例：患者突发胸骨后压榨性疼痛伴大汗淋漓持续一小时，考虑心梗。", id=2),   # planted (zh)
        chat("Flu", OTHER, id=3),
        chat("Chest pain", "Chest pain with sweating needs an ambulance: call your emergency number.", id=4),
    ])
    assert clean(train, "--output_dir", tmp_path / "o", "--clean.eval_files", evalset) == 0
    assert "2 record(s) share a 13-unit n-gram with 2 eval item(s)" in capsys.readouterr().out
    report = json.loads((tmp_path / "o" / "report.json").read_text(encoding="utf-8"))
    con = report["contamination"]
    assert [(h["line"], h["eval_line"]) for h in con["hits"]] == [(1, 2), (2, 3)]
    assert con["hits"][0]["eval_file"] == str(evalset) and "crushing chest pain" in con["hits"][0]["overlap"]
    assert report["total"]["contamination_hits"] == 2 and report["total"]["records_out"] == 4  # report only

    assert clean(train, "--output_dir", tmp_path / "p", "--clean.eval_files", evalset,
                 "--clean.drop_contaminated") == 0
    assert [r["id"] for r in read_jsonl(tmp_path / "p" / "train.jsonl")] == [3, 4]
    report = json.loads((tmp_path / "p" / "report.json").read_text(encoding="utf-8"))
    assert report["total"]["removed"]["contaminated"] == 2


def test_refuses_non_empty_output_dir(tmp_path, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", [chat("q", ZH)])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for flag in ((), ("--overwrite",)):  # a folder medgpt did not write: refused either way, nothing touched
        assert clean(src, "--output_dir", out, *flag) == 1
        assert "medgpt did not write what it holds (keep.txt" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    out = tmp_path / "cleaned"
    assert clean(src, "--output_dir", out) == 0
    assert clean(src, "--output_dir", out) == 1 and "not empty" in capsys.readouterr().err
    (out / "keep.txt").write_text("mine")  # the user's, added to our output later
    assert clean(src, "--output_dir", out, "--overwrite") == 0
    assert (out / "a.jsonl").is_file() and (out / "keep.txt").read_text() == "mine"


def test_refuses_to_overwrite_its_input(tmp_path, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", [chat("q", ZH)])
    assert clean(src, "--output_dir", tmp_path, "--overwrite") == 1
    assert "would overwrite the input" in capsys.readouterr().err
    assert read_jsonl(src) == [chat("q", ZH)]


def test_bad_record_names_file_and_line(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps(chat("q", ZH)) + "\n{not json\n", encoding="utf-8")
    assert clean(src, "--output_dir", tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert f"{src}:2:" in err and "malformed JSON" in err
    assert not (tmp_path / "o" / "bad.jsonl").exists() and not (tmp_path / "o" / "report.json").exists()


@pytest.mark.parametrize("args, needle", [
    ([], "no data files given"),
    (["--data.eval_files", "x.jsonl"], "--clean.eval_files"),
    (["--clean.pii_types", "passport"], "unknown PII type"),
    (["--clean.near_threshold", "1.5"], "near_threshold"),
])
def test_option_errors(tmp_path, capsys, args, needle):
    src = write_jsonl(tmp_path / "a.jsonl", [chat("q", ZH)])
    files = [] if needle == "no data files given" else [src]
    assert clean(*files, "--output_dir", tmp_path / "o", *args) == 1
    assert needle in capsys.readouterr().err


def test_demo_data_survives(tmp_path, capsys):
    """The shipped demo data is clean: nothing is removed and no identifier is found."""
    assert clean(ROOT / "data" / "demo", "--output_dir", tmp_path) == 0
    total = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))["total"]
    assert total["records_in"] == total["records_out"] > 1500 and total["pii"] == {}
    assert json.loads((tmp_path / "sft_alpaca.json").read_text(encoding="utf-8")) == json.loads(
        (ROOT / "data" / "demo" / "sft_alpaca.json").read_text(encoding="utf-8"))


def test_demo_training_data_is_disjoint_from_every_heldout_file(tmp_path, capsys):
    """The demo's held-out split (QA references, knowledge-base questions), the safety probes and the English MCQ
    items share no 13-unit n-gram with any file a demo step trains on (data/demo/heldout/README.md). Seven Chinese
    MCQ items do (their facts are taught in Chinese SFT/preference answers): the demo evaluates English only, and
    the list is pinned so that a new overlap fails here."""
    from medgpt.data.text import has_cjk

    demo = ROOT / "data" / "demo"
    train = ["sft_alpaca.json", "sft_sharegpt.jsonl", "preference.jsonl", "safety_pairs.jsonl"]
    held = ["heldout/qa.jsonl", "heldout/rag_questions.jsonl", "safety.jsonl", "mcq.jsonl"]
    assert clean(*(str(demo / f) for f in train), "--output_dir", tmp_path / "o",
                 "--clean.eval_files", ",".join(str(demo / f) for f in held)) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text(encoding="utf-8"))
    assert report["contamination"]["eval_items"] == 48 + 24 + 82 + 248
    hits = report["contamination"]["hits"]
    assert {Path(h["eval_file"]).name for h in hits} == {"mcq.jsonl"} and all(has_cjk(h["eval_text"]) for h in hits)
    assert sorted({h["eval_line"] for h in hits}) == [8, 59, 97, 134, 167, 170, 237]
