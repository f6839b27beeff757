"""Validation reports, and the loader every training command calls.

    medgpt data validate data/train.jsonl 'data/extra/*.json'

Every problem is reported as `file:line: what is wrong`, like a compiler, so a user can jump to it.
`load_records` validates before it returns anything: a bad record fails the run before a model is
loaded, not hours into training. Training commands load through `load_splits`, which skips a few invalid
records (each named in the log) rather than lose a run to one empty turn in a scraped file, and refuses
more than `--data.max_invalid` of them; a file that cannot be read at all always fails. `iter_canonical`
is the streaming variant for corpora too large to check first; it fails at the first bad record instead.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain, islice
from typing import Iterator, Literal

from medgpt.data.formats import (
    FORMATS,
    SHAPES,
    RecordError,
    apply_columns,
    as_kind,
    can_convert,
    detect_format,
    kind_of,
    to_canonical,
)
from medgpt.data.readers import expand_paths, iter_raw, listed
from medgpt.utils import MedGPTError, log

SNIFF = 20  # valid records looked at to decide a file's format
SNIFF_MAX = 1000  # ...reading at most this many, so a file of garbage is not buffered whole
FIX_FORMAT = "set --data.format or map columns with --data.columns"
KINDS = ("text", "chat", "preference", "labelled", "prompt", "mcq")


@dataclass
class Problem:
    """One thing wrong at `file:line` (line 0: the file as a whole). `fatal`: the file, or the rest of it,
    cannot be read (never skipped, unlike one bad record)."""
    file: str
    line: int
    message: str
    level: Literal["error", "warning"] = "error"
    fatal: bool = False

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {'warning: ' if self.level == 'warning' else ''}{self.message}"


@dataclass
class FileReport:
    """What validation found in one source. `count` counts every record read, good or bad;
    `kinds` are the record kinds the file can be loaded as (e.g. preference -> preference, chat, prompt);
    `problems` stops growing at max_problems_per_file while `n_errors`/`n_warnings`/`n_fatal` keep counting;
    `n_errors - n_fatal` records are invalid one by one."""
    path: str
    format: str | None
    count: int = 0
    problems: list[Problem] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    n_errors: int = 0
    n_warnings: int = 0
    n_fatal: int = 0

    def add(self, problem: Problem, limit: int) -> None:
        if problem.level == "error":
            self.n_errors += 1
            self.n_fatal += problem.fatal
        else:
            self.n_warnings += 1
        if len(self.problems) < limit:
            self.problems.append(problem)


def _decide_format(path: str, head: list, fmt: str, columns) -> tuple[str | None, Problem | None]:
    """The file's format: the one most of its first records have. 'auto' when no record parsed."""
    if fmt != "auto":
        return fmt, None
    valid = [raw for raw in head if raw.obj is not None]
    if not valid:
        return "auto", None  # nothing parsed (errors already reported per line): detect record by record
    votes = Counter()
    for raw in valid:
        try:
            votes[detect_format(apply_columns(raw.obj, columns))] += 1
        except RecordError:
            votes[None] += 1
    best, n = votes.most_common(1)[0]
    if best is not None and 2 * n > len(valid):
        return best, None
    keys = sorted({str(k) for raw in valid for k in raw.obj})
    mixed = ", ".join(f"{f}: {c}" for f, c in votes.most_common() if f) if len(votes) > 1 else ""
    message = (f"cannot tell the record format{f' (records look mixed: {mixed})' if mixed else ''}; "
               f"keys seen: {', '.join(keys[:20])}; {FIX_FORMAT}")
    return None, Problem(path, valid[0].line, message, fatal=True)


def _open(path: str, fmt: str, columns, encoding: str, text_mode: str):
    """(format, file-level problem, rows) for one source; rows yield (line, canonical record, error, fatal)."""
    raws = iter_raw(path, encoding, text_mode)
    head, parsed = [], 0
    for raw in raws:
        head.append(raw)
        parsed += raw.obj is not None
        if parsed >= SNIFF or len(head) >= SNIFF_MAX:
            break
    if not head:
        empty = os.path.isfile(path) and os.path.getsize(path) == 0
        problem = Problem(path, 1, "file is empty" if empty else "no records (only blank lines?)", fatal=True)
        return None, problem, iter(())
    fmt, problem = _decide_format(path, head, fmt, columns)

    def rows():
        for raw in chain(head, raws):
            if raw.error is not None:
                yield raw.line, None, raw.error, raw.fatal
                continue
            try:
                yield raw.line, to_canonical(raw.obj, fmt, columns), None, False
            except RecordError as e:
                yield raw.line, None, str(e), False
    return fmt, problem, rows()


