"""`medgpt data clean`: deduplicate, filter and scrub personal identifiers; check for eval contamination.

    medgpt data clean data/demo --output_dir out/clean
    medgpt data clean notes.jsonl --output_dir out/clean --clean.eval_files data/demo/mcq.jsonl \
        --clean.drop_contaminated --clean.min_chars 20

Every input file comes back under --output_dir with the same relative name, format and fields (a .jsonl
stays .jsonl with its extra fields, a .json list stays a list, .txt keeps one document per line or paragraph
as --data.text_mode says, .csv/.tsv keep their header, .parquet its schema; a saved `datasets` dir or a hub
dataset becomes NAME.jsonl; text is written as UTF-8 whatever the input encoding). `report.json` holds, per
file and in total: records in and out, removals by reason, PII replacements by type and contamination hits.

Recipe, per record in file order (the first step a record fails names its removal reason):
  1. scrub personal identifiers in every string of the raw record (medgpt/data/pii.py); later steps see the
     scrubbed text, so records that differ only in a name or phone number count as duplicates;
  2. too_short / too_long: characters of the record's text (all its natural-language strings);
  3. repetitive, judged per string (each message, option...): share of lines that repeat an earlier line,
     share covered by the most frequent 4-gram, share covered by repeated 10-grams (Gopher's rules, Rae et
     al. 2021, app. A.1.1; units are words or single Chinese characters, so Chinese needs no segmenter);
  4. exact_duplicate: same text after NFKC, case folding and whitespace collapsing, across all files;
  5. near_duplicate: MinHash + LSH over character shingles (medgpt/data/minhash.py);
  6. contaminated: shares a 13-unit n-gram (unit: a word, or one Chinese character) with an item of
     --clean.eval_files, as in GPT-3's 13-gram check (Brown et al. 2020, app. C). Reported always, removed
     only with --clean.drop_contaminated.
The whole input is read before anything is written (deduplication is global); all files are validated first,
so a bad record stops the run with its file:line before any output exists. Every file is written atomically.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from medgpt.args import DataArgs
from medgpt.config import arg, section
from medgpt.data.minhash import contamination, eval_index, normalize, units
from medgpt.data.readers import listed
from medgpt.data.text import record_parts, record_text
from medgpt.utils import MedGPTError, atomic_write

REASONS = ("too_short", "too_long", "repetitive", "exact_duplicate", "near_duplicate", "contaminated")
MAX_LISTED = 200  # removed records / contamination hits listed by file:line in report.json


@dataclass
class CleanArgs:
    min_chars: int = arg(0, "Remove records whose text is shorter than this many characters (0: off). "
                         "Off by default: a short answer is a fine chat record; try 200 for web text.", min=0)
    max_chars: int = arg(100_000, "Remove records whose text is longer than this many characters (0: off).", min=0)
    max_dup_line_frac: float = arg(0.3, "Remove records in which more than this share of the lines repeat an "
                                   "earlier line (Gopher uses 0.3; 1: off).", min=0, max=1)
    max_top_ngram_frac: float = arg(0.3, "Remove records whose most frequent n-gram (seen 3+ times) covers more "
                                    "than this share of a string: stutter like 好的好的好的 (Gopher: 0.16-0.20 "
                                    "for word n-grams; 1: off).", min=0, max=1)
    top_ngram: int = arg(4, "n for the top n-gram rule; units are words or single Chinese characters.", min=1)
    max_dup_ngram_frac: float = arg(0.3, "Remove records in which n-grams that occur more than once cover more "
                                    "than this share of a string: a looping paragraph (Gopher: 0.10; 1: off).",
                                    min=0, max=1)
    dup_ngram: int = arg(10, "n for the duplicate n-gram rule, in the same units.", min=1)
    exact_dedup: bool = arg(True, "Remove exact duplicates (normalised text) across all files.")
    near_dedup: bool = arg(True, "Remove near duplicates (MinHash + LSH), keeping the first of each group.")
    near_min_chars: int = arg(50, "Shorter records are left to exact dedup: with a handful of shingles one "
                              "changed letter is another word (antibiotic, antibiotics).", min=0)
    near_threshold: float = arg(0.8, "Estimated Jaccard similarity of shingle sets at or above which a record "
                                "is a near duplicate of an earlier one.", above=0, max=1)
    shingle: int = arg(5, "Characters per shingle for near-dedup (5 suits Chinese and English alike).", min=1)
    num_perm: int = arg(128, "MinHash permutations (signature length); more is more exact and slower.", min=1)
    seed: int = arg(1, "Seed of the MinHash hash functions.", min=0, max=2**32 - 1)
    scrub_pii: bool = arg(True, "Replace personal identifiers with [NAME], [ADDRESS], [PHONE], [ID], [MRN], "
                          "[DOB], [EMAIL], ... placeholders (medgpt/data/pii.py).")
    pii_types: list[str] = arg(factory=lambda: ["all"], help="Which identifiers to scrub: all, or some of id, phone, "
                               "mrn, email, bank_card, dob, name, address, ssn, account, license, plate, device, "
                               "url, ip.")
    eval_files: list[str] = arg(factory=list, help="Evaluation sets to check the training data against "
                                "(any record format), e.g. data/demo/mcq.jsonl.")
    contamination_ngram: int = arg(13, "Units (a word, or one Chinese character) that an overlap must span. "
                                   "Eval items shorter than this match only as a whole (if 8+ units).", min=1)
    drop_contaminated: bool = arg(False, "Remove training records that overlap an eval item (default: report).")


@dataclass
class Config:
    data: DataArgs = section(DataArgs, "The files to clean (also given as bare arguments).")
    clean: CleanArgs = section(CleanArgs, "Filters, deduplication, PII scrubbing and contamination check.")
    output_dir: str = arg("", "Where the cleaned files, report.json and config.yaml go.")
    overwrite: bool = arg(False, "Write into a non-empty output directory.")


# ----------------------------------------------------------------------------- text of a record

def scrub_obj(obj, types, counts: Counter):
    """Every string inside a raw record (any nesting) scrubbed; keys and non-strings untouched. The record is one
    unit: a name found in one field is replaced in all of them."""
    from medgpt.data.pii import scrub_record

    obj, found = scrub_record(obj, types)
    counts.update(found)
    return obj


# ----------------------------------------------------------------------------- filters

def dup_line_frac(text: str) -> float:
    """Share of the non-blank lines that repeat an earlier line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (len(lines) - len(set(lines))) / len(lines) if lines else 0.0


