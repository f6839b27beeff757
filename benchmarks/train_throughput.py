"""SFT throughput: padded batches vs packed rows (what `--sft.packing` does) vs TRL's flattened padding-free
batches, side by side in one run.

    python benchmarks/train_throughput.py                # ~10M-parameter Llama, demo SFT data, CPU
    python benchmarks/train_throughput.py --records 128 --max-length 512

Every variant trains one epoch over the same conversations with the same model, tokenizer and template:
  padded     batches of whole conversations, right-padded (the default)
  packed     conversations packed best-fit into rows of max_length, positions restarting per conversation
  flattened  TRL's padding-free packing: each batch is ONE sequence; without flash-attention the attention
             then spans the whole flattened batch, which is why medgpt packs rows instead
Reported per variant (each in its own process, so peak memory is its own):
  - real tok/s: non-padding tokens processed per second (padding is compute spent on nothing)
  - trained tok/s: assistant tokens (labels != -100) per second
  - padding share of the tokens the model saw, optimizer steps, wall time, peak memory (RSS on CPU,
    max allocated on CUDA).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = [str(ROOT / "data/demo/sft_sharegpt.jsonl"), str(ROOT / "data/demo/sft_alpaca.json")]


def build(workdir: Path, vocab: int) -> Path:
    """Tokenizer trained on the demo corpus + a random ~10M-parameter Llama, saved like a real checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from medgpt.data.templates import apply_template
    from medgpt.scratch.tokenizer import train_bpe

    texts = [line for p in sorted((ROOT / "data/demo").glob("pretrain_*.txt"))
             for line in p.read_text(encoding="utf-8").splitlines()]
    tok = train_bpe(texts, vocab_size=vocab, show_progress=False)
    apply_template(tok, "chatml")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    out = workdir / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def variant(model_dir: str, mode: str, args, queue) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from medgpt.data.prepare import PackedCollator, chat_dataset, pack
    from medgpt.data.validate import load_records
    from medgpt.train.run import precision

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    records = load_records(DATA, "chat", max_samples=args.records)
    ds = chat_dataset(records, "chatml", tok, args.max_length)
    if mode == "packed":  # exactly what `medgpt sft --sft.packing true` does
        ds = pack(ds, args.max_length)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    counts = {"real": 0, "trained": 0, "seen": 0}

    workdir = tempfile.mkdtemp()
    cfg = SFTConfig(output_dir=workdir, num_train_epochs=1, per_device_train_batch_size=args.batch_size,
                    learning_rate=1e-4, max_length=args.max_length, report_to=[],
                    packing=mode == "flattened", packing_strategy="bfd", padding_free=mode == "flattened",
                    save_strategy="no", logging_steps=10 ** 9,
                    disable_tqdm=True, dataloader_pin_memory=False, seed=0, **precision("auto"))
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                         data_collator=PackedCollator(tok.pad_token_id) if mode == "packed" else None)
    collate = trainer.data_collator

    def counting_collator(examples):
        batch = collate(examples)
        labels = batch["labels"]
        counts["real"] += sum(len(e["input_ids"]) for e in examples)  # rows as stored: no padding yet
        counts["trained"] += int((labels != -100).sum())
        counts["seen"] += labels.numel()
        return batch

    trainer.data_collator = counting_collator
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    queue.put({"variant": mode, "wall_s": wall, "steps": result.global_step, "loss": result.training_loss,
               "real_tok_s": counts["real"] / wall, "trained_tok_s": counts["trained"] / wall,
               "padding_share": 1 - counts["real"] / max(counts["seen"], 1), "peak_mib": peak / 2 ** 20,
               "tokens": counts["real"], "trained_tokens": counts["trained"]})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=192, help="conversations to train on (one epoch)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--vocab", type=int, default=6400)
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--variants", nargs="+", default=["padded", "packed", "flattened"],
                   choices=["padded", "packed", "flattened"])
    args = p.parse_args()

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build(Path(tmp), args.vocab)
        from transformers import AutoModelForCausalLM

        n_params = sum(x.numel() for x in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
        ctx = mp.get_context("spawn")
        rows = []
        for mode in args.variants:
            q = ctx.Queue()
            proc = ctx.Process(target=variant, args=(str(model_dir), mode, args, q))
            proc.start()
            proc.join()
            if proc.exitcode != 0:
                raise SystemExit(f"the {mode} run failed (exit {proc.exitcode})")
            rows.append(q.get())

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({args.threads} threads)"
    print(f"\nSFT throughput: {n_params / 1e6:.1f}M-parameter Llama, {args.records} demo conversations, "
          f"batch {args.batch_size}, max_length {args.max_length}, {device}\n")
    head = f"{'variant':<10}{'steps':>7}{'wall s':>9}{'real tok/s':>12}{'trained tok/s':>15}{'padding':>9}{'peak MiB':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['variant']:<10}{r['steps']:>7}{r['wall_s']:>9.1f}{r['real_tok_s']:>12.0f}{r['trained_tok_s']:>15.0f}"
              f"{r['padding_share']:>9.1%}{r['peak_mib']:>10.0f}")
    base = next((r for r in rows if r["variant"] == "padded"), rows[0])
    print()
    for r in rows:
        if r is not base:
            print(f"{r['variant']} / {base['variant']}: {r['real_tok_s'] / base['real_tok_s']:.2f}x real tokens/s, "
                  f"{r['trained_tok_s'] / base['trained_tok_s']:.2f}x trained tokens/s, "
                  f"{r['peak_mib'] / base['peak_mib']:.2f}x peak memory")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
