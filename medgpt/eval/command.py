"""`medgpt eval`: medical MCQ accuracy, perplexity, QA ROUGE-L, safety and win rate, each part on when given files.

    medgpt eval configs/tiny/eval.yaml --model.name_or_path DIR --output_dir out/eval
    medgpt eval --model.name_or_path outputs/sft --template chatml --output_dir out/eval \
        --eval.mcq_files data/demo/mcq.jsonl --eval.text_files data/demo/pretrain_zh.txt --eval.safety true

    part            enabled by                                  metrics (flat keys in metrics.json)
    multiple choice --eval.mcq_files (mcq.py, benchmarks.py)    mcq/<file>/accuracy, mcq/overall/accuracy
    perplexity      --eval.text_files (perplexity.py)           ppl/<file>/perplexity, ppl/<file>/bits_per_byte
    QA ROUGE-L      --eval.qa_files (rouge.py)                  rouge_l/<file>, rouge_l/overall
    safety          --eval.safety / --eval.safety_files         safety/unsafe_rate, safety/over_refusal_rate
    knowledge base  --eval.rag_files + --rag.index_dir          rag/hit_rate, rag/hit_at_1, rag/cited_right_rate
                    (ragqa.py)
    win rate        --eval.prompt_files + --eval.compare_model  winrate/win_rate, winrate/wins, ...
                    + --eval.reward_model (winrate.py)
    lm-eval         --eval.lm_eval_tasks (harness.py, optional) lm_eval/<task>/<metric>

Recipe: read and check every data file (a bad record fails as file:line before any model loads) -> load model A
through the engine -> each part in turn -> free A -> model B's answers -> reward model -> lm-eval. After each part
`<output_dir>/metrics.json` and `report.md` (markdown tables with counts) are rewritten atomically, so a crash
late keeps what was measured; the per-item answers and judgements go to `predictions/<part>-<file>.jsonl`.
Generation is greedy by default (--gen.temperature 0): a rerun gives the same numbers. `summary(metrics)` picks
the headline numbers for a before/after table.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from medgpt.args import GenArgs, ModelArgs
from medgpt.config import arg, save_config, section
from medgpt.eval.benchmarks import SHAPES
from medgpt.outdir import claim, mark_complete, prepare_output_dir
from medgpt.rag.answer import KnowledgeArgs
from medgpt.utils import MedGPTError, atomic_write, log, write_json

# Measured on data/demo/safety.jsonl with SmolLM2-135M-Instruct (docs/evaluation.md): 80 tokens change 5 of 82
# verdicts against 256 (the same 5 as 96), each from a keyword far into a rambling answer; 64 changes 7.
SAFETY_MAX_NEW_TOKENS = 80
# Generation batches: the 82 probes at 96 tokens on 2 CPU cores took 72 s in batches of 8, 49 s of 16, 37 s of 32,
# 34 s of 48 (identical answers); a GPU gains more from large batches still.
GEN_BATCH_SIZE = 48


@dataclass
class EvalArgs:
    mcq_files: list[str] = arg(factory=list, help="Multiple-choice files: our {question, options, answer} records "
                               "or local MedQA, MedMCQA, PubMedQA, CMExam, CMB, C-Eval/CMMLU files.")
    mcq_method: Literal["loglik", "generate"] = arg(
        "loglik", "loglik: the option whose reply the model finds most likely; generate: greedy reply, first "
        "option letter parsed.")
    mcq_target: Literal["letter", "option"] = arg(
        "letter", "What loglik scores as the reply: the letter (sum log-prob) or 'A. option text' (log-prob per byte).")
    mcq_format: Literal[SHAPES] = arg("auto", "File shape; auto detects it per file.")  # type: ignore[valid-type]
    medmcqa_cop: Literal["auto", "0", "1"] = arg(
        "auto", "MedMCQA cop numbering: 1 (1-4, original JSON), 0 (0-3, Hugging Face release), auto (per file from "
        "the values seen).")
    mcq_max_new_tokens: int = arg(16, "generate method: tokens generated per question.", min=1)
    text_files: list[str] = arg(factory=list, help="Held-out text for perplexity and bits per byte, per file.")
    text_mode: Literal["line", "paragraph", "file"] = arg(
        "line", "For .txt text files: one document per line, per blank-line-separated paragraph, or per file.")
    ppl_stride: int = arg(0, "Tokens predicted per window in documents longer than max_length (0: max_length - 1, "
                          "disjoint windows; smaller: more context, slower).", min=0)
    qa_files: list[str] = arg(factory=list, help="QA pairs: chat records (the last assistant turn is the reference) "
                              "or prompt records with an answer; scored by the references' perplexity and by "
                              "ROUGE-L of greedy answers.")
    prompt_files: list[str] = arg(factory=list, help="Prompts both models answer for the win rate.")
    compare_model: Optional[str] = arg(None, "Model B for the win rate (a model dir or hub id).")
    compare_adapter: Optional[str] = arg(None, "A LoRA adapter on top of model B.")
    compare_template: Optional[str] = arg(None, "Model B's chat template (default: --template).")
    reward_model: Optional[str] = arg(None, "Reward model dir (`medgpt rm` output) that judges the win rate.")
    tie_margin: float = arg(0.0, "Reward differences up to this count as a tie.", min=0)
    safety: bool = arg(False, "Run the safety probes (data/demo/safety.jsonl unless safety_files are given).")
    safety_files: list[str] = arg(factory=list, help="Safety probe files: {prompt, expected: urge_care|refuse|"
                                  "answer, category}.")
    safety_max_new_tokens: int = arg(SAFETY_MAX_NEW_TOKENS, "Tokens generated per safety probe (0: "
                                     "--gen.max_new_tokens): the keyword rules judge the start of an answer.", min=0)
    rag_files: list[str] = arg(factory=list, help="Knowledge-base questions {question, source: leaflet file name, "
                               "lang?} answered from --rag.index_dir: retrieval hit rate and right citations.")
    rag_without: bool = arg(False, "Also answer the rag_files questions without passages, side by side in "
                            "predictions/rag-*.jsonl.")
    lm_eval_tasks: list[str] = arg(factory=list, help="lm-evaluation-harness tasks to run too (needs "
                                   "`pip install lm-eval` and the hub).")
    lm_eval_num_fewshot: Optional[int] = arg(None, "lm-eval: few-shot examples (default: each task's own).", min=0)
    lm_eval_limit: Optional[float] = arg(None, "lm-eval: at most this many examples per task (< 1: a fraction).",
                                         above=0)
    lm_eval_chat_template: bool = arg(False, "lm-eval: render prompts with the tokenizer's chat template.")
    system: Optional[str] = arg(None, "A system prompt for every question and prompt.")
    batch_size: int = arg(16, "Rows per forward pass when scoring (MCQ loglik, perplexity, answer loss, the reward "
                          "model, lm-eval).", min=1)
    gen_batch_size: int = arg(GEN_BATCH_SIZE, "Prompts per generation batch (QA, safety, knowledge base, win rate, MCQ "
                              "generate); on CPU greedy answers came out identical at 8 to 48.", min=1)
    max_length: int = arg(2048, "Longest scored sequence (capped at the model's context); longer prompts lose "
                          "their oldest tokens, longer documents are scored in windows.", min=2)
    max_samples: Optional[int] = arg(None, "Use at most this many records per file (quick runs), counted after "
                                     "--eval.lang.", min=1)
    lang: Literal["all", "en", "zh"] = arg(
        "all", "Evaluate only the items in one language: zh keeps those whose question (MCQ, QA, probe, knowledge-"
        "base question, win-rate prompt; the text itself for perplexity) holds Chinese characters, en the others. "
        "For a model that reads one of them only, e.g. SmolLM2 (English).")


@dataclass
class Config:
    model: ModelArgs = section(ModelArgs, "Model A: the model evaluated.")
    gen: GenArgs = dataclasses.field(
        default_factory=lambda: GenArgs(temperature=0.0, max_new_tokens=256),
        metadata={"help": "Generation for QA, safety, win rate (greedy by default: reproducible numbers)."})
    eval: EvalArgs = section(EvalArgs)
    rag: KnowledgeArgs = section(KnowledgeArgs, "The knowledge base of --eval.rag_files (as `medgpt serve --rag.*`).")
    template: str = arg("tokenizer", "Chat template name, or `tokenizer` to use the tokenizer's own.")
    only_cpu: bool = arg(False, "Run on the CPU even when a GPU is present.")
    output_dir: str = arg("", "Where metrics.json, report.md and predictions/ go.")
    overwrite: bool = arg(False, "Write into a non-empty output_dir.")


HEADLINE = re.compile(r"mcq/[^/]+/accuracy|ppl/[^/]+/(perplexity|bits_per_byte)|rouge_l/overall|answer_ppl/overall|"
                      r"winrate/win_rate|"
                      r"safety/(unsafe_rate|over_refusal_rate)|rag/(hit_rate|cited_right_rate)|lm_eval/[^/]+/acc(_norm)?")


def summary(metrics: dict) -> dict[str, float]:
    """The headline numbers of a metrics.json for a before/after table: accuracy per MCQ file and overall,
    perplexity and bits per byte per text file, overall ROUGE-L, win rate, the two safety rates, lm-eval acc."""
    return {k: float(v) for k, v in metrics.items() if HEADLINE.fullmatch(k) and isinstance(v, (int, float))}


# ----------------------------------------------------------------------------------------------- helpers

def file_names(paths: list[str]) -> list[str]:
    """A short unique name per file for metric keys: the stem, with the parent dir when stems collide."""
    stems = [Path(p).stem for p in paths]
    names = [f"{Path(p).parent.name}-{s}" if stems.count(s) > 1 else s for p, s in zip(paths, stems)]
    return [n if names.count(n) == 1 else f"{n}-{i}" for i, n in enumerate(names, 1)]


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}%"


def _table(header: list[str], rows: list[list]) -> list[str]:
    align = ["---" if i == 0 else "---:" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"] + \
           ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _user_text(messages: list[dict]) -> str:
    return messages[-1]["content"]


def _free() -> None:
    """Give memory back after the caller dropped its last reference to a model."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- data

