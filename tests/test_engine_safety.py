"""The async engine under attack: no caller hangs, errors are vectordb's, counts are exact,
and concurrent callers with different filters each get their own answer.

Every wait on the engine goes through :func:`within`, a hang guard: a hang fails the test
in seconds instead of stalling the suite.
"""

from __future__ import annotations

import asyncio
import threading
import types
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest

import vectordb as vdb

K = 10
GUARD = 10.0
pytestmark = pytest.mark.asyncio


async def within(awaitable: Awaitable[Any], seconds: float = GUARD) -> Any:
    """Hang guard: the awaitable's result, or a test failure after ``seconds``."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait([task], timeout=seconds)
    if not done:
        task.cancel()
        pytest.fail(f"hang: no answer within {seconds} s")
    return task.result()


def meta(i: int) -> dict[str, Any]:
    return {"group": i % 5, "tag": "ab"[i % 2], "score": float(i % 17)}


@pytest.fixture(scope="module")
def data():
    x = vdb.make_clustered(2_200, 32, seed=5)
    return x[:2_000], x[2_000:]


@pytest.fixture(scope="module")
def index(data):
    return vdb.ClusteredIndex.build(
        data[0], metadata=[meta(i) for i in range(len(data[0]))], max_leaf_size=100
    )


def small_index(data) -> vdb.ClusteredIndex:
    """A fresh index of 400 vectors with metadata, for tests that write."""
    x = data[0][:400]
    return vdb.ClusteredIndex.build(x, metadata=[meta(i) for i in range(400)], max_leaf_size=50)


class Gate:
    """Spy on an engine's batch jobs (one call per group); optionally hold them in the
    executor until released (every query goes there: none runs on the loop)."""

    def __init__(self, engine: vdb.AsyncEngine, *, hold: bool = False):
        engine._inline = False
        self.batches: list[int] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()
        real = engine._run_batch

        def run(queries, key):
            self.batches.append(len(queries))
            self.started.set()
            self.release.wait(GUARD)
            return real(queries, key)

        engine._run_batch = run  # type: ignore[method-assign]

    async def wait_started(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.started.wait, GUARD)


def assert_engine_error(result: Any) -> None:
    """``result`` (from ``gather(return_exceptions=True)``) is an answer, a cancellation,
    a timeout, or a ``VectorDBError``: never another exception."""
    if isinstance(result, BaseException):
        assert isinstance(
            result, (asyncio.CancelledError, asyncio.TimeoutError, vdb.VectorDBError)
        ), repr(result)


# ------------------------------------------------------------------ overload="wait" (item 6)


async def test_a_caller_waiting_for_room_is_served_when_the_queue_ahead_is_cancelled(index, data):
    q = data[1]
    async with vdb.AsyncEngine(index, max_workers=1, max_pending=2, overload="wait") as engine:
        gate = Gate(engine, hold=True)
        running = asyncio.ensure_future(engine.search(q[0], K))
        await gate.wait_started()
        queued = [asyncio.ensure_future(engine.search(x, K)) for x in q[1:3]]
        waiting = asyncio.ensure_future(engine.search(q[3], K))
        await asyncio.sleep(0.02)
        assert not waiting.done() and engine.stats().queue_depth == 2
        for task in queued:
            task.cancel()
        await asyncio.gather(*queued, return_exceptions=True)
        gate.release.set()
        ids, _ = await within(waiting)
        await within(running)
        np.testing.assert_array_equal(ids, index.search(q[3], K)[0])
        assert gate.batches == [1, 1]  # the cancelled ones never ran
        assert engine.stats().queue_depth == 0


async def test_cancelled_queued_callers_give_their_room_back_at_once(index, data):
    q = data[1]
    async with vdb.AsyncEngine(index, max_workers=1, max_pending=100, overload="wait") as engine:
        gate = Gate(engine, hold=True)
        running = asyncio.ensure_future(engine.search(q[0], K))
        await gate.wait_started()
        queued = [asyncio.ensure_future(engine.search(q[i % 100], K)) for i in range(100)]
        waiting = [asyncio.ensure_future(engine.search(q[i], K)) for i in range(60)]
        await asyncio.sleep(0.02)
        assert engine.stats().queue_depth == 100 and not any(t.done() for t in waiting)
        for task in queued[:90]:  # enough to sweep the dropped ones out of the queue
            task.cancel()
        await asyncio.gather(*queued[:90], return_exceptions=True)
        await asyncio.sleep(0.02)
        # The worker is still busy, yet the waiters took the room given back.
        assert engine.stats().queue_depth == 10 + 60
        gate.release.set()
        got = await within(asyncio.gather(*waiting, *queued[90:], running))
        for i, (ids, _) in enumerate(got[:60]):
            np.testing.assert_array_equal(ids, index.search(q[i], K)[0])
        stats = engine.stats()
        assert stats.cancelled == 90 and stats.queries == 71 and stats.queue_depth == 0


# ------------------------------------------------------------------ racing aclose (item 12)


async def test_a_write_waiting_for_the_write_lock_completes_when_aclose_starts(data):
    index = small_index(data)
    engine = vdb.AsyncEngine(index)
    release = threading.Event()
    real_add = index.add

    def slow_add(*args, **kwargs):
        release.wait(GUARD)
        return real_add(*args, **kwargs)

    index.add = slow_add  # type: ignore[method-assign]
    first = asyncio.ensure_future(engine.add(data[1][:1], ids=[10_000]))
    await asyncio.sleep(0.02)  # `first` holds the write lock and runs on the executor
    second = asyncio.ensure_future(engine.add(data[1][1:2], ids=[10_001]))
    third = asyncio.ensure_future(engine.delete([0]))
    await asyncio.sleep(0.02)
    closing = asyncio.ensure_future(engine.aclose())
    await asyncio.sleep(0.02)
    assert engine.state is vdb.EngineState.CLOSING
    with pytest.raises(vdb.EngineClosedError):
        await engine.add(data[1][2:3], ids=[10_002])
    release.set()
    results = await within(asyncio.gather(first, second, third, closing, return_exceptions=True))
    assert not any(isinstance(r, BaseException) for r in results), results
    assert engine.state is vdb.EngineState.CLOSED
    assert 10_000 in index and 10_001 in index and 0 not in index


def _racing_calls(engine: vdb.AsyncEngine, data) -> dict[str, Callable[[], Awaitable[Any]]]:
    q = data[1]
    return {
        "search": lambda: engine.search(q[0], K),
        "search_batch": lambda: engine.search_batch(q[:8], K),
        "filtered": lambda: engine.search(q[1], K, filter={"group": 1}),
        "add": lambda: engine.add(q[:2]),
        "upsert": lambda: engine.upsert(q[2:4], ids=[1, 2]),
        "delete": lambda: engine.delete([7], missing_ok=True),
        "compact": lambda: engine.compact(),
        "get_vectors": lambda: engine.get_vectors([3, 4]),
        "get_metadata": lambda: engine.get_metadata(5),
        "ids_matching": lambda: engine.ids_matching({"group": 2}),
        "run": lambda: engine.run(len, engine.index),
        "warm": lambda: engine.warm(),
        "stats": lambda: asyncio.sleep(0, engine.stats()),
    }


@pytest.mark.parametrize("steps", [0, 1, 2, 3, 5, 8, 13])
async def test_every_call_racing_aclose_completes_or_raises_engine_closed(data, tmp_path, steps):
    small_index(data).save(tmp_path / "idx")
    engine = await vdb.AsyncEngine.open(tmp_path / "idx", mmap=True)
    await engine.search(data[1][0], K)  # the batcher exists: searches queue behind aclose
    calls = _racing_calls(engine, data)
    tasks = {name: asyncio.ensure_future(call()) for name, call in calls.items()}
    for _ in range(steps):
        await asyncio.sleep(0)
    closers = [asyncio.ensure_future(engine.aclose()), asyncio.ensure_future(engine.aclose())]
    results = await within(asyncio.gather(*tasks.values(), *closers, return_exceptions=True))
    for name, result in zip([*tasks, "aclose", "aclose"], results, strict=True):
        assert not isinstance(result, BaseException) or isinstance(result, vdb.EngineClosedError), (
            name,
            repr(result),
        )
    assert engine.state is vdb.EngineState.CLOSED
    await within(engine.aclose())


# ------------------------------------------------------------------ stats (item 13)


async def test_stats_count_every_cancelled_or_timed_out_caller_exactly_once(index, data):
    q = data[1]
    rows: list[int] = []
    tasks: list[asyncio.Future[Any]] = []

    def call(aw: Awaitable[Any], n: int = 1) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(aw)
        tasks.append(task)
        rows.append(n)
        return task

    async with vdb.AsyncEngine(
        index, max_workers=1, max_pending=100, overload="wait", max_wait=0.01
    ) as engine:
        gate = Gate(engine, hold=True)
        running = call(engine.search(q[0], K))
        await gate.wait_started()
        queued = [call(engine.search(q[i % 200], K)) for i in range(80)]
        queued += [call(engine.search(q[i], K, timeout=0.01)) for i in range(15)]
        queued.append(call(engine.search_batch(q[:5], K), 5))
        waiting = [call(engine.search(q[i % 200], K)) for i in range(300)]
        waiting += [call(engine.search(q[i], K, timeout=0.01)) for i in range(40)]
        waiting.append(call(engine.search_batch(q[:7], K, timeout=0.01), 7))
        await asyncio.sleep(0.05)  # the timeouts fire while the worker is held
        running.cancel()  # in flight
        for task in queued[:80:2] + waiting[:300:3]:
            task.cancel()
        gate.release.set()
        results = await within(asyncio.gather(*tasks, return_exceptions=True))
        stats = engine.stats()
    for result in results:
        assert_engine_error(result)
    gone = sum(
        n
        for n, r in zip(rows, results, strict=True)
        if isinstance(r, (asyncio.CancelledError, asyncio.TimeoutError))
    )
    answered = sum(
        n for n, r in zip(rows, results, strict=True) if not isinstance(r, BaseException)
    )
    assert gone >= 1 + 40 + 15 + 100 + 40 + 7  # every cancel and timeout above took effect
    assert stats.cancelled == gone
    assert stats.queries == answered
    assert stats.failed == 0
    assert stats.queries + stats.cancelled + stats.failed == sum(rows)
    assert stats.queue_depth == 0 and stats.in_flight == 0


async def test_a_timeout_of_zero_times_out_and_is_counted(index, data):
    async with vdb.AsyncEngine(index) as engine:
        with pytest.raises(asyncio.TimeoutError):
            await within(engine.search(data[1][0], K, timeout=0))
        ids, _ = await within(engine.search(data[1][0], K, timeout=float("inf")))
        np.testing.assert_array_equal(ids, index.search(data[1][0], K)[0])
        assert engine.stats().cancelled == 1 and engine.stats().queries == 1


@pytest.mark.parametrize("timeout", ["1", -1, float("nan"), True, [1]])
async def test_a_bad_timeout_is_an_invalid_parameter(index, data, timeout):
    async with vdb.AsyncEngine(index) as engine:
        with pytest.raises(vdb.InvalidParameterError, match="timeout"):
            await within(engine.search(data[1][0], K, timeout=timeout))
        with pytest.raises(vdb.InvalidParameterError, match="timeout"):
            await within(engine.search_batch(data[1][:2], K, timeout=timeout))


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, SystemExit])
async def test_an_interruption_in_a_batch_fails_its_callers_then_stops_the_loop(
    index, data, interruption
):
    """A callable filter raising ``KeyboardInterrupt``/``SystemExit`` in the executor: the
    callers of the interrupted groups get a ``VectorDBError`` caused by it, the groups run
    before it keep their answers, the interruption stops the loop once, and the engine
    serves again when the loop runs again. Run on a loop of its own, in a thread, so that
    the interruption cannot reach the test's loop."""
    q = data[1]

    def stop(doc: dict[str, Any]) -> bool:
        raise interruption()

    def scenario() -> dict[str, Any]:
        loop = asyncio.new_event_loop()
        seen: dict[str, Any] = {}
        try:
            engine = vdb.AsyncEngine(index, max_workers=1, max_wait=0.05)
            # Queued before the loop runs, so they share one batch: groups in this order.
            before = [loop.create_task(engine.search(x, K)) for x in q[:3]]
            hit = [loop.create_task(engine.search(x, K, filter=stop)) for x in q[3:6]]
            after = [loop.create_task(engine.search(x, 5)) for x in q[6:9]]
            everyone = asyncio.gather(*before, *hit, *after, return_exceptions=True)
            try:
                loop.run_until_complete(everyone)
            except BaseException as exc:
                seen["loop"] = exc
            guard = asyncio.wait_for(asyncio.shield(everyone), GUARD)
            try:
                seen["results"] = loop.run_until_complete(guard)
            except BaseException as exc:
                seen["second run"] = exc
            try:
                seen["later"] = loop.run_until_complete(engine.search(q[9], K))
                loop.run_until_complete(engine.aclose())
            except BaseException as exc:
                seen["later"] = exc
        finally:
            loop.close()
        return seen

    seen = await asyncio.to_thread(scenario)
    assert isinstance(seen.get("loop"), interruption), seen
    assert "second run" not in seen, seen
    results = seen["results"]
    for i, result in enumerate(results[:3]):
        np.testing.assert_array_equal(result[0], index.search(q[i], K)[0])
    for result in results[3:]:
        assert type(result) is vdb.VectorDBError, repr(result)
        assert isinstance(result.__cause__, interruption)
        assert "interrupted" in str(result)
    np.testing.assert_array_equal(seen["later"][0], index.search(q[9], K)[0])