def _digest(record: dict) -> bytes:
    # 8 bytes per record instead of the record itself keeps duplicate detection in bounded memory.
    text = json.dumps(record, ensure_ascii=False, sort_keys=True)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


def _wrong_kind(path: str, fmt: str, kind: str, purpose: str | None) -> MedGPTError:
    have = kind_of(fmt)
    return MedGPTError(f"{purpose or 'this command'} needs {SHAPES[kind]}; {path} holds {have} records "
                       f"(format: {fmt}), which cannot be used as {kind} records. Point the command at "
                       f"{kind} data, or check --data.format / --data.columns")


def _file_problem(path: str, error: MedGPTError) -> Problem:
    return Problem(path, 0, str(error).removeprefix(f"{path}: "), fatal=True)


def _check_rows(report: FileReport, rows, kind, records, seen, max_samples, max_problems) -> None:
    """Feed one file's rows into its report, and into `records` (as `kind` when set) unless it is None."""
    for line, record, error, fatal in rows:
        report.count += 1
        if error is None:
            first = seen.setdefault(_digest(record), (report.path, line))
            if first != (report.path, line):
                where = f"line {first[1]}" if first[0] == report.path else f"{first[0]}:{first[1]}"
                report.add(Problem(report.path, line, f"duplicate of {where}", "warning"), max_problems)
            if records is not None:
                try:
                    records.append(as_kind(record, kind) if kind else record)
                except RecordError as e:
                    error = str(e)
        if error is not None:
            report.add(Problem(report.path, line, error, fatal=fatal), max_problems)
        if max_samples is not None and records is not None and len(records) >= max_samples:
            return


def _scan(specs, kind, keep, *, format, columns, encoding, text_mode, max_samples, max_problems, purpose):
    """One pass over every source: a report per file, and (when `keep`) the records, as `kind` when set."""
    if format != "auto" and format not in FORMATS:
        raise MedGPTError(f"unknown --data.format '{format}'; use auto or one of {', '.join(FORMATS)}")
    reports, records = [], ([] if keep else None)
    seen: dict[bytes, tuple[str, int]] = {}  # record digest -> (file, line) where it first appeared
    for path in expand_paths(specs):
        if max_samples is not None and keep and len(records) >= max_samples:
            break
        report = FileReport(path, None)
        reports.append(report)
        try:
            fmt, problem, rows = _open(path, format, columns, encoding, text_mode)
        except MedGPTError as e:  # unreadable source (hub offline, bad codec name): one problem, go on
            report.add(_file_problem(path, e), max_problems)
            continue
        if problem is not None:
            report.add(problem, max_problems)
            continue
        if fmt != "auto":  # "auto": no record parsed among the first ones; each record is detected alone
            report.format = fmt
            report.kinds = [k for k in KINDS if can_convert(kind_of(fmt), k)]
            if kind is not None and kind not in report.kinds:
                raise _wrong_kind(path, fmt, kind, purpose)
        try:
            _check_rows(report, rows, kind, records, seen, max_samples, max_problems)
        except MedGPTError as e:
            report.add(_file_problem(path, e), max_problems)
    return reports, records


def validate_files(specs: list[str], format: str = "auto", columns: dict[str, str] | None = None,
                   encoding: str = "auto", text_mode: str = "line", max_problems_per_file: int = 50
                   ) -> list[FileReport]:
    """Check every record of every source; never raises for bad data (only for paths that do not exist)."""
    reports, _ = _scan(specs, None, False, format=format, columns=columns, encoding=encoding, text_mode=text_mode,
                       max_samples=None, max_problems=max_problems_per_file, purpose=None)
    return reports


