"""<output_dir>/report.md and summary.json of a pipeline run: the step table, the verdict against the recipe's
goals (what improved, what did not, answers before and after), the before/after evaluation table, and per step its
command, key metrics, loss plot and sample answers. `medgpt.pipeline` runs the steps and calls `write_report`
after each; everything here only reads what the steps wrote.
"""

from __future__ import annotations

import difflib
import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from medgpt.utils import MedGPTError, atomic_write, is_main_process, write_json

if TYPE_CHECKING:  # the runner imports this module; a step is only read here
    from medgpt.pipeline import Step

REPORT, SUMMARY = "report.md", "summary.json"
KEY_METRICS = ("loss", "perplexity", "accura", "margin", "reward", "score", "kl", "rouge_l", "global_step")

def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_report(root: Path, steps: list[Step], goals: Optional[dict] = None) -> None:
    """<output_dir>/report.md: a table of the steps, the verdict (goals, what improved and what did not, answers
    before and after), then per step its command, key metrics, loss plot and sample answers; summary.json beside
    it. Written atomically, after every step."""
    if not is_main_process():
        return
    counts = {s: sum(st.status == s for st in steps) for s in ("ran", "skipped", "failed")}
    lines = [f"# Pipeline report: {root}", "",
             f"Updated {time.strftime('%Y-%m-%d %H:%M:%S')}: " + ", ".join(f"{n} {s}" for s, n in counts.items())
             + f" of {len(steps)} steps; {sum(s.wall or 0 for s in steps if s.status in ('ran', 'skipped')):.1f} s "
             f"of step time in all.", "", "| # | step | command | status | time | key metrics |",
             "|---|---|---|---|---|---|"]
    details: list[str] = []
    for s in steps:
        metrics = {}
        if s.status in ("ran", "skipped"):
            try:
                metrics = json.loads((s.out / "metrics.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                pass
        key = {k: v for k, v in metrics.items() if any(m in k for m in KEY_METRICS)}
        wall = f"{s.wall:.1f} s" if isinstance(s.wall, (int, float)) else ""
        brief = ", ".join(f"{k} {_fmt(v)}" for k, v in list(key.items())[:4])
        lines.append(f"| {s.index + 1} | {s.name} | {s.command} | {s.status} | {wall} | {brief} |")
        details += ["", f"## {s.index + 1}. {s.name}: {s.status}" + (f" ({wall})" if wall else ""), "",
                    "```", s.line(), "```"]
        if key:
            details += ["", "| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in key.items()]
        if s.status in ("ran", "skipped") and (s.out / "loss.png").is_file():
            rel = Path(_relpath(s.out / "loss.png", root)).as_posix()
            details += ["", f"![{s.name} loss]({rel})"]
        if s.command == "sample" and s.status in ("ran", "skipped"):
            for row in _read_jsonl(s.out / "samples.jsonl"):
                answer = row.get("answer", "").replace("\n", "\n> ")
                details += ["", f"**Q:** {row.get('question', '')}", "", f"> {answer or '(empty)'}"]
                if "reference" in row:
                    ref = " ".join(row["reference"].split())  # one line: a list in the reference stays in the quote
                    ref = ref if len(ref) <= 300 else ref[:300] + " ..."
                    details += ["", f"Reference (ROUGE-L {row['rouge_l']:.2f}): {ref}"]
    summary = summary_json(steps, goals)
    verdict = verdict_lines(summary) + answers_before_after(steps, root)
    with atomic_write(root / REPORT) as f:
        f.write("\n".join(lines + verdict + evaluation_table(steps) + details) + "\n")
    write_json(root / SUMMARY, summary)


# The before/after figures of a recipe with eval steps, under fixed names other checks read: the first eval step
# is "before", the last "after".
SUMMARY_KEYS = {"heldout_ppl": "answer_ppl/overall", "unsafe_rate": "safety/unsafe_rate",
                "over_refusal": "safety/over_refusal_rate", "mcq_accuracy": "mcq/overall/accuracy",
                "rouge_l": "rouge_l/overall"}


def summary_json(steps: list[Step], goals: Optional[dict] = None) -> dict:
    """<output_dir>/summary.json: what was fine-tuned, each step's status and seconds, the first and the last eval
    step's headline numbers as NAME_before / NAME_after, the knowledge-base figures of the last eval, and each
    recipe goal checked (goals, goals_met: None until both evals have run)."""
    def metrics(s: Step) -> dict:
        try:
            return json.loads((s.out / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    trained = next((s for s in steps if s.command not in ("eval", "sample", "merge") and s.parsed is not None
                    and getattr(getattr(s.parsed, "model", None), "name_or_path", None)), None)
    out: dict[str, Any] = {"model": trained.parsed.model.name_or_path if trained else None,
                           "seconds": round(sum(s.wall or 0 for s in steps if s.status in ("ran", "skipped")), 1),
                           "steps": {s.name: {"command": s.command,
                                              "status": "complete" if s.status in ("ran", "skipped") else s.status,
                                              "seconds": round(s.wall, 1) if s.wall is not None else None}
                                     for s in steps}}
    evals = [metrics(s) for s in steps if s.command == "eval" and s.status in ("ran", "skipped")]
    out["evals"] = len(evals)
    if evals:
        for name, key in SUMMARY_KEYS.items():
            out[f"{name}_before"], out[f"{name}_after"] = evals[0].get(key), evals[-1].get(key)
        for key in ("hit_rate", "hit_at_1", "cited_right_rate"):
            out[f"rag_{key}"] = evals[-1].get(f"rag/{key}")
    if goals:
        out["goals"] = check_goals(goals, out if len(evals) > 1 else {})
        met = [g["met"] for g in out["goals"]]
        out["goals_met"] = None if None in met else all(met)
    return out


LOWER_IS_BETTER = {"heldout_ppl", "unsafe_rate", "over_refusal"}
GOAL = re.compile(r"(?P<sign>[+-])(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>%|pt)|(?P<op><=|>=)\s*(?P<bound>\d+(?:\.\d+)?)")


def parse_goals(goals: dict) -> dict[str, re.Match]:
    """Each recipe goal's SPEC parsed; an unknown figure or a SPEC that does not parse fails before anything runs."""
    parsed = {}
    for name, spec in goals.items():
        if name not in SUMMARY_KEYS:
            near = difflib.get_close_matches(str(name), list(SUMMARY_KEYS), n=1)
            raise MedGPTError(f"recipe goal '{name}': not a summary figure; goals can name {', '.join(SUMMARY_KEYS)}."
                              + (f" Did you mean '{near[0]}'?" if near else ""))
        m = GOAL.fullmatch(str(spec).strip())
        if m is None:
            raise MedGPTError(f"recipe goal '{name}: {spec}': write a change from the first eval to the last, "
                              f"'-10%' (relative) or '-25pt' (points of a rate), or a bound on the last, '<= 0.1'.")
        parsed[name] = m
    return parsed


def check_goals(goals: dict, summary: dict) -> list[dict]:
    """Each goal with its figures before and after and whether it is met (None while a figure is missing)."""
    rows = []
    for name, m in parse_goals(goals).items():
        before, after = summary.get(f"{name}_before"), summary.get(f"{name}_after")
        if m["op"]:
            bound = float(m["bound"])
            met = None if after is None else (after <= bound if m["op"] == "<=" else after >= bound)
        elif before is None or after is None:
            met = None
        else:
            delta = float(m["num"]) / 100 * (before if m["unit"] == "%" else 1)  # 10% of before, or 25 points
            met = after <= before - delta if m["sign"] == "-" else after >= before + delta
        rows.append({"goal": name, "want": str(goals[name]).strip(), "before": before, "after": after, "met": met})
    return rows


def _change(name: str, before: float, after: float) -> str:
    """A change as a reader weighs it: relative for perplexity, points for rates and scores."""
    if name == "heldout_ppl":
        return f"{after / before - 1:+.1%}" if before else f"{after - before:+.3g}"
    return f"{100 * (after - before):+.1f} pt"


def _figure(name: str, v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.2f}" if name == "heldout_ppl" else f"{100 * v:.1f}%" if name != "rouge_l" else f"{v:.3f}"


def verdict_lines(summary: dict) -> list[str]:
    """## Verdict: the recipe's goals met or not, then every before/after figure sorted into improved, worse and
    unchanged, in plain words. Empty until two eval steps have run."""
    pairs = [(n, summary.get(f"{n}_before"), summary.get(f"{n}_after")) for n in SUMMARY_KEYS]
    pairs = [(n, b, a) for n, b, a in pairs if b is not None and a is not None]
    if not pairs or summary.get("evals", 0) < 2:
        return []
    out = ["", "## Verdict", ""]
    if summary.get("goals"):
        met = summary.get("goals_met")
        out += [f"Goals: {'all met' if met else 'not all met' if met is False else 'not yet measured'}.", "",
                "| goal | wanted | before | after | change | met |", "|---|---|---:|---:|---:|---|"]
        for g in summary["goals"]:
            change = _change(g["goal"], g["before"], g["after"]) if None not in (g["before"], g["after"]) else ""
            out.append(f"| {g['goal']} | {g['want']} | {_figure(g['goal'], g['before'])} | "
                       f"{_figure(g['goal'], g['after'])} | {change} | "
                       f"{'yes' if g['met'] else 'no' if g['met'] is False else 'n/a'} |")
        out.append("")
    better, worse, same = [], [], []
    for name, before, after in pairs:
        text = f"{name} {_figure(name, before)} -> {_figure(name, after)} ({_change(name, before, after)})"
        if abs(after - before) < 1e-9:
            same.append(text)
        elif (after < before) == (name in LOWER_IS_BETTER):
            better.append(text)
        else:
            worse.append(text)
    for label, items in (("Improved", better), ("Worse", worse), ("Unchanged", same)):
        out.append(f"- **{label}:** {'; '.join(items) if items else 'nothing'}.")
    if summary.get("rag_hit_rate") is not None:
        out.append(f"- **Knowledge base (last eval):** retrieval hit rate {_figure('rate', summary['rag_hit_rate'])}"
                   f", best passage from the right leaflet {_figure('rate', summary.get('rag_hit_at_1'))}, answers "
                   f"citing the right leaflet {_figure('rate', summary.get('rag_cited_right_rate'))}.")
    return out


def _quote(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return "> " + ((text if len(text) <= limit else text[:limit] + " ...") or "(empty)")


def answers_before_after(steps: list[Step], root: Path, n: int = 3) -> list[str]:
    """The first `n` held-out questions of the first and the last eval, answered before and after (the same
    questions every run: the first of the file, not picked), and the first knowledge-base questions answered with
    the passages (and without, when the eval wrote that too)."""
    evals = [s for s in steps if s.command == "eval" and s.status in ("ran", "skipped")]
    if len(evals) < 2:
        return []
    first, last = evals[0], evals[-1]
    out: list[str] = []
    for path in sorted((first.out / "predictions").glob("qa-*.jsonl")):
        before, after = _read_jsonl(path), _read_jsonl(last.out / "predictions" / path.name)
        rows = [(b, a) for b, a in zip(before, after) if b.get("prompt") == a.get("prompt")][:n]
        if rows:
            out += ["", f"## Held-out answers, {first.name} vs {last.name} ({path.stem[3:]})"]
        for b, a in rows:
            out += ["", f"**Q:** {b['prompt']}", "", f"Before (ROUGE-L {b.get('rouge_l', 0):.2f}):", "",
                    _quote(b.get("answer", "")), "", f"After (ROUGE-L {a.get('rouge_l', 0):.2f}):", "",
                    _quote(a.get("answer", "")), "", "Reference:", "", _quote(b.get("reference", ""), 300)]
    for path in sorted((last.out / "predictions").glob("rag-*.jsonl")):
        rows = _read_jsonl(path)[:2]
        if rows:
            out += ["", f"## Knowledge-base answers, {last.name} ({path.stem[4:]})"]
        for r in rows:
            cited = ", ".join(r.get("cited") or []) or "none"
            out += ["", f"**Q:** {r.get('question', '')} (answer in {r.get('source', '?')}; retrieved: "
                    f"{', '.join(r.get('retrieved') or [])}; cited: {cited})", "", "With the knowledge base:", "",
                    _quote(r.get("answer", ""))]
            if "answer_without_rag" in r:
                out += ["", "Without:", "", _quote(r["answer_without_rag"])]
    return out


def evaluation_table(steps: list[Step]) -> list[str]:
    """Every finished `eval` step side by side (before/after a stage: same files, other model), with the change
    from the first to the last; empty without eval steps."""
    evals = [s for s in steps if s.command == "eval" and s.status in ("ran", "skipped")]
    if not evals:
        return []
    from medgpt.eval.command import summary

    columns = []
    for s in evals:
        try:
            columns.append(summary(json.loads((s.out / "metrics.json").read_text(encoding="utf-8"))))
        except (OSError, ValueError):
            columns.append({})
    keys = list(dict.fromkeys(k for c in columns for k in c))
    delta = len(evals) > 1
    head = ["metric", *(s.name for s in evals)] + ([f"change ({evals[0].name} -> {evals[-1].name})"] if delta else [])
    out = ["", "## Evaluation", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        row = [k] + [_fmt(c[k]) if k in c else "" for c in columns]
        if delta:
            first, last = columns[0].get(k), columns[-1].get(k)
            row.append(f"{last - first:+.4g}" if first is not None and last is not None else "")
        out.append("| " + " | ".join(row) + " |")
    return out


def _relpath(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(path.resolve(), start.resolve())


def _read_jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError):
        return []