# ------------------------------------------------------------------ filters in batches


def in_group_3(doc: dict[str, Any]) -> bool:
    return doc["group"] == 3


FILTERS: list[Any] = [
    None,
    {"group": 1},
    {"group": 2},
    {"tag": "a"},
    {"group": {"$in": [1, 3]}},
    {"score": {"$gte": 5.0, "$lt": 12.0}},
    {"group": {"$nin": [0]}, "tag": "b"},
    {"group": {"$ne": 4}},
    in_group_3,
    lambda doc: doc["score"] > 10,
]


async def gather_held(engine: vdb.AsyncEngine, calls: list[Callable[[], Awaitable[Any]]]):
    """Run ``calls`` concurrently, all queued behind a held first batch so that they are
    collected together into one batch."""
    gate = Gate(engine, hold=True)
    first = asyncio.ensure_future(engine.search(np.zeros(engine.index.dim, np.float32), K))
    await gate.wait_started()
    tasks = [asyncio.ensure_future(call()) for call in calls]
    await asyncio.sleep(0.01)
    gate.release.set()
    await within(first)
    return await within(asyncio.gather(*tasks)), gate.batches[1:]


def assert_same(got: tuple[Any, Any], want: tuple[Any, Any]) -> None:
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


async def test_forty_concurrent_callers_with_different_filters_get_their_own(index, data):
    q = data[1]
    async with vdb.AsyncEngine(index, max_workers=1) as engine:
        calls = [
            (lambda i=i: engine.search(q[i], K, filter=FILTERS[i % len(FILTERS)]))
            for i in range(40)
        ]
        got, batches = await gather_held(engine, calls)
    for i, result in enumerate(got):
        assert_same(result, index.search(q[i], K, filter=FILTERS[i % len(FILTERS)]))
    assert len(batches) == len(FILTERS)  # they were batched: one job, a group per filter


