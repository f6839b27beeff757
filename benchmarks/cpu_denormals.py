"""CPU training speed with denormal floats flushed to zero (what every medgpt training run does, medgpt/train/run.py)
vs computed in full, side by side in one run.

    python benchmarks/cpu_denormals.py                 # ~1.3M-parameter Llama (the demo's shape), ~2 min on 2 CPUs
    python benchmarks/cpu_denormals.py --steps 1200 --hidden 192

Numbers below float32's smallest normal (1.2e-38) are handled in slow microcode on x86 CPUs. They are rare in
a fresh model; as training shrinks some weights, gradients and Adam moments, they appear, and each step slows.
Both variants train the same model from the same seed on the same data: the demo pretraining text as bytes
(vocab 256, random 128-byte windows, batch 8), AdamW at 4e-3 with clipping, as `medgpt pt` does. Reported per
variant: tokens/s over the first and the last quarter of the steps, and the final loss (flushing values below
1.2e-38 to zero must not change what is learned).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run(flush: bool, args) -> dict:
    """One variant, in a fresh process: the flag is per thread and threads inherit it when created, so it must
    be set before torch starts its worker threads (medgpt sets it before any model work, in run.start)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_flush_denormal(flush)
    text = b"".join((ROOT / "data/demo" / f).read_bytes() for f in ("pretrain_zh.txt", "pretrain_en.txt"))
    data = torch.tensor(list(text), dtype=torch.long)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=args.hidden, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=args.hidden * 3, max_position_embeddings=args.block,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(0)
    quarter = args.steps // 4
    marks, loss = {}, float("nan")
    t0 = time.perf_counter()
    for step in range(args.steps):
        if step in (0, quarter, args.steps - quarter):
            marks[step] = time.perf_counter()
        starts = torch.randint(0, len(data) - args.block - 1, (args.batch,), generator=g)
        x = torch.stack([data[s:s + args.block] for s in starts])
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.item()
    end = time.perf_counter()
    tokens = quarter * args.batch * args.block
    return {"first": tokens / (marks[quarter] - marks[0]), "last": tokens / (end - marks[args.steps - quarter]),
            "loss": loss, "wall": end - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    print(f"{args.steps} steps of {args.batch}x{args.block} tokens, hidden {args.hidden}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    rows = {}
    with mp.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        for name, flush in (("computed in full", False), ("flushed to zero", True)):
            rows[name] = pool.apply(run, (flush, args))
    print(f"{'denormals':<18}{'tok/s first 1/4':>16}{'tok/s last 1/4':>16}{'final loss':>12}{'wall s':>9}")
    for name, r in rows.items():
        print(f"{name:<18}{r['first']:>16,.0f}{r['last']:>16,.0f}{r['loss']:>12.4f}{r['wall']:>9.1f}")
    a, b = rows["computed in full"], rows["flushed to zero"]
    print(f"flushed / full: {b['last'] / a['last']:.2f}x tokens/s over the last quarter, "
          f"{a['wall'] / b['wall']:.2f}x less wall time in all")


if __name__ == "__main__":
    main()
