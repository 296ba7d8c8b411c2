"""The scheduler on its own (no model): one worker thread, dynamic batching, interleaved streams, bounds."""

from __future__ import annotations

import asyncio
import threading

import pytest

from bsharedrag.serving.scheduler import QueueFull, Scheduler, TooLarge


@pytest.fixture
def scheduler():
    scheduler = Scheduler(capacity=16, max_batch=4)
    scheduler.start()
    yield scheduler
    scheduler.stop(timeout=10)


def _blocked(scheduler: Scheduler) -> threading.Event:
    """Occupy the worker until the returned event is set, so that the next jobs queue up."""
    release, started = threading.Event(), threading.Event()
    scheduler.submit(lambda: (started.set(), release.wait(10)))
    assert started.wait(10)
    return release


def test_every_job_runs_on_the_one_worker_thread(scheduler):
    names = {scheduler.submit(lambda: threading.current_thread().name).result(10) for _ in range(5)}
    assert names == {"bsharedrag-model"}


def test_queued_jobs_with_one_key_run_as_one_batch(scheduler):
    calls = []

    def batch(items):
        calls.append(list(items))
        return [item * 10 for item in items]

    release = _blocked(scheduler)
    futures = [scheduler.submit_batched("search", batch, n) for n in range(6)]
    other = scheduler.submit_batched("other", batch, 99)
    release.set()
    assert [f.result(10) for f in futures] == [0, 10, 20, 30, 40, 50] and other.result(10) == 990
    assert calls == [[0, 1, 2, 3], [99], [4, 5]] or calls == [[0, 1, 2, 3], [4, 5], [99]]  # max_batch=4


def test_a_failing_batch_fails_each_of_its_jobs_and_the_worker_survives(scheduler):
    def broken(items):
        raise ValueError("bad batch")

    release = _blocked(scheduler)
    futures = [scheduler.submit_batched("k", broken, n) for n in range(3)]
    release.set()
    for future in futures:
        with pytest.raises(ValueError, match="bad batch"):
            future.result(10)
    assert scheduler.submit(lambda: "alive").result(10) == "alive"


def test_streams_interleave_with_each_other_and_with_calls(scheduler):
    log = []

    def steps(name, count):
        for i in range(count):
            log.append(f"{name}{i}")
            yield i

    async def consume(name, count):
        return [item async for item in scheduler.stream(lambda: steps(name, count))]

    async def main():
        release = _blocked(scheduler)
        a = asyncio.ensure_future(consume("a", 3))
        b = asyncio.ensure_future(consume("b", 3))
        await asyncio.sleep(0.05)  # both streams are queued behind the blocker
        call = scheduler.submit(lambda: log.append("call"))
        release.set()
        return await a, await b, await asyncio.wrap_future(call)

    a, b, _ = asyncio.run(main())
    assert a == b == [0, 1, 2]
    assert log.index("call") < log.index("a2")  # the call did not wait for the whole stream
    assert log[:4] == ["a0", "b0", "call", "a1"]


def test_a_stream_left_early_is_closed_and_frees_its_slot(scheduler):
    closed = threading.Event()

    def endless():
        try:
            while True:
                yield "tick"
        finally:
            closed.set()

    async def take_two():
        out = []
        async for item in scheduler.stream(endless):
            out.append(item)
            if len(out) == 2:
                break
        return out

    assert asyncio.run(take_two()) == ["tick", "tick"]
    assert closed.wait(10)
    assert scheduler.submit(lambda: scheduler.depth).result(10) == 1  # only this call is admitted now


def test_errors_reach_the_caller(scheduler):
    def broken():
        raise KeyError("nope")
        yield  # pragma: no cover

    with pytest.raises(KeyError):
        scheduler.submit(lambda: {}["nope"]).result(10)

    async def consume():
        return [item async for item in scheduler.stream(broken)]

    with pytest.raises(KeyError):
        asyncio.run(consume())


def test_a_full_queue_refuses_at_once_and_recovers():
    scheduler = Scheduler(capacity=2, max_batch=4)
    scheduler.start()
    try:
        release = _blocked(scheduler)
        queued = scheduler.submit(lambda: "queued")
        with pytest.raises(QueueFull, match="queue_size=2"):
            scheduler.submit(lambda: "refused")
        release.set()
        assert queued.result(10) == "queued"
        assert scheduler.submit(lambda: "after").result(10) == "after"
    finally:
        scheduler.stop(timeout=10)


def test_stop_finishes_admitted_jobs_then_refuses_new_ones():
    scheduler = Scheduler(capacity=8)
    scheduler.start()
    release = _blocked(scheduler)
    pending = [scheduler.submit(lambda n=n: n) for n in range(3)]
    release.set()
    scheduler.stop(timeout=10)
    assert [f.result(0) for f in pending] == [0, 1, 2]
    with pytest.raises(QueueFull, match="shutting down"):
        scheduler.submit(lambda: None)


@pytest.mark.parametrize(("capacity", "max_batch"), [(0, 1), (1, 0)])
def test_bad_sizes_are_refused(capacity, max_batch):
    with pytest.raises(ValueError, match="must be positive"):
        Scheduler(capacity, max_batch)


def test_one_failing_item_fails_only_its_own_job(scheduler):
    calls = []

    def batch(items):
        calls.append(list(items))
        if "bad" in items:
            raise ValueError("cannot embed 'bad'")
        return [item.upper() for item in items]

    release = _blocked(scheduler)
    futures = [scheduler.submit_batched("k", batch, item) for item in ("a", "bad", "c", "d")]
    release.set()
    assert [futures[i].result(10) for i in (0, 2, 3)] == ["A", "C", "D"]
    with pytest.raises(ValueError, match="cannot embed 'bad'"):
        futures[1].result(10)
    assert calls[0] == ["a", "bad", "c", "d"] and sorted(map(tuple, calls[1:])) == [("a",), ("bad",), ("c",), ("d",)]


def test_streams_over_the_memory_budget_wait_for_running_ones_and_one_too_large_is_refused():
    from bsharedrag.serving.metrics import Metrics

    metrics = Metrics()
    scheduler = Scheduler(capacity=16, max_batch=4, metrics=metrics, memory_budget=100)
    scheduler.start()
    running, peak = [], []

    def answer(name):
        def steps():
            running.append(name)
            peak.append(scheduler.reserved)
            try:
                for _ in range(3):
                    yield name
            finally:
                running.remove(name)
        return steps

    async def ask(name):
        return [item async for item in scheduler.stream(answer(name), reserve=40)]

    async def main():
        return await asyncio.gather(*(ask(name) for name in "abcde"))

    try:
        assert asyncio.run(main()) == [[name] * 3 for name in "abcde"]
        assert max(peak) <= 80  # never more than two answers of 40 within 100
        assert scheduler.reserved == 0
        waits = metrics.registry.get_sample_value("bsharedrag_queue_wait_seconds_count")
        assert waits == 5  # each answer's wait counted once, however many turns it waited for memory

        async def too_large():
            return [item async for item in scheduler.stream(answer("x"), reserve=101)]

        with pytest.raises(TooLarge, match="serve.kv_cache_mib"):
            asyncio.run(too_large())
    finally:
        scheduler.stop(timeout=10)
