"""Batch generation: a record file in, one JSONL line per record out, in input order.

    medgpt generate configs/tiny/generate.yaml --model.name_or_path DIR \
        --generate.input_file questions.jsonl --generate.output_file out/answers.jsonl
    torchrun --nproc_per_node 4 -m medgpt.cli generate ...      # process r takes records r, r+4, r+8, ...

Input: a .txt file (one question per non-empty line) or any record file a prompt can be read from (chat,
Alpaca, ShareGPT, OpenAI, preference, mcq; jsonl/json/csv/parquet); a reference answer is kept when there is one.
Prompts are sorted by length so each left-padded batch wastes little on padding; every line carries its input
`index`, and the output file is in input order.

Resumable: each process appends its finished lines to `<output>.rank<r>.partial.jsonl` after every batch
(flushed to disk), so a killed run loses at most the batch in flight. A re-run reads those files and any earlier
output, keeps every complete line (a line cut short by the kill is dropped) and generates only what is missing.
When every process is done, rank 0 writes the output in input order in one atomic step and removes the partials.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Optional

from medgpt.args import GenArgs, ModelArgs
from medgpt.config import arg, section
from medgpt.utils import MedGPTError, atomic_write, is_main_process, log


@dataclass
class GenerateArgs:
    input_file: str = arg("", "Prompts: a .txt file (one question per line) or any chat, prompt, preference or "
                          "mcq record file (jsonl, json, csv, parquet).")
    output_file: str = arg("", "JSONL written in input order: index, prompt, answer (the input's reference, when "
                           "it has one), output, finish_reason, prompt_tokens, completion_tokens.")
    batch_size: int = arg(8, "Prompts generated together in one left-padded batch (per process).", min=1)
    system: Optional[str] = arg(None, "A system message put before every prompt that has none.")
    max_samples: Optional[int] = arg(None, "Use only the first N input records.", min=1)


@dataclass
class Config:
    model: ModelArgs = section(ModelArgs, "The model to generate with (a merged model, or a base + adapter).")
    template: str = arg("tokenizer", "Chat template name, or `tokenizer` to use the model's own.")
    gen: GenArgs = section(GenArgs, "Decoding (temperature 0: greedy, reproducible).")
    only_cpu: bool = arg(False, "Run on the CPU even when a GPU is present.")
    generate: GenerateArgs = section(GenerateArgs, "Input, output and batching.")


def read_prompts(args: GenerateArgs) -> list[dict]:
    """`{"prompt": [messages], "answer"?}` for every input record, in file order."""
    from medgpt.data.validate import load_records

    path = args.input_file
    if not path:
        raise MedGPTError("no input given. Add --generate.input_file FILE (a .txt file with one question per line, "
                          "or a jsonl/json/csv/parquet record file).")
    if not path.startswith("hf://") and not any(c in path for c in "*?[") and not os.path.exists(path):
        raise MedGPTError(f"--generate.input_file {path} does not exist (looked in {os.getcwd()}). Check the path.")
    if path.lower().endswith(".txt"):
        texts = load_records([path], "text", max_samples=args.max_samples)
        records = [{"prompt": [{"role": "user", "content": r["text"].strip()}]} for r in texts]
    else:
        records = load_records([path], "prompt", max_samples=args.max_samples, purpose="medgpt generate")
    if args.system:
        system = {"role": "system", "content": args.system}
        records = [{**r, "prompt": r["prompt"] if r["prompt"][0]["role"] == "system" else [system, *r["prompt"]]}
                   for r in records]
    return records


def partial_path(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.name}.rank{rank}.partial.jsonl")


def read_done(paths: list[Path], records: list[dict]) -> dict[int, dict]:
    """index -> output line, from every complete line of `paths` (first one wins); damaged lines are skipped."""
    done: dict[int, dict] = {}
    for path in paths:
        if not path.is_file():
            continue
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                try:
                    row = json.loads(line)
                except ValueError:  # a line cut short by a kill (or a stray fragment): generated again
                    continue
                i = row.get("index") if isinstance(row, dict) else None
                if not isinstance(i, int) or not 0 <= i < len(records) or "output" not in row:
                    continue
                if row.get("prompt") != records[i]["prompt"]:
                    raise MedGPTError(f"{path}:{n}: this line answers a different prompt than input record {i}: "
                                      f"the input changed since that run. Delete {path} (and its .partial.jsonl "
                                      f"files) or choose another --generate.output_file.")
                done.setdefault(i, row)
    return done


def _partials(out: Path) -> list[Path]:
    # Every rank's file, including ranks of an earlier run with more processes.
    return sorted(Path(p) for p in glob.glob(glob.escape(str(out)) + ".rank*.partial.jsonl"))


def _distributed() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; joins a gloo group used only for the final barrier."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch
        import torch.distributed as dist

        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            # Ranks finish their shards at different times: the barrier must outwait the slowest one.
            dist.init_process_group("gloo", timeout=timedelta(days=7))
    return rank, world


def _line(i: int, record: dict, result) -> str:
    row = {"index": i, "prompt": record["prompt"]}
    if "answer" in record:
        row["answer"] = record["answer"]
    row.update(output=result.text, finish_reason=result.finish_reason, prompt_tokens=result.prompt_tokens,
               completion_tokens=result.completion_tokens)
    return json.dumps(row, ensure_ascii=False) + "\n"


def _ends_mid_line(path: Path) -> bool:
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def generate_shard(cfg: Config, records: list[dict], todo: list[int], partial: Path) -> None:
    """Generate `todo` (input indices) in length-sorted batches, appending each batch's lines to `partial`."""
    from tqdm import tqdm

    from medgpt.infer.engine import Engine

    engine = Engine.load(cfg.model, cfg.template, cfg.only_cpu)
    ids = {i: engine.prompt_ids(records[i]["prompt"]) for i in todo}
    for i in todo:  # fail before hours of work, not in the middle of them
        if len(ids[i]) >= engine.max_context:
            raise MedGPTError(f"input record {i} of {cfg.generate.input_file} is {len(ids[i])} tokens: no room "
                              f"to answer in the model's context of {engine.max_context}. Shorten or drop it.")
    # Longest first: similar lengths share a batch, and a batch too big for memory fails at once.
    order = sorted(todo, key=lambda i: (-len(ids[i]), i))
    size = max(1, cfg.generate.batch_size)
    with open(partial, "ab") as f, tqdm(total=len(order), unit="prompt", desc="generate",
                                        disable=not is_main_process()) as bar:
        if _ends_mid_line(partial):
            f.write(b"\n")  # end a line cut short by a kill, so it stays one skipped line
        for start in range(0, len(order), size):
            batch = order[start:start + size]
            room = engine.max_context - max(len(ids[i]) for i in batch)
            budget = min(cfg.gen.max_new_tokens, room)
            results = engine.generate([ids[i] for i in batch], cfg.gen, budgets=[budget] * len(batch))
            f.write("".join(_line(i, records[i], r) for i, r in zip(batch, results)).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))