def _check(cfg: Config) -> None:
    e = cfg.eval
    if not cfg.model.name_or_path:
        raise MedGPTError("no model given. Add --model.name_or_path DIR (the model to evaluate).")
    if e.prompt_files and not (e.compare_model and e.reward_model):
        raise MedGPTError("--eval.prompt_files runs the win rate, which needs --eval.compare_model (model B) and "
                          "--eval.reward_model (the judge). Add both, or drop --eval.prompt_files.")
    if (e.compare_model or e.reward_model) and not e.prompt_files:
        raise MedGPTError("--eval.compare_model / --eval.reward_model are for the win rate: add --eval.prompt_files "
                          "(the prompts both models answer).")
    if e.lm_eval_tasks:
        import importlib.util

        from medgpt.eval.harness import INSTALL
        if importlib.util.find_spec("lm_eval") is None:
            raise MedGPTError(INSTALL)
    if e.rag_files and not cfg.rag.index_dir:
        raise MedGPTError("--eval.rag_files are answered from a knowledge base: add --rag.index_dir DIR (build one "
                          "with `medgpt rag index DOCS --rag.index_dir DIR`).")
    if cfg.rag.index_dir and not e.rag_files:
        raise MedGPTError("--rag.index_dir is for --eval.rag_files: add the questions file, or drop --rag.index_dir.")
    if e.rag_without and not e.rag_files:
        raise MedGPTError("--eval.rag_without true compares answers to --eval.rag_files: add that file.")
    if e.batch_size < 1 or e.max_length < 2:
        raise MedGPTError("--eval.batch_size must be >= 1 and --eval.max_length >= 2.")


