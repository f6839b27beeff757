"""Medical benchmark files -> canonical MCQ records `{question, options: {A: ..}, answer: "A", subject?}`.

    medgpt eval --model.name_or_path DIR --eval.mcq_files medqa/test.jsonl,medmcqa/dev.json,cmexam/test.csv

Each file is read with the project's readers (jsonl, json, csv, tsv, parquet, saved `datasets` dirs) and its shape
is decided from its first record's keys (`--eval.mcq_format` forces one). The adapters only rename fields; every
record then goes through the canonical MCQ check (`data/formats.py`), so a bad record fails as `file:line: why`.

    shape      local file of                         fields read
    canonical  our mcq records, C-Eval val/dev csv   question, options {A: ..} | [..] | A/B/C/D columns, answer
    medqa      MedQA (USMLE and MCMLE) jsonl         question, options {A: ..}, answer_idx (else answer text)
    medmcqa    MedMCQA json/jsonl/parquet            question, opa..opd, cop, subject_name
    pubmedqa   PubMedQA ori_pqal.json or HF rows     QUESTION/question, CONTEXTS/context.contexts, final_decision
    cmexam     CMExam csv                            Question, Options ("A xxx\\nB yyy"), Answer
    cmb        CMB-Exam json                         question, option {A: ..}, answer, question_type, exam_subject
    ceval      C-Eval test / CMMLU csv               question/Question, A..D, answer/Answer (case-insensitive)

MedMCQA numbers the correct option `cop` 1-4 in the original JSON release and 0-3 (a ClassLabel) in the Hugging
Face `openlifescienceai/medmcqa` release. `--eval.medmcqa_cop auto` decides per file from the values seen: a 0
means 0-based, a 4 means 1-based, neither is ambiguous and asks for `--eval.medmcqa_cop 0|1`.

Not errors, counted and reported as skipped: multiple-answer questions (CMB 多项选择题, a CMExam answer "AB") and
unlabelled rows (a test split without answers: MedMCQA cop -1, C-Eval test).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from medgpt.data.formats import LETTERS, RecordError, record_kind, to_canonical
from medgpt.data.readers import iter_raw, listed
from medgpt.utils import MedGPTError

SHAPES = ("auto", "canonical", "medqa", "medmcqa", "pubmedqa", "cmexam", "cmb", "ceval")
MULTI, UNLABELLED = "multiple answers", "no answer (unlabelled)"
PUBMEDQA_OPTIONS = {"A": "yes", "B": "no", "C": "maybe"}
_OPTION_LINE = re.compile(r"\s*([A-J])\s*[.、:：．)）]?\s*(.*\S)\s*$")


class Skip(Exception):
    """A record that is fine but not scored (multiple answers, no answer); the message is the reason."""


@dataclass
class McqFile:
    path: str
    shape: str
    records: list[dict] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # reason -> count


# ----------------------------------------------------------------------------------------------- detection

def _lower(obj: dict) -> dict:
    return {str(k).strip().lower(): v for k, v in obj.items()}


def detect_shape(obj: dict) -> str:
    """The shape of one raw record, from its keys."""
    low = _lower(obj)
    values = list(obj.values())
    if values and all(isinstance(v, dict) for v in values) and "question" in _lower(values[0]):
        return "pubmedqa"  # ori_pqal.json: {pmid: {QUESTION, CONTEXTS, final_decision}}
    if "final_decision" in low:
        return "pubmedqa"
    if {"opa", "opb"} <= low.keys():
        return "medmcqa"
    if "option" in low and "question" in low:
        return "cmb"
    if isinstance(low.get("options"), str):
        return "cmexam"
    if "answer_idx" in low:
        return "medqa"
    if "question" in low and "options" not in low and {"a", "b"} <= low.keys():
        return "ceval"
    return "canonical"


# ----------------------------------------------------------------------------------------------- adapters

def _answer_text(value) -> str:
    if value is None or (isinstance(value, float) and value != value):  # None or NaN (pandas-written csv)
        return ""
    return str(value).strip()


def _single(answer: str) -> str:
    """An answer given as letters: one letter, or Skip for several ("AB", "A,C") or none."""
    letters = re.sub(r"[\s,，、;；/]", "", answer).upper()
    if not letters:
        raise Skip(UNLABELLED)
    if len(letters) > 1 and all(c in LETTERS for c in letters):
        raise Skip(MULTI)
    return letters


def _medqa(obj: dict, **_) -> dict:
    low = _lower(obj)
    answer = low.get("answer_idx") or low.get("answer")
    return {"question": low.get("question"), "options": low.get("options"), "answer": answer}


def _medmcqa(obj: dict, cop_base: int = 1, **_) -> dict:
    low = _lower(obj)
    options = {letter: low.get(f"op{letter.lower()}") for letter in "ABCDE" if f"op{letter.lower()}" in low}
    cop = _cop(low.get("cop"))
    if cop is None or cop < 0:
        raise Skip(UNLABELLED)
    index = cop - cop_base
    if not 0 <= index < len(options):
        raise RecordError(f"cop {low.get('cop')!r} is not an option number ({cop_base}-{len(options) - 1 + cop_base} "
                          f"with --eval.medmcqa_cop {cop_base})")
    record = {"question": low.get("question"), "options": options, "answer": LETTERS[index]}
    if isinstance(low.get("subject_name"), str):
        record["subject"] = low["subject_name"]
    return record


def _cop(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    if value is None or value == "" or (isinstance(value, float) and value != value):
        return None
    raise RecordError(f"cop must be an option number, got {value!r}")


def _pubmedqa(obj: dict, **_) -> dict:
    low = _lower(obj)
    context = low.get("contexts", low.get("context"))
    if isinstance(context, dict):  # HF bigbio/pubmed_qa rows: context = {contexts: [...], labels, meshes}
        context = context.get("contexts")
    if isinstance(context, list):
        context = "\n".join(str(c) for c in context)
    decision = _answer_text(low.get("final_decision")).lower()
    if not decision:
        raise Skip(UNLABELLED)
    answer = next((k for k, v in PUBMEDQA_OPTIONS.items() if v == decision), None)
    if answer is None:
        raise RecordError(f"final_decision must be yes, no or maybe, got {low.get('final_decision')!r}")
    question = low.get("question")
    if isinstance(question, str) and isinstance(context, str) and context.strip():
        question = f"Context: {context.strip()}\n\nQuestion: {question.strip()}"
    return {"question": question, "options": dict(PUBMEDQA_OPTIONS), "answer": answer}


def _cmexam(obj: dict, **_) -> dict:
    low = _lower(obj)
    options = {}
    for line in str(low.get("options") or "").splitlines():
        if not line.strip():
            continue
        m = _OPTION_LINE.match(line)
        if not m:
            raise RecordError(f"option line {line.strip()!r} does not start with a letter (expected 'A xxx')")
        options[m.group(1)] = m.group(2)
    return {"question": low.get("question"), "options": options, "answer": _single(_answer_text(low.get("answer")))}


def _cmb(obj: dict, **_) -> dict:
    low = _lower(obj)
    if "多项" in str(low.get("question_type") or ""):
        raise Skip(MULTI)
    record = {"question": low.get("question"), "options": low.get("option"),
              "answer": _single(_answer_text(low.get("answer")))}
    if isinstance(low.get("exam_subject"), str):
        record["subject"] = low["exam_subject"]
    return record


def _ceval(obj: dict, **_) -> dict:
    low = _lower(obj)
    options = {k.upper(): v for k, v in low.items() if len(k) == 1 and k.upper() in LETTERS and _answer_text(v)}
    return {"question": low.get("question"), "options": options, "answer": _single(_answer_text(low.get("answer")))}


def _canonical(obj: dict, **_) -> dict:
    record = to_canonical(obj, "auto")
    if record_kind(record) != "mcq":
        raise RecordError("not a multiple-choice record: {question, options, answer} (or a benchmark shape: "
                          f"{', '.join(SHAPES[2:])}) is needed; keys seen: {', '.join(map(str, obj))}")
    return record


ADAPTERS = {"canonical": _canonical, "medqa": _medqa, "medmcqa": _medmcqa, "pubmedqa": _pubmedqa,
            "cmexam": _cmexam, "cmb": _cmb, "ceval": _ceval}


def to_mcq(obj: dict, shape: str, **options) -> dict:
    """One raw record of `shape` -> a canonical MCQ record. Raises Skip (not scored) or RecordError (bad)."""
    record = ADAPTERS[shape](obj, **options)
    return record if shape == "canonical" else to_canonical(record, "mcq")


# ----------------------------------------------------------------------------------------------- files

def _cop_base(path: str, objs: list[dict], setting: str) -> int:
    if setting in ("0", "1"):
        return int(setting)
    seen = set()
    for obj in objs:
        try:
            seen.add(_cop(_lower(obj).get("cop")))
        except RecordError:
            pass  # reported as that record's error
    if 0 in seen and 4 in seen:
        raise MedGPTError(f"{path}: MedMCQA cop values include both 0 and 4, so they are neither 0-3 nor 1-4. "
                          "Check the file, or set --eval.medmcqa_cop 0 or 1.")
    if 0 in seen or 4 in seen:
        return 0 if 0 in seen else 1
    raise MedGPTError(f"{path}: cannot tell whether MedMCQA cop counts options from 0 (Hugging Face release) or "
                      "from 1 (original JSON release): no row has cop 0 or 4. Set --eval.medmcqa_cop 0 or 1.")


def _rows(path: str, encoding: str):
    """(line, raw object, read error) for a file; PubMedQA's {pmid: record} document becomes one row per pmid."""
    for raw in iter_raw(path, encoding):
        obj = raw.obj
        if obj is not None and detect_shape(obj) == "pubmedqa" and "final_decision" not in _lower(obj):
            for value in obj.values():
                yield raw.line, value, None
            continue
        yield raw.line, obj, raw.error


