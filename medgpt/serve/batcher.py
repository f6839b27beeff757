"""Request batching for `medgpt serve`: concurrent requests share the model's forward passes.

    batcher = ContinuousBatcher(engine, max_batch_size=8, wait_ms=5); batcher.start()   # or Batcher: static
    job = Job(prompt_ids, gen, stop=[], stream=True, loop=asyncio.get_running_loop())
    batcher.submit(job)
    kind, payload = await job.events.get()     # ("text", delta)... then ("done", Result) or ("error", exc)

Both run the model on one worker thread (never the event loop) and drop unrun a job whose client went away
before its turn; --serve.batching picks one.

ContinuousBatcher (the default) keeps one running batch (medgpt/infer/continuous.py): between decoding steps,
queued jobs join it (up to `max_batch_size` rows) and finished or cancelled ones leave it, so a short answer never
waits for a long one. Jobs of any settings share the batch (each row samples with its own settings, a seeded one
from its own generator), and a greedy answer is the one the job would get alone. When the model is idle, the
first job waits up to `wait_ms` for others so they are prefilled in one pass.

Batcher (static) takes the oldest queued job, then gathers more for at most `wait_ms` (up to `max_batch_size`)
and runs them as one left-padded `engine.generate` call: each row keeps its own token budget, streaming callback
and cancel flag (the engine stops rows independently), but the batch ends only when its longest row does. Only
jobs that decode alike share a batch: the same sampling settings and stop strings (the engine takes one of each
per call), and a combined length (longest prompt + largest budget) that fits the model's context. Jobs that do
not fit wait for the next batch, ahead of newer ones. Sampling with a seed runs alone, so a seeded request gets
the same answer whether or not others arrive at the same time.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from medgpt.args import GenArgs
from medgpt.infer.continuous import Decoder, Request
from medgpt.utils import MedGPTError

_STOP = object()  # put on the queue to end the worker


@dataclass(eq=False)
class Job:
    prompt_ids: list[int]
    gen: GenArgs                     # the request's settings; gen.max_new_tokens is its budget
    stop: list[str]
    stream: bool                     # send ("text", delta) events as tokens are decoded
    loop: asyncio.AbstractEventLoop  # events are delivered on this loop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)  # set when the client goes away

    def key(self) -> tuple:
        """Jobs with equal keys can share one generate call. Greedy ignores top_p, top_k and the seed."""
        g = self.gen
        sampled = (g.temperature, g.top_p, g.top_k, g.seed) if g.temperature > 0 else (0.0,)
        return sampled + (g.repetition_penalty, g.repetition_guard, tuple(self.stop))

    @property
    def alone(self) -> bool:
        return self.gen.temperature > 0 and self.gen.seed is not None

    def emit(self, kind: str, payload) -> None:
        """Hand an event to the request's coroutine (called from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass


class Batcher:
    def __init__(self, engine, max_batch_size: int = 8, wait_ms: float = 5.0):
        if max_batch_size < 1:
            raise MedGPTError(f"serve.max_batch_size must be at least 1 (1 turns batching off), not {max_batch_size}.")
        self.engine, self.max_batch_size, self.wait = engine, max_batch_size, max(0.0, wait_ms) / 1000
        self.queue: queue.Queue = queue.Queue()
        self.pending: deque[Job] = deque()  # taken from the queue but left out of a batch: first in line next
        self.thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._work, name="medgpt-batcher", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.queue.put(_STOP)
        if self.thread is not None:
            self.thread.join(timeout)

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    def waiting(self) -> int:
        """Jobs not yet in a batch (approximate: read while the worker may be taking one)."""
        return self.queue.qsize() + len(self.pending)

    # ------------------------------------------------------------------------------------ worker thread

    def _fits(self, batch: list[Job], job: Job) -> bool:
        if job.key() != batch[0].key() or job.alone:
            return False
        longest = max(len(j.prompt_ids) for j in batch + [job])
        budget = max(j.gen.max_new_tokens for j in batch + [job])
        return longest + budget <= self.engine.max_context

    def next_batch(self) -> Optional[list[Job]]:
        """The next jobs to run together (blocks until there is one); None when the batcher is stopped."""
        while True:
            first = self.pending.popleft() if self.pending else self.queue.get()
            if first is _STOP:
                return None
            if not first.cancel.is_set():
                break
        batch = [first]
        if first.alone:
            return batch
        left = deque()
        for job in self.pending:
            if job.cancel.is_set():
                continue
            (batch if len(batch) < self.max_batch_size and self._fits(batch, job) else left).append(job)
        self.pending = left
        deadline = time.monotonic() + self.wait
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:  # past the deadline, still take what is already queued: it arrived while the model was busy
                job = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                self.queue.put(_STOP)  # seen again after this batch
                break
            if not job.cancel.is_set():
                (batch if self._fits(batch, job) else self.pending).append(job)
        return batch

    def run_batch(self, batch: list[Job]) -> None:
        def streamer(job: Job):
            return (lambda delta: job.emit("text", delta)) if job.stream else None

        try:
            results = self.engine.generate(
                [j.prompt_ids for j in batch], batch[0].gen, stop=batch[0].stop,
                budgets=[j.gen.max_new_tokens for j in batch], on_text=[streamer(j) for j in batch],
                cancelled=[j.cancel.is_set for j in batch])
        except Exception as e:  # every row of the batch fails with it; the server keeps running
            for job in batch:
                job.emit("error", e)
            return
        for job, result in zip(batch, results):
            job.emit("done", result)

    def _work(self) -> None:
        while (batch := self.next_batch()) is not None:
            self.run_batch(batch)


class ContinuousBatcher(Batcher):
    """Continuous batching: jobs join and leave the running batch between decoding steps (see the module doc)."""

    def __init__(self, engine, max_batch_size: int = 8, wait_ms: float = 5.0):
        super().__init__(engine, max_batch_size, wait_ms)
        self.decoder = Decoder(engine)
        self.running: dict[Request, Job] = {}

    def admit(self) -> Optional[list[Job]]:
        """Jobs to add to the running batch now (blocks while nothing runs); None when the batcher is stopped."""
        room = self.max_batch_size - len(self.running)
        jobs: list[Job] = []
        deadline = None
        while len(jobs) < room:
            try:
                if not self.running and not jobs:
                    job = self.queue.get()  # idle: wait for work
                    deadline = time.monotonic() + self.wait
                elif deadline is not None and (remaining := deadline - time.monotonic()) > 0:
                    job = self.queue.get(timeout=remaining)  # let others arriving now share the prefill
                else:
                    job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                return None
            if not job.cancel.is_set():
                jobs.append(job)
        return jobs

    def join(self, jobs: list[Job]) -> None:
        ready = []
        for job in jobs:
            request = Request(job.prompt_ids, job.gen, job.stop, cancelled=job.cancel.is_set,
                              on_text=(lambda delta, j=job: j.emit("text", delta)) if job.stream else None)
            try:
                self.decoder.check(request)  # a job that cannot run fails alone
            except MedGPTError as e:
                job.emit("error", e)
                continue
            self.running[request] = job
            ready.append(request)
        if ready:
            self.finish(self.decoder.join(ready))

    def finish(self, done: list) -> None:
        for request, result in done:
            self.running.pop(request).emit("done", result)

    def _work(self) -> None:
        while (jobs := self.admit()) is not None:
            try:
                if jobs:
                    self.join(jobs)
                self.finish(self.decoder.step())
            except Exception as e:  # every running row fails with it; the server keeps running
                self.decoder.clear()
                for job in self.running.values():
                    job.emit("error", e)
                self.running.clear()
        for job in self.running.values():  # stopped: nobody will finish these
            job.emit("error", MedGPTError("the server is shutting down."))


def make_batcher(engine, batching: str, max_batch_size: int, wait_ms: float) -> Batcher:
    """The batcher --serve.batching names: "continuous" or "static"."""
    cls = {"continuous": ContinuousBatcher, "static": Batcher}[batching]
    return cls(engine, max_batch_size, wait_ms)