def merge(out: Path, records: list[dict]) -> None:
    """Write `out` in input order from the earlier output and every partial file, then remove the partials."""
    parts = _partials(out)
    done = read_done([out, *parts], records)
    missing = [i for i in range(len(records)) if i not in done]
    if missing:
        raise MedGPTError(f"{len(missing)} of {len(records)} prompts have no output yet (first: index {missing[0]}); "
                          f"their lines are kept in {out}.rank*.partial.jsonl. Run the same command again to "
                          f"generate the rest.")
    with atomic_write(out) as f:
        for i in range(len(records)):
            f.write(json.dumps(done[i], ensure_ascii=False) + "\n")
    for p in parts:
        p.unlink()


def run(cfg: Config) -> int:
    """Generate an answer for every input record -> --generate.output_file (JSONL, input order)."""
    records = read_prompts(cfg.generate)
    if not cfg.generate.output_file:
        raise MedGPTError("no output file given. Add --generate.output_file FILE.jsonl.")
    out = Path(cfg.generate.output_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    rank, world = _distributed()
    done = read_done([out, *_partials(out)], records)
    todo = [i for i in range(rank, len(records), world) if i not in done]
    log(f"generate: {len(records)} prompts, {len(done)} already done, {len(records) - len(done)} to go"
        f"{f' over {world} processes' if world > 1 else ''}")
    if todo:
        generate_shard(cfg, records, todo, partial_path(out, rank))
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    if rank == 0:
        merge(out, records)
        log(f"wrote {len(records)} lines to {out}")
    if world > 1:
        dist.destroy_process_group()
    return 0