def _read(cfg: Config) -> dict[str, list]:
    """Every data file of every enabled part, read and checked: {part: [(name, path, payload)]}."""
    from medgpt.data.readers import expand_paths
    from medgpt.data.text import has_cjk
    from medgpt.data.validate import load_records
    from medgpt.eval.benchmarks import read_mcq_file
    from medgpt.eval.ragqa import read_questions
    from medgpt.eval.safety import probe_files, read_probes

    e = cfg.eval

    def named(specs):
        paths = expand_paths(specs) if specs else []
        return list(zip(file_names(paths), paths))

    def records(path, kind, purpose, flag, shape):
        try:
            return load_records([path], kind, text_mode=e.text_mode, purpose=purpose)
        except MedGPTError as err:  # its hints name --data.* options, which `medgpt eval` reads as --eval.* files
            raise MedGPTError(f"{err}\n(medgpt eval reads {flag} as {shape}; `medgpt data convert` writes other "
                              f"shapes as canonical JSONL.)") from None

    def prompts(path, purpose):
        return records(path, "prompt", purpose, "--eval.qa_files / --eval.prompt_files",
                       "chat, prompt, preference or Alpaca/ShareGPT records")

    def some(items, text):  # --eval.lang, then --eval.max_samples
        if e.lang != "all":
            items = [x for x in items if has_cjk(text(x)) == (e.lang == "zh")]
        return items[:e.max_samples] if e.max_samples else items

    def question(r):
        return _user_text(r["prompt"] if "prompt" in r else r["messages"])

    parts: dict[str, list] = {}
    parts["mcq"] = []
    for n, p in named(e.mcq_files):
        f = read_mcq_file(p, e.mcq_format, e.medmcqa_cop)
        parts["mcq"].append((n, p, dataclasses.replace(f, records=some(f.records, lambda r: r["question"]))))
    parts["ppl"] = [(n, p, some([r["text"] for r in records(p, "text", "perplexity", "--eval.text_files",
                                                            ".txt files or {text} records")], str))
                    for n, p in named(e.text_files)]
    parts["qa"] = [(n, p, some(prompts(p, "ROUGE-L"), question)) for n, p in named(e.qa_files)]
    for _, path, recs in parts["qa"]:
        if any("answer" not in r for r in recs):
            raise MedGPTError(f"{path}: ROUGE-L needs a reference answer per record: chat records (the last "
                              f"assistant turn is the reference) or prompt records with an 'answer'.")
    files = probe_files(e.safety_files, e.safety)
    parts["safety"] = [(n, p, some(read_probes(p), question)) for n, p in zip(file_names(files), files)]
    parts["winrate"] = [(n, p, some(prompts(p, "the win rate"), question)) for n, p in named(e.prompt_files)]
    parts["rag"] = [(n, p, some(read_questions(p), lambda q: q["question"])) for n, p in named(e.rag_files)]
    for part, files in parts.items():
        for _, path, items in files:
            if not (items.records if part == "mcq" else items):
                raise MedGPTError(f"{path}: no {part} items left with --eval.lang {e.lang}. Use another "
                                  f"--eval.lang, or drop the file from this run.")
    return parts


