"""The one generation path: `medgpt chat`, `generate`, `serve`, `webui`, `rag ask` and `eval` all call it.

    engine = Engine.load(ModelArgs(name_or_path="outputs/demo/merge"))
    result = engine.chat([{"role": "user", "content": "What is hypertension?"}], GenArgs(temperature=0))
    for delta in engine.stream(messages, gen): print(delta, end="")

It loads base + optional adapter through `model/load.py`, renders prompts with the same template the model was
trained with (the saved chat template by default), and runs `model.generate` on a left-padded batch. Everything
per row (end-of-turn tokens, stop strings, each row's own token budget, a runaway-repetition guard, streaming
text deltas, cancellation) lives in one StoppingCriteria that sees every new token, so a batch of requests with
different lengths and budgets shares one forward pass per step.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from medgpt.args import GenArgs, ModelArgs
from medgpt.utils import MedGPTError, log

FINISH_STOP, FINISH_LENGTH, FINISH_REPETITION = "stop", "length", "repetition"


@dataclass
class Result:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str          # "stop" (end of turn or a stop string), "length", "repetition" (guard fired)
    token_ids: list[int] = field(default_factory=list)


def repeated_tail(ids: list[int], min_span: int = 24, min_repeats: int = 3, max_period: int = 64) -> int:
    """Length of the first copy of a unit that repeats back to back at the end of `ids`, or 0 when none does.

    A unit of `p` tokens counts as runaway repetition when it occurs at least `min_repeats` times in a row at the
    tail and the repeats cover at least `min_span` tokens ("a a a ... a" x24, or one sentence three times).
    Returns p, so the caller can cut the tail down to one copy of the unit.
    """
    n = len(ids)
    for p in range(1, max_period + 1):
        need = max(min_repeats * p, min_span)
        if need > n:
            if min_repeats * p > n:
                break
            continue
        tail = ids[n - need:]
        if all(tail[i] == tail[i - p] for i in range(p, need)):
            return p
    return 0


class Row:
    """One sequence of a batch: its tokens so far, its limits, and where its text has been streamed to."""

    def __init__(self, gen: GenArgs, stop: list[str], on_text: Optional[Callable[[str], None]],
                 cancelled: Optional[Callable[[], bool]]):
        self.gen, self.stop, self.on_text, self.cancelled = gen, stop, on_text, cancelled
        self.ids: list[int] = []
        self.text = ""          # decoded so far (without the end-of-turn token)
        self.sent = 0           # characters handed to on_text
        self.done: Optional[str] = None
        self.cut: Optional[int] = None  # final text length when a stop string or the guard trims it

    def final_text(self) -> str:
        if self.cut is None:
            return self.text
        # A streamed row cannot take back what it sent: its text ends where the stream did.
        return self.text[:max(self.cut, self.sent)]


class Controller:
    """A StoppingCriteria over the whole batch: updates each live row with its newest token."""

    def __init__(self, rows: list[Row], tokenizer, stop_ids: set[int], guard: bool):
        self.rows, self.tok, self.stop_ids, self.guard = rows, tokenizer, stop_ids, guard

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        last = input_ids[:, -1].tolist()
        for row, token in zip(self.rows, last):
            if row.done is None:
                self.feed(row, token)
        return torch.tensor([r.done is not None for r in self.rows], device=input_ids.device)

    def feed(self, row: Row, token: int) -> None:
        if token in self.stop_ids:
            row.done = FINISH_STOP
            return self.flush(row)
        row.ids.append(token)
        row.text = self.tok.decode(row.ids, skip_special_tokens=True)
        for s in row.stop:
            at = row.text.find(s, max(0, row.sent - len(s)))
            if at >= 0:
                row.done, row.cut = FINISH_STOP, at
                return self.flush(row)
        if self.guard and (p := repeated_tail(row.ids)):
            # Keep one copy of the repeated unit: the text up to where the second copy starts.
            row.done = FINISH_REPETITION
            row.cut = len(self.tok.decode(row.ids[:len(row.ids) - (_repeat_count(row.ids, p) - 1) * p],
                                          skip_special_tokens=True))
            return self.flush(row)
        if len(row.ids) >= row.gen.max_new_tokens:
            row.done = FINISH_LENGTH
            return self.flush(row)
        if row.cancelled is not None and row.cancelled():
            row.done = FINISH_STOP
            return self.flush(row)
        self._emit(row, final=False)

    def _emit(self, row: Row, final: bool) -> None:
        if row.on_text is None:
            return
        text = row.final_text()
        end = len(text)
        if not final:
            # Hold back a partial UTF-8 character (a byte-level token mid-character decodes to U+FFFD) and any
            # tail that could still grow into a stop string.
            while end > row.sent and text[end - 1] == "\ufffd":
                end -= 1
            hold = max((len(s) - 1 for s in row.stop), default=0)
            end = max(row.sent, end - hold)
        if end > row.sent:
            row.on_text(text[row.sent:end])
            row.sent = end

    def flush(self, row: Row) -> None:
        self._emit(row, final=True)


def _repeat_count(ids: list[int], p: int) -> int:
    """How many copies of the last `p` tokens sit back to back at the end of ids."""
    k, n = 1, len(ids)
    while (k + 1) * p <= n and ids[n - (k + 1) * p:n - k * p] == ids[n - p:]:
        k += 1
    return k


class Engine:
    """A loaded model + tokenizer + chat template, ready to generate."""

    def __init__(self, model, tokenizer, template, name: str = ""):
        from medgpt.data.templates import stop_token_ids

        self.model, self.tokenizer, self.template, self.name = model, tokenizer, template, name
        self.stop_ids = stop_token_ids(template, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        # Multi-token stops of the template ("USER:", "### Instruction") are matched on the text.
        self.stop_strings = [s for s in template.stop
                             if len(tokenizer(s, add_special_tokens=False)["input_ids"]) > 1]
        self.lock = threading.Lock()  # one generate() at a time on this model

    @classmethod
    def load(cls, model: ModelArgs, template: str = "tokenizer", only_cpu: bool = False) -> "Engine":
        """Load base (+ adapter) for inference: eval mode, on the GPU when there is one and only_cpu is off."""
        import torch

        from medgpt.data.templates import get_template_for
        from medgpt.model.load import load_model, load_tokenizer

        tokenizer = load_tokenizer(model)
        tmpl = get_template_for(template, tokenizer)
        net = load_model(model).eval()
        if torch.cuda.is_available() and not only_cpu and getattr(net, "hf_device_map", None) is None:
            net.to("cuda")
        name = model.name_or_path.rstrip("/") + (f"+{model.adapter.rstrip('/')}" if model.adapter else "")
        log(f"loaded {name} on {net.device} (template: {tmpl.name})")
        return cls(net, tokenizer, tmpl, name=name)

    # ------------------------------------------------------------------------------------------ prompts

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation that ends with a user turn, plus the assistant's generation prompt."""
        from medgpt.data.templates import encode_prompt

        return encode_prompt(messages, self.template, self.tokenizer)

    def text_ids(self, text: str) -> list[int]:
        """Token ids of a raw prompt (`/v1/completions`): no template."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @property
    def max_context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)

    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if prompt_tokens + max_new_tokens > self.max_context:
            raise MedGPTError(f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                              f"model's context of {self.max_context} tokens. Shorten the prompt or lower "
                              f"max_new_tokens.")

    # ----------------------------------------------------------------------------------------- generate

    def generation_config(self, gen: GenArgs, max_new_tokens: int):
        """The transformers GenerationConfig for `gen`: the one place our settings become theirs, so that
        `generate` and the continuous decoder (infer/continuous.py) sample alike."""
        from transformers import GenerationConfig

        sample = gen.temperature > 0
        return GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=sample, eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
            temperature=gen.temperature if sample else None, top_p=gen.top_p if sample else None,
            top_k=(gen.top_k or None) if sample else None,
            repetition_penalty=gen.repetition_penalty if gen.repetition_penalty != 1.0 else None)

    def left_padded(self, prompts: list[list[int]], device=None):
        """(ids, attention mask) of a batch, padded on the left: every row's next token comes from the last column."""
        import torch

        longest = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), longest), self.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(prompts), longest), dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p):] = torch.tensor(p, device=device)
            mask[i, longest - len(p):] = 1
        return ids, mask

    def generate(self, prompts: list[list[int]], gen: GenArgs, *, stop: Optional[list[str]] = None,
                 budgets: Optional[list[int]] = None,
                 on_text: Optional[list[Optional[Callable[[str], None]]]] = None,
                 cancelled: Optional[list[Optional[Callable[[], bool]]]] = None,
                 guard: bool = True) -> list[Result]:
        """Generate for a batch of prompt ids with one sampling setting; rows stop independently.

        budgets: each row's own max_new_tokens (default gen.max_new_tokens for all); on_text: per-row callbacks
        that receive text deltas as they are decoded (streaming); cancelled: per-row callables polled each step
        (a client that went away frees its row).
        """
        import torch
        from transformers import StoppingCriteriaList

        if not prompts:
            return []
        n = len(prompts)
        budgets = budgets or [gen.max_new_tokens] * n
        if any(not p for p in prompts):
            raise MedGPTError("an empty prompt cannot be completed: send at least one token of text.")
        longest = max(len(p) for p in prompts)
        self.check_fits(longest, max(budgets))
        rows = [Row(_with_budget(gen, b), (stop or []) + self.stop_strings,
                    (on_text or [None] * n)[i], (cancelled or [None] * n)[i]) for i, b in enumerate(budgets)]
        ids, mask = self.left_padded(prompts)
        config = self.generation_config(gen, max(budgets) + 1)
        controller = Controller(rows, self.tokenizer, set(self.stop_ids), guard and gen.repetition_guard)
        device = self.model.device
        with self.lock, torch.inference_mode():
            if gen.seed is not None:
                torch.manual_seed(gen.seed)
            self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                                stopping_criteria=StoppingCriteriaList([controller]))
        results = []
        for row, p in zip(rows, prompts):
            if row.done is None:  # generate() stopped on its own (max_new_tokens)
                row.done = FINISH_LENGTH
                controller.flush(row)
            results.append(Result(row.final_text(), len(p), len(row.ids), row.done, row.ids))
        return results

    def chat(self, messages: list[dict], gen: GenArgs) -> Result:
        """One reply to a conversation that ends with a user turn."""
        return self.generate([self.prompt_ids(messages)], gen)[0]

    def stream(self, messages: list[dict], gen: GenArgs) -> Iterator[str]:
        """Text deltas of one reply as they are decoded (generation runs in a thread; breaking off stops it)."""
        import queue

        q: queue.Queue = queue.Queue()
        stop = threading.Event()
        done = object()
        errors: list[BaseException] = []

        def work():
            try:
                self.generate([self.prompt_ids(messages)], gen, on_text=[q.put], cancelled=[stop.is_set])
            except BaseException as e:  # handed to the consumer, raised there
                errors.append(e)
            finally:
                q.put(done)

        t = threading.Thread(target=work, daemon=True)
        t.start()
        try:
            while (item := q.get()) is not done:
                yield item
        finally:
            stop.set()
            t.join()
        if errors:
            raise errors[0]


def fit_context(engine, messages: list[dict], max_new_tokens: int) -> tuple[list[dict], int]:
    """Drop the oldest turns until prompt + answer fit the model's context; then shrink the answer budget.

    A long chat (`medgpt chat`, the web UI) keeps going instead of failing on its 20th turn; the system message
    stays. Returns (messages, max_new_tokens).
    """
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    while True:
        used = len(engine.prompt_ids(system + turns))
        if used + max_new_tokens <= engine.max_context or sum(m["role"] == "user" for m in turns) <= 1:
            break
        turns = turns[1:]
        while turns and turns[0]["role"] != "user":  # a conversation starts with the user
            turns = turns[1:]
    budget = min(max_new_tokens, engine.max_context - used)
    if budget < 1:
        raise MedGPTError(f"this message ({used} tokens) does not fit the model's context of {engine.max_context} "
                          f"tokens with room for an answer. Send a shorter one.")
    return system + turns, budget


def _with_budget(gen: GenArgs, budget: int) -> GenArgs:
    from dataclasses import replace

    return replace(gen, max_new_tokens=budget)
