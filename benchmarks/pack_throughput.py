"""Pack throughput: `medgpt pack` end to end vs the raw batch speed of the same tokenizer, side by side in one run.

    python benchmarks/pack_throughput.py               # demo corpus repeated to ~32 MB: about 40 s on 2 CPUs
    python benchmarks/pack_throughput.py --mb 64 --num-proc 1 2 4

The corpus is the demo pretraining text (one document per line) plus the knowledge leaflets (one document per
file), repeated to --mb megabytes of UTF-8 and written as JSONL. The tokenizer is trained on the demo corpus here
(ByteLevel BPE, vocab 6400, medgpt.scratch.tokenizer.train_bpe). Rows:
  raw tok(batch)       `tokenizer(batch)` on the texts already in memory, batches of --batch-docs: no IO
  raw encode_batch_fast the Rust backend call that pack makes, in memory (no attention masks, no offsets)
  pack num_proc=N      the `medgpt pack` command in a fresh process: read + parse JSONL, tokenize, EOS, val hash,
                       write .bin/.idx.npy with sha256, fsync, rename, meta.json
For pack, "loop" counts the packing loop only (pack's own timer), "e2e" the whole command's wall clock
(Python start-up, imports and tokenizer loading included). Tokens exclude the EOS that pack appends, so every
row counts the same tokens. Threads: the raw rows and pack num_proc=1 use the Rust tokenizer's own thread
pool (TOKENIZERS_PARALLELISM as set in your environment); pack workers use one thread each.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEMO = ROOT / "data" / "demo"


def demo_documents() -> list[str]:
    docs = [line for p in sorted(DEMO.glob("pretrain_*.txt"))
            for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    docs += [p.read_text(encoding="utf-8").strip() for p in sorted((DEMO / "knowledge").glob("*.md"))]
    return docs


def write_corpus(path: Path, docs: list[str], mb: float) -> int:
    """The documents repeated until the file holds `mb` megabytes; returns the document count."""
    lines = [json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs]
    size = sum(len(line.encode("utf-8")) for line in lines)
    repeats = max(1, round(mb * 2 ** 20 / size))
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(repeats):
            f.writelines(lines)
    return repeats * len(docs)


def raw(tok, texts: list[str], batch: int, fast: bool) -> tuple[int, float]:
    encode = tok.backend_tokenizer.encode_batch_fast
    tok(texts[:batch])  # warm-up: first call pays for thread-pool start and caches
    n, start = 0, time.perf_counter()
    for i in range(0, len(texts), batch):
        chunk = texts[i:i + batch]
        if fast:
            n += sum(len(e.ids) for e in encode(chunk, add_special_tokens=False))
        else:
            n += sum(map(len, tok(chunk)["input_ids"]))
    return n, time.perf_counter() - start


def pack(corpus: Path, tok_dir: Path, out: Path, num_proc: int, batch: int) -> dict:
    cmd = [sys.executable, "-m", "medgpt.cli", "pack", str(corpus), "--model.name_or_path", str(tok_dir),
           "--output_dir", str(out), "--pack.num_proc", str(num_proc), "--pack.batch_docs", str(batch)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"pack failed:\n{proc.stderr}")
    loop = float(re.search(r" in ([\d.]+)s: ", proc.stdout).group(1))
    meta = json.loads((out / "meta.json").read_text())
    splits = meta["splits"].values()
    tokens = sum(s["tokens"] - s["documents"] for s in splits)  # without the appended EOS
    return {"tokens": tokens, "loop_s": loop, "wall_s": wall, "sha": [s["sha256"] for s in splits]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=32, help="corpus size in megabytes of UTF-8")
    p.add_argument("--vocab", type=int, default=6400)
    p.add_argument("--batch-docs", type=int, default=1000)
    p.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()

    from transformers import AutoTokenizer

    from medgpt.scratch.tokenizer import train_bpe

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        docs = demo_documents()
        tok_dir = tmp / "tokenizer"
        train_bpe(docs, vocab_size=args.vocab, show_progress=False).save_pretrained(tok_dir)
        corpus = tmp / "corpus.jsonl"
        n_docs = write_corpus(corpus, docs, args.mb)
        mb = corpus.stat().st_size / 2 ** 20

        tok = AutoTokenizer.from_pretrained(tok_dir)
        texts = [json.loads(line)["text"] for line in corpus.open(encoding="utf-8")]
        rows = []
        for name, fast in (("raw tok(batch)", False), ("raw encode_batch_fast", True)):
            n, secs = raw(tok, texts, args.batch_docs, fast)
            rows.append((name, "-", n, secs, n / secs))
        del texts
        packs = {}
        for n_proc in args.num_proc:
            r = packs[n_proc] = pack(corpus, tok_dir, tmp / f"packed-{n_proc}", n_proc, args.batch_docs)
            rows.append((f"pack num_proc={n_proc} loop", n_proc, r["tokens"], r["loop_s"], r["tokens"] / r["loop_s"]))
            rows.append((f"pack num_proc={n_proc} e2e", n_proc, r["tokens"], r["wall_s"], r["tokens"] / r["wall_s"]))

    threads = os.environ.get("TOKENIZERS_PARALLELISM", "unset")
    print(f"\npack throughput: {mb:.1f} MB JSONL, {n_docs:,} documents, ByteLevel BPE vocab {len(tok)}, "
          f"batches of {args.batch_docs}, {os.cpu_count()} CPUs, TOKENIZERS_PARALLELISM={threads}\n")
    head = f"{'variant':<28}{'procs':>6}{'tokens':>12}{'seconds':>9}{'tokens/s':>12}{'x raw':>8}"
    print(head)
    print("-" * len(head))
    base = rows[0][4]
    for name, procs, n, secs, rate in rows:
        print(f"{name:<28}{procs:>6}{n:>12,}{secs:>9.2f}{rate:>12,.0f}{rate / base:>8.2f}")
    print()
    assert all(r[2] == rows[0][2] for r in rows), "pack and the raw tokenizer disagree on the token count"
    shas = {tuple(r["sha"]) for r in packs.values()}
    print(f"every variant counted the same {rows[0][2]:,} tokens; pack outputs byte-identical across num_proc: "
          f"{'yes' if len(shas) == 1 else 'NO'}")
    for n_proc, r in packs.items():
        rate = r["tokens"] / r["loop_s"]
        print(f"pack num_proc={n_proc} / raw tok(batch): {rate / base:.2f}x (loop), "
              f"{r['tokens'] / r['wall_s'] / base:.2f}x (end to end)")
    print(json.dumps([dict(zip(("variant", "procs", "tokens", "seconds", "tokens_per_s"), r)) for r in rows]))


if __name__ == "__main__":
    main()
