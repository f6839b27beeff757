"""PII scrubbing recall and precision per identifier type on a labelled set of clinical notes.

    python benchmarks/pii_recall.py                     # benchmarks/pii_notes.jsonl, under a second
    python benchmarks/pii_recall.py --show-misses       # also print what leaked and what was over-scrubbed

Each line of the set is one record: `text` or `messages` (a chat, scrubbed as one record so that a name found in
one message goes in all), `identifiers` (the exact strings that must go, with their type, and `in` when only the
occurrences inside a longer string count: "张" in "张先生") and `facts` (medical facts that must survive verbatim).
Notes in the `none-*` group hold no identifier at all: lab panels, doses, visit dates, guideline numbers.
  recall     an identifier counts as found when every occurrence of it is covered by replaced text
  precision  replaced spans that overlap a real identifier / all replaced spans (by the placeholder's type)
  facts      medical facts still present, verbatim, in the scrubbed record
The replaced spans are recovered by aligning the scrubbed string to the original: the text between
placeholders is kept verbatim, so what sits between two kept pieces is what a placeholder replaced.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medgpt.data.pii import TYPES, scrub_record  # noqa: E402  (after the sys.path line: runs from a checkout)

NOTES = ROOT / "benchmarks" / "pii_notes.jsonl"
_PLACEHOLDER = re.compile(r"\[(" + "|".join(TYPES) + r")\]")


def replaced_spans(original: str, scrubbed: str) -> list[tuple[int, int, str]]:
    """(start, end, type) in `original` of every span that a placeholder in `scrubbed` replaced."""
    pieces = _PLACEHOLDER.split(scrubbed)  # kept text, type, kept text, type, ...
    if len(pieces) == 1:
        return []
    pattern = "".join(re.escape(p) if i % 2 == 0 else "(.+?)" for i, p in enumerate(pieces))
    m = re.fullmatch(pattern, original, re.DOTALL)
    if m is None:
        raise AssertionError(f"scrubbed text does not align with its original:\n{original}\n{scrubbed}")
    return [(m.start(g), m.end(g), pieces[2 * g - 1]) for g in range(1, m.lastindex + 1)]


def occurrences(text: str, ident: dict) -> list[tuple[int, int]]:
    """Where an identifier occurs: all occurrences, or only those inside its `in` string."""
    where = [(m.start(), m.end()) for m in re.finditer(re.escape(ident.get("in", ident["text"])), text)]
    if "in" in ident:
        offset = ident["in"].index(ident["text"])
        where = [(s + offset, s + offset + len(ident["text"])) for s, _ in where]
    return where


def covered(span: tuple[int, int], text: str, spans: list) -> bool:
    """Every letter and digit of the span lies in replaced text (spaces and punctuation at its edges may stay)."""
    hit = [False] * (span[1] - span[0])
    for s, e, _ in spans:
        for i in range(max(s, span[0]), min(e, span[1])):
            hit[i - span[0]] = True
    return all(h for h, ch in zip(hit, text[span[0]:span[1]]) if ch.isalnum())


def strings(record: dict) -> list[str]:
    return [record["text"]] if "text" in record else [m["content"] for m in record["messages"]]


def evaluate(notes: list[dict]) -> dict:
    """Per type: identifiers found and total, spans scrubbed and those that were real; facts kept and total."""
    found, total, spans_all, spans_true = Counter(), Counter(), Counter(), Counter()
    facts_kept = facts_total = 0
    misses, false = [], []
    for note in notes:
        body = {k: note[k] for k in ("text", "messages") if k in note}
        out, _ = scrub_record(body)
        originals, scrubbed = strings(note), strings(out)
        per_string = [replaced_spans(o, s) for o, s in zip(originals, scrubbed)]
        for ident in note["identifiers"]:
            total[ident["type"]] += 1
            where = [(i, occ) for i, o in enumerate(originals) for occ in occurrences(o, ident)]
            if all(covered(occ, originals[i], per_string[i]) for i, occ in where):
                found[ident["type"]] += 1
            else:
                misses.append((note["id"], ident["type"], ident["text"]))
        for i, (o, spans) in enumerate(zip(originals, per_string)):
            real = [occ for ident in note["identifiers"] for occ in occurrences(o, ident)]
            for s, e, kind in spans:
                spans_all[kind] += 1
                if any(s < re_ and rs < e for rs, re_ in real):
                    spans_true[kind] += 1
                else:
                    false.append((note["id"], kind, o[s:e]))
        joined = "\n".join(scrubbed)
        facts_total += len(note["facts"])
        facts_kept += sum(f in joined for f in note["facts"])
    return {"found": found, "total": total, "spans": spans_all, "true": spans_true, "facts_kept": facts_kept,
            "facts_total": facts_total, "misses": misses, "false_positives": false, "notes": len(notes)}


def table(r: dict) -> str:
    def pct(a, b):
        return f"{100 * a / b:.1f}%" if b else "-"
    lines = ["| type | found / total | recall | scrubbed spans | precision |", "|---|---|---|---|---|"]
    for t in TYPES:
        if r["total"][t] or r["spans"][t]:
            lines.append(f"| {t} | {r['found'][t]} / {r['total'][t]} | {pct(r['found'][t], r['total'][t])} "
                         f"| {r['spans'][t]} | {pct(r['true'][t], r['spans'][t])} |")
    f, n, s, ts = (sum(r[k].values()) for k in ("found", "total", "spans", "true"))
    lines.append(f"| **all** | {f} / {n} | {pct(f, n)} | {s} | {pct(ts, s)} |")
    lines.append(f"\n{r['notes']} notes; medical facts kept verbatim: {r['facts_kept']} / {r['facts_total']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--notes", type=Path, default=NOTES)
    ap.add_argument("--show-misses", action="store_true")
    args = ap.parse_args()
    notes = [json.loads(line) for line in args.notes.read_text(encoding="utf-8").splitlines() if line.strip()]
    r = evaluate(notes)
    print(table(r))
    if args.show_misses:
        for note, kind, text in r["misses"]:
            print(f"missed  {note:24} {kind:9} {text!r}")
        for note, kind, text in r["false_positives"]:
            print(f"extra   {note:24} {kind:9} {text!r}")


if __name__ == "__main__":
    main()