def _knowledge(cfg: Config, files: list):
    """The index of --rag.index_dir, opened and checked against the questions' sources before any model loads."""
    from medgpt.eval.ragqa import check_sources
    from medgpt.rag.answer import load_knowledge

    if not files:
        return None
    index = load_knowledge(cfg.rag)
    for _, path, questions in files:
        check_sources(questions, index, path)
    return index


# ----------------------------------------------------------------------------------------------- parts

def _mcq(engine, files, cfg: Config, out: Path, metrics: dict) -> list[str]:
    from medgpt.eval.mcq import accuracy, score_generate, score_loglik

    e = cfg.eval
    window = min(e.max_length, engine.max_context)
    rows, total, correct, skipped = [], 0, 0, 0
    for name, path, f in files:
        if e.mcq_method == "loglik":
            picks, cut = score_loglik(engine, f.records, e.mcq_target, batch_size=e.batch_size, max_length=window,
                                      system=e.system)
        else:
            picks, cut = score_generate(engine, f.records, cfg.gen, batch_size=e.gen_batch_size,
                                        max_new_tokens=e.mcq_max_new_tokens, system=e.system)
        acc = accuracy(f.records, picks)
        n_skip = sum(f.skipped.values())
        metrics.update({f"mcq/{name}/accuracy": acc["accuracy"], f"mcq/{name}/questions": acc["questions"],
                        f"mcq/{name}/correct": acc["correct"], f"mcq/{name}/skipped": n_skip})
        if e.mcq_method == "generate":
            metrics[f"mcq/{name}/unparsed"] = acc["unparsed"]
        total, correct, skipped = total + acc["questions"], correct + acc["correct"], skipped + n_skip
        why = ", ".join(f"{k}: {v}" for k, v in f.skipped.items())
        rows.append([name, f.shape, acc["questions"], acc["correct"], _pct(acc["accuracy"]),
                     f"{n_skip} ({why})" if n_skip else 0, cut])
        _write_jsonl(out / "predictions" / f"mcq-{name}.jsonl",
                     [{**r, **p, "correct": p["pred"] == r["answer"]} for r, p in zip(f.records, picks)])
    metrics.update({"mcq/overall/accuracy": correct / total, "mcq/overall/questions": total,
                    "mcq/overall/correct": correct})
    rows.append(["**overall**", "", total, correct, _pct(correct / total), skipped, ""])
    how = e.mcq_method + (f", {e.mcq_target}" if e.mcq_method == "loglik" else "")
    return [f"## Multiple choice ({how})", ""] + _table(
        ["file", "format", "questions", "correct", "accuracy", "skipped", "prompts cut"], rows)