def _grams(toks: list[str], n: int) -> list[tuple[str, ...]]:
    return list(zip(*(toks[i:] for i in range(n))))


def top_ngram_frac(toks: list[str], n: int) -> float:
    """Characters covered by the most frequent n-gram's occurrences / characters of all units.

    An n-gram seen only twice scores 0: saying a phrase twice is ordinary, and in a short text it would
    otherwise dominate the share."""
    if len(toks) < n:
        return 0.0
    gram, count = Counter(_grams(toks, n)).most_common(1)[0]
    if count < 3:
        return 0.0
    return min(1.0, count * sum(map(len, gram)) / max(1, sum(map(len, toks))))


def dup_ngram_frac(toks: list[str], n: int) -> float:
    """Characters of the units covered by an n-gram that occurs more than once / characters of all units."""
    if len(toks) < n:
        return 0.0
    grams = _grams(toks, n)
    counts = Counter(grams)
    if len(counts) == len(grams):
        return 0.0
    covered = [0] * (len(toks) + 1)  # +1 at a repeated gram's start, -1 past its end: a running sum
    for i, g in enumerate(grams):
        if counts[g] > 1:
            covered[i] += 1
            covered[i + n] -= 1
    depth, chars = 0, 0
    for tok, step in zip(toks, covered):
        depth += step
        if depth > 0:
            chars += len(tok)
    return chars / max(1, sum(map(len, toks)))


def filter_reason(parts: list[str], c: CleanArgs, normalized: list[str] | None = None) -> str | None:
    """too_short, too_long, repetitive, or None when the record passes the filters.

    Length counts the whole record; repetition is judged string by string (each message, each option),
    because parallel fields repeat one another by design: MCQ options sharing a unit (mL/min/1.73 m²),
    a chosen and a rejected answer sharing sentences. `normalized`: the parts already normalize()d."""
    length = sum(map(len, parts)) + max(0, len(parts) - 1)
    if c.min_chars and length < c.min_chars:
        return "too_short"
    if c.max_chars and length > c.max_chars:
        return "too_long"
    for part, norm in zip(parts, normalized or [normalize(p) for p in parts]):
        if c.max_dup_line_frac < 1 and dup_line_frac(part) > c.max_dup_line_frac:
            return "repetitive"
        toks = units(norm, normalized=True)
        if c.max_top_ngram_frac < 1 and top_ngram_frac(toks, c.top_ngram) > c.max_top_ngram_frac:
            return "repetitive"
        if c.max_dup_ngram_frac < 1 and dup_ngram_frac(toks, c.dup_ngram) > c.max_dup_ngram_frac:
            return "repetitive"
    return None


