"""Sample answers: replies to a few questions with a model's own chat template (the pipeline's `sample` step, so
a run's report shows what the model says). Greedy by default, through the one generation engine
(medgpt/infer/engine.py), repetition guard included.

When the questions come from a file with reference answers (chat records: the last assistant turn; prompt
records with an `answer`), each answer is scored against its reference with ROUGE-L (medgpt/eval/rouge.py), and
metrics.json holds the mean: on training questions it measures how much of its data the model can say back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from medgpt.args import GenArgs, ModelArgs
from medgpt.config import arg, section
from medgpt.outdir import claim, mark_complete, prepare_output_dir
from medgpt.utils import MedGPTError, atomic_write, log, write_json


@dataclass
class SampleConfig:
    model: ModelArgs = section(ModelArgs, "The model to answer with (a merged model, or a base + adapter).")
    questions: list[str] = arg(factory=list, help="Questions, each asked as a single user turn (on the command "
                               "line: one argument each, commas and all).", whole=True)
    questions_file: Optional[str] = arg(None, "More questions: a .txt file (one per line) or any prompt, chat, "
                                        "preference or mcq data file (the prompt is asked).")
    max_questions: int = arg(8, "Ask at most this many questions from questions_file.", min=1)
    system: Optional[str] = arg(None, "A system message put before every question.")
    gen: GenArgs = section(lambda: GenArgs(max_new_tokens=128, temperature=0.0),
                           "Decoding: greedy (temperature 0) by default, so answers are reproducible.")
    template: str = arg("tokenizer", "Chat template name, or `tokenizer` to use the model's own.")
    output_dir: str = arg("", "Where samples.jsonl goes.")




def check_settings(cfg: SampleConfig) -> None:
    """Settings that cannot work, refused before a model loads (the pipeline runs this for every sample step)."""
    if not cfg.questions and not cfg.questions_file:
        raise MedGPTError("no questions. Give them as arguments (medgpt sample \"What is ...?\") or in "
                          "--questions_file FILE.")


def read_questions(cfg: SampleConfig) -> list[tuple[list[dict], Optional[str]]]:
    """Each question as the messages to send (a system message first when cfg.system is set), with its reference
    answer when the file gives one (else None)."""
    prompts = [([{"role": "user", "content": q}], None) for q in cfg.questions]
    f = cfg.questions_file
    if f:
        if not Path(f).is_file():
            raise MedGPTError(f"questions_file {f} does not exist. Check the sample step's args.")
        if f.endswith(".txt"):
            lines = [x.strip() for x in Path(f).read_text(encoding="utf-8").splitlines() if x.strip()]
            extra = [([{"role": "user", "content": q}], None) for q in lines]
        else:
            from medgpt.data.validate import load_records

            extra = [(r["prompt"], r.get("answer")) for r in load_records([f], "prompt", max_samples=cfg.max_questions)]
        prompts += extra[:cfg.max_questions]
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    return [(system + [m for m in p if m["role"] != "system" or not system], ref) for p, ref in prompts]


def run_sample(cfg: SampleConfig) -> int:
    """Answers to the questions, one batch -> <output_dir>/samples.jsonl (+ metrics.json with ROUGE-L when
    there are reference answers)."""
    from medgpt.eval.rouge import rouge_l
    from medgpt.infer.engine import Engine

    check_settings(cfg)
    questions = read_questions(cfg)
    engine = Engine.load(cfg.model, cfg.template)
    results = engine.generate([engine.prompt_ids(m) for m, _ in questions], cfg.gen)
    rows = []
    for (messages, ref), res in zip(questions, results):
        row = {"question": messages[-1]["content"], "answer": res.text.strip(), "finish_reason": res.finish_reason}
        if ref is not None:
            row.update(reference=ref, rouge_l=round(rouge_l(row["answer"], ref), 4))
        rows.append(row)
        score = f"  (ROUGE-L {row['rouge_l']:.3f} against the reference)" if ref is not None else ""
        log(f"Q: {row['question']}\nA: {row['answer']}{score}\n")
    # A rerun replaces its own earlier answers (and nothing it did not write): an earlier metrics.json that these
    # answers do not rewrite goes once they are saved (outdir.mark_complete).
    out = prepare_output_dir(cfg.output_dir, overwrite=True, command="sample")
    scored = [r["rouge_l"] for r in rows if "rouge_l" in r]
    if scored:  # written before samples.jsonl, the artifact that marks the step complete
        claim(out, "metrics.json")
        write_json(out / "metrics.json", {"rouge_l": sum(scored) / len(scored), "rouge_l_answers": len(scored)})
        log(f"ROUGE-L against the references: {sum(scored) / len(scored):.3f} over {len(scored)} answer(s)")
    claim(out, "samples.jsonl")
    with atomic_write(out / "samples.jsonl") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    mark_complete(out)
    return 0