def _ppl(engine, files, cfg: Config, metrics: dict) -> list[str]:
    from medgpt.eval.perplexity import perplexity

    window = min(cfg.eval.max_length, engine.max_context)
    rows = []
    for name, path, texts in files:
        r = perplexity(engine, texts, window=window, stride=cfg.eval.ppl_stride, batch_size=cfg.eval.batch_size,
                       progress=f"perplexity {name}")
        metrics.update({f"ppl/{name}/{k}": r[k] for k in ("perplexity", "bits_per_byte", "documents", "tokens",
                                                          "bytes")})
        rows.append([name, r["documents"], r["tokens"], r["bytes"], f"{r['perplexity']:.3f}",
                     f"{r['bits_per_byte']:.4f}"])
    return [f"## Perplexity (window {window} tokens)", ""] + _table(
        ["file", "documents", "tokens", "bytes", "perplexity", "bits/byte"], rows)


def answer_nll(engine, convs: list[list[dict]], answers: list[str], *, batch_size: int, max_length: int):
    """Teacher-forced negative log-likelihood of each reference answer after its prompt, tokenized as in training
    (the answer's own tokens, not its end-of-turn token): [(nll, tokens)]."""
    from medgpt.eval.mcq import reply_ids
    from medgpt.eval.scoring import logprobs

    requests = []
    for messages, answer in zip(convs, answers):
        prompt = engine.prompt_ids(messages)
        requests.append((prompt, [reply_ids(engine, messages, prompt, answer)]))
    scores = logprobs(engine.model, requests, pad_id=engine.pad_id, batch_size=batch_size, max_length=max_length,
                      progress="answer loss")
    return [(-row[0], len(conts[0])) for row, (_, conts) in zip(scores, requests)]


def _qa(engine, files, cfg: Config, out: Path, metrics: dict) -> list[str]:
    """Per file: the perplexity of the reference answers (teacher-forced: what training lowers) and ROUGE-L of
    the greedy answers against them (what a reader sees)."""
    from medgpt.eval.rouge import rouge_l
    from medgpt.eval.scoring import generate_answers

    rows, scores_all, nll_all, tokens_all = [], [], 0.0, 0
    for name, path, records in files:
        convs = [_with_system(r["prompt"], cfg.eval.system) for r in records]
        losses = answer_nll(engine, convs, [r["answer"] for r in records], batch_size=cfg.eval.batch_size,
                            max_length=min(cfg.eval.max_length, engine.max_context))
        nll, tokens = sum(x for x, _ in losses), sum(n for _, n in losses)
        nll_all, tokens_all = nll_all + nll, tokens_all + tokens
        results, _ = generate_answers(engine, convs, cfg.gen, cfg.eval.gen_batch_size, progress=f"qa {name}")
        scores = [rouge_l(res.text, r["answer"]) for res, r in zip(results, records)]
        scores_all += scores
        ppl = math.exp(nll / max(tokens, 1))
        metrics.update({f"rouge_l/{name}": sum(scores) / len(scores), f"rouge_l/{name}/answers": len(scores),
                        f"answer_ppl/{name}": ppl, f"answer_ppl/{name}/tokens": tokens})
        rows.append([name, len(scores), tokens, f"{ppl:.3f}", f"{sum(scores) / len(scores):.4f}"])
        _write_jsonl(out / "predictions" / f"qa-{name}.jsonl",
                     [{"prompt": _user_text(r["prompt"]), "reference": r["answer"], "answer": res.text,
                       "rouge_l": s, "reference_nll": round(x, 4), "reference_tokens": n}
                      for r, res, s, (x, n) in zip(records, results, scores, losses)])
    metrics["rouge_l/overall"] = sum(scores_all) / len(scores_all)
    metrics["answer_ppl/overall"] = math.exp(nll_all / max(tokens_all, 1))
    rows.append(["**overall**", len(scores_all), tokens_all, f"{metrics['answer_ppl/overall']:.3f}",
                 f"{metrics['rouge_l/overall']:.4f}"])
    return ["## QA: reference-answer perplexity (teacher-forced) and ROUGE-L F1 of greedy answers "
            "(characters for CJK, words otherwise)", ""] + _table(
        ["file", "answers", "reference tokens", "answer perplexity", "ROUGE-L"], rows)


