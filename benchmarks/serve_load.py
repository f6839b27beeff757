"""Serve load: `medgpt serve` under concurrent clients, static vs continuous batching, side by side in one run.

    python benchmarks/serve_load.py                        # a ~2M-parameter llama built here: a few min on 2 CPUs
    python benchmarks/serve_load.py --model /work/main/.cache/real/smollm2-135m-instruct --template tokenizer

The server runs in this process (uvicorn in a thread, the real app from medgpt.serve.api.create_app) on one
engine; for each --modes value it is started with --serve.batching MODE and --serve.max_batch_size
--max-batch-size, and --clients async clients (httpx) each send --requests chat completions back to back: greedy,
the repetition guard off, prompts from the demo MCQ questions, and mixed answer lengths: each request's max_tokens
is drawn once from --min-tokens..--max-tokens (uniform, --seed), the same list in every mode. Mixed lengths are
what continuous batching is for: a static batch runs to its longest answer while its short ones wait.

Without --model the model is a random-init llama (hidden 128, 4 layers) with a BPE tokenizer trained here on the
demo corpus (medgpt.scratch.tokenizer.train_bpe): its answers are noise, but noise costs the same compute per token
as sense. With --ignore-eos (the default for that model) the end-of-turn tokens' logits are set to -inf in the
model's output, so every answer runs to its max_tokens and the lengths really differ; a real model stops where it
likes unless you pass --ignore-eos.

Columns: req/s and completion tok/s over the wall clock of the whole load; p50/p99 of per-request latency; errors
(non-200 answers); fwd = model forward passes (prefills and decoding steps), rows/fwd = the mean rows per pass.
The last lines give each number of continuous over static.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEMO = ROOT / "data" / "demo"
WARMUP = 2  # requests per configuration before the clock starts


def build_model(out: Path) -> Path:
    """A random-init ~2M-parameter llama + a BPE tokenizer trained on the demo corpus, saved to `out`."""
    from medgpt.scratch.model import ArchArgs, model_config
    from medgpt.scratch.model import build_model as build
    from medgpt.scratch.tokenizer import train_bpe

    texts = [line for p in sorted(DEMO.glob("pretrain_*.txt")) for line in p.read_text("utf-8").splitlines()]
    texts += [p.read_text("utf-8") for p in sorted((DEMO / "knowledge").glob("*.md"))]
    tok = train_bpe(texts, vocab_size=4096, show_progress=False)
    arch = ArchArgs(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2)
    config = model_config("llama", arch, len(tok), 1024, tok.eos_token_id, tok.pad_token_id)
    model = build(config, seed=0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"built a random llama: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"vocab {len(tok)} -> {out}")
    return out


def questions(n: int) -> list[str]:
    rows = [json.loads(line) for line in (DEMO / "mcq.jsonl").read_text("utf-8").splitlines() if line.strip()]
    return [rows[i % len(rows)]["question"] for i in range(n)]


def start_server(app):
    import uvicorn

    from medgpt.serve.api import bind

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


async def load(url: str, name: str, work: list[tuple[str, int]], clients: int, on_start) -> dict:
    """`clients` workers take (prompt, max_tokens) off one list until it is empty; per-request latency and tokens.
    on_start() is called when the clock starts, after the warm-up."""
    import httpx

    todo = list(reversed(work))
    latencies, tokens, errors = [], 0, 0

    def request(prompt: str, max_tokens: int) -> dict:
        return {"model": name, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0}

    async def worker(http):
        nonlocal tokens, errors
        while todo:
            start = time.perf_counter()
            r = await http.post(url + "/v1/chat/completions", json=request(*todo.pop()))
            if r.status_code != 200:
                errors += 1
                continue
            latencies.append(time.perf_counter() - start)
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=3600, limits=httpx.Limits(max_connections=clients)) as http:
        for _ in range(WARMUP):  # not timed: first calls pay for lazy initialisation
            (await http.post(url + "/v1/chat/completions", json=request(work[0][0], 8))).raise_for_status()
        on_start()
        start = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(clients)))
        wall = time.perf_counter() - start
    latencies = sorted(latencies) or [float("nan")]
    return {"requests": len(latencies), "errors": errors, "wall": wall, "tokens": tokens,
            "p50": statistics.median(latencies), "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def instrument(engine, ignore_eos: bool) -> list[int]:
    """Wrap the model's forward (both modes call it for every prefill and step): the returned list gets each pass's
    rows. With ignore_eos the end-of-turn logits become -inf, so answers run to their max_tokens."""
    import torch

    rows, real = [], engine.model.forward

    def forward(*a, **kw):
        out = real(*a, **kw)
        rows.append(len(kw["input_ids"]))
        if ignore_eos:
            out.logits[..., torch.tensor(engine.stop_ids)] = float("-inf")
        return out

    engine.model.forward = forward
    return rows


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a model dir (default: build a ~2M-parameter random llama here)")
    p.add_argument("--template", default="chatml", help="chat template (default chatml; `tokenizer` for a "
                   "model with its own)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients")
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--min-tokens", type=int, default=8, help="smallest max_tokens drawn for a request")
    p.add_argument("--max-tokens", type=int, default=256, help="largest max_tokens drawn for a request")
    p.add_argument("--seed", type=int, default=0, help="seed of the max_tokens draw")
    p.add_argument("--modes", nargs="+", default=["static", "continuous"], choices=["static", "continuous"],
                   help="--serve.batching values, run in this order")
    p.add_argument("--max-batch-size", type=int, default=16, help="--serve.max_batch_size")
    p.add_argument("--wait-ms", type=float, default=5.0, help="--serve.batch_wait_ms")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=None,
                   help="answers run to their max_tokens (default: on for the random model, off with --model)")
    return p.parse_args()


def report(rows: list[dict]) -> None:
    print(f"\n{'batching':>10} {'requests':>8} {'errors':>6} {'req/s':>7} {'tok/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'fwd':>6} {'rows/fwd':>8}")
    for r in rows:
        print(f"{r['mode']:>10} {r['requests']:>8} {r['errors']:>6} {r['requests'] / r['wall']:>7.2f} "
              f"{r['tokens'] / r['wall']:>8.1f} {1000 * r['p50']:>8.0f} {1000 * r['p99']:>8.0f} {r['fwd']:>6} "
              f"{r['rows']:>8.1f}")
    by = {r["mode"]: r for r in rows}
    if {"static", "continuous"} <= set(by):
        c, s = by["continuous"], by["static"]
        print(f"continuous / static: {(c['requests'] / c['wall']) / (s['requests'] / s['wall']):.2f}x req/s, "
              f"{(c['tokens'] / c['wall']) / (s['tokens'] / s['wall']):.2f}x completion tok/s, "
              f"p50 latency {c['p50'] / s['p50']:.2f}x, p99 latency {c['p99'] / s['p99']:.2f}x")


def main() -> None:
    args = parse_args()
    import random

    import torch

    from medgpt.args import GenArgs, ModelArgs
    from medgpt.infer.engine import Engine
    from medgpt.serve.api import ServeArgs, create_app

    tmp = tempfile.TemporaryDirectory()
    model_dir = args.model or str(build_model(Path(tmp.name) / "model"))
    ignore_eos = args.model is None if args.ignore_eos is None else args.ignore_eos
    engine = Engine.load(ModelArgs(name_or_path=model_dir), args.template)
    gen = GenArgs(temperature=0, repetition_penalty=1.0, repetition_guard=False, max_new_tokens=args.max_tokens)
    n = args.clients * args.requests
    draw = random.Random(args.seed)
    work = list(zip(questions(n), [draw.randint(args.min_tokens, args.max_tokens) for _ in range(n)]))
    rows_per_pass = instrument(engine, ignore_eos)
    print(f"device {engine.model.device}, torch threads {torch.get_num_threads()}, {args.clients} clients x "
          f"{args.requests} requests, max_tokens {args.min_tokens}..{args.max_tokens} (seed {args.seed}, "
          f"{sum(t for _, t in work)} in all), greedy, ignore_eos {ignore_eos}, max_batch_size "
          f"{args.max_batch_size}, batch_wait_ms {args.wait_ms}")
    rows = []
    for mode in args.modes:
        serve = ServeArgs(model_name="bench", batching=mode, max_batch_size=args.max_batch_size,
                          batch_wait_ms=args.wait_ms, log_requests=False, max_tokens=args.max_tokens,
                          max_queue=10_000)
        server, thread, url = start_server(create_app(engine, serve, gen))
        result = asyncio.run(load(url, "bench", work, args.clients, on_start=rows_per_pass.clear))
        server.should_exit = True
        thread.join(10)
        result.update(mode=mode, fwd=len(rows_per_pass), rows=sum(rows_per_pass) / max(1, len(rows_per_pass)))
        rows.append(result)
        print(f"{mode}: {result['requests']} requests in {result['wall']:.1f} s", flush=True)
    report(rows)
    tmp.cleanup()


if __name__ == "__main__":
    main()
