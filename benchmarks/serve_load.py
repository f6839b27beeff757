"""Serve load: `medgpt serve` under concurrent clients, batching off vs on, side by side in one run.

    python benchmarks/serve_load.py                        # a ~2M-parameter llama built here: ~1 min on 2 CPUs
    python benchmarks/serve_load.py --model outputs/demo/merge --template tokenizer --clients 32

The server runs in this process (uvicorn in a thread, the real app from medgpt.serve.api.create_app) on one
engine; for each --batch-sizes value it is started with --serve.max_batch_size N (1 = batching off) and
--clients async clients (httpx) each send --requests chat completions back to back: greedy, a fixed max_tokens,
the repetition guard off, prompts from the demo MCQ questions. Without --model the model is a random-init llama
(hidden 128, 4 layers) with a BPE tokenizer trained here on the demo corpus (medgpt.scratch.tokenizer.train_bpe):
its answers are noise, but noise costs the same compute per token as sense. A random model may still emit an
end-of-turn token early, so completion tokens/s is reported beside requests/s.

Columns: req/s and completion tok/s over the wall clock of the whole load; p50/p99 of per-request latency;
calls = engine.generate calls, rows/call = the mean batch the batcher formed.
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


async def load(url: str, name: str, prompts: list[str], clients: int, max_tokens: int) -> dict:
    """`clients` workers take prompts off one list until it is empty; per-request latency and tokens."""
    import httpx

    todo = list(prompts)
    latencies, tokens, errors = [], 0, 0

    def request(prompt: str) -> dict:
        return {"model": name, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0}

    async def worker(http):
        nonlocal tokens, errors
        while todo:
            start = time.perf_counter()
            r = await http.post(url + "/v1/chat/completions", json=request(todo.pop()))
            if r.status_code != 200:
                errors += 1
                continue
            latencies.append(time.perf_counter() - start)
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        for _ in range(WARMUP):  # not timed: first calls pay for lazy initialisation
            (await http.post(url + "/v1/chat/completions", json=request(prompts[0]))).raise_for_status()
        start = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(clients)))
        wall = time.perf_counter() - start
    latencies.sort()
    return {"requests": len(latencies), "errors": errors, "wall": wall, "tokens": tokens,
            "p50": statistics.median(latencies), "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a model dir (default: build a ~2M-parameter random llama here)")
    p.add_argument("--template", default="chatml", help="chat template (default chatml; `tokenizer` for a "
                   "model with its own)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients")
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16], help="--serve.max_batch_size values "
                   "(1 = no batching, the baseline)")
    p.add_argument("--wait-ms", type=float, default=5.0, help="--serve.batch_wait_ms")
    args = p.parse_args()

    import torch

    from medgpt.args import GenArgs, ModelArgs
    from medgpt.infer.engine import Engine
    from medgpt.serve.api import ServeArgs, create_app

    tmp = tempfile.TemporaryDirectory()
    model_dir = args.model or str(build_model(Path(tmp.name) / "model"))
    engine = Engine.load(ModelArgs(name_or_path=model_dir), args.template)
    gen = GenArgs(temperature=0, repetition_penalty=1.0, repetition_guard=False, max_new_tokens=args.max_tokens)
    prompts = questions(args.clients * args.requests)
    real_generate, calls = engine.generate, []

    def counted(batch, *a, **kw):
        calls.append(len(batch))
        return real_generate(batch, *a, **kw)

    engine.generate = counted
    print(f"device {engine.model.device}, torch threads {torch.get_num_threads()}, {args.clients} clients x "
          f"{args.requests} requests, max_tokens {args.max_tokens}, greedy, batch_wait_ms {args.wait_ms}")
    rows = []
    for size in args.batch_sizes:
        serve = ServeArgs(model_name="bench", max_batch_size=size, batch_wait_ms=args.wait_ms, log_requests=False,
                          max_tokens=args.max_tokens, max_queue=10_000)
        server, thread, url = start_server(create_app(engine, serve, gen))
        calls.clear()
        result = asyncio.run(load(url, "bench", prompts, args.clients, args.max_tokens))
        server.should_exit = True
        thread.join(10)
        timed = calls[WARMUP:]  # the warm-up requests ran one at a time
        result.update(size=size, calls=len(timed), rows=sum(timed) / max(1, len(timed)))
        rows.append(result)

    print(f"\n{'max_batch_size':>14} {'requests':>8} {'errors':>6} {'req/s':>7} {'tok/s':>8} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'calls':>6} {'rows/call':>9}")
    for r in rows:
        print(f"{r['size']:>14} {r['requests']:>8} {r['errors']:>6} {r['requests'] / r['wall']:>7.2f} "
              f"{r['tokens'] / r['wall']:>8.1f} {1000 * r['p50']:>8.0f} {1000 * r['p99']:>8.0f} {r['calls']:>6} "
              f"{r['rows']:>9.1f}")
    base = rows[0]
    for r in rows[1:]:
        speedup = (r["requests"] / r["wall"]) / (base["requests"] / base["wall"])
        print(f"max_batch_size {r['size']} vs {base['size']}: {speedup:.2f}x requests/s, "
              f"{(r['tokens'] / r['wall']) / (base['tokens'] / base['wall']):.2f}x completion tokens/s, "
              f"p50 latency {r['p50'] / base['p50']:.2f}x")
    tmp.cleanup()


if __name__ == "__main__":
    main()