async def test_forty_callers_with_different_filters_k_probes_and_rerank(index, data):
    q = data[1]
    params = [
        dict(
            k=1 + i % 6,
            probes=1 + i % 3,
            rerank_factor=1 + i % 4,
            filter=FILTERS[(i * 7) % len(FILTERS)],
        )
        for i in range(40)
    ]
    async with vdb.AsyncEngine(index, max_workers=1, max_wait=0.05) as engine:
        calls = [(lambda i=i: engine.search(q[i], **params[i])) for i in range(40)]
        calls += [(lambda i=i: engine.search_batch(q[i : i + 3], **params[i])) for i in range(8)]
        got, _ = await gather_held(engine, calls)
    for i, result in enumerate(got[:40]):
        assert result[0].shape == (params[i]["k"],)
        assert_same(result, index.search(q[i], **params[i]))
    for i, result in enumerate(got[40:]):
        assert_same(result, index.search_batch(q[i : i + 3], **params[i]))


async def test_equal_dict_filters_batch_together_callables_by_identity(index, data):
    q = data[1]

    def twin_a(doc: dict[str, Any]) -> bool:
        return doc["group"] == 1

    def twin_b(doc: dict[str, Any]) -> bool:  # same code, another object: its own group
        return doc["group"] == 1

    equal = [
        {"group": 1},
        dict([("group", 1)]),
        types.MappingProxyType({"group": 1}),
        {"group": 1},
    ]
    async with vdb.AsyncEngine(index, max_workers=1) as engine:
        calls = [(lambda i=i: engine.search(q[i], K, filter=equal[i % 4])) for i in range(8)]
        calls += [(lambda i=i: engine.search(q[i], K, filter=twin_a)) for i in range(8, 11)]
        calls += [(lambda i=i: engine.search(q[i], K, filter=twin_b)) for i in range(11, 13)]
        got, batches = await gather_held(engine, calls)
    want = [index.search(q[i], K, filter={"group": 1}) for i in range(13)]
    for result, expected in zip(got, want, strict=True):
        assert_same(result, expected)
    assert batches == [8, 3, 2]


