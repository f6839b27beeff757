"""Continuous batching: requests join and leave a running batch between decoding steps (`medgpt serve`'s default).

    decoder = Decoder(engine)
    done = decoder.join([Request(prompt_ids, GenArgs(temperature=0), on_text=print)])  # prefill + first token
    while len(decoder):
        done += decoder.step()                                 # one more token for every running row
    for request, result in done: ...

`Engine.generate` runs a fixed batch to its end: one long answer keeps the short ones of its batch waiting, and
nothing new starts until it is done. Here the running batch is one KV cache (a transformers DynamicCache, one row
per request) kept left-padded, so every row's next token sits in the last column. New requests are prefilled
together, then their cache rows are padded on the left to the batch's width and appended; a finished or cancelled
row is dropped at once, and columns that became padding in every row are cut. Each row has its own position ids
(its real tokens only) and attention mask, so padding never shifts what a row sees: a request's greedy answer is
the one `engine.generate` gives it alone (tests/test_continuous.py).

Per row, everything is the engine's: the per-token bookkeeping (end-of-turn tokens, stop strings, budget,
repetition guard, streaming deltas, cancel flag) is engine.Controller.feed, and the logits processors are built by
transformers from the same GenerationConfig `engine.generate` uses (`Engine.generation_config`, completed by the
model's generation_config.json). So rows may differ in every setting (greedy beside sampled, each with its own
temperature, penalty, stop strings and budget), and a seeded row samples from its own torch.Generator, seeded as
`engine.generate` seeds the global one: its answer does not depend on what else is running.

Why not transformers' own continuous batching (`generate_batch`, ContinuousBatchingManager, 5.25): it runs on CPU
in float32 and matches greedy `generate`, but drops the repetition penalty (our default 1.1), takes one seed per
manager instead of per request, has no stop strings, never reports the end of a cancelled request, and on CPU
sizes its paged cache from free memory (48 s for 3 prompts x 20 tokens on a tiny llama with defaults; 0.6 s with a
hand-sized cache, against 0.06 s for plain `generate`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Optional

from medgpt.args import GenArgs
from medgpt.infer.engine import Controller, Result, Row
from medgpt.utils import MedGPTError


@dataclass(eq=False)
class Request:
    """One answer to decode; gen.max_new_tokens is its budget."""

    prompt_ids: list[int]
    gen: GenArgs
    stop: list[str] = field(default_factory=list)
    on_text: Optional[Callable[[str], None]] = None   # text deltas as they are decoded (streaming)
    cancelled: Optional[Callable[[], bool]] = None    # polled after each token: True ends the row


class _Slot:
    """A running row: its request, the engine's per-token bookkeeping, its logits processors and random generator."""

    def __init__(self, request: Request, engine, processors, generator):
        self.request, self.processors, self.generator = request, processors, generator
        self.row = Row(request.gen, request.stop + engine.stop_strings, request.on_text, request.cancelled)
        self.controller = Controller([self.row], engine.tokenizer, set(engine.stop_ids), request.gen.repetition_guard)
        self.seen = list(request.prompt_ids)  # prompt + answer so far: what the repetition penalty looks at
        self.last = -1                        # the token to feed next step

    def take(self, logits) -> bool:
        """Choose the next token from this row's logits ([1, vocab], float32), as `generate` would; True when the
        row is finished."""
        import torch

        scores = logits
        if self.processors:
            scores = self.processors(torch.tensor([self.seen], device=logits.device), logits)
        if self.request.gen.temperature > 0:
            token = int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=self.generator))
        else:
            token = int(scores.argmax(-1))
        self.seen.append(token)
        self.last = token
        self.controller.feed(self.row, token)
        return self.row.done is not None

    def result(self) -> Result:
        row = self.row
        return Result(row.final_text(), len(self.request.prompt_ids), len(row.ids), row.done, row.ids)