def read_mcq_file(path: str, shape: str = "auto", medmcqa_cop: str = "auto", max_samples: int | None = None,
                  encoding: str = "auto") -> McqFile:
    """Every record of one file as canonical MCQ records, or a MedGPTError listing the bad ones as file:line."""
    rows = list(_rows(path, encoding))
    first = next((obj for _, obj, _ in rows if obj is not None), None)
    if first is None:
        errors = [f"{path}:{line}: {error}" for line, _, error in rows if error][:10]
        raise MedGPTError("\n".join(errors) if errors else f"{path}: no records (empty file?)")
    shape = detect_shape(first) if shape == "auto" else shape
    options = {}
    if shape == "medmcqa":
        options["cop_base"] = _cop_base(path, [obj for _, obj, _ in rows if obj is not None], medmcqa_cop)
    out, problems = McqFile(path, shape), []
    for line, obj, error in rows:
        if max_samples is not None and len(out.records) >= max_samples:
            break
        if error is None:
            try:
                out.records.append(to_mcq(obj, shape, **options))
                continue
            except Skip as e:
                out.skipped[str(e)] += 1
                continue
            except RecordError as e:
                error = str(e)
        problems.append(f"{path}:{line}: {error}")
    if problems:
        raise MedGPTError(f"{len(problems)} bad multiple-choice record(s) (read as {shape}):\n{listed(problems)}\n"
                          f"Fix them, or set --eval.mcq_format to the file's real shape ({', '.join(SHAPES[1:])}).")
    if not out.records:
        why = ", ".join(f"{n} skipped: {r}" for r, n in out.skipped.items())
        raise MedGPTError(f"{path}: no question to score ({why}).")
    return out
