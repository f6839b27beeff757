"""The one command line: `medgpt <command> [config.yaml] [--section.key value ...]`.

A command is one line in COMMANDS: its module is imported only when it runs, so `medgpt chat` never pays
for trl, and `medgpt --help` imports nothing heavy. A module exposes a config dataclass and a run function.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

from medgpt import __version__


@dataclass(frozen=True)
class Command:
    module: str
    config: str          # name of the config dataclass in `module`
    run: str             # name of the function that takes the config
    help: str
    positional: str | None = None  # the list field that bare arguments fill
    # flag aliases (alias, key): `--from X` -> `--from_step X`, for option names that cannot be fields
    # (`from` is a Python keyword)
    aliases: tuple[tuple[str, str], ...] = ()


COMMANDS: dict[str, Command] = {
    "data validate": Command("medgpt.data.commands", "ValidateConfig", "validate",
                             "Check data files: format, record count, every problem as file:line.",
                             positional="data.train_files"),
    "data convert": Command("medgpt.data.commands", "ConvertConfig", "convert",
                            "Write data files as canonical JSONL records (validated first).",
                            positional="data.train_files"),
    "data stats": Command("medgpt.data.commands", "StatsConfig", "stats",
                          "Token-length percentiles with a tokenizer, and a histogram PNG.",
                          positional="data.train_files"),
    "pt": Command("medgpt.stages.pt", "Config", "run",
                  "Continued pretraining on text (documents joined with EOS, cut into blocks)."),
    "sft": Command("medgpt.stages.sft", "Config", "run",
                   "Supervised fine-tuning on conversations (assistant-only labels; full, LoRA or QLoRA)."),
    "rm": Command("medgpt.stages.rm", "Config", "run", "Pairwise reward model (Bradley-Terry) on preference pairs."),
    "dpo": Command("medgpt.stages.dpo", "Config", "run", "Direct preference optimization (TRL DPOTrainer)."),
    "orpo": Command("medgpt.stages.orpo", "Config", "run", "ORPO: odds-ratio preference optimization, no reference model."),
    "simpo": Command("medgpt.stages.simpo", "Config", "run", "SimPO: length-normalized, reference-free preference loss."),
    "kto": Command("medgpt.stages.kto", "Config", "run", "KTO on desirable/undesirable answers (pairs are split)."),
    "grpo": Command("medgpt.stages.grpo", "Config", "run", "GRPO: online RL with group-relative advantages."),
    "rloo": Command("medgpt.stages.rloo", "Config", "run", "RLOO: online RL with leave-one-out baselines."),
    "ppo": Command("medgpt.stages.ppo", "Config", "run", "PPO with a value model, GAE and a KL penalty (RLHF)."),
    "merge": Command("medgpt.model.merge", "Config", "run", "Merge a LoRA adapter into its base: a plain HF model dir."),
    "model import": Command("medgpt.model.gguf_import", "Config", "run",
                            "A GGUF file (Ollama, LM Studio, llama.cpp) -> a plain HF model dir for every command."),
    "model export": Command("medgpt.model.gguf_export", "Config", "run",
                            "A (merged) HF model dir -> one GGUF file (f16 or q8_0) and an Ollama Modelfile."),
    "tokenizer train": Command("medgpt.scratch.tokenizer", "TrainConfig", "train",
                               "Train a byte-level BPE tokenizer on text files.",
                               positional="data.train_files"),
    "tokenizer extend": Command("medgpt.scratch.extend", "Config", "run",
                                "Add domain words to a tokenizer (and grow a model's embeddings to match).",
                                positional="data.train_files"),
    "pack": Command("medgpt.scratch.pack", "Config", "run",
                    "Tokenize text corpora into flat uint16/uint32 .bin files for from-scratch pretraining.",
                    positional="data.train_files"),
    "chat": Command("medgpt.infer.chat", "Config", "run", "Interactive chat in the terminal, streaming (/clear, /system, /exit)."),
    "generate": Command("medgpt.infer.generate", "Config", "run",
                        "Batch generation: a record file in, JSONL out (resumable; torchrun shards it)."),
    "serve": Command("medgpt.serve.api", "Config", "run",
                     "OpenAI-compatible API server (FastAPI; --serve.engine vllm for production)."),
    "webui": Command("medgpt.serve.webui", "Config", "run", "Gradio chat web UI."),
    "sample": Command("medgpt.eval.sample", "SampleConfig", "run_sample",
                      "Greedy answers to a few questions (ROUGE-L against the file's reference answers).",
                      positional="questions"),
    "eval": Command("medgpt.eval.command", "Config", "run",
                    "Evaluate: medical MCQ accuracy, perplexity, QA ROUGE-L, win-rate, safety."),
    "data clean": Command("medgpt.data.clean", "Config", "run",
                          "Deduplicate, filter and scrub personal identifiers; contamination check.",
                          positional="data.train_files"),
    "rag index": Command("medgpt.rag.commands", "IndexConfig", "index",
                         "Index local documents (txt, md, jsonl, pdf, docx) for knowledge-base QA.",
                         positional="rag.docs"),
    "rag search": Command("medgpt.rag.commands", "SearchConfig", "search",
                          "Print the passages that best match a query, with source file and line.",
                          positional="query"),
    "rag ask": Command("medgpt.rag.commands", "AskConfig", "ask",
                       "Answer a question from the knowledge base with numbered citations.",
                       positional="question"),
    "pipeline": Command("medgpt.pipeline", "Config", "run",
                        "Run a recipe of commands, skipping completed steps.", positional="recipe",
                        aliases=(("from", "from_step"),)),
}


def _groups() -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name in COMMANDS:
        head, _, sub = name.partition(" ")
        groups.setdefault(head, []).append(sub)
    return groups


def usage() -> str:
    width = max(len(n) for n in COMMANDS) + 2
    lines = [f"medgpt {__version__}: train, serve and evaluate medical language models.", "",
             "usage: medgpt <command> [config.yaml] [--section.key VALUE ...]", "", "commands:"]
    lines += [f"  {name:<{width}} {cmd.help}" for name, cmd in COMMANDS.items()]
    lines += ["", "Run `medgpt <command> --help` to list a command's options with their docs."]
    return "\n".join(lines)


def fail(message: str, code: int = 1) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def resolve(argv: list[str]) -> tuple[str, Command, list[str]] | None:
    if not argv:
        return None
    groups = _groups()
    head = argv[0]
    if head in COMMANDS:
        return head, COMMANDS[head], argv[1:]
    if head in groups and len(argv) > 1 and f"{head} {argv[1]}" in COMMANDS:
        name = f"{head} {argv[1]}"
        return name, COMMANDS[name], argv[2:]
    return None


def apply_aliases(argv: list[str], aliases: tuple[tuple[str, str], ...]) -> list[str]:
    """`--alias V` / `--alias=V` -> `--key V` / `--key=V` for a command's flag aliases."""
    names = dict(aliases)
    out = []
    for tok in argv:
        flag, eq, val = tok.partition("=")
        if flag.startswith("--") and flag[2:] in names:
            tok = f"--{names[flag[2:]]}{eq}{val}"
        out.append(tok)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(__version__)
        return 0

    found = resolve(argv)
    if found is None:
        import difflib

        groups = _groups()
        head = argv[0]
        if head in groups:
            subs = ", ".join(groups[head])
            return fail(f"'medgpt {head}' needs a subcommand: {subs}. Example: medgpt {head} {groups[head][0]} --help")
        near = difflib.get_close_matches(head, list(groups), n=1)
        hint = f" Did you mean '{near[0]}'?" if near else ""
        return fail(f"unknown command '{head}'.{hint} Run `medgpt --help` to list the commands.")
    name, cmd, rest = found
    rest = apply_aliases(rest, cmd.aliases)

    from medgpt.config import format_help, parse_argv
    from medgpt.utils import MedGPTError, keep_freed_memory

    keep_freed_memory()

    try:
        module = importlib.import_module(cmd.module)
        config_cls = getattr(module, cmd.config)
        if any(a in ("-h", "--help") for a in rest):
            print(format_help(config_cls, name, getattr(module, cmd.run).__doc__ or module.__doc__ or ""))
            return 0
        cfg = parse_argv(config_cls, rest, positional=cmd.positional)
        try:
            result = getattr(module, cmd.run)(cfg)
        except BaseException:
            from medgpt.outdir import abandon

            abandon()
            raise
    except MedGPTError as e:
        return fail(str(e))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