def _with_system(messages: list[dict], system: Optional[str]) -> list[dict]:
    if not system or messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": system}] + messages


def _safety(engine, files, cfg: Config, out: Path, metrics: dict) -> list[str]:
    from medgpt.eval.safety import judge, tally
    from medgpt.eval.scoring import generate_answers

    probes = [p for _, _, ps in files for p in ps]
    cap = cfg.eval.safety_max_new_tokens or cfg.gen.max_new_tokens
    gen = dataclasses.replace(cfg.gen, max_new_tokens=cap)
    results, _ = generate_answers(engine, [_with_system(p["messages"], cfg.eval.system) for p in probes], gen,
                                  cfg.eval.gen_batch_size, progress="safety")
    verdicts = [judge(r.text, p["expected"]) for p, r in zip(probes, results)]
    rates = tally(probes, verdicts)
    metrics.update({f"safety/{k}": v for k, v in rates.items()})
    metrics["safety/max_new_tokens"] = cap
    i = 0
    for name, _, ps in files:
        _write_jsonl(out / "predictions" / f"safety-{name}.jsonl",
                     [{"prompt": _user_text(p["messages"]), "category": p["category"], "expected": p["expected"],
                       "answer": r.text, "verdict": v}
                      for p, r, v in zip(ps, results[i:i + len(ps)], verdicts[i:i + len(ps)])])
        i += len(ps)
    rows = []
    for cat in sorted({p["category"] for p in probes}):
        for kind, rate, label in (("harmful", "unsafe_rate", "unsafe"), ("benign", "over_refusal_rate", "refused")):
            if f"{cat}/{kind}_probes" in rates:
                n = rates[f"{cat}/{kind}_probes"]
                r = rates[f"{cat}/{rate}"]
                rows.append([cat, n, label, round(r * n), _pct(r)])
    for kind, rate, label in (("harmful", "unsafe_rate", "unsafe"), ("benign", "over_refusal_rate", "refused")):
        if f"{kind}_probes" in rates:
            n, r = rates[f"{kind}_probes"], rates[rate]
            rows.append([f"**all {kind}**", n, label, round(r * n), _pct(r)])
    return [f"## Safety (keyword rules on answers of up to {cap} tokens: a coarse proxy, read "
            f"predictions/safety-*.jsonl)", ""] + _table(
        ["category", "probes", "judged", "count", "rate"], rows)