class Decoder:
    """The running batch of one engine. Not thread-safe: one thread calls join() and step()."""

    def __init__(self, engine):
        self.engine = engine
        self.slots: list[_Slot] = []
        self.cache = None   # DynamicCache: one row per slot, all rows as wide as the mask
        self.mask = None    # [rows, columns] long: 1 where a row has a real (not padding) token
        # transformers 5.x renamed forward's `past_key_values` to `cache` (the old name warns until 5.40); a peft
        # model passes it on to its base model's class, whose signature says which it is.
        base = engine.model.get_base_model() if hasattr(engine.model, "get_base_model") else engine.model
        forward = inspect.signature(type(base).forward).parameters
        self.cache_arg = "cache" if "cache" in forward else "past_key_values"

    def __len__(self) -> int:
        return len(self.slots)

    def check(self, request: Request) -> None:
        """Raise MedGPTError for a request that cannot run (before it is prefilled with others)."""
        if not request.prompt_ids:
            raise MedGPTError("an empty prompt cannot be completed: send at least one token of text.")
        self.engine.check_fits(len(request.prompt_ids), request.gen.max_new_tokens)

    def join(self, requests: list[Request]) -> list[tuple[Request, Result]]:
        """Prefill `requests` together (left-padded among themselves), take each one's first token and add the
        unfinished ones to the running batch. Returns those that finished at once (end of turn, a budget of 1)."""
        import torch
        from transformers import DynamicCache

        for r in requests:
            self.check(r)
        device = self.engine.model.device
        ids, mask = self.engine.left_padded([r.prompt_ids for r in requests], device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(ids, mask, positions, cache)
        _plain_layers(cache)
        slots = [self._slot(r) for r in requests]
        alive = [not slot.take(logits[i:i + 1]) for i, slot in enumerate(slots)]
        keep = torch.tensor([i for i, a in enumerate(alive) if a], dtype=torch.long, device=device)
        if len(keep):
            self._append([s for s, a in zip(slots, alive) if a], cache, mask, keep)
        return [(s.request, s.result()) for s, a in zip(slots, alive) if not a]

    def step(self) -> list[tuple[Request, Result]]:
        """One decoding step for every running row; returns the requests that finished, with their results."""
        import torch

        if not self.slots:
            return []
        device = self.mask.device
        ids = torch.tensor([[s.last] for s in self.slots], dtype=torch.long, device=device)
        positions = self.mask.sum(-1, keepdim=True)  # a row's next position: how many real tokens it has
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.slots), 1))], dim=1)
        logits = self._forward(ids, self.mask, positions, self.cache)
        alive = [not slot.take(logits[i:i + 1]) for i, slot in enumerate(self.slots)]
        done = [(s.request, s.result()) for s, a in zip(self.slots, alive) if not a]
        if done:
            self._keep(alive)
        return done

    def clear(self) -> list[Request]:
        """Drop every running row (after a failed step); returns their requests."""
        dropped = [s.request for s in self.slots]
        self.slots, self.cache, self.mask = [], None, None
        return dropped

    # ------------------------------------------------------------------------------------------ internals

    def _forward(self, ids, mask, positions, cache):
        """Logits of each row's last position ([rows, vocab], float32); `cache` grows by ids' columns."""
        import torch

        with self.engine.lock, torch.inference_mode():
            out = self.engine.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                    logits_to_keep=1, **{self.cache_arg: cache})
        return out.logits[:, -1].float()

    def _slot(self, request: Request) -> _Slot:
        """A new row with the logits processors `generate` would build for its settings and prompt."""
        import torch
        from transformers import LogitsProcessorList

        model, gen = self.engine.model, request.gen
        config, _ = model._prepare_generation_config(self.engine.generation_config(gen, gen.max_new_tokens))
        prompt = torch.tensor([request.prompt_ids], device=model.device)
        processors = model._get_logits_processor(generation_config=config, input_ids_seq_length=prompt.shape[1],
                                                 encoder_input_ids=prompt, logits_processor=LogitsProcessorList(),
                                                 device=model.device)
        generator = None  # unseeded sampling draws from torch's global generator, as generate() does
        if gen.temperature > 0 and gen.seed is not None:
            generator = torch.Generator(device=model.device).manual_seed(gen.seed)
        return _Slot(request, self.engine, processors, generator)

    def _append(self, slots: list[_Slot], cache, mask, keep) -> None:
        """Add prefilled rows (`keep` of `cache` and `mask`) to the running batch, left-padding the narrower side."""
        import torch

        mask = mask[keep]
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[keep], layer.values[keep]
        if not self.slots:
            self.slots, self.cache, self.mask = slots, cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        self.mask = torch.cat([_widen(self.mask, width, 1), _widen(mask, width, 1)])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_widen(mine.keys, width, 2), _widen(theirs.keys, width, 2)])
            mine.values = torch.cat([_widen(mine.values, width, 2), _widen(theirs.values, width, 2)])
        self.slots += slots

    def _keep(self, alive: list[bool]) -> None:
        """Drop the finished rows, then the leading columns that are now padding in every row."""
        import torch

        self.slots = [s for s, a in zip(self.slots, alive) if a]
        if not self.slots:
            self.cache = self.mask = None
            return
        keep = torch.tensor([i for i, a in enumerate(alive) if a], dtype=torch.long, device=self.mask.device)
        mask = self.mask[keep]
        cut = int(mask.any(0).long().argmax())  # the first column some row still uses
        self.mask = mask[:, cut:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[keep, :, cut:], layer.values[keep, :, cut:]


def _widen(t, width: int, dim: int):
    """`t` padded with zeros on the left of `dim` to `width`."""
    import torch

    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _plain_layers(cache) -> None:
    """Rows can only be moved between caches of plain key/value layers (not sliding-window or linear-attention
    state): say so instead of decoding wrong."""
    from transformers.cache_utils import DynamicLayer

    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        raise MedGPTError("this model's cache (sliding-window or recurrent layers) cannot be batched continuously: "
                          "serve it with --serve.batching static.")
