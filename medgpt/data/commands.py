"""`medgpt data validate|convert|stats`: look at data before any model loads.

    medgpt data validate data/demo
    medgpt data convert data/demo/sft_alpaca.json --output out/sft.jsonl
    medgpt data stats data/demo/sft_sharegpt.jsonl --model.name_or_path out/tokenizer --output out/lengths.png
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from medgpt.args import DataArgs, ModelArgs
from medgpt.config import arg, section
from medgpt.utils import MedGPTError, atomic_write, log


def _files(d: DataArgs) -> list[str]:
    files = d.train_files + d.eval_files
    if not files:
        raise MedGPTError("no data files given. Pass them as arguments (medgpt data validate FILE...) "
                          "or with --data.train_files A,B.")
    return files


# ----------------------------------------------------------------------------- validate

@dataclass
class ValidateConfig:
    data: DataArgs = section(DataArgs, "The files to check (also given as bare arguments).")


def validate(cfg: ValidateConfig) -> int:
    """Check data files: detected format, record count, and every problem as file:line.

    Exits 0 when there are no errors (warnings such as duplicates are allowed), 1 otherwise.
    """
    from medgpt.data.validate import format_report, validate_files

    d = cfg.data
    reports = validate_files(_files(d), format=d.format, columns=d.columns, encoding=d.encoding,
                             text_mode=d.text_mode)
    print(format_report(reports))
    return 1 if any(r.n_errors for r in reports) else 0


# ----------------------------------------------------------------------------- convert

@dataclass
class ConvertConfig:
    data: DataArgs = section(DataArgs, "The files to convert (also given as bare arguments).")
    output: str = arg("", "The JSONL file to write (canonical records, one per line).")
    kind: Optional[str] = arg(None, "Convert records to this kind: text, chat, preference, prompt or mcq "
                              "(default: keep each file's own kind).")
    overwrite: bool = arg(False, "Replace an existing output file.")


def convert(cfg: ConvertConfig) -> int:
    """Validate, then write canonical JSONL (to a temp file first, renamed when complete)."""
    from pathlib import Path

    from medgpt.data.readers import expand_paths
    from medgpt.data.validate import load_records

    if not cfg.output:
        raise MedGPTError("no output file given. Add --output FILE.jsonl.")
    out = Path(cfg.output)
    if out.exists() and not cfg.overwrite:
        raise MedGPTError(f"{out} already exists. Pass --overwrite to replace it, or choose another --output.")
    d = cfg.data
    # The output is never an input: `convert DIR --output DIR/all.jsonl` would otherwise read its own earlier
    # output on a rerun and write every record twice. (Its hidden `.tmp` files are never data files.)
    files = expand_paths(_files(d))
    inputs = [f for f in files if Path(f).resolve() != out.resolve()]
    if len(inputs) < len(files):
        log(f"not reading {out} (the output) as an input")
    if not inputs:
        raise MedGPTError(f"the only input given is the output file {out} itself. Pass the source files, or "
                          "choose another --output.")
    records = load_records(inputs, cfg.kind, format=d.format, columns=d.columns, encoding=d.encoding,
                           text_mode=d.text_mode, max_samples=d.max_samples)
    with atomic_write(out) as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    log(f"wrote {len(records)} records to {out}")
    return 0


# ----------------------------------------------------------------------------- stats

@dataclass
class StatsConfig:
    data: DataArgs = section(DataArgs, "The files to measure (also given as bare arguments).")
    model: ModelArgs = section(ModelArgs, "model.name_or_path gives the tokenizer to count with.")
    template: str = arg("tokenizer", "Chat template used to render conversations (a name, or tokenizer).")
    output: str = arg("token_lengths.png", "Where to write the histogram of token lengths.")


def _lengths(records: list[dict], tokenizer, template) -> tuple[list[int], list[int]]:
    """Total tokens and trained (assistant) tokens per record."""
    from medgpt.data.templates import encode

    total, trained = [], []
    for rec in records:
        if "messages" in rec or "chosen" in rec:
            msgs = rec["messages"] if "messages" in rec else rec["prompt"] + rec["chosen"]
            enc = encode(msgs, template, tokenizer)
            if enc is None:
                continue
            total.append(len(enc.input_ids))
            trained.append(sum(1 for x in enc.labels if x != -100))
        else:
            from medgpt.data.text import record_text

            n = len(tokenizer(record_text(rec), add_special_tokens=False).input_ids)
            total.append(n)
            trained.append(n)
    return total, trained


def percentile(sorted_values: list[int], q: float) -> int:
    if not sorted_values:
        return 0
    i = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[i]


def stats(cfg: StatsConfig) -> int:
    """Token-length percentiles per file, computed with a real tokenizer, and a histogram PNG."""
    from medgpt.data.templates import get_template_for
    from medgpt.data.validate import load_records
    from medgpt.model.load import load_tokenizer

    d = cfg.data
    if not cfg.model.name_or_path:
        raise MedGPTError("data stats counts tokens with a tokenizer: add --model.name_or_path DIR_OR_HUB_ID.")
    tokenizer = load_tokenizer(cfg.model)
    template = get_template_for(cfg.template, tokenizer)
    rows = []
    series = {}
    for path in _files(d):
        records = load_records([path], None, format=d.format, columns=d.columns, encoding=d.encoding,
                               text_mode=d.text_mode, max_samples=d.max_samples)
        total, trained = _lengths(records, tokenizer, template)
        s = sorted(total)
        share = sum(trained) / max(sum(total), 1)
        rows.append((path, len(records), percentile(s, 50), percentile(s, 90), percentile(s, 95),
                     percentile(s, 99), s[-1] if s else 0, sum(total), share))
        series[path] = total
    header = ("file", "records", "p50", "p90", "p95", "p99", "max", "tokens", "trained")
    widths = [max(len(header[0]), *(len(str(r[0])) for r in rows))] + [8] * 7 + [8]
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    for r in rows:
        cells = [str(r[0]).ljust(widths[0])] + [str(v).rjust(8) for v in r[1:8]] + [f"{r[8]:.0%}".rjust(8)]
        print("  ".join(cells))
    _histogram(series, cfg.output)
    log(f"histogram written to {cfg.output}")
    return 0


def _histogram(series: dict[str, list[int]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from pathlib import Path

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, values in series.items():
        if values:
            ax.hist(values, bins=40, alpha=0.55, label=f"{Path(name).name} (n={len(values)})")
    ax.set_xlabel("tokens per record")
    ax.set_ylabel("records")
    ax.set_title("Token lengths")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