async def test_filters_that_print_alike_are_not_batched_together(index, data):
    # A mapping condition and a string that reads like it, lists and tuples, 1 and 1.0,
    # True and 1: never one another's filter, whatever their printed forms.
    q = data[1]
    filters: list[Any] = [
        {"tag": types.MappingProxyType({"$in": ["a"]})},
        {"tag": "mappingproxy({'$in': ['a']})"},
        {"group": {"$in": (1, 2)}},
        {"group": {"$in": [1, 2]}},
        {"group": 1},
        {"group": 1.0},
        {"group": True},
        {"group": {"$gte": 1, "$lt": 3}},
        {"group": {"$lt": 3, "$gte": 1}},
    ]
    async with vdb.AsyncEngine(index, max_workers=1) as engine:
        calls = [
            (lambda i=i: engine.search(q[i], K, filter=filters[i % len(filters)]))
            for i in range(27)
        ]
        got, _ = await gather_held(engine, calls)
    for i, result in enumerate(got):
        assert_same(result, index.search(q[i], K, filter=filters[i % len(filters)]))


async def test_a_filter_changed_after_the_call_is_not_seen(index, data):
    q = data[1]
    flt: dict[str, Any] = {"group": 1, "tag": {"$in": ["a", "b"]}}
    async with vdb.AsyncEngine(index, max_workers=1) as engine:
        gate = Gate(engine, hold=True)
        first = asyncio.ensure_future(engine.search(q[0], K))
        await gate.wait_started()
        task = asyncio.ensure_future(engine.search(q[1], K, filter=flt))
        await asyncio.sleep(0.01)  # the call is queued
        flt["group"] = 2
        flt["tag"]["$in"].remove("b")
        gate.release.set()
        await within(first)
        got = await within(task)
    want = index.search(q[1], K, filter={"group": 1, "tag": {"$in": ["a", "b"]}})
    assert_same(got, want)


