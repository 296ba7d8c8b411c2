"""One worker thread owns the model; every request that runs it is a job in one bounded queue.

Why one thread: the retriever and the generator are two LoRA adapters on one set of weights, and
the active adapter is global state of that one model. Two threads running forward passes at once
would switch it under each other (a search embedding with the generator's LoRA, an answer decoded
with the retriever's). One owner thread makes that impossible by construction, with no lock held
across a forward pass.

Three kinds of job:
- `call`: a function run once (embeddings, document upserts).
- `batched`: items that share a key are run together; the worker takes the queued jobs with the same
  key in one go (dynamic batching), e.g. up to `max_batch` searches embedded in one forward pass.
  When a batch raises, its items are run again one by one, so an item that fails fails only its
  own request, never its neighbours in the batch.
- `stream`: an iterator (answer generation). The worker advances it by one chunk, then puts it at the
  back of the queue, so searches and other answers interleave with a long answer instead of waiting
  for it. `stream_tokens` enters the adapter per forward pass, never across a `yield`, which is what
  makes this interleaving safe. Answers streaming at once are decoded together: the first of them
  whose next chunk is not ready runs one batched decode step for all (`model.generate.DecodeBatch`),
  the others find their chunks ready, so one round of the queue costs one forward pass.

A stream may reserve memory (`reserve`, the KV cache an answer can grow to). The reserved total stays
within `memory_budget`: a stream that does not fit waits in the queue, untouched, until running
answers finish; one that could never fit is refused at submission (`TooLarge`).

The queue admits at most `capacity` jobs (queued or streaming); past that `submit` raises
`QueueFull` at once, which the API turns into 503 with Retry-After instead of an unbounded backlog.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["QueueFull", "Scheduler", "TooLarge"]

log = logging.getLogger(__name__)
_DONE = object()


class QueueFull(RuntimeError):
    """The scheduler already holds `capacity` jobs."""


class TooLarge(ValueError):
    """A stream reserves more memory than the scheduler's whole budget."""


@dataclass
class _Job:
    kind: str  # "call" | "batched" | "stream"
    fn: Callable
    item: Any = None
    key: str | None = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    iterator: Iterator | None = None
    emit: Callable[[Any], None] | None = None  # stream jobs: thread-safe hand-over of each chunk
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)
    reserve: int = 0  # stream jobs: bytes held from their first step to their end
    holding: bool = False


