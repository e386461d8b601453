"""The server's generation worker: one thread owns the model and its GenerationEngine
(model/engine.py: torch, or another chosen by `--engine`). Requests wait in a bounded queue.

With an engine that offers continuous batching (the torch engine on the fast decoder), every
request, streamed or not, is a row of a decode batch (model/batching.py): it joins between two
decode steps as soon as there is room (`max_batch` rows in all), shares every step with the
others of the same adapters, and leaves when it ends; batches of different adapters (tenants)
are stepped in turn, one step each. A cancelled stream leaves at the next step.

Otherwise (another engine, or `continuous=False`) concurrent non-streaming requests with the
same adapters and sampling parameters are decoded together in one `generate` call, and
streaming requests run one at a time, cancellably.

Each job may carry `then`, a function run on the worker right after generation (the server
stores the answer there), so an answer is stored even if its client has gone away.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from onthejob.model import Completion, LoadedModel, SamplingParams
from onthejob.model.engine import GenerationEngine, TorchEngine

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """Too many requests are waiting; the caller should retry later."""


@dataclass
class _Job:
    prompt: list[int]
    params: SamplingParams
    adapters: tuple[str, ...]
    then: Callable[[Completion], Any] | None
    on_piece: Callable[[str], None] | None = None
    cancel: threading.Event | None = None
    future: Future = field(default_factory=Future)

    @property
    def streaming(self) -> bool:
        return self.on_piece is not None

    def batch_key(self) -> tuple:
        p = self.params
        return (self.adapters, p.max_tokens, p.temperature, p.top_p, tuple(p.stop), p.seed,
                p.top_logprobs)


class Engine:
    """Serializes all use of one model. `lock` is held while the model runs; hold it too if
    you touch the model (e.g. switch adapters) outside the engine."""

    def __init__(self, lm: LoadedModel, *, max_batch: int = 8, max_queue: int = 64,
                 backend: GenerationEngine | None = None, continuous: bool | None = None) -> None:
        self.lm = lm
        self.backend = backend or TorchEngine(lm)
        can = getattr(self.backend, "can_batch", None)
        available = bool(can and can())
        if continuous and not available:
            raise ValueError(f"the {self.backend.name} engine cannot batch continuously here")
        self.continuous = available if continuous is None else continuous
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.lock = threading.RLock()
        self._jobs: deque[_Job] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self.batches_run = 0  # for tests and metrics: generate calls, or decode steps
        self.widest = 0  # the most rows one decode step (or generate call) has served
        loop = self._loop_continuous if self.continuous else self._loop
        self._thread = threading.Thread(target=loop, name="onthejob-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt: Sequence[int], params: SamplingParams,
               adapters: Sequence[str] = (), then: Callable[[Completion], Any] | None = None
               ) -> Future:
        """Queue a completion; the future's result is `then(completion)`, or the completion."""
        return self._put(_Job(list(prompt), params, tuple(adapters), then))

    def submit_stream(self, prompt: Sequence[int], params: SamplingParams,
                      adapters: Sequence[str], on_piece: Callable[[str], None],
                      cancel: threading.Event,
                      then: Callable[[Completion], Any] | None = None) -> Future:
        """Queue a streamed completion: `on_piece` gets each text piece on the worker thread.
        Setting `cancel` stops it; the completion then has finish_reason 'cancelled'."""
        return self._put(_Job(list(prompt), params, tuple(adapters), then, on_piece, cancel))

    def complete(self, prompt: Sequence[int], params: SamplingParams,
                 adapters: Sequence[str] = ()) -> Completion:
        return self.submit(prompt, params, adapters).result()

    @property
    def queued(self) -> int:
        """Requests waiting for the model (not counting the batch running now)."""
        with self._cv:
            return len(self._jobs)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    def _put(self, job: _Job) -> Future:
        params = job.params
        params.validate()
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if len(self._jobs) >= self.max_queue:
                raise Overloaded(f"{len(self._jobs)} requests are waiting; retry shortly")
            self._jobs.append(job)
            self._cv.notify()
        return job.future

    def _take(self) -> list[_Job] | None:
        with self._cv:
            while not self._jobs and not self._closed:
                self._cv.wait()
            if not self._jobs:
                return None
            first = self._jobs.popleft()
            batch = [first]
            if not first.streaming:
                key = first.batch_key()
                for job in list(self._jobs):
                    if len(batch) >= self.max_batch:
                        break
                    if not job.streaming and job.batch_key() == key:
                        self._jobs.remove(job)
                        batch.append(job)
            return batch

    # -- continuous batching -----------------------------------------------------------------
    def _admit(self, active: int, wait: bool) -> list[_Job] | None:
        """Jobs to seat now (up to the free rows); None when closed with nothing left."""
        with self._cv:
            while wait and not self._jobs and not self._closed:
                self._cv.wait()
            if self._closed and not self._jobs and not active:
                return None
            room = max(0, self.max_batch - active)
            return [self._jobs.popleft() for _ in range(min(room, len(self._jobs)))]

    def _loop_continuous(self) -> None:
        batches: dict[tuple[str, ...], Any] = {}  # adapters -> DecodeBatch
        while True:
            active = sum(len(b) for b in batches.values())
            jobs = self._admit(active, wait=not active)
            if jobs is None:
                return
            for job in jobs:
                if not job.future.set_running_or_notify_cancel():
                    continue
                try:
                    with self.lock:
                        batch = batches.get(job.adapters)
                        if batch is None:
                            batch = batches[job.adapters] = self.backend.open_batch(job.adapters)
                        batch.add(job.prompt, job.params, job)
                except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                    if not isinstance(exc, ValueError):
                        log.exception("starting a generation failed")
                    job.future.set_exception(exc)
            for key, batch in list(batches.items()):
                if not len(batch):
                    del batches[key]
                    continue
                try:
                    with self.lock:
                        rows = len(batch)
                        events = batch.step()
                        self.batches_run += 1
                        self.widest = max(self.widest, rows)
                except Exception as exc:  # noqa: BLE001 - every row of the batch gets the error
                    log.exception("generation failed")
                    for row in batch.rows:
                        row.tag.future.set_exception(exc)
                    del batches[key]
                    continue
                for event in events:
                    job = event.tag
                    if event.piece and job.on_piece is not None:
                        job.on_piece(event.piece)
                    if event.completion is not None:
                        self._finish(job, event.completion)
                    elif job.cancel is not None and job.cancel.is_set():
                        self._finish(job, batch.drop(job))

    @staticmethod
    def _finish(job: _Job, completion: Completion) -> None:
        try:
            result = job.then(completion) if job.then else completion
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            log.exception("storing a completion failed")
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)

    # -- one generate call per batch ---------------------------------------------------------
    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            live = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                with self.lock:
                    if live[0].streaming:
                        completions = [self._stream(live[0])]
                    else:
                        completions = self.backend.generate([j.prompt for j in live],
                                                            live[0].params, live[0].adapters)
                    self.batches_run += 1
                    self.widest = max(self.widest, len(live))
            except Exception as exc:  # noqa: BLE001 - every waiting caller gets the error
                log.exception("generation failed")
                for job in live:
                    job.future.set_exception(exc)
                continue
            for job, completion in zip(live, completions, strict=True):
                self._finish(job, completion)

    def _stream(self, job: _Job) -> Completion:
        text = []
        for item in self.backend.stream(job.prompt, job.params, job.adapters):
            if isinstance(item, Completion):
                return item
            text.append(item)
            job.on_piece(item)
            if job.cancel is not None and job.cancel.is_set():
                break
        return Completion(job.prompt, [], [], "".join(text), "cancelled")