# ------------------------------------------------------------------ cancel every step


def _ops(engine: vdb.AsyncEngine, data) -> dict[str, Callable[[], Awaitable[Any]]]:
    ops = _racing_calls(engine, data)
    del ops["stats"]
    ops["aclose"] = engine.aclose
    return ops


OPS = ["search", "search_batch", "filtered", "add", "upsert", "delete", "compact"]
OPS += ["get_vectors", "get_metadata", "ids_matching", "run", "warm", "aclose"]


@pytest.mark.parametrize("op", OPS)
async def test_cancel_or_time_out_a_call_at_every_step(data, tmp_path, op):
    """Cancel (or time out) one call after 0, 1, 2, ... loop steps: the caller gets its
    answer, ``CancelledError``, ``TimeoutError`` or a ``VectorDBError``; nobody hangs; the
    engine still answers correctly and closes."""
    small_index(data).save(tmp_path / "idx")
    q = data[1]
    for how in ("cancel", "timeout"):
        for steps in range(12):
            engine = await vdb.AsyncEngine.open(tmp_path / "idx", mmap=True, max_workers=2)
            await within(engine.search(q[0], K))
            call = _ops(engine, data)[op]
            if how == "cancel":
                task = asyncio.ensure_future(call())
                for _ in range(steps):
                    await asyncio.sleep(0)
                task.cancel()
            else:
                task = asyncio.ensure_future(asyncio.wait_for(call(), steps * 2e-4))
            (result,) = await within(asyncio.gather(task, return_exceptions=True))
            assert_engine_error(result)
            if op == "aclose":
                await within(engine.aclose())  # the close went on regardless
                assert engine.state is vdb.EngineState.CLOSED
                continue
            ids, _ = await within(engine.search(q[9], K))
            np.testing.assert_array_equal(ids, engine.index.search(q[9], K)[0])
            writes = [engine.add(q[10:11], ids=[50_000]), engine.delete([50_000])]
            await within(asyncio.gather(*writes))
            await within(engine.aclose())
            assert engine.state is vdb.EngineState.CLOSED


async def test_a_cancelled_write_still_completes_and_the_next_waits_for_it(data):
    index = small_index(data)
    entered = threading.Event()
    release = threading.Event()
    active = 0
    overlap = False
    lock = threading.Lock()
    real_add = index.add

    def spy(*args, **kwargs):
        nonlocal active, overlap
        with lock:
            active += 1
            overlap = overlap or active > 1
        try:
            if not entered.is_set():
                entered.set()
                release.wait(GUARD)
            return real_add(*args, **kwargs)
        finally:
            with lock:
                active -= 1

    index.add = spy  # type: ignore[method-assign]
    async with vdb.AsyncEngine(index, max_workers=2) as engine:
        first = asyncio.ensure_future(engine.add(data[1][:1], ids=[20_000]))
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, GUARD)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await within(first)
        second = asyncio.ensure_future(engine.add(data[1][1:2], ids=[20_001]))
        await asyncio.sleep(0.05)
        assert not second.done() and active == 1  # waits for the cancelled write's end
        release.set()
        await within(second)
    assert not overlap
    assert 20_000 in index and 20_001 in index