def _rag(engine, index, files, cfg: Config, out: Path, metrics: dict) -> list[str]:
    """Each question answered as `medgpt rag ask` does (same passages, same prompt), judged by ragqa.py."""
    from medgpt.eval.ragqa import judge, tally
    from medgpt.eval.scoring import generate_answers
    from medgpt.rag.answer import fit_augment

    e, k = cfg.eval, cfg.rag
    questions = [q for _, _, qs in files for q in qs]
    plain = [_with_system([{"role": "user", "content": q["question"]}], e.system) for q in questions]
    augmented = [fit_augment(engine, m, index, k.top_k, cfg.gen.max_new_tokens, mode=k.mode) for m in plain]
    results, _ = generate_answers(engine, [m for m, _ in augmented], cfg.gen, e.gen_batch_size, progress="rag")
    without = generate_answers(engine, plain, cfg.gen, e.gen_batch_size, progress="rag, no passages")[0] \
        if e.rag_without else [None] * len(questions)
    judged = [judge(q, sources, r.text) for q, (_, sources), r in zip(questions, augmented, results)]
    metrics.update(tally(judged))
    rows, i = [], 0
    for name, _, qs in files:
        sl = slice(i, i + len(qs))
        t = tally(judged[sl])
        rows.append([name, len(qs), _pct(t["rag/hit_rate"]), _pct(t["rag/hit_at_1"]), _pct(t["rag/cited_right_rate"]),
                     _pct(t["rag/cited_any_rate"])])
        _write_jsonl(out / "predictions" / f"rag-{name}.jsonl",
                     [{**q, "retrieved": [s["where"] for s in sources], **j, "answer": r.text,
                       **({"answer_without_rag": w.text} if w is not None else {})}
                      for q, (_, sources), j, r, w in zip(qs, augmented[sl], judged[sl], results[sl], without[sl])])
        i += len(qs)
    if len(files) > 1:
        rows.append(["**overall**", len(questions), _pct(metrics["rag/hit_rate"]), _pct(metrics["rag/hit_at_1"]),
                     _pct(metrics["rag/cited_right_rate"]), _pct(metrics["rag/cited_any_rate"])])
    return [f"## Knowledge base ({cfg.rag.index_dir}, top {k.top_k} passages, {k.mode})", "",
            "hit: the question's source file among the passages in the prompt; cited right: the answer cites it "
            "([n] or its file name).", ""] + _table(
        ["file", "questions", f"hit@{k.top_k}", "hit@1", "cited right", "cites any"], rows)


def _winrate(answers_a, files, cfg: Config, out: Path, metrics: dict) -> list[str]:
    from medgpt.eval.scoring import generate_answers
    from medgpt.eval.winrate import score, tally
    from medgpt.infer.engine import Engine
    from medgpt.train.rewards import RewardModel

    e = cfg.eval
    b_args = dataclasses.replace(cfg.model, name_or_path=e.compare_model, adapter=e.compare_adapter)
    engine_b = Engine.load(b_args, e.compare_template or cfg.template, only_cpu=cfg.only_cpu)
    prompts = [_with_system(r["prompt"], e.system) for _, _, recs in files for r in recs]
    answers_b = [r.text for r in generate_answers(engine_b, prompts, cfg.gen, e.gen_batch_size, progress="model B")[0]]
    name_b = engine_b.name
    del engine_b
    _free()
    judge = RewardModel(e.reward_model, device="cpu" if cfg.only_cpu else None, max_length=e.max_length,
                        batch_size=e.batch_size, template=cfg.template)
    scores_a, scores_b = score(judge, prompts, answers_a), score(judge, prompts, answers_b)
    del judge
    _free()
    rows, i = [], 0
    for name, _, recs in files:
        sl = slice(i, i + len(recs))
        t = tally(scores_a[sl], scores_b[sl], e.tie_margin)
        rows.append([name, t["prompts"], t["wins"], t["ties"], t["losses"], _pct(t["win_rate"])])
        _write_jsonl(out / "predictions" / f"winrate-{name}.jsonl",
                     [{"prompt": _user_text(p), "answer_a": a, "answer_b": b, "reward_a": sa, "reward_b": sb}
                      for p, a, b, sa, sb in zip(prompts[sl], answers_a[sl], answers_b[sl], scores_a[sl],
                                                  scores_b[sl])])
        i += len(recs)
    t = tally(scores_a, scores_b, e.tie_margin)
    metrics.update({f"winrate/{k}": v for k, v in t.items()})
    if len(files) > 1:
        rows.append(["**overall**", t["prompts"], t["wins"], t["ties"], t["losses"], _pct(t["win_rate"])])
    return [f"## Win rate: A = {cfg.model.name_or_path} vs B = {name_b}, judged by {e.reward_model}", "",
            "Ties count as half a win.", ""] + _table(["file", "prompts", "A wins", "ties", "B wins", "win rate"], rows)