# ----------------------------------------------------------------------------- reading and writing

def _read(specs: list[str], d: DataArgs) -> list[tuple[str, str, list[tuple[int, dict, dict]]]]:
    """[(path, format, [(line, raw record, canonical record)])] of every source, validated first."""
    from medgpt.data.formats import to_canonical
    from medgpt.data.readers import iter_raw
    from medgpt.data.validate import validate_files

    reports = validate_files(specs, format=d.format, columns=d.columns, encoding=d.encoding, text_mode=d.text_mode)
    errors = [p for r in reports for p in r.problems if p.level == "error"]
    if errors:
        total = sum(r.n_errors for r in reports)
        raise MedGPTError(f"the data has {total} error(s):\n{listed(errors, total)}\nFix them (nothing was written), or run "
                          f"`medgpt data validate {' '.join(specs)}` to list them all.")
    out = []
    for r in reports:
        rows = [(raw.line, raw.obj, to_canonical(raw.obj, r.format or "auto", d.columns))
                for raw in iter_raw(r.path, d.encoding, d.text_mode)]
        out.append((r.path, r.format or "auto", rows))
    return out


def output_paths(paths: list[str], out_dir: Path) -> dict[str, Path]:
    """Each source's output path: its path relative to the sources' common folder, under out_dir."""
    from medgpt.data.readers import HUB_PREFIX

    local = [os.path.abspath(p) for p in paths if not p.startswith(HUB_PREFIX)]
    root = os.path.commonpath([os.path.dirname(p) for p in local]) if local else ""
    out = {}
    for p in paths:
        if p.startswith(HUB_PREFIX):
            out[p] = out_dir / (p.removeprefix(HUB_PREFIX).replace("/", "__") + ".jsonl")
            continue
        rel = os.path.relpath(os.path.abspath(p), root)
        out[p] = out_dir / (rel + ".jsonl" if os.path.isdir(p) else rel)
        if Path(out[p]).resolve() == Path(p).resolve():
            raise MedGPTError(f"--output_dir {out_dir} would overwrite the input {p}; choose another --output_dir.")
    return out


