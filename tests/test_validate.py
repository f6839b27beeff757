"""Validation reports (`file:line: what is wrong`) and the loader every training command calls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medgpt.data.validate import FileReport, Problem, format_report, iter_canonical, load_records, validate_files
from medgpt.utils import MedGPTError

FIX = Path(__file__).parent / "fixtures" / "data"


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return str(path)


def problems(reports: list[FileReport]) -> list[str]:
    return [str(p) for r in reports for p in r.problems]


QA = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(4)]


def test_problem_str():
    assert str(Problem("a.jsonl", 3, "bad")) == "a.jsonl:3: bad"
    assert str(Problem("a.jsonl", 3, "dup", "warning")) == "a.jsonl:3: warning: dup"
    assert str(Problem("hf://x/y", 0, "offline")) == "hf://x/y: offline"


def test_clean_fixtures_validate():
    reports = validate_files([str(FIX)])
    assert problems(reports) == []
    by_name = {Path(r.path).name: r for r in reports}
    assert by_name["preference.jsonl"].format == "preference"
    assert by_name["preference.jsonl"].kinds == ["chat", "preference", "prompt"]
    assert by_name["alpaca.json"].count == 3
    assert by_name["mcq.csv"].format == "mcq"


def test_every_problem_with_its_line(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        '{"messages": [}',
        {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}]},
        {"messages": [{"role": "doctor", "content": "q"}]},
        {"messages": []},
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ])
    [report] = validate_files([path])
    assert report.format == "openai" and report.count == 7
    assert (report.n_errors, report.n_warnings) == (5, 1)
    assert problems([report]) == [
        f"{path}:2: malformed JSON: Expecting value (column 15)",
        f"{path}:3: conversation turn 2 is 'user' but 'assistant' was expected after 'user'",
        f"{path}:4: messages turn 1: unsupported role 'doctor' (use system, user or assistant; tool and function "
        "turns are not supported)",
        f"{path}:5: empty conversation",
        f"{path}:6: messages turn 1 ('user') is empty",
        f"{path}:7: warning: duplicate of line 1",
    ]


def test_json_list_problem_lines():
    reports = validate_files([str(FIX / "alpaca.json")], format="mcq")  # wrong format forced: all fail
    assert [str(p) for p in reports[0].problems][:2] == [
        f"{FIX / 'alpaca.json'}:2: missing field 'question'", f"{FIX / 'alpaca.json'}:3: missing field 'question'"]


def test_duplicates_across_files_are_warnings(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", QA[:2])
    second = write_jsonl(tmp_path / "b.jsonl", [QA[1], QA[3]])
    reports = validate_files([first, second])
    assert problems(reports) == [f"{second}:1: warning: duplicate of {first}:2"]
    assert load_records([first, second], "chat")[2] == {"messages": [{"role": "user", "content": "q1"},
                                                                    {"role": "assistant", "content": "a1"}]}


def test_empty_and_blank_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n")
    (tmp_path / "nothing.json").write_text("[]")
    assert problems(validate_files([str(tmp_path)])) == [
        f"{tmp_path / 'blank.txt'}:1: no records (only blank lines?)",
        f"{tmp_path / 'empty.jsonl'}:1: file is empty",
        f"{tmp_path / 'nothing.json'}:1: no records (only blank lines?)",
    ]


def test_undecodable_file_reported_with_its_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    [line] = problems(validate_files([str(path)]))
    assert line.startswith(f"{path}:2: undecodable byte 0xff at byte offset 25")
    assert "--data.encoding" in line


def test_gbk_file_auto_and_explicit(tmp_path):
    path = tmp_path / "gbk.jsonl"
    path.write_bytes('{"问": "发烧怎么办？", "答": "多喝水，必要时就医。"}\n'.encode("gbk"))
    expected = [{"messages": [{"role": "user", "content": "发烧怎么办？"},
                              {"role": "assistant", "content": "多喝水，必要时就医。"}]}]
    assert load_records([str(path)], "chat") == expected
    assert load_records([str(path)], "chat", encoding="gbk") == expected


def test_mixed_and_unknown_shapes(tmp_path):
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "a"}, {"question": "q", "answer": "x"}])
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"foo": 1, "bar": 2}] * 3)
    assert problems(validate_files([mixed, unknown])) == [
        f"{mixed}:1: cannot tell the record format (records look mixed: text: 1, qa: 1); keys seen: answer, "
        "question, text; set --data.format or map columns with --data.columns",
        f"{unknown}:1: cannot tell the record format; keys seen: bar, foo; set --data.format or map columns "
        "with --data.columns",
    ]


def test_a_few_odd_records_fail_under_the_majority_format(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", QA[:3] + [{"text": "stray"}])
    assert problems(validate_files([path])) == [f"{path}:4: missing field 'question'"]


def test_column_mapping_in_validation(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"Q": "What is gout?", "A_": "Arthritis from uric acid."}])
    columns = {"prompt": "Q", "response": "A_"}
    assert load_records([path], "chat", columns=columns)[0]["messages"][0]["content"] == "What is gout?"
    [report] = validate_files([path])
    assert report.format is None  # without the mapping nothing fits


def test_max_problems_per_file_still_counts(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", QA[:1] + ["{"] * 5)
    [report] = validate_files([path], max_problems_per_file=2)
    assert len(report.problems) == 2 and report.n_errors == 5
    assert "... 3 more not shown" in format_report([report])


def test_format_report():
    reports = [FileReport("a.jsonl", "qa", 3, [Problem("a.jsonl", 2, "bad"), Problem("a.jsonl", 3, "dup", "warning")],
                          ["chat", "prompt"], 1, 1)]
    assert format_report(reports) == ("a.jsonl: qa, 3 records, 1 error, 1 warning\n"
                                      "  a.jsonl:2: bad\n"
                                      "  a.jsonl:3: warning: dup\n"
                                      "1 file, 3 records, 1 error, 1 warning: fix the errors above before training")


# ----------------------------------------------------------------------------- load_records

def test_load_records_refuses_bad_data_listing_problems(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", QA[:1] + ['{"question": "q"'] * 12)
    with pytest.raises(MedGPTError) as e:
        load_records([path], "chat")
    message = str(e.value)
    assert message.startswith("the data has 12 errors:\n")
    assert f"  {path}:2: malformed JSON" in message
    assert f"{path}:11:" in message and f"{path}:12:" not in message  # first 10 only
    assert "... and 2 more" in message
    assert f"medgpt data validate {path}" in message


def test_load_records_wrong_kind_names_file_format_and_shape():
    with pytest.raises(MedGPTError) as e:
        load_records([str(FIX / "corpus.txt")], "preference", purpose="dpo")
    assert str(e.value).startswith(f"dpo needs preference records {{prompt, chosen, rejected}}; "
                                   f"{FIX / 'corpus.txt'} holds text records (format: text)")
    with pytest.raises(MedGPTError, match="this command needs chat records"):
        load_records([str(FIX / "text.jsonl")], "chat")


def test_load_records_converts_kinds():
    sft = load_records([str(FIX / "preference.jsonl")], "chat")
    assert sft[0]["messages"] == [{"role": "user", "content": "Can I take ibuprofen with an empty stomach?"},
                                  {"role": "assistant", "content": "Better with food; it can irritate the stomach."}]
    rl = load_records([str(FIX / "mcq.jsonl")], "prompt")
    assert rl[0]["answer"] == "B" and rl[0]["prompt"][0]["content"].endswith("D. Vitamin K")
    assert load_records([str(FIX / "openai.jsonl")], "prompt")[0]["answer"] == "60 to 100 beats per minute."
    # kind None keeps each file's own kind
    assert load_records([str(FIX / "text.jsonl"), str(FIX / "mcq.csv")])[2]["answer"] == "B"


def test_load_records_prompt_without_answer_cannot_be_chat():
    with pytest.raises(MedGPTError, match=r"prompt\.jsonl:3: a prompt record needs an 'answer'"):
        load_records([str(FIX / "prompt.jsonl")], "chat")


def test_load_records_max_samples_across_files():
    files = [str(FIX / "qa.jsonl"), str(FIX / "qa.tsv")]
    assert len(load_records(files, "chat", max_samples=3)) == 3
    assert len(load_records(files, "chat", max_samples=6)) == 6
    assert len(load_records(files, "chat")) == 7


def test_load_records_glob_and_txt_modes():
    assert len(load_records([str(FIX / "*.txt")], "text", text_mode="paragraph")) == 3
    assert len(load_records([str(FIX / "*.txt")], "text", text_mode="file")) == 1


def test_load_records_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(QA), tmp_path / "qa.parquet")
    assert len(load_records([str(tmp_path / "qa.parquet")], "chat")) == 4


# ----------------------------------------------------------------------------- iter_canonical

def test_iter_canonical_streams_and_stops_at_the_bad_line(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", QA[:2] + ['{"question": "q"}'] + QA[2:])
    stream = iter_canonical([path], "prompt")
    assert next(stream) == {"prompt": [{"role": "user", "content": "q0"}], "answer": "a0"}
    next(stream)
    with pytest.raises(MedGPTError, match=rf"^{path}:3: missing field 'answer'"):
        next(stream)
    assert len(list(iter_canonical([path], "chat", max_samples=2))) == 2
    assert next(iter(iter_canonical([str(FIX / "corpus.txt")])))["text"].startswith("Hypertension")


def test_iter_canonical_wrong_kind():
    with pytest.raises(MedGPTError, match="grpo needs prompt records"):
        next(iter(iter_canonical([str(FIX / "corpus.txt")], "prompt", purpose="grpo")))


def test_unreadable_source_is_one_file_problem(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    [line] = problems(validate_files(["someone/medical-qa"]))
    assert line.startswith("hf://someone/medical-qa: 'someone/medical-qa' is not a local file or directory")
    assert "offline mode is on" in line


# ----------------------------------------------------------------------------- tolerant training loads

CHAT = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]} for i in range(60)]
EMPTY_TURN = {"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "a"}]}


def test_load_tolerant_skips_a_few_invalid_records_naming_them(tmp_path, capsys):
    from medgpt.data.validate import load_tolerant

    path = write_jsonl(tmp_path / "sft.jsonl", CHAT[:30] + [EMPTY_TURN] + CHAT[31:])
    records, invalid = load_tolerant([path], "chat", max_invalid=0.05)
    assert (len(records), invalid) == (59, 1)
    out = capsys.readouterr().out
    assert "skipped 1 invalid record of 60 read (1.7%" in out
    assert f"{path}:31: conversations turn 1 ('user') is empty" in out
    with pytest.raises(MedGPTError, match=r"^the data has 1 error:"):  # 0: strict, as `load_records` is
        load_tolerant([path], "chat", max_invalid=0)


def test_load_tolerant_lists_ten_then_counts_the_rest(tmp_path, capsys):
    from medgpt.data.validate import load_tolerant

    path = write_jsonl(tmp_path / "sft.jsonl", CHAT[:48] + [EMPTY_TURN] * 12)
    load_tolerant([path], "chat", max_invalid=0.25)
    out = capsys.readouterr().out
    assert f"{path}:58:" in out and f"{path}:59:" not in out and "... and 2 more" in out


def test_load_tolerant_refuses_above_the_threshold(tmp_path):
    from medgpt.data.validate import load_tolerant

    path = write_jsonl(tmp_path / "sft.jsonl", CHAT[:50] + [EMPTY_TURN] * 10)
    with pytest.raises(MedGPTError) as e:
        load_tolerant([path], "chat", max_invalid=0.05)
    message = str(e.value)
    assert message.startswith("10 invalid records of 60 read (16.7%), more than --data.max_invalid 0.05 (5%) allows")
    assert f"  {path}:51: conversations turn 1 ('user') is empty" in message
    assert "raise --data.max_invalid to 0.17" in message and f"medgpt data validate {path}" in message


@pytest.mark.parametrize("tail, needle", [
    ("[1, ", "malformed JSON"),  # a .json document broken halfway: the rest of the file is lost
    ("garbage", "unexpected text 'garbage'"),
])
def test_load_tolerant_never_skips_a_file_level_problem(tmp_path, tail, needle):
    from medgpt.data.validate import load_tolerant

    path = tmp_path / "sft.json"
    path.write_text(json.dumps(CHAT) + "\n" + tail)
    with pytest.raises(MedGPTError, match=needle):
        load_tolerant([str(path)], "chat", max_invalid=0.5)


def test_load_tolerant_undecodable_file_still_fails(tmp_path):
    from medgpt.data.validate import load_tolerant

    path = tmp_path / "sft.jsonl"
    path.write_bytes("".join(json.dumps(r) + "\n" for r in CHAT).encode() + b'{"text": "\xff\xfe"}\n')
    with pytest.raises(MedGPTError, match=r"sft\.jsonl:61: undecodable byte 0xff"):
        load_tolerant([str(path)], "chat", max_invalid=0.5)


def test_load_splits_counts_invalid_records_of_both_splits(tmp_path):
    from medgpt.args import DataArgs
    from medgpt.data.validate import load_splits

    train = write_jsonl(tmp_path / "train.jsonl", CHAT[:30] + [EMPTY_TURN] + CHAT[31:])
    held = write_jsonl(tmp_path / "eval.jsonl", CHAT[:29] + ['{"conversations": ['])
    assert DataArgs().max_invalid == 0.05
    train_records, eval_records, invalid = load_splits(DataArgs(train_files=[train], eval_files=[held]), "chat")
    assert (len(train_records), len(eval_records), invalid) == (59, 29, 2)
    with pytest.raises(MedGPTError, match="the data has 1 error"):
        load_splits(DataArgs(train_files=[train], max_invalid=0), "chat")


def test_hostile_records_are_problems_not_crashes(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", QA[:2] + ['{"question": "\\ud800", "answer": "a"}',
                                                        '{"question": ' + "[" * 100_000 + "]" * 100_000 + "}"])
    [report] = validate_files([path])
    assert [p.line for p in report.problems] == [3, 4] and report.n_errors == 2
    assert report.problems[0].message.startswith("lone surrogate \\ud800")
    assert report.problems[1].message.startswith("JSON nested too deeply")


def test_medicalgpt_reward_file_is_preference():
    [report] = validate_files([str(FIX / "medicalgpt_reward.jsonl")])
    assert (report.format, report.count, report.n_errors) == ("preference", 6, 0)
    assert load_records([str(FIX / "medicalgpt_reward.jsonl")], "preference", purpose="dpo")[2]["prompt"][0] == {
        "role": "system", "content": "你是一名耐心的全科医生，用通俗的语言回答。"}


@pytest.mark.parametrize("lang, kept", [("all", 6), ("en", 4), ("zh", 2)])
def test_data_lang_keeps_one_language_then_max_samples(lang, kept, tmp_path, capsys):
    """--data.lang: records holding Chinese characters are zh, the others en; --data.max_samples counts kept ones."""
    from medgpt.args import DataArgs
    from medgpt.data.validate import load_splits

    en = [json.dumps({"question": f"What is fever {i}?", "answer": "A high temperature."}) for i in range(4)]
    zh = [json.dumps({"question": f"发烧是什么{i}？", "answer": "体温升高。"}, ensure_ascii=False) for i in range(2)]
    train = write_jsonl(tmp_path / "t.jsonl", [zh[0], *en, zh[1]])
    records = load_splits(DataArgs(train_files=[train], lang=lang), "chat")[0]
    assert len(records) == kept
    if lang != "all":
        assert all(("发烧" in json.dumps(r, ensure_ascii=False)) == (lang == "zh") for r in records)
        assert f"--data.lang {lang}: kept {kept} of 6 train records" in capsys.readouterr().out
    assert len(load_splits(DataArgs(train_files=[train], lang=lang, max_samples=1), "chat")[0]) == 1
    if lang == "zh":
        only_en = write_jsonl(tmp_path / "en.jsonl", en)
        with pytest.raises(MedGPTError, match="--data.lang zh leaves no train records in"):
            load_splits(DataArgs(train_files=[only_en], lang="zh"), "chat")