class Scheduler:
    """A bounded job queue served by one worker thread that owns the model."""

    def __init__(self, capacity: int = 256, max_batch: int = 32, metrics=None, memory_budget: int | None = None):
        if capacity <= 0 or max_batch <= 0:
            raise ValueError(f"capacity and max_batch must be positive, got {capacity} and {max_batch}")
        self.capacity = capacity
        self.max_batch = max_batch
        self.metrics = metrics
        self.memory_budget = memory_budget  # None: unbounded
        self.reserved = 0  # bytes held by running streams (only the worker changes it)
        self._queue: collections.deque[_Job] = collections.deque()
        self._admitted = 0  # queued + streaming jobs; streams re-queued after a step are not re-admitted
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._work, name="bsharedrag-model", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the jobs already admitted, then stop the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def depth(self) -> int:
        return self._admitted

    # --- submitting ------------------------------------------------------------------------

    def _admit(self, job: _Job) -> _Job:
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if self._admitted >= self.capacity:
                raise QueueFull(f"{self._admitted} model jobs are already queued (serve.queue_size={self.capacity})")
            self._admitted += 1
            self._queue.append(job)
            self._report_gauges()
            self._cond.notify()
        return job

    def submit(self, fn: Callable, *args, **kwargs) -> concurrent.futures.Future:
        """Run `fn(*args, **kwargs)` on the worker; raises QueueFull when the queue is full."""
        return self._admit(_Job("call", lambda: fn(*args, **kwargs))).future

    def submit_batched(self, key: str, batch_fn: Callable[[list], list], item: Any) -> concurrent.futures.Future:
        """Queue `item`; queued items with the same `key` go through `batch_fn(items) -> results` together."""
        return self._admit(_Job("batched", batch_fn, item=item, key=key)).future

    async def run(self, fn: Callable, *args, **kwargs) -> Any:
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    async def run_batched(self, key: str, batch_fn: Callable[[list], list], item: Any) -> Any:
        return await asyncio.wrap_future(self.submit_batched(key, batch_fn, item))

    async def stream(self, factory: Callable[[], Iterator], reserve: int = 0) -> AsyncIterator:
        """Items of the iterator `factory()` (created and advanced on the worker), as they come.

        Raises QueueFull before the first item when the queue is full, TooLarge when `reserve` bytes
        exceed the memory budget. Leaving the loop early (a client that disconnects) cancels the job:
        the worker closes the iterator at its next turn.
        """
        if self.memory_budget is not None and reserve > self.memory_budget:
            raise TooLarge(f"this answer may need {reserve / 2**20:.1f} MiB of KV cache, more than the server's "
                           f"budget of {self.memory_budget / 2**20:.1f} MiB (serve.kv_cache_mib): ask for fewer tokens")
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        emit = lambda item: loop.call_soon_threadsafe(inbox.put_nowait, item)  # noqa: E731
        job = self._admit(_Job("stream", factory, emit=emit, reserve=reserve))
        try:
            while True:
                item = await inbox.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.cancelled.set()

    # --- the worker ------------------------------------------------------------------------

    def _report_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._admitted)
            self.metrics.kv_reserved.set(self.reserved)

    def _next_jobs(self) -> list[_Job] | None:
        """The next job, or a run of queued batched jobs sharing its key; None once stopping and empty."""
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            jobs = [first]
            if first.kind == "batched":
                rest = collections.deque()
                while self._queue and len(jobs) < self.max_batch:
                    job = self._queue.popleft()
                    (jobs if job.kind == "batched" and job.key == first.key else rest).append(job)
                self._queue.extendleft(reversed(rest))
            return jobs

    def _release(self, count: int) -> None:
        with self._cond:
            self._admitted -= count
            self._report_gauges()

    def _requeue(self, job: _Job) -> None:
        with self._cond:
            self._queue.append(job)

    def _work(self) -> None:
        while (jobs := self._next_jobs()) is not None:
            if not self._holds_memory(jobs[0]):
                self._requeue(jobs[0])  # waits, not yet started, for running answers to free their memory
                continue
            if self.metrics is not None and jobs[0].iterator is None:
                now = time.perf_counter()
                for job in jobs:
                    self.metrics.queue_wait.observe(now - job.queued_at)
            try:
                if jobs[0].kind == "stream":
                    self._step(jobs[0])
                elif jobs[0].kind == "batched":
                    self._run_batch(jobs)
                else:
                    self._run_call(jobs[0])
            except BaseException:  # noqa: BLE001 - the worker must survive any job
                log.exception("model job failed")

    def _run_call(self, job: _Job) -> None:
        if job.future.set_running_or_notify_cancel():
            try:
                job.future.set_result(job.fn())
            except Exception as error:  # noqa: BLE001 - handed to the awaiting request
                job.future.set_exception(error)
        self._release(1)

    def _run_batch(self, jobs: list[_Job]) -> None:
        live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        try:
            if live:
                if self.metrics is not None:
                    self.metrics.batch_size.observe(len(live))
                self._settle(jobs[0].fn, live)
        finally:
            self._release(len(jobs))

    @staticmethod
    def _settle(batch_fn: Callable[[list], list], jobs: list[_Job]) -> None:
        """Run `jobs` as one batch; if it fails, run each alone, so one bad item fails only its own request."""
        try:
            results = batch_fn([job.item for job in jobs])
        except Exception as error:  # noqa: BLE001 - handed to the awaiting request(s)
            if len(jobs) == 1:
                jobs[0].future.set_exception(error)
                return
            log.warning("a batch of %d failed (%s); running its items one by one", len(jobs), error)
            for job in jobs:
                Scheduler._settle(batch_fn, [job])
            return
        for job, result in zip(jobs, results, strict=True):
            job.future.set_result(result)

    def _step(self, job: _Job) -> None:
        """Advance a stream by one item; re-queue it unless it is finished, failed or cancelled."""
        if job.cancelled.is_set():
            self._finish_stream(job, None)
            return
        try:
            if job.iterator is None:
                job.iterator = iter(job.fn())
            item = next(job.iterator)
        except StopIteration:
            self._finish_stream(job, _DONE)
        except Exception as error:  # noqa: BLE001 - handed to the streaming request
            self._finish_stream(job, error)
        else:
            self._emit(job, item)
            self._requeue(job)

    def _holds_memory(self, job: _Job) -> bool:
        """Whether `job` may run: it reserves nothing, already holds its memory, or gets it now.

        A cancelled job may always run, so that `_step` finishes it."""
        if job.holding or not job.reserve or job.cancelled.is_set():
            return True
        if self.memory_budget is not None and self.reserved + job.reserve > self.memory_budget:
            return False
        self.reserved += job.reserve
        job.holding = True
        self._report_gauges()
        return True

    def _finish_stream(self, job: _Job, last: Any) -> None:
        if job.iterator is not None and hasattr(job.iterator, "close"):
            job.iterator.close()
        if job.holding:
            self.reserved -= job.reserve
            job.holding = False
        if last is not None:
            self._emit(job, last)
        self._release(1)

    @staticmethod
    def _emit(job: _Job, item: Any) -> None:
        try:
            job.emit(item)
        except RuntimeError:  # the request's event loop is gone: nobody is listening any more
            job.cancelled.set()