def write_records(src: str, dest: Path, objs: list[dict], text_mode: str, fields: list[str]) -> None:
    """Write raw records back in the format of `src` (atomically); `fields` is a csv/tsv file's header."""
    from medgpt.data.readers import HUB_PREFIX

    ext = ".jsonl" if os.path.isdir(src) or src.startswith(HUB_PREFIX) else dest.suffix.lower()
    if ext == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(objs, schema=pq.read_schema(src))
        with atomic_write(dest, "wb") as f:
            pq.write_table(table, f)
        return
    with atomic_write(dest) as f:
        if ext == ".json":
            json.dump(objs, f, ensure_ascii=False, indent=2)
            f.write("\n")
        elif ext == ".txt":
            sep = "\n" if text_mode == "line" else "\n\n"  # paragraphs (and a whole file) keep their blank line
            f.write(sep.join(o["text"] for o in objs) + ("\n" if objs else ""))
        elif ext in (".csv", ".tsv"):
            writer = csv.DictWriter(f, fieldnames=fields, delimiter="\t" if ext == ".tsv" else ",",
                                    lineterminator="\n")
            writer.writeheader()
            writer.writerows(objs)
        else:
            for o in objs:
                f.write(json.dumps(o, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- the command

def _check(cfg: Config) -> tuple[str, ...]:
    from medgpt.data.pii import parse_types

    d, c = cfg.data, cfg.clean
    if not d.train_files:
        raise MedGPTError("no data files given. Pass them as arguments (medgpt data clean FILE... --output_dir DIR) "
                          "or with --data.train_files A,B.")
    if d.eval_files:
        raise MedGPTError("data clean cleans --data.train_files; to check them against evaluation sets, pass those "
                          "with --clean.eval_files instead of --data.eval_files.")
    if not 0 < c.near_threshold <= 1:
        raise MedGPTError(f"--clean.near_threshold must be in (0, 1], got {c.near_threshold}.")
    for key in ("shingle", "num_perm", "top_ngram", "dup_ngram", "contamination_ngram"):
        if getattr(c, key) < 1:
            raise MedGPTError(f"--clean.{key} must be at least 1, got {getattr(c, key)}.")
    try:
        return parse_types(c.pii_types) if c.scrub_pii else ()
    except ValueError as e:
        raise MedGPTError(f"--clean.pii_types: {e}.") from None


@dataclass
class Record:
    """One input record on its way through: where it came from, its (scrubbed) raw fields, its normalised
    text, why it was removed (None: kept) and, for a duplicate, the index of the record it repeats."""
    path: str
    line: int
    obj: dict
    norm: str
    pii: Counter
    reason: str | None = None
    of: int | None = None


def _filter(sources, c: CleanArgs, d: DataArgs, types: tuple[str, ...]) -> list[Record]:
    """Steps 1-4 (scrub, length and repetition filters, exact dedup) over every record, in file order."""
    from medgpt.data.formats import to_canonical

    recs: list[Record] = []
    seen: dict[bytes, int] = {}  # digest of the normalised text -> index of its first record
    budget = d.max_samples if d.max_samples is not None else -1
    for path, fmt, rows in sources:
        for line, obj, canon in rows:
            if len(recs) == budget:
                return recs
            pii = Counter()
            if types:
                obj = scrub_obj(obj, types, pii)
                if pii:  # the text the later steps judge is the scrubbed one
                    canon = to_canonical(obj, fmt, d.columns)
            parts = record_parts(canon)
            norms = [normalize(p) for p in parts]
            rec = Record(path, line, obj, " ".join(n for n in norms if n), pii)  # == normalize("\n".join(parts))
            rec.reason = filter_reason(parts, c, norms)
            if rec.reason is None and c.exact_dedup:
                first = seen.setdefault(hashlib.blake2b(rec.norm.encode("utf-8"), digest_size=16).digest(), len(recs))
                if first != len(recs):
                    rec.reason, rec.of = "exact_duplicate", first
            recs.append(rec)
    return recs


def _near_dedup(recs: list[Record], c: CleanArgs) -> None:
    """Step 5: mark near duplicates among the records still kept (long enough to judge)."""
    from medgpt.data import minhash

    kept = [i for i, r in enumerate(recs) if r.reason is None and len(r.norm) >= c.near_min_chars]
    sigs = minhash.signatures([recs[i].norm for i in kept], c.num_perm, c.shingle, c.seed)
    bands, rows = minhash.optimal_bands(c.num_perm, c.near_threshold)
    for i, j in zip(kept, minhash.near_duplicates(sigs, c.near_threshold, bands, rows)):
        if j >= 0:
            recs[i].reason, recs[i].of = "near_duplicate", kept[j]


def _contaminated(recs: list[Record], eval_items: list[tuple[str, int, str]], c: CleanArgs) -> list[tuple]:
    """Step 6: [(record, eval item index, overlapping n-gram)] for kept records; marks them with --drop."""
    index, short = eval_index(eval_items, c.contamination_ngram)
    hits = []
    for r in recs:
        found = contamination(r.norm, index, short, c.contamination_ngram, True) if r.reason is None else None
        if found:
            hits.append((r, *found))
            if c.drop_contaminated:
                r.reason = "contaminated"
    return hits


def _stats(recs: list[Record]) -> dict:
    st = {"records_in": len(recs), "records_out": 0, "removed": dict.fromkeys(REASONS, 0), "pii": Counter()}
    for r in recs:
        if r.reason is None:
            st["records_out"] += 1
            st["pii"].update(r.pii)  # replacements in what is written out
        else:
            st["removed"][r.reason] += 1
    st["pii"] = dict(sorted(st["pii"].items()))
    return st


def _report(sources, dests, recs, hits, eval_items, c: CleanArgs, seconds: dict) -> dict:
    by_file: dict[str, list[Record]] = {path: [] for path, _, _ in sources}
    for r in recs:
        by_file[r.path].append(r)
    hit_count = Counter(r.path for r, _, _ in hits)
    files = {path: {"output": str(dests[path]), "format": fmt, **_stats(by_file[path]),
                    "contamination_hits": hit_count[path]} for path, fmt, _ in sources}
    removed = [{"file": r.path, "line": r.line, "reason": r.reason}
               | ({"duplicate_of": f"{recs[r.of].path}:{recs[r.of].line}"} if r.of is not None else {})
               for r in recs if r.reason is not None][:MAX_LISTED]
    return {
        "files": files, "total": {**_stats(recs), "contamination_hits": len(hits)}, "removed_records": removed,
        "contamination": {
            "eval_files": list(c.eval_files), "eval_items": len(eval_items), "ngram": c.contamination_ngram,
            "records_hit": len(hits),
            "eval_items_hit": len({e for _, e, _ in hits}), "dropped": c.drop_contaminated,
            "hits": [{"file": r.path, "line": r.line, "eval_file": eval_items[e][0], "eval_line": eval_items[e][1],
                      "overlap": gram, "eval_text": eval_items[e][2][:300]} for r, e, gram in hits[:MAX_LISTED]]},
        "seconds": seconds,
        "records_per_second": round(len(recs) / max(seconds["total"], 1e-9), 1),
    }


def run(cfg: Config) -> int:
    """Deduplicate, filter and scrub data files into --output_dir (same formats), with report.json."""
    from medgpt.config import save_config
    from medgpt.outdir import claim, mark_complete, prepare_output_dir
    from medgpt.utils import write_json

    d, c = cfg.data, cfg.clean
    types = _check(cfg)
    clock = [time.perf_counter()]
    sources = _read(d.train_files, d)
    dests = output_paths([path for path, _, _ in sources], Path(cfg.output_dir))  # refuses to overwrite an input
    out = prepare_output_dir(cfg.output_dir, cfg.overwrite, command="data clean")
    claim(out, "report.json", "config.yaml", *{Path(p).relative_to(out).parts[0] for p in dests.values()})
    eval_items = []
    if c.eval_files:
        plain = DataArgs(encoding=d.encoding, text_mode=d.text_mode)  # eval sets: their own formats, no columns
        eval_items = [(path, line, record_text(canon)) for path, _, rows in _read(c.eval_files, plain)
                      for line, _, canon in rows]
    clock.append(time.perf_counter())

    recs = _filter(sources, c, d, types)
    clock.append(time.perf_counter())
    if c.near_dedup:
        _near_dedup(recs, c)
    clock.append(time.perf_counter())
    hits = _contaminated(recs, eval_items, c) if eval_items else []
    clock.append(time.perf_counter())

    kept: dict[str, list[dict]] = {path: [] for path, _, _ in sources}
    for r in recs:
        if r.reason is None:
            kept[r.path].append(r.obj)
    for path, _, rows in sources:
        fields = list(rows[0][1]) if rows else []  # a csv/tsv header, kept even when every row goes
        write_records(path, dests[path], kept[path], d.text_mode, fields)
    clock.append(time.perf_counter())

    steps = ("read", "filter", "near_dedup", "contamination", "write")
    seconds = {k: round(b - a, 3) for k, a, b in zip(steps, clock, clock[1:])}
    seconds["total"] = round(clock[-1] - clock[0], 3)
    report = _report(sources, dests, recs, hits, eval_items, c, seconds)
    write_json(out / "report.json", report)
    save_config(cfg, out / "config.yaml")
    mark_complete(out)
    print(summary(report))
    return 0


def summary(report: dict) -> str:
    """The table printed at the end: one row per file and a total."""
    heads = ["records", "kept", "short", "long", "repet.", "exact", "near", "contam.", "pii"]
    rows = [(path, st) for path, st in report["files"].items()] + [("total", report["total"])]
    width = max(len(p) for p, _ in rows)
    lines = [" ".join(["file".ljust(width)] + [h.rjust(7) for h in heads])]
    for path, st in rows:
        cells = [st["records_in"], st["records_out"]] + [st["removed"][k] for k in REASONS[:5]]
        cells += [st["contamination_hits"], sum(st["pii"].values())]
        lines.append(" ".join([path.ljust(width)] + [str(v).rjust(7) for v in cells]))
    t = report["total"]
    if t["pii"]:
        lines.append("PII replaced: " + ", ".join(f"{k} {v}" for k, v in t["pii"].items()))
    con = report["contamination"]
    if con["eval_files"]:
        verb = "removed" if con["dropped"] else "kept (--clean.drop_contaminated removes them)"
        lines.append(f"contamination: {con['records_hit']} record(s) share a {con['ngram']}-unit n-gram with "
                     f"{con['eval_items_hit']} eval item(s); {verb}")
    lines.append(f"{t['records_out']} of {t['records_in']} records kept in {report['seconds']['total']:.2f} s "
                 f"({report['records_per_second']:.0f} records/s); details in report.json")
    return "\n".join(lines)