# ----------------------------------------------------------------------------------------------- run

def _save(out: Path, metrics: dict, sections: list[list[str]], title: str) -> str:
    write_json(out / "metrics.json", metrics)
    text = "\n\n".join(["\n".join(s) for s in [[title]] + sections]) + "\n"
    with atomic_write(out / "report.md") as f:
        f.write(text)
    return text


def run(cfg: Config) -> dict:
    """Evaluate a model on every part that has files; write metrics.json and report.md. Returns the metrics."""
    from medgpt.infer.engine import Engine

    _check(cfg)
    parts = _read(cfg)
    e = cfg.eval
    if not any(parts.values()) and not e.lm_eval_tasks:
        raise MedGPTError("nothing to evaluate. Give --eval.mcq_files, --eval.text_files, --eval.qa_files, "
                          "--eval.safety true (or --eval.safety_files), --eval.rag_files with --rag.index_dir, "
                          "--eval.prompt_files with "
                          "--eval.compare_model and --eval.reward_model, or --eval.lm_eval_tasks.")
    index = _knowledge(cfg, parts["rag"])
    out = prepare_output_dir(cfg.output_dir, overwrite=cfg.overwrite, command="eval")
    claim(out, "config.yaml", "metrics.json", "report.md", "predictions")
    save_config(cfg, out / "config.yaml")
    metrics: dict = {}
    sections: list[list[str]] = []
    title = f"# Evaluation of {cfg.model.name_or_path}" + (f" + {cfg.model.adapter}" if cfg.model.adapter else "")

    def timed(part: str, fn, *args):
        start = time.perf_counter()
        lines = fn(*args)
        seconds = time.perf_counter() - start
        metrics[f"time/{part}_seconds"] = round(seconds, 3)
        log(f"{part}: {seconds:.1f}s")
        sections.append(lines + ["", f"_{seconds:.1f} s_"])
        _save(out, metrics, sections, title)

    answers_a = []
    if any(parts[p] for p in ("mcq", "ppl", "qa", "safety", "rag", "winrate")):
        engine = Engine.load(cfg.model, cfg.template, only_cpu=cfg.only_cpu)
        title += f" (template {engine.template.name}, on {engine.model.device})"
        if parts["mcq"]:
            timed("mcq", _mcq, engine, parts["mcq"], cfg, out, metrics)
        if parts["ppl"]:
            timed("perplexity", _ppl, engine, parts["ppl"], cfg, metrics)
        if parts["qa"]:
            timed("qa", _qa, engine, parts["qa"], cfg, out, metrics)
        if parts["safety"]:
            timed("safety", _safety, engine, parts["safety"], cfg, out, metrics)
        if parts["rag"]:
            timed("rag", _rag, engine, index, parts["rag"], cfg, out, metrics)
        if parts["winrate"]:
            from medgpt.eval.scoring import generate_answers

            prompts = [_with_system(r["prompt"], e.system) for _, _, recs in parts["winrate"] for r in recs]
            answers_a = [r.text for r in generate_answers(engine, prompts, cfg.gen, e.gen_batch_size,
                                                          progress="model A")[0]]
        del engine
        _free()
    if parts["winrate"]:
        timed("winrate", _winrate, answers_a, parts["winrate"], cfg, out, metrics)
    if e.lm_eval_tasks:
        from medgpt.eval.harness import harness_args, run_harness

        args = harness_args(cfg.model, e.lm_eval_tasks, num_fewshot=e.lm_eval_num_fewshot, limit=e.lm_eval_limit,
                            batch_size=e.batch_size, device="cpu" if cfg.only_cpu else None,
                            chat_template=e.lm_eval_chat_template)

        def lm_eval_part():
            found = run_harness(args)
            metrics.update(found)
            return ["## lm-evaluation-harness", ""] + _table(["metric", "value"],
                                                             [[k, f"{v:.4f}"] for k, v in found.items()])
        timed("lm_eval", lm_eval_part)
    text = _save(out, metrics, sections, title)
    mark_complete(out)
    log("\n" + text)
    log(f"wrote {out / 'metrics.json'} and {out / 'report.md'}")
    return metrics
