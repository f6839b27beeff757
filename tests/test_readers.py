"""Readers: paths, encodings and line numbers, on real files (fixtures and tmp_path)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medgpt.data.readers import DecodeError, Raw, detect_encoding, expand_paths, iter_raw, iter_records
from medgpt.utils import MedGPTError

FIX = Path(__file__).parent / "fixtures" / "data"


def lines_of(path, **kw) -> list[tuple[int, str | None]]:
    return [(r.line, r.error) for r in iter_raw(str(path), **kw)]


def objs(path, **kw) -> list[dict]:
    return [r.obj for r in iter_raw(str(path), **kw)]


# ----------------------------------------------------------------------------- expand_paths

def test_expand_file_glob_and_directory(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}\n")
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    (tmp_path / "sub" / "b.json").write_text("[]")
    (tmp_path / "sub" / "deep" / "c.txt").write_text("x")
    (tmp_path / "sub" / "notes.md").write_text("not data")
    (tmp_path / ".hidden.jsonl").write_text("{}\n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.jsonl").write_text("{}\n")
    t = str(tmp_path)
    assert expand_paths([f"{t}/a.jsonl"]) == [f"{t}/a.jsonl"]
    assert expand_paths([t]) == [f"{t}/a.jsonl", f"{t}/sub/b.json", f"{t}/sub/deep/c.txt"]
    assert expand_paths([f"{t}/*.jsonl"]) == [f"{t}/a.jsonl"]
    assert expand_paths([f"{t}/**/*.txt"]) == [f"{t}/sub/deep/c.txt"]
    # the same file named twice is read once
    assert expand_paths([f"{t}/a.jsonl", f"{t}/*.jsonl"]) == [f"{t}/a.jsonl"]


def test_expand_saved_dataset_dir_is_not_recursed(tmp_path):
    saved = tmp_path / "ds"
    saved.mkdir()
    (saved / "dataset_info.json").write_text("{}")
    (saved / "state.json").write_text("{}")
    (tmp_path / "x.jsonl").write_text("{}\n")
    assert expand_paths([str(saved)]) == [str(saved)]
    assert expand_paths([str(tmp_path)]) == [str(saved), str(tmp_path / "x.jsonl")]


def test_expand_hub_id_and_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert expand_paths(["someone/medical-qa"]) == ["hf://someone/medical-qa"]
    with pytest.raises(MedGPTError, match="'data/train.jsonl' not found"):
        expand_paths(["data/train.jsonl"])
    with pytest.raises(MedGPTError, match=r"glob 'nothing/\*.jsonl' matches no data files"):
        expand_paths(["nothing/*.jsonl"])
    (tmp_path / "notes.docx").write_text("x")
    with pytest.raises(MedGPTError, match="unsupported file type '.docx'"):
        expand_paths(["notes.docx"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedGPTError, match="holds no data files"):
        expand_paths(["empty"])


# ----------------------------------------------------------------------------- encodings

def test_detect_encoding_utf8_bom_gbk(tmp_path):
    text = '{"text": "高血压患者应低盐饮食"}\n'
    (tmp_path / "u.jsonl").write_text(text, encoding="utf-8")
    (tmp_path / "bom.jsonl").write_bytes(text.encode("utf-8-sig"))
    (tmp_path / "gbk.jsonl").write_bytes(text.encode("gbk"))
    assert detect_encoding(tmp_path / "u.jsonl") == "utf-8"
    assert detect_encoding(tmp_path / "bom.jsonl") == "utf-8-sig"
    assert detect_encoding(tmp_path / "gbk.jsonl") == "gb18030"


def test_detect_encoding_cut_sample_inside_a_character(tmp_path):
    (tmp_path / "u.txt").write_text("高" * 10, encoding="utf-8")
    assert detect_encoding(tmp_path / "u.txt", sample_bytes=4) == "utf-8"  # 4 bytes end mid-character


def test_detect_encoding_undecodable_names_line_and_offset(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xff"}\n')
    with pytest.raises(DecodeError) as e:
        detect_encoding(path)
    assert e.value.line == 2
    assert str(e.value).startswith(f"{path}:2: undecodable byte 0xff at byte offset 28")
    assert "--data.encoding" in str(e.value)


def test_bom_and_gbk_files_read_correctly(tmp_path):
    record = {"instruction": "高血压怎么办？", "output": "低盐饮食。"}
    line = json.dumps(record, ensure_ascii=False) + "\n"
    (tmp_path / "bom.jsonl").write_bytes(line.encode("utf-8-sig"))
    (tmp_path / "gbk.jsonl").write_bytes((line * 2).encode("gbk"))
    assert objs(tmp_path / "bom.jsonl") == [record]
    assert objs(tmp_path / "bom.jsonl", encoding="utf-8") == [record]  # a BOM is dropped even then
    assert objs(tmp_path / "gbk.jsonl") == [record, record]
    assert objs(tmp_path / "gbk.jsonl", encoding="gbk") == [record, record]


def test_gbk_read_as_utf8_is_an_error_at_its_line_not_mojibake(tmp_path):
    path = tmp_path / "gbk.jsonl"
    path.write_bytes(b'{"text": "ok"}\n' + '{"text": "高血压"}\n'.encode("gbk"))
    raws = list(iter_raw(str(path), encoding="utf-8"))
    assert raws[0].obj == {"text": "ok"}
    assert raws[1].line == 2 and raws[1].obj is None
    assert raws[1].error.startswith("undecodable byte 0xb8 at byte offset 25 as utf-8")


def test_bad_bytes_after_the_sample_are_still_caught(tmp_path, monkeypatch):
    path = tmp_path / "late.txt"
    path.write_bytes(b"fine\n" * 3 + b"bad \xff\n")
    from medgpt.data import readers
    monkeypatch.setattr(readers, "detect_encoding", lambda p: "utf-8")  # as if the sample were clean
    assert lines_of(path)[-1][0] == 4 and "undecodable byte 0xff" in lines_of(path)[-1][1]


def test_unknown_encoding_name(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(MedGPTError, match="unknown encoding 'nope'"):
        list(iter_raw(str(tmp_path / "a.txt"), encoding="nope"))


# ----------------------------------------------------------------------------- jsonl and json

def test_jsonl_malformed_line_and_blank_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"\n[1, 2]\n   \n{"text": "c"}\n')
    raws = list(iter_raw(str(path)))
    assert [r.line for r in raws] == [1, 3, 4, 6]
    assert raws[1].error.startswith("malformed JSON: Expecting ',' delimiter")
    assert raws[2].error == "expected a JSON object per line, got list"
    assert raws[3] == Raw(str(path), 6, obj={"text": "c"})


def test_json_list_element_lines():
    assert lines_of(FIX / "alpaca.json") == [(2, None), (3, None), (9, None)]
    assert objs(FIX / "alpaca.json")[2]["history"] == [["我血压高怎么办？", "建议低盐饮食并按时复诊。"]]


def test_json_object_of_lists_is_concatenated():
    assert lines_of(FIX / "splits.json") == [(3, None), (4, None), (7, None)]
    assert objs(FIX / "splits.json")[2] == {"text": "Insulin lowers blood glucose."}


def test_json_columnar_becomes_rows():
    assert lines_of(FIX / "columnar.json") == [(3, None), (4, None)]
    assert objs(FIX / "columnar.json")[1] == {"instruction": "What is anemia?",
                                              "output": "Too few red blood cells or too little hemoglobin."}


def test_json_single_object_jsonl_in_disguise_and_malformed(tmp_path):
    (tmp_path / "one.json").write_text('{"text": "only"}')
    assert objs(tmp_path / "one.json") == [{"text": "only"}]
    (tmp_path / "lines.json").write_text('{"text": "a"}\n{"text": "b"}\n')
    assert lines_of(tmp_path / "lines.json") == [(1, None), (2, None)]
    (tmp_path / "bad.json").write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n')
    assert lines_of(tmp_path / "bad.json") == [(3, "malformed JSON: Expecting property name enclosed in "
                                                    "double quotes (column 16)")]
    (tmp_path / "empty.json").write_text("  \n")
    assert lines_of(tmp_path / "empty.json") == []


# ----------------------------------------------------------------------------- txt, csv, tsv, parquet

def test_txt_modes():
    path = FIX / "corpus.txt"
    assert [(r.line, r.obj["text"]) for r in iter_raw(str(path))] == [
        (1, "Hypertension is high blood pressure."), (2, "It is common in older adults."),
        (4, "高血压是常见的慢性病。"), (7, "Diabetes affects how the body uses glucose.")]
    assert [(r.line, r.obj["text"]) for r in iter_raw(str(path), text_mode="paragraph")] == [
        (1, "Hypertension is high blood pressure.\nIt is common in older adults."),
        (4, "高血压是常见的慢性病。"), (7, "Diabetes affects how the body uses glucose.")]
    whole = list(iter_raw(str(path), text_mode="file"))
    assert len(whole) == 1 and whole[0].line == 1 and whole[0].obj["text"].count("\n") == 6


def test_csv_rows_with_multiline_field_and_tsv():
    raws = list(iter_raw(str(FIX / "mcq.csv")))
    assert [r.line for r in raws] == [2, 3]
    assert raws[1].obj["question"] == "A first-line drug for type 2 diabetes is\nwhich of these?"
    assert raws[1].obj["A"] == "Metformin"
    assert [(r.line, r.obj["question"]) for r in iter_raw(str(FIX / "qa.tsv"))] == [
        (2, "What is a stroke?"), (3, "什么是哮喘？")]


def test_csv_ragged_row(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("question,answer\nq1,a1\n\nq2,a2,extra\n")
    assert lines_of(path) == [(2, None), (4, "row has 3 fields but the header has 2")]


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "qa.parquet")
    assert [(r.line, r.obj) for r in iter_raw(str(tmp_path / "qa.parquet"))] == list(enumerate(rows, 1))


def test_saved_dataset_dir(tmp_path):
    import datasets
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}]),
                          "test": datasets.Dataset.from_list([{"text": "c"}])}).save_to_disk(tmp_path / "ds")
    [path] = expand_paths([str(tmp_path)])
    assert [(r.line, r.obj) for r in iter_raw(path)] == [(1, {"text": "a"}), (2, {"text": "b"})]


def test_hub_id_offline_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MedGPTError, match="offline mode is on"):
        list(iter_raw("hf://someone/medical-qa"))


def test_iter_records_chains_files():
    raws = list(iter_records([str(FIX / "text.jsonl"), str(FIX / "qa.tsv")]))
    assert [(Path(r.file).name, r.line) for r in raws] == [("text.jsonl", 1), ("text.jsonl", 2),
                                                           ("qa.tsv", 2), ("qa.tsv", 3)]


# ----------------------------------------------------------------------------- hostile files

def test_json_concatenated_top_level_values_are_all_read(tmp_path):
    (tmp_path / "two.json").write_text('[{"text": "a"}]\n[{"text": "b"},\n {"text": "c"}]\n')
    assert objs(tmp_path / "two.json") == [{"text": "a"}, {"text": "b"}, {"text": "c"}]
    assert lines_of(tmp_path / "two.json") == [(1, None), (2, None), (3, None)]
    (tmp_path / "pretty.json").write_text('{\n  "text": "a"\n}\n{\n  "text": "b"\n}\n')
    assert objs(tmp_path / "pretty.json") == [{"text": "a"}, {"text": "b"}]
    (tmp_path / "mixed.json").write_text('[{"text": "a"}]\n{"text": "b"}')
    assert objs(tmp_path / "mixed.json") == [{"text": "a"}, {"text": "b"}]


def test_json_trailing_garbage_is_a_fatal_error_at_its_line(tmp_path):
    (tmp_path / "tail.json").write_text('[{"text": "a"}]\n\nnot json')
    raws = list(iter_raw(str(tmp_path / "tail.json")))
    assert raws[0].obj == {"text": "a"}
    assert (raws[1].line, raws[1].fatal) == (3, True)
    assert raws[1].error.startswith("unexpected text 'not json' after the end of the JSON data")
    (tmp_path / "broken.json").write_text('[{"text": "a"}]\n[{"text": "b"}')
    assert lines_of(tmp_path / "broken.json")[-1] == (2, "malformed JSON: expected ',' or ']' (column 15)")


def test_named_pipe_is_never_opened(tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.jsonl")  # opening it for reading would block until a writer appears
    (tmp_path / "ok.jsonl").write_text('{"text": "a"}\n')
    assert expand_paths([str(tmp_path)]) == [str(tmp_path / "ok.jsonl"), str(tmp_path / "pipe.jsonl")]
    assert expand_paths([str(tmp_path / "pipe.jsonl")]) == [str(tmp_path / "pipe.jsonl")]  # not "not found"
    with pytest.raises(MedGPTError, match=r"pipe\.jsonl: not a regular file \(a named pipe, socket or device\)"):
        list(iter_raw(str(tmp_path / "pipe.jsonl")))


def test_lone_surrogate_is_a_record_error(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "ok \\ud83d\\ude00"}\n{"text": "bad \\ud800 x"}\n{"text": ["\\udfff"]}\n')
    raws = list(iter_raw(str(path)))
    assert raws[0].obj == {"text": "ok \U0001F600"}  # a proper pair is one character
    assert raws[1].error.startswith("lone surrogate \\ud800 in a string") and not raws[1].fatal
    assert raws[2].error.startswith("lone surrogate \\udfff")
    (tmp_path / "s.json").write_text('[{"text": "a"}, {"text": "\\udc00"}]')
    assert lines_of(tmp_path / "s.json")[1][1].startswith("lone surrogate \\udc00")


def test_deep_nesting_is_a_record_error_not_a_recursion_error(tmp_path):
    from medgpt.data.readers import NESTED

    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "d.jsonl").write_text(f'{{"text": "a"}}\n{{"text": {deep}}}\n{{"text": "b"}}\n')
    assert lines_of(tmp_path / "d.jsonl") == [(1, None), (2, NESTED), (3, None)]
    (tmp_path / "d.json").write_text(f'[{{"text": "a"}},\n {deep}]')
    [(line, error)] = lines_of(tmp_path / "d.json")
    assert (line, error) == (2, NESTED)


def test_listed_shows_ten_then_counts_the_rest():
    from medgpt.data.readers import listed

    assert listed(["a:1: x", "a:2: y"]) == "  a:1: x\n  a:2: y"
    many = [f"f:{i}: bad" for i in range(1, 13)]
    assert listed(many).splitlines()[-2:] == ["  f:10: bad", "  ... and 2 more"]
    assert listed(many[:10], total=40).endswith("  f:10: bad\n  ... and 30 more")
