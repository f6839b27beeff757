"""SFT side by side with MedicalGPT's own `training/supervised_finetuning.py`, on identical conversations.

    git clone --depth 1 https://github.com/shibing624/MedicalGPT /tmp/MedicalGPT   # once; its script needs loguru
    pip install loguru
    python benchmarks/sft_vs_medicalgpt.py --medicalgpt /tmp/MedicalGPT                     # LoRA, SmolLM2-135M
    python benchmarks/sft_vs_medicalgpt.py --medicalgpt /tmp/MedicalGPT --full --tiny \\
        --records 164 --max-length 512 --batch-size 8                                        # full SFT, 10M Llama

Both sides train one epoch on the same conversations of MedicalGPT's own medical SFT sample
(data/sft/medical_sft_1K_format.jsonl), with the same model, chat template (the tokenizer's own), batch size,
max length, LoRA settings (rank 8, alpha 16, dropout 0.05, every linear layer), learning rate and fp32 weights.
Only conversations that both sides keep whole are used (MedicalGPT cuts each turn's source and target to shares
of max_length; medgpt would truncate), so both train exactly the same tokens: the table shows each side's token
count, read from its own tokenized dataset (medgpt's rows end with the template's newline after <|im_end|>,
MedicalGPT's do not: one untrained token per conversation more on medgpt's side, counted against it).

Each side runs in its own process, one after the other (`--repeats` alternates them), and is measured by the same
meter (medgpt/train/speed.py): tokens per second from the end of the first optimizer step to the end of the last
(start-up, model loading and the first step's warm-up excluded on both sides), and MFU against this machine's
matmul peak, measured here before the runs. HF Trainer's own `train_runtime` (first step included) is shown too.
What each side does with those tokens is its own: MedicalGPT pads each batch to its longest conversation, medgpt
packs conversations (on CPU into one padding-free row per batch, attending per conversation) and scores only the
trained positions (docs/training.md, "Speed").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REAL_MODEL = ROOT / ".cache" / "real" / "smollm2-135m-instruct"
SAMPLE = "data/sft/medical_sft_1K_format.jsonl"
LORA = {"rank": 8, "alpha": 16, "dropout": 0.05}

# Runs a training script with every transformers Trainer measured by medgpt's meter; writes what it measured.
WRAPPER = r'''
import json, runpy, sys, time
sys.path.insert(0, {root!r})
import transformers
from medgpt.train.speed import instrument

out, script, sys.argv = sys.argv[1], sys.argv[2], sys.argv[2:]
found = {{}}
train = transformers.Trainer.train

def measured_train(self, *args, **kwargs):
    rows = self.train_dataset
    found["real_tokens"] = sum(len(r["input_ids"]) for r in rows)
    found["trained_tokens"] = sum(sum(1 for x in r["labels"][1:] if x != -100) for r in rows)
    found["rows"] = len(rows)
    meter = instrument(self, {peak_seconds})
    result = train(self, *args, **kwargs)
    found.update(meter.summary(), train_runtime=result.metrics["train_runtime"], steps=result.global_step,
                 loss=result.training_loss)
    return result

transformers.Trainer.train = measured_train
runpy.run_path(script, run_name="__main__")
json.dump(found, open(out, "w"))
'''


def fitting(records: list[dict], tokenizer, max_length: int, n: int) -> list[dict]:
    """The first `n` single-exchange conversations that both sides keep whole at `max_length`."""
    from medgpt.data.templates import encode, get_template_for

    template = get_template_for("tokenizer", tokenizer)
    kept = []
    for r in records:
        conv = r.get("conversations") or []
        if len(conv) != 2 or [c.get("from") for c in conv] != ["human", "gpt"]:
            continue
        messages = [{"role": "user", "content": conv[0]["value"]}, {"role": "assistant", "content": conv[1]["value"]}]
        whole = encode(messages, template, tokenizer)
        if whole is None or len(whole.input_ids) > max_length:
            continue
        # MedicalGPT: source = prompt text, target = answer + eos; each capped at its share of max_length.
        source = len(tokenizer.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True,
                                                   return_dict=True)["input_ids"])
        target = len(tokenizer.encode(conv[1]["value"], add_special_tokens=False))
        total = source + target
        if source > int(max_length * source / total) or target > int(max_length * target / total) - 1 or \
                total + 1 > max_length:
            continue
        kept.append({"r": r, "messages": messages})
        if len(kept) == n:
            break
    if len(kept) < n:
        raise SystemExit(f"only {len(kept)} conversations of the sample fit whole in {max_length} tokens; "
                         f"lower --records or raise --max-length")
    return kept


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def medgpt_side(model: str, data: Path, out: Path, args) -> list[str]:
    cmd = [sys.executable, "-m", "medgpt.cli", "sft", "--model.name_or_path", model, "--data.train_files", str(data),
           "--template", "tokenizer", "--output_dir", str(out), "--overwrite", "true", "--train.batch_size", str(args.batch_size),
           "--train.max_length", str(args.max_length), "--train.learning_rate", "2e-5",
           "--train.num_epochs", "1", "--train.logging_steps", "1", "--train.save_steps", "100000",
           "--train.tensorboard", "false", "--train.peak_seconds", str(args.peak_seconds), "--sft.packing", "true"]
    if args.full:
        return cmd + ["--finetune.type", "full"]
    return cmd + ["--finetune.type", "lora", "--finetune.lora_rank", str(LORA["rank"]), "--finetune.lora_alpha",
                  str(LORA["alpha"]), "--finetune.lora_dropout", str(LORA["dropout"]),
                  "--finetune.target_modules", "all-linear"]


def medicalgpt_side(repo: Path, model: str, data: Path, val: Path, out: Path, measured: Path, args) -> list[str]:
    wrapper = out.parent / "measure_trainer.py"
    wrapper.write_text(WRAPPER.format(root=str(ROOT), peak_seconds=args.peak_seconds))
    cmd = [sys.executable, str(wrapper), str(measured), str(repo / "training" / "supervised_finetuning.py"),
           "--model_name_or_path", model, "--train_file_dir", str(data), "--validation_file_dir", str(val),
           "--output_dir", str(out), "--do_train", "--do_eval", "False",
           "--per_device_train_batch_size", str(args.batch_size), "--model_max_length", str(args.max_length),
           "--num_train_epochs", "1", "--learning_rate", "2e-5", "--logging_steps", "1", "--save_strategy", "no",
           "--report_to", "none", "--torch_dtype", "float32",
           "--preprocessing_num_workers", "1", "--cache_dir", str(out.parent / "hf-cache"), "--seed", "42"]
    if args.full:
        return cmd + ["--use_peft", "False"]
    return cmd + ["--use_peft", "True", "--target_modules", "all", "--lora_rank", str(LORA["rank"]),
                  "--lora_alpha", str(LORA["alpha"]), "--lora_dropout", str(LORA["dropout"])]


def run(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"this run failed (exit {proc.returncode}); its log is {log}:\n  {' '.join(cmd)}")
    return time.perf_counter() - start


def ours_measured(out: Path, kept: list[dict], tokenizer) -> dict:
    from medgpt.data.templates import encode, get_template_for

    template = get_template_for("tokenizer", tokenizer)
    enc = [encode(k["messages"], template, tokenizer) for k in kept]
    metrics = json.loads((out / "metrics.json").read_text())
    return {**metrics, "real_tokens": sum(len(e.input_ids) for e in enc),
            "trained_tokens": sum(sum(1 for x in e.labels[1:] if x != -100) for e in enc),
            "steps": metrics.get("global_step"), "loss": metrics.get("train_loss")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--medicalgpt", required=True, help="a clone of https://github.com/shibing624/MedicalGPT")
    p.add_argument("--model", default=str(REAL_MODEL), help="model folder (default: the real SmolLM2-135M-Instruct)")
    p.add_argument("--tiny", action="store_true", help="a random ~10M-parameter Llama with a tokenizer trained on "
                   "the demo corpus (benchmarks/train_throughput.py) instead of --model")
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--records", type=int, default=48)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1, help="runs per side, alternating")
    p.add_argument("--peak-seconds", type=float, default=2.0)
    p.add_argument("--keep", help="keep the runs' folders here instead of a temporary folder")
    args = p.parse_args()

    import torch
    from transformers import AutoTokenizer

    from medgpt.train.speed import matmul_peak

    repo = Path(args.medicalgpt)
    if not (repo / "training" / "supervised_finetuning.py").is_file() or not (repo / SAMPLE).is_file():
        raise SystemExit(f"{repo} is not a MedicalGPT clone (no training/supervised_finetuning.py or {SAMPLE}). "
                         "Run: git clone --depth 1 https://github.com/shibing624/MedicalGPT " + str(repo))
    work = Path(args.keep or tempfile.mkdtemp(prefix="sft-vs-medicalgpt-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        from train_throughput import build

        model = str(build(work, 6400))
    else:
        model = args.model
    tokenizer = AutoTokenizer.from_pretrained(model)
    records = [json.loads(line) for line in open(repo / SAMPLE, encoding="utf-8") if line.strip()]
    kept = fitting(records, tokenizer, args.max_length, args.records)
    write_jsonl(work / "ours.jsonl", [{"messages": k["messages"]} for k in kept])
    write_jsonl(work / "theirs" / "train.jsonl", [k["r"] for k in kept])
    write_jsonl(work / "theirs-val" / "val.jsonl", [kept[0]["r"]])  # so MedicalGPT splits nothing off

    peak = matmul_peak(torch.device("cpu"), torch.float32, args.peak_seconds)
    rows = []
    for i in range(args.repeats):
        for side in ("MedicalGPT", "medgpt"):
            out = work / f"{side}-{i}"
            if side == "medgpt":
                wall = run(medgpt_side(model, work / "ours.jsonl", out, args), work / f"{side}-{i}.log")
                found = ours_measured(out, kept, tokenizer)
            else:
                measured = work / f"{side}-{i}.json"
                wall = run(medicalgpt_side(repo, model, work / "theirs", work / "theirs-val", out, measured, args),
                           work / f"{side}-{i}.log")
                found = json.loads(measured.read_text())
            rows.append({"side": side, "run": i, "wall_s": wall, **found})
            print(f"{side} run {i}: {rows[-1].get('tokens_per_second')} tokens/s", flush=True)

    what = "full SFT" if args.full else f"LoRA r{LORA['rank']} (all linear, dropout {LORA['dropout']})"
    print(f"\n{what} on {Path(model).name}, {args.records} conversations of MedicalGPT's {SAMPLE}, "
          f"batch {args.batch_size}, max length {args.max_length}, fp32, {torch.get_num_threads()} threads")
    print(f"matmul peak of this machine: {peak / 1e9:,.1f} GFLOP/s (fp32, 2048x2048)\n")
    head = (f"{'side':<11}{'run':>4}{'tokens':>8}{'trained':>9}{'tok/s':>8}{'trained/s':>11}{'MFU':>7}"
            f"{'train_runtime':>15}{'process s':>11}{'steps':>7}{'loss':>8}")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['side']:<11}{r['run']:>4}{r['real_tokens']:>8}{r['trained_tokens']:>9}"
              f"{r.get('tokens_per_second', 0):>8.1f}{r.get('trained_tokens_per_second', 0):>11.1f}"
              f"{r.get('mfu', 0):>7.1%}{r['train_runtime']:>15.1f}{r['wall_s']:>11.1f}{r['steps']:>7}"
              f"{r['loss']:>8.3f}")
    ours = [r for r in rows if r["side"] == "medgpt"]
    theirs = [r for r in rows if r["side"] == "MedicalGPT"]

    def mean(rs, key):
        return sum(r[key] for r in rs) / len(rs)

    print(f"\nmedgpt / MedicalGPT: {mean(ours, 'trained_tokens_per_second') / mean(theirs, 'trained_tokens_per_second'):.2f}x "
          f"trained tokens/s, {mean(ours, 'tokens_per_second') / mean(theirs, 'tokens_per_second'):.2f}x tokens/s "
          f"(steady state), {mean(theirs, 'train_runtime') / mean(ours, 'train_runtime'):.2f}x train_runtime, "
          f"{mean(theirs, 'wall_s') / mean(ours, 'wall_s'):.2f}x process time")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
