"""Continued pretraining on raw text: every token trains.

    medgpt pt configs/tiny/pt.yaml --model.name_or_path DIR --output_dir out/pt
    medgpt pt --model.name_or_path Qwen/Qwen2.5-0.5B --data.train_files data/demo/pretrain_en.txt \
        --finetune.type full --train.max_length 1024 --data.eval_split 0.05 --output_dir out/pt

Recipe: validate data -> tokenizer -> documents into blocks -> load model (+LoRA) -> transformers Trainer -> save.

Blocks: documents are joined with the EOS token and cut into blocks of exactly --train.max_length tokens (the
block size); the tail that does not fill a block is dropped. Blocks are full, so there is no padding and
labels = input_ids: every token trains, EOS included (it teaches where a document ends; padding would have
been masked, which is why no pad-masking collator is used here).

Streaming (--data.streaming true): for corpora larger than RAM. Records are read lazily
(`iter_canonical`: a bad record fails when it is reached, not up front), tokenized on the fly, in file order
(shuffle the corpus beforehand). A stream has no length, so --train.max_steps is required. Eval data
(--data.eval_files) is still loaded whole and validated: keep it small.

Eval: perplexity = exp(eval loss) over eval blocks, from --data.eval_files or --data.eval_split; both
`eval_loss` and `perplexity` go into metrics.json.

From scratch and packed corpora (medgpt/scratch/pretrain.py): with --model.init llama|qwen2 (a random-init
model shaped by --arch.*; --model.name_or_path then names only the tokenizer), with packed dirs (`medgpt pack`)
in --data.train_files, or with a --pt.phases curriculum, pt trains in a plain loop over random windows of the
packs instead: warmup-stable-decay LR (`--train.lr_scheduler auto`), tokens/s and MFU, resumable checkpoints.

    medgpt pt configs/tiny/pt_scratch.yaml --model.name_or_path out/tokenizer --output_dir out/pt
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from medgpt.args import DataArgs, FinetuneArgs, ModelArgs, TrainArgs
from medgpt.config import arg, section
from medgpt.scratch.model import ArchArgs
from medgpt.utils import MedGPTError, log


@dataclass
class PTArgs:
    phases: list[dict[str, Any]] = arg(factory=list, help="Curriculum (in the YAML file): a list of {name: str, "
                                       "steps: int, data: {PACKED_DIR: weight, ...}}; each phase draws its batches "
                                       "from its dirs by weight, and the run lasts the sum of their steps.")
    decay_fraction: float = arg(0.2, "warmup_stable_decay: the LR decays (1-sqrt) over this last share of the steps.",
                                min=0, max=1)
    min_lr_ratio: float = arg(0.1, "The LR decays to this fraction of --train.learning_rate.", min=0, max=1)
    eval_windows: int = arg(64, "Evaluate on at most this many consecutive windows of each packed val split.", min=1)
    compile: bool = arg(False, "torch.compile the model (faster on recent GPUs, after a compile warm-up).")


def _train_defaults() -> TrainArgs:
    # `auto` resolves per mode: warmup_stable_decay for packed/from-scratch runs, cosine for text (as before).
    return TrainArgs(lr_scheduler="auto")


@dataclass
class Config:
    model: ModelArgs = section(ModelArgs)
    arch: ArchArgs = section(ArchArgs, "The architecture built by --model.init (from scratch only).")
    data: DataArgs = section(DataArgs, "Text: .txt (see --data.text_mode), JSONL/JSON records with a text field, "
                             "...; or packed dirs (`medgpt pack`).")
    finetune: FinetuneArgs = section(FinetuneArgs)
    train: TrainArgs = dataclasses.field(default_factory=_train_defaults, metadata={"help": (
        "For pt, --train.max_length is the block size (the context); lr_scheduler auto = warmup_stable_decay on "
        "packed data, cosine on text.")})
    pt: PTArgs = section(PTArgs, "The WSD decay (any run) and packed-data / from-scratch options.")
    output_dir: str = arg("", "Where checkpoints, the final model and logs go.")
    overwrite: bool = arg(False, "Write into a non-empty output_dir.")
    resume: bool = arg(False, "Continue from the last complete checkpoint in output_dir.")


def _too_small(texts: list[str], tokenizer, block_size: int, what: str, flag: str) -> MedGPTError:
    # Only called when not one block came out, so the corpus is small and counting it again is cheap.
    per_doc = 1 + (tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False))  # as text_blocks
    n = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + per_doc for t in texts)
    return MedGPTError(f"{what}: the corpus has {n:,} tokens (EOS between documents included), fewer than one block "
                       f"of --train.max_length {block_size} tokens, so there is nothing to train on. Add more text "
                       f"to {flag}, or lower --train.max_length.")


def blocks_dataset(texts: list[str], tokenizer, block_size: int, what: str, flag: str):
    """In-memory texts -> Dataset(input_ids) of full blocks; refuses a corpus smaller than one block."""
    from datasets import Dataset

    from medgpt.data.prepare import text_blocks

    blocks = list(text_blocks(texts, tokenizer, block_size))
    if not blocks:
        raise _too_small(texts, tokenizer, block_size, what, flag)
    log(f"{what}: {len(texts):,} documents -> {len(blocks):,} blocks of {block_size} tokens "
        f"({len(blocks) * block_size:,} tokens)")
    return Dataset.from_dict({"input_ids": blocks})


def streamed_blocks(data: DataArgs, tokenizer, block_size: int):
    """IterableDataset of blocks read lazily from data.train_files. The first block is built here, so a file of
    the wrong kind or a corpus smaller than one block fails now, before the model loads."""
    from datasets import IterableDataset

    from medgpt.data.prepare import text_blocks
    from medgpt.data.validate import iter_canonical

    def texts():
        for record in iter_canonical(data.train_files, "text", format=data.format, columns=data.columns,
                                     encoding=data.encoding, text_mode=data.text_mode,
                                     max_samples=data.max_samples, purpose="pt"):
            yield record["text"]

    if next(text_blocks(texts(), tokenizer, block_size), None) is None:
        raise _too_small(list(texts()), tokenizer, block_size, "train", "--data.train_files")

    def generate():
        for block in text_blocks(texts(), tokenizer, block_size):
            yield {"input_ids": block}

    log(f"train: streaming blocks of {block_size} tokens from {', '.join(data.train_files)}")
    return IterableDataset.from_generator(generate)


def collate(rows: list[dict]) -> dict:
    """Stack full blocks; labels are the inputs themselves (the model shifts them by one)."""
    from transformers import default_data_collator

    batch = default_data_collator(rows)
    batch["labels"] = batch["input_ids"].clone()
    return batch


def packed_run(cfg: Config) -> bool:
    """The packed-data loop runs from scratch, for packed dirs and for a curriculum; text uses the Trainer."""
    from medgpt.scratch.memmap import is_packed_dir

    if not cfg.model.init and cfg.arch != ArchArgs():
        raise MedGPTError("--arch.* options shape a model built from scratch, but --model.init is not set. Add "
                          "--model.init llama|qwen2, or drop the --arch.* options to continue a pretrained model.")
    return bool(cfg.model.init or cfg.pt.phases or any(is_packed_dir(p) for p in cfg.data.train_files))


def scheduler_kwargs(cfg: Config) -> dict:
    """The Trainer's lr schedule for text: auto is cosine (as before packed runs existed); warmup_stable_decay
    gets the same 1-sqrt decay as the packed loop (medgpt.scratch.schedule)."""
    from medgpt.scratch.schedule import decay_steps

    train = cfg.train
    if train.lr_scheduler == "auto":
        return {"lr_scheduler_type": "cosine"}
    if train.lr_scheduler != "warmup_stable_decay":
        return {}
    if train.max_steps <= 0:
        raise MedGPTError("--train.lr_scheduler warmup_stable_decay needs --train.max_steps N on text data: the "
                          "decay is placed at the end of a known number of steps.")
    return {"lr_scheduler_kwargs": {"num_decay_steps": decay_steps(cfg.pt.decay_fraction, train.max_steps),
                                    "decay_type": "1-sqrt", "min_lr_ratio": cfg.pt.min_lr_ratio}}


def run(cfg: Config) -> int:
    """Continued pretraining: documents joined with EOS, cut into blocks of --train.max_length tokens."""
    if packed_run(cfg):
        from medgpt.scratch.pretrain import pretrain

        return pretrain(cfg)
    from medgpt.data.validate import load_records, load_splits
    from medgpt.model.load import load_model, load_tokenizer
    from medgpt.train import run as R

    # Data first: a bad file or a missing flag fails in seconds, before any model loads.
    data = cfg.data
    if data.streaming and data.lang != "all":
        raise MedGPTError("--data.lang picks records from data in memory; it does not work with --data.streaming "
                          "true. Filter the corpus first, or drop one of the two.")
    if data.streaming:
        if cfg.train.max_steps <= 0:
            raise MedGPTError("--data.streaming true needs --train.max_steps N: a stream has no length, so the "
                              "trainer cannot tell how many steps an epoch is. Set --train.max_steps (or drop "
                              "--data.streaming to load the corpus into memory).")
        if data.eval_split > 0:
            raise MedGPTError("--data.eval_split cannot hold records out of a stream. Give held-out text with "
                              "--data.eval_files instead (it is loaded whole, so keep it small).")
        if not data.train_files:
            raise MedGPTError("no training data given. Add --data.train_files FILES (pt needs text records).")
        invalid = 0  # a stream is checked as it is read: its first bad record stops the run
        eval_records = load_records(data.eval_files, "text", format=data.format, columns=data.columns,
                                    encoding=data.encoding, text_mode=data.text_mode, max_samples=data.max_samples,
                                    purpose="pt") if data.eval_files else []
    else:
        train_records, eval_records, invalid = load_splits(data, "text", purpose="pt", seed=cfg.train.seed)
    schedule = scheduler_kwargs(cfg)
    from transformers import Trainer, TrainingArguments

    out = R.start(cfg)
    tokenizer = load_tokenizer(cfg.model)
    block = cfg.train.max_length
    if data.streaming:
        train_ds = streamed_blocks(data, tokenizer, block)
    else:
        train_ds = blocks_dataset([r["text"] for r in train_records], tokenizer, block, "train",
                                  "--data.train_files")
    eval_flag = "--data.eval_files" if data.eval_files else "--data.train_files (held out by --data.eval_split)"
    eval_ds = (blocks_dataset([r["text"] for r in eval_records], tokenizer, block, "eval", eval_flag)
               if eval_records else None)

    model = load_model(cfg.model, cfg.finetune, gradient_checkpointing=cfg.train.gradient_checkpointing,
                       vocab_size=len(tokenizer))
    R.log_parameters(model)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and block > max_positions:
        log(f"warning: block size {block} is longer than the model's max_position_embeddings {max_positions}; "
            f"positions past it were never trained. Lower --train.max_length unless you extend the context on purpose.")

    args = TrainingArguments(**{**R.trainer_kwargs(cfg.train, out, has_eval=eval_ds is not None), **schedule})
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                      data_collator=collate, processing_class=tokenizer, callbacks=[R.checkpoint_callback()])
    result = R.train(trainer, cfg, out)
    metrics = dict(result.metrics)
    if eval_ds is not None:
        metrics.update(trainer.evaluate())
        loss = metrics["eval_loss"]
        metrics["perplexity"] = math.exp(loss) if loss < 700 else float("inf")  # exp overflows a float past ~709
        log(f"eval: loss {loss:.4f}, perplexity {metrics['perplexity']:.2f}")
    metrics["invalid_records"] = invalid  # skipped by load_splits (--data.max_invalid)
    R.save_artifacts(trainer, tokenizer, out, metrics)
    return 0