def _fail(specs: list[str], reports: list[FileReport]) -> MedGPTError:
    errors = [p for r in reports for p in r.problems if p.level == "error"]
    total = sum(r.n_errors for r in reports)
    return MedGPTError(f"the data has {total} error{'s' if total != 1 else ''}:\n{listed(errors, total)}\n"
                       f"Fix them, or run `medgpt data validate {' '.join(specs)}` to see them all.")


def load_records(specs: list[str], kind: str | None = None, *, format: str = "auto",
                 columns: dict[str, str] | None = None, encoding: str = "auto", text_mode: str = "line",
                 max_samples: int | None = None, purpose: str | None = None) -> list[dict]:
    """Validated records of `kind` (text/chat/preference/prompt/mcq; None: each file's own) from files,
    globs, directories, saved `datasets` dirs or hub ids.

    Raises MedGPTError listing the first problems when any record is bad, or naming the file and the shape
    needed when a file holds the wrong kind of records. `purpose` (e.g. 'dpo') words that message.
    With `max_samples`, reading stops after that many records (later records are not checked).
    """
    return load_tolerant(specs, kind, format=format, columns=columns, encoding=encoding, text_mode=text_mode,
                         max_samples=max_samples, purpose=purpose, max_invalid=0.0)[0]


def load_tolerant(specs: list[str], kind: str | None = None, *, max_invalid: float, format: str = "auto",
                  columns: dict[str, str] | None = None, encoding: str = "auto", text_mode: str = "line",
                  max_samples: int | None = None, purpose: str | None = None) -> tuple[list[dict], int]:
    """`load_records` that skips invalid records, up to `max_invalid` (a fraction of the records read):
    (records, number skipped). A file that cannot be read, or holds the wrong kind, still fails."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown kind '{kind}'; known: {', '.join(KINDS)}")
    specs = [specs] if isinstance(specs, str) else list(specs)
    reports, records = _scan(specs, kind, True, format=format, columns=columns, encoding=encoding,
                             text_mode=text_mode, max_samples=max_samples, max_problems=50, purpose=purpose)
    if any(r.n_fatal for r in reports) or (max_invalid <= 0 and any(r.n_errors for r in reports)):
        raise _fail(specs, reports)
    invalid = [p for r in reports for p in r.problems if p.level == "error"]
    n_invalid = sum(r.n_errors for r in reports)
    tolerate(invalid, n_invalid, sum(r.count for r in reports), max_invalid, specs)
    warnings = sum(r.n_warnings for r in reports)
    if warnings:
        log(f"data: {warnings} warning(s) (e.g. duplicates); `medgpt data validate {' '.join(specs)}` lists them")
    return (records[:max_samples] if max_samples is not None else records), n_invalid


def tolerate(problems: list, n_invalid: int, n_records: int, max_invalid: float, specs: list[str],
             hint: str = "") -> None:
    """Log the invalid records being skipped (the first 10 as file:line), or refuse when they are more than
    `max_invalid` of `n_records`: a file that is mostly broken is the wrong file, not a few bad lines."""
    if not n_invalid:
        return
    shown = listed(problems, n_invalid)
    share = n_invalid / max(n_records, 1)
    if share > max_invalid:
        raise MedGPTError(
            f"{_plural(n_invalid, 'invalid record')} of {n_records} read ({share:.1%}), more than --data.max_invalid "
            f"{max_invalid:g} ({max_invalid:.0%}) allows:\n{shown}\nFix them (`medgpt data validate "
            f"{' '.join(specs)}` lists them all), or raise --data.max_invalid to {math.ceil(round(share * 100, 6)) / 100:g} "
            f"to train on the valid records only.{f' {hint}' if hint else ''}")
    log(f"data: skipped {_plural(n_invalid, 'invalid record')} of {n_records} read ({share:.1%}; "
        f"--data.max_invalid {max_invalid:g} allows {max_invalid:.0%}):\n{shown}")


def iter_canonical(specs: list[str], kind: str | None = None, *, format: str = "auto",
                   columns: dict[str, str] | None = None, encoding: str = "auto", text_mode: str = "line",
                   max_samples: int | None = None, purpose: str | None = None) -> Iterator[dict]:
    """Records of `kind` (None: each file's own), streamed without upfront validation.

    Raises MedGPTError at the first bad `file:line`. Duplicates are not looked for.
    """
    if format != "auto" and format not in FORMATS:
        raise MedGPTError(f"unknown --data.format '{format}'; use auto or one of {', '.join(FORMATS)}")

    def stream():
        for path in expand_paths(specs):
            fmt, problem, rows = _open(path, format, columns, encoding, text_mode)
            if problem is not None:
                raise MedGPTError(str(problem))
            if kind is not None and fmt != "auto" and not can_convert(kind_of(fmt), kind):
                raise _wrong_kind(path, fmt, kind, purpose)
            for line, record, error, _ in rows:
                try:
                    if error is not None:
                        raise RecordError(error)
                    yield as_kind(record, kind) if kind else record
                except RecordError as e:
                    raise MedGPTError(f"{path}:{line}: {e}\nRun `medgpt data validate {path}` to list every "
                                      "problem in the file.") from None
    return islice(stream(), max_samples)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def format_report(reports: list[FileReport]) -> str:
    """Text for `medgpt data validate`: a header per file, its problems, then a summary line."""
    out = []
    for r in reports:
        out.append(f"{r.path}: {r.format or 'unknown format'}, {_plural(r.count, 'record')}, "
                   f"{_plural(r.n_errors, 'error')}, {_plural(r.n_warnings, 'warning')}")
        out += [f"  {p}" for p in r.problems]
        hidden = r.n_errors + r.n_warnings - len(r.problems)
        if hidden:
            out.append(f"  ... {hidden} more not shown")
    errors, warnings = sum(r.n_errors for r in reports), sum(r.n_warnings for r in reports)
    verdict = "fix the errors above before training" if errors else "OK"
    out.append(f"{_plural(len(reports), 'file')}, {_plural(sum(r.count for r in reports), 'record')}, "
               f"{_plural(errors, 'error')}, {_plural(warnings, 'warning')}: {verdict}")
    return "\n".join(out)


def _in_lang(records: list[dict], invalid: int, data, split: str) -> tuple[list[dict], int]:
    """--data.lang: the records of one language (then --data.max_samples of them); says how many it kept."""
    if data.lang == "all":
        return records, invalid
    from medgpt.data.text import has_cjk

    kept = [r for r in records if has_cjk(json.dumps(r, ensure_ascii=False)) == (data.lang == "zh")]
    log(f"--data.lang {data.lang}: kept {len(kept)} of {len(records)} {split} records")
    if not kept:
        raise MedGPTError(f"--data.lang {data.lang} leaves no {split} records in "
                          f"{', '.join(data.train_files if split == 'train' else data.eval_files)}. Use another "
                          f"--data.lang (all, en, zh) or other files.")
    return kept[:data.max_samples] if data.max_samples else kept, invalid


def load_splits(data, kind: str, *, purpose: str | None = None, seed: int = 42
                ) -> tuple[list[dict], list[dict], int]:
    """Train and eval records for a training command, from `DataArgs`, and how many invalid records were skipped
    (up to --data.max_invalid of each split; see `tolerate`): eval from `eval_files`, or a seeded `eval_split`
    fraction held out of train. Everything is read and checked before any model loads."""
    import random

    if not data.train_files:
        raise MedGPTError(f"no training data given. Add --data.train_files FILES"
                          f"{f' ({purpose} needs {kind} records)' if purpose else ''}.")
    lang = data.lang
    common = dict(format=data.format, columns=data.columns, encoding=data.encoding, text_mode=data.text_mode,
                  max_samples=data.max_samples if lang == "all" else None, purpose=purpose,
                  max_invalid=data.max_invalid)
    train, invalid = _in_lang(*load_tolerant(data.train_files, kind, **common), data, "train")
    if data.eval_files:
        held, more = _in_lang(*load_tolerant(data.eval_files, kind, **common), data, "eval")
        return train, held, invalid + more
    if data.eval_split > 0 and len(train) > 1:
        rng = random.Random(seed)
        order = list(range(len(train)))
        rng.shuffle(order)
        n_eval = max(1, int(len(train) * data.eval_split))
        held = set(order[:n_eval])
        return [r for i, r in enumerate(train) if i not in held], [train[i] for i in sorted(held)], invalid
    return train, [], invalid