async def test_aclose_cancelled_midway_still_closes_and_queued_searches_finish(data, tmp_path):
    small_index(data).save(tmp_path / "idx")
    q = data[1]
    engine = await vdb.AsyncEngine.open(tmp_path / "idx", mmap=True, max_workers=1)
    gate = Gate(engine, hold=True)
    searches = [asyncio.ensure_future(engine.search(x, K)) for x in q[:20]]
    await gate.wait_started()
    closers = [asyncio.ensure_future(engine.aclose()) for _ in range(3)]
    await asyncio.sleep(0.01)
    closers[0].cancel()
    await asyncio.sleep(0.01)
    assert engine.state is vdb.EngineState.CLOSING
    gate.release.set()
    results = await within(asyncio.gather(*searches, *closers, return_exceptions=True))
    assert isinstance(results[20], asyncio.CancelledError)
    assert results[21:] == [None, None]
    with vdb.ClusteredIndex.open(tmp_path / "idx") as copy:
        for x, result in zip(q[:20], results[:20], strict=True):
            assert not isinstance(result, BaseException), repr(result)
            np.testing.assert_array_equal(result[0], copy.search(x, K)[0])
    assert engine.state is vdb.EngineState.CLOSED
    await within(engine.aclose())


# ------------------------------------------------------------------ event loops


async def test_queued_callers_fail_when_the_engine_is_closed_between_loop_runs(index, data):
    q = data[1]

    def scenario() -> list[Any]:
        loop = asyncio.new_event_loop()
        try:
            engine = vdb.AsyncEngine(index, max_workers=1)
            gate = Gate(engine, hold=True)
            tasks = [loop.create_task(engine.search(x, K)) for x in q[:1]]
            loop.run_until_complete(loop.run_in_executor(None, gate.started.wait, GUARD))
            tasks += [loop.create_task(engine.search(x, K)) for x in q[1:6]]
            loop.run_until_complete(asyncio.sleep(0.01))  # queued behind the first
            engine.close()  # the loop is between runs: allowed
            gate.release.set()
            everyone = asyncio.gather(*tasks, return_exceptions=True)
            try:
                return list(loop.run_until_complete(asyncio.wait_for(everyone, GUARD)))
            except BaseException as exc:
                return [exc]
        finally:
            loop.close()

    results = await asyncio.to_thread(scenario)
    assert len(results) == 6, results
    for result in results:
        assert isinstance(result, vdb.EngineClosedError), repr(result)


async def test_a_second_event_loop_gets_a_clear_error_not_a_hang(index, data):
    q = data[1]

    def scenario() -> tuple[Any, Any, Any]:
        engine = vdb.AsyncEngine(index)

        async def first() -> Any:
            return await engine.search(q[0], K)

        async def second() -> Any:
            try:
                return await asyncio.wait_for(engine.search(q[1], K), GUARD)
            except BaseException as exc:
                return exc

        async def close() -> Any:
            try:
                return await asyncio.wait_for(engine.aclose(), GUARD)
            except BaseException as exc:
                return exc

        got = asyncio.run(first())
        other = asyncio.run(second())
        closed = asyncio.run(close())
        return got, other, (closed, engine.state)

    got, other, (closed, state) = await asyncio.to_thread(scenario)
    np.testing.assert_array_equal(got[0], index.search(q[0], K)[0])
    assert isinstance(other, vdb.InvalidParameterError), repr(other)
    assert "event loop" in str(other)
    assert closed is None and state is vdb.EngineState.CLOSED


async def test_cancel_open_at_every_step(data, tmp_path):
    small_index(data).save(tmp_path / "idx")
    for steps in range(12):
        task = asyncio.ensure_future(vdb.AsyncEngine.open(tmp_path / "idx", mmap=True))
        for _ in range(steps):
            await asyncio.sleep(0)
        task.cancel()
        (result,) = await within(asyncio.gather(task, return_exceptions=True))
        assert_engine_error(result)
        if isinstance(result, vdb.AsyncEngine):
            await within(result.aclose())
