"""Sample answers: greedy replies to a few questions with a model's own chat template (the pipeline's `sample`
step, so a run's report shows what the model says).

Kept small and apart: medgpt/infer/engine.py (one sampling path for chat, API and batch) replaces it later.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from medgpt.args import ModelArgs
from medgpt.config import arg, section
from medgpt.utils import MedGPTError, atomic_write, log


@dataclass
class SampleConfig:
    model: ModelArgs = section(ModelArgs, "The model to answer with (a merged model, or a base + adapter).")
    questions: list[str] = arg(factory=list, help="Questions, each asked as a single user turn.")
    questions_file: Optional[str] = arg(None, "More questions: a .txt file (one per line) or any prompt, chat, "
                                        "preference or mcq data file (the prompt is asked).")
    max_questions: int = arg(8, "Ask at most this many questions from questions_file.")
    system: Optional[str] = arg(None, "A system message put before every question.")
    max_new_tokens: int = arg(128, "Most tokens per answer (greedy decoding).")
    template: str = arg("tokenizer", "Chat template name, or `tokenizer` to use the model's own.")
    output_dir: str = arg("", "Where samples.jsonl goes.")




def read_questions(cfg: SampleConfig) -> list[list[dict]]:
    """Each question as the messages to send (a system message first when cfg.system is set)."""
    prompts = [[{"role": "user", "content": q}] for q in cfg.questions]
    f = cfg.questions_file
    if f:
        if not Path(f).is_file():
            raise MedGPTError(f"questions_file {f} does not exist. Check the sample step's args.")
        if f.endswith(".txt"):
            lines = [x.strip() for x in Path(f).read_text(encoding="utf-8").splitlines() if x.strip()]
            extra = [[{"role": "user", "content": q}] for q in lines]
        else:
            from medgpt.data.validate import load_records

            extra = [r["prompt"] for r in load_records([f], "prompt", max_samples=cfg.max_questions)]
        prompts += extra[:cfg.max_questions]
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    return [system + [m for m in p if m["role"] != "system" or not system] for p in prompts]


def run_sample(cfg: SampleConfig) -> int:
    """Greedy answers to the questions with the model's own chat template -> <output_dir>/samples.jsonl."""
    import torch
    from transformers import GenerationConfig

    from medgpt.data.templates import encode_prompt, get_template_for, stop_token_ids
    from medgpt.model.load import load_model, load_tokenizer

    prompts = read_questions(cfg)
    tokenizer = load_tokenizer(cfg.model)
    template = get_template_for(cfg.template, tokenizer)
    model = load_model(cfg.model).eval()
    if torch.cuda.is_available():
        model.to("cuda")
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=False,
                           eos_token_id=stop_token_ids(template, tokenizer), pad_token_id=tokenizer.pad_token_id)
    rows = []
    for messages in prompts:
        ids = torch.tensor([encode_prompt(messages, template, tokenizer)], device=model.device)
        with torch.no_grad():
            new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)[0]
        answer = tokenizer.decode(new[ids.shape[1]:], skip_special_tokens=True).strip()
        rows.append({"question": messages[-1]["content"], "answer": answer})
        log(f"Q: {rows[-1]['question']}\nA: {answer}\n")
    with atomic_write(Path(cfg.output_dir) / "samples.jsonl") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return 0
