"""The async engine: batching, cancellation, timeouts, overload, lifecycle, files."""

from __future__ import annotations

import asyncio
import gc
import itertools
import threading
import time

import numpy as np
import pytest

import vectordb as vdb

K = 10
pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def data():
    x = vdb.make_clustered(3_000, 64, seed=21)
    return x[:2_500], x[2_500:]


@pytest.fixture(scope="module")
def index(data):
    return vdb.ClusteredIndex.build(data[0], max_leaf_size=200, leaf_scan="codes")


class Gate:
    """Spy on an engine's batches; optionally hold them in the executor until released
    (every query goes there: none runs on the loop)."""

    def __init__(self, engine: vdb.AsyncEngine, *, hold: bool = False, fail: bool = False):
        engine._inline = False
        self.batches: list[int] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.fail = fail
        real = engine._run_batch

        def run(queries, key):
            self.batches.append(len(queries))
            self.started.set()
            self.release.wait(10)
            if self.fail:
                raise RuntimeError("boom")
            return real(queries, key)

        engine._run_batch = run  # type: ignore[method-assign]

    async def wait_started(self):
        await asyncio.get_running_loop().run_in_executor(None, self.started.wait, 10)


async def test_concurrent_results_equal_search_batch(index, data):
    queries = np.concatenate([data[1]] * 2)  # 1,000 concurrent callers
    want_ids, want_dists = index.search_batch(queries, K)
    async with vdb.AsyncEngine(index, max_batch_size=64) as engine:
        got = await asyncio.gather(*(engine.search(q, K) for q in queries))
        stats = engine.stats()
    for i, (ids, dists) in enumerate(got):
        np.testing.assert_array_equal(ids, want_ids[i])
        np.testing.assert_array_equal(dists, want_dists[i])
    assert stats.queries == len(queries)
    assert stats.batches < len(queries) / 4  # really batched
    assert stats.mean_batch_size > 4
    assert stats.queue_depth == 0 and stats.in_flight == 0
    assert stats.p50_ms <= stats.p99_ms


async def test_mixed_parameters_in_one_window(index, data):
    queries = data[1][:60]
    params = [dict(k=1 + i % 7, probes=1 + i % 3, rerank_factor=1 + i % 4) for i in range(60)]
    async with vdb.AsyncEngine(index, max_wait=0.05) as engine:
        got = await asyncio.gather(
            *(engine.search(q, **p) for q, p in zip(queries, params, strict=True))
        )
    for q, p, (ids, dists) in zip(queries, params, got, strict=True):
        want_ids, want_dists = index.search(q, **p)
        assert ids.shape == (p["k"],)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(dists, want_dists)


async def test_search_batch_through_the_engine(index, data):
    async with vdb.AsyncEngine(index) as engine:
        ids, dists = await engine.search_batch(data[1], K, probes=2)
    want = index.search_batch(data[1], K, probes=2)
    np.testing.assert_array_equal(ids, want[0])
    np.testing.assert_array_equal(dists, want[1])


async def test_a_lone_query_is_not_held_back(index, data):
    # max_wait=0: the batch goes as soon as the first query is there.
    async with vdb.AsyncEngine(index, max_wait=0) as engine:
        ids, _ = await engine.search(data[1][0], K)
    np.testing.assert_array_equal(ids, index.search(data[1][0], K)[0])


class Where:
    """Record the thread each of an engine's searches runs on."""

    def __init__(self, engine: vdb.AsyncEngine, delay: float = 0.0):
        self.threads: list[threading.Thread] = []
        self.delay = delay
        real = engine._run_batch

        def run(queries, key):
            self.threads.append(threading.current_thread())
            if self.delay:
                time.sleep(self.delay)
            return real(queries, key)

        engine._run_batch = run  # type: ignore[method-assign]

    def on_loop(self) -> list[bool]:
        return [t is threading.current_thread() for t in self.threads]


@pytest.fixture
def patient(monkeypatch):
    """No lone search is too slow for the loop (a busy test machine's would be)."""
    from vectordb.engine import batcher

    monkeypatch.setattr(batcher, "_HERE_BUDGET", 10.0)


async def test_a_lone_query_on_an_idle_engine_runs_on_the_loop(index, data, patient):
    async with vdb.AsyncEngine(index) as engine:
        where = Where(engine)
        for q in data[1][:20]:
            ids, dists = await engine.search(q, K)
            want = index.search(q, K)
            np.testing.assert_array_equal(ids, want[0])
            np.testing.assert_array_equal(dists, want[1])
        stats = engine.stats()
    # The first goes to the executor: it may compile the search's kernels.
    assert where.on_loop() == [False] + [True] * 19
    assert stats.queries == 20 and stats.batches == 20 and stats.in_flight == 0


async def test_queries_made_together_are_batched_on_the_executor(index, data):
    queries = data[1][:200]
    async with vdb.AsyncEngine(index) as engine:
        where = Where(engine)
        got = await asyncio.gather(*(engine.search(q, K) for q in queries))
        stats = engine.stats()
    assert not any(where.on_loop())
    assert stats.batches < 20  # batched, not 200 lone searches one after another
    want = index.search_batch(queries, K)
    np.testing.assert_array_equal(np.stack([g[0] for g in got]), want[0])


@pytest.mark.parametrize("kind", ["mmap", "inline=False", "filter", "search_batch"])
async def test_lone_queries_that_go_to_the_executor(index, data, tmp_path, kind, patient):
    """A mapped index (a cold page would block the loop on the disk), an engine told so, a
    filtered query (SQLite, or the caller's code) and a batch of queries leave the loop."""
    served = index
    if kind == "mmap":
        index.save(tmp_path / "i")
        served = vdb.ClusteredIndex.open(tmp_path / "i", mmap=True)
    options = {"inline": False} if kind == "inline=False" else {}
    async with vdb.AsyncEngine(served, **options) as engine:
        where = Where(engine)
        for q in data[1][:3]:
            if kind == "filter":
                await engine.search(q, K, filter=lambda _: True)
            elif kind == "search_batch":
                await engine.search_batch(np.stack([q, q]), K)
            else:
                await engine.search(q, K)
    assert where.on_loop() == [False] * 3
    if kind == "mmap":  # unless the caller asks for it
        async with vdb.AsyncEngine(served, inline=True) as engine:
            where = Where(engine)
            await engine.search(data[1][0], K)
            await engine.search(data[1][0], K)
        assert where.on_loop() == [False, True]
        served.close()


async def test_a_slow_lone_search_sends_the_next_ones_to_the_executor(index, data):
    from vectordb.engine import batcher

    async with vdb.AsyncEngine(index) as engine:
        where = Where(engine, delay=2 * batcher._HERE_BUDGET)
        for q in data[1][: batcher._HERE_COOLDOWN + 3]:
            await engine.search(q, K)
    cooldown = [False] * batcher._HERE_COOLDOWN
    assert where.on_loop() == [False, True, *cooldown, True]  # first, slow, cooled, again


async def test_a_lone_query_cancelled_before_it_runs(index, data, patient):
    async with vdb.AsyncEngine(index) as engine:
        where = Where(engine)
        await engine.search(data[1][0], K)  # the first lone query goes to the executor
        task = asyncio.ensure_future(engine.search(data[1][0], K))
        await asyncio.sleep(0)  # the query is looking for companions
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(where.threads) == 1 and engine.stats().cancelled == 1
        ids, _ = await engine.search(data[1][1], K)
        np.testing.assert_array_equal(ids, index.search(data[1][1], K)[0])
        assert where.on_loop() == [False, True] and engine.stats().queries == 2


async def test_a_lone_query_with_a_timeout_goes_to_the_executor(index, data, patient):
    """A search on the loop could not be cut short: one with a timeout times out there."""
    async with vdb.AsyncEngine(index) as engine:
        where = Where(engine)
        await engine.search(data[1][0], K)  # the first lone query goes to the executor
        ids, _ = await engine.search(data[1][1], K, timeout=5)
        np.testing.assert_array_equal(ids, index.search(data[1][1], K)[0])
        assert where.on_loop() == [False, False]
        where.delay = 0.05
        with pytest.raises(asyncio.TimeoutError):
            await engine.search(data[1][0], K, timeout=0.005)
        assert engine.stats().cancelled == 1


async def test_a_batch_goes_at_once_when_every_caller_is_in(index, data):
    """With one call's batch running and the other call queued, nobody is left to batch
    with: the second batch starts without waiting max_wait for companions."""
    async with vdb.AsyncEngine(index, max_workers=2, max_wait=1.0) as engine:
        gate = Gate(engine, hold=True)
        first = asyncio.ensure_future(engine.search(data[1][0], K))
        await gate.wait_started()
        second = asyncio.ensure_future(engine.search(data[1][1], K))
        for _ in range(10):  # a few passes of the loop, far less than max_wait
            await asyncio.sleep(0)
        assert engine.stats().in_flight == 2 and gate.batches == [1, 1]
        gate.release.set()
        for task, q in ((first, data[1][0]), (second, data[1][1])):
            np.testing.assert_array_equal((await task)[0], index.search(q, K)[0])


async def test_cancelled_before_its_batch_started_is_dropped(index, data):
    async with vdb.AsyncEngine(index, max_workers=1) as engine:
        gate = Gate(engine, hold=True)
        first = asyncio.ensure_future(engine.search(data[1][0], K))
        await gate.wait_started()  # the only worker is busy with `first`
        doomed = asyncio.ensure_future(engine.search(data[1][1], K))
        kept = asyncio.ensure_future(engine.search(data[1][2], K))
        await asyncio.sleep(0.01)
        doomed.cancel()
        gate.release.set()
        await first
        ids, _ = await kept
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert gate.batches == [1, 1]  # `doomed` never reached the executor
        np.testing.assert_array_equal(ids, index.search(data[1][2], K)[0])
        assert engine.stats().cancelled == 1


async def test_cancelled_while_running_does_not_disturb_its_batch(index, data):
    async with vdb.AsyncEngine(index, max_workers=1, max_wait=0.05) as engine:
        gate = Gate(engine, hold=True)
        tasks = [asyncio.ensure_future(engine.search(q, K)) for q in data[1][:5]]
        await gate.wait_started()
        tasks[2].cancel()
        gate.release.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[2], asyncio.CancelledError)
        for i in (0, 1, 3, 4):
            np.testing.assert_array_equal(results[i][0], index.search(data[1][i], K)[0])
        # and the engine goes on serving
        ids, _ = await engine.search(data[1][9], K)
        np.testing.assert_array_equal(ids, index.search(data[1][9], K)[0])


async def test_timeout_raises_and_the_engine_recovers(index, data):
    async with vdb.AsyncEngine(index, max_workers=1) as engine:
        gate = Gate(engine, hold=True)
        with pytest.raises(asyncio.TimeoutError):
            await engine.search(data[1][0], K, timeout=0.05)
        gate.release.set()
        ids, _ = await engine.search(data[1][1], K, timeout=10)
        np.testing.assert_array_equal(ids, index.search(data[1][1], K)[0])


async def test_overload_raise(index, data):
    async with vdb.AsyncEngine(index, max_workers=1, max_pending=2, overload="raise") as engine:
        gate = Gate(engine, hold=True)
        running = asyncio.ensure_future(engine.search(data[1][0], K))
        await gate.wait_started()
        queued = [asyncio.ensure_future(engine.search(q, K)) for q in data[1][1:3]]
        await asyncio.sleep(0)
        assert engine.stats().queue_depth == 2
        with pytest.raises(vdb.EngineOverloadedError, match="max_pending=2"):
            await engine.search(data[1][3], K)
        gate.release.set()
        await asyncio.gather(running, *queued)


async def test_overload_wait_lets_the_caller_in_when_there_is_room(index, data):
    async with vdb.AsyncEngine(index, max_workers=1, max_pending=2, overload="wait") as engine:
        gate = Gate(engine, hold=True)
        running = asyncio.ensure_future(engine.search(data[1][0], K))
        await gate.wait_started()
        queued = [asyncio.ensure_future(engine.search(q, K)) for q in data[1][1:3]]
        waiting = asyncio.ensure_future(engine.search(data[1][3], K))
        await asyncio.sleep(0.02)
        assert not waiting.done() and engine.stats().queue_depth == 2
        gate.release.set()
        ids, _ = await waiting
        await asyncio.gather(running, *queued)
        np.testing.assert_array_equal(ids, index.search(data[1][3], K)[0])


async def test_exception_reaches_every_caller_of_the_batch_and_the_engine_goes_on(index, data):
    async with vdb.AsyncEngine(index, max_workers=1, max_wait=0.05) as engine:
        gate = Gate(engine, fail=True)
        results = await asyncio.gather(
            *(engine.search(q, K) for q in data[1][:4]), return_exceptions=True
        )
        assert all(isinstance(r, RuntimeError) and str(r) == "boom" for r in results)
        assert engine.stats().failed == 4
        gate.fail = False
        ids, _ = await engine.search(data[1][5], K)
        np.testing.assert_array_equal(ids, index.search(data[1][5], K)[0])


async def test_bad_query_fails_alone(index, data):
    async with vdb.AsyncEngine(index, max_wait=0.05) as engine:
        good = asyncio.ensure_future(engine.search(data[1][0], K))
        with pytest.raises(vdb.DimensionMismatchError):
            await engine.search(np.zeros(3), K)
        with pytest.raises(vdb.InvalidParameterError):
            await engine.search(data[1][0], k=0)
        ids, _ = await good
        np.testing.assert_array_equal(ids, index.search(data[1][0], K)[0])


async def test_close_while_busy_finishes_queued_work_then_refuses(index, data):
    engine = vdb.AsyncEngine(index, max_workers=1)
    gate = Gate(engine, hold=True)
    tasks = [asyncio.ensure_future(engine.search(q, K)) for q in data[1][:8]]
    await gate.wait_started()
    closing = asyncio.ensure_future(engine.aclose())
    await asyncio.sleep(0.01)
    assert engine.state is vdb.EngineState.CLOSING and not closing.done()
    with pytest.raises(vdb.EngineClosedError):
        await engine.search(data[1][0], K)
    gate.release.set()
    await asyncio.gather(closing, engine.aclose())  # concurrent and repeated close
    for task, q in zip(tasks, data[1][:8], strict=True):
        np.testing.assert_array_equal(task.result()[0], index.search(q, K)[0])
    assert engine.state is vdb.EngineState.CLOSED
    await engine.aclose()
    for call in (engine.search(data[1][0]), engine.search_batch(data[1]), engine.save("x")):
        with pytest.raises(vdb.EngineClosedError):
            await call
    assert len(index) == 2_500  # an index the engine does not own stays usable
    index.search(data[1][0])


async def test_event_loop_keeps_ticking_while_a_batch_runs(index, data):
    ticks = 0

    async def heartbeat(stop: asyncio.Event):
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.001)

    async with vdb.AsyncEngine(index) as engine:
        gate = Gate(engine)
        real = engine._run_batch

        def slow(queries, key):  # the search itself, made long enough to watch
            time.sleep(0.1)
            return real(queries, key)

        engine._run_batch = slow  # type: ignore[method-assign]
        stop = asyncio.Event()
        beat = asyncio.ensure_future(heartbeat(stop))
        await asyncio.sleep(0)
        ticks = 0
        await engine.search_batch(np.repeat(data[1], 4, axis=0), K)
        during = ticks
        stop.set()
        await beat
    assert during >= 10, during  # the loop ran ~100 1-ms ticks while the executor worked
    del gate


async def test_garbage_collected_open_engine_warns(index):
    engine = vdb.AsyncEngine(index)
    with pytest.warns(ResourceWarning, match="not closed"):
        del engine
        gc.collect()


async def test_open_save_and_warm(index, data, tmp_path):
    index.save(tmp_path / "a")
    progress = []
    async with await vdb.AsyncEngine.open(tmp_path / "a", mmap=True, max_workers=2) as engine:
        assert engine.index.is_using_mmap
        read = await engine.warm(lambda done, total: progress.append((done, total)))
        assert read == len(index) * index.dim * 4
        assert progress and progress[-1] == (read, read)
        assert all(a[0] < b[0] for a, b in itertools.pairwise(progress))
        await engine.save(tmp_path / "b")
        ids, _ = await engine.search(data[1][0], K)
    with pytest.raises(vdb.IndexClosedError):  # the engine owned and closed its index
        engine.index.search(data[1][0], K)
    with vdb.ClusteredIndex.open(tmp_path / "b", verify=True) as copy:
        np.testing.assert_array_equal(copy.search(data[1][0], K)[0], ids)
    np.testing.assert_array_equal(ids, index.search(data[1][0], K)[0])
    async with vdb.AsyncEngine(index) as engine:
        assert await engine.warm() == 0  # vectors in RAM: nothing to page in


async def test_open_errors(index, tmp_path):
    with pytest.raises(vdb.InvalidIndexFileError, match="not a directory"):
        await vdb.AsyncEngine.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(vdb.InvalidIndexFileError, match=r"manifest\.json"):
        await vdb.AsyncEngine.open(tmp_path / "empty")
    index.save(tmp_path / "ok")
    with pytest.raises(vdb.InvalidParameterError, match="max_workers"):
        await vdb.AsyncEngine.open(tmp_path / "ok", max_workers=0)


async def test_failed_save_leaves_nothing_behind(index, tmp_path, monkeypatch):
    import os

    async with vdb.AsyncEngine(index) as engine:
        real = os.fsync
        calls = 0

        def failing(fd):
            nonlocal calls
            calls += 1
            if calls == 3:
                raise OSError(28, "No space left on device")
            return real(fd)

        monkeypatch.setattr(os, "fsync", failing)
        with pytest.raises(vdb.StorageError) as info:
            await engine.save(tmp_path / "idx")
        assert info.value.errno == 28
        monkeypatch.setattr(os, "fsync", real)
        assert os.listdir(tmp_path) == []
        await engine.save(tmp_path / "idx")
        assert (tmp_path / "idx" / "manifest.json").is_file()


async def test_keys_of_plain_calls_are_shared_and_still_checked():
    from vectordb.engine.keys import BatchKey, FilterKey

    plain = BatchKey.of(10, None, None, None)
    assert plain is BatchKey.of(10, None, None, None)
    assert plain == BatchKey(10, None, None, FilterKey(None), None)
    assert plain != BatchKey.of(10, 4, None, None) and plain != BatchKey.of(11, None, None, None)
    for bad in (0, -1, True, 10**9, 2.0):
        with pytest.raises(vdb.InvalidParameterError, match="k"):
            BatchKey.of(bad, None, None, None)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("max_workers", 0),
        ("max_batch_size", -1),
        ("max_pending", 0),
        ("max_wait", -0.1),
        ("max_wait", "1ms"),
        ("overload", "drop"),
        ("inline", "yes"),
        ("inline", 1),
    ],
)
async def test_bad_options(index, option, value):
    with pytest.raises(vdb.InvalidParameterError, match=option):
        vdb.AsyncEngine(index, **{option: value})


async def test_engine_needs_an_index():
    with pytest.raises(vdb.InvalidParameterError, match="ClusteredIndex"):
        vdb.AsyncEngine("index.bin")  # type: ignore[arg-type]


async def test_sync_close_refuses_while_its_loop_runs(index, data):
    engine = vdb.AsyncEngine(index)
    await engine.search(data[1][0], k=K)
    with pytest.raises(vdb.InvalidParameterError, match="aclose"):
        engine.close()
    await engine.aclose()
    engine.close()  # idempotent once closed


async def test_sync_close_after_the_loop_ended(index, data):
    # An engine used by one loop (asyncio.run in a worker thread here), closed from plain
    # code once that loop has ended: what a sync-only caller, such as an adapter, does.
    def scenario() -> vdb.AsyncEngine:
        engine = vdb.AsyncEngine(index)

        async def use() -> None:
            await engine.search(data[1][0], k=K)

        asyncio.run(use())
        engine.close()
        engine.close()
        return engine

    engine = await asyncio.to_thread(scenario)
    assert engine.state is vdb.EngineState.CLOSED
    with pytest.raises(vdb.EngineClosedError):
        await engine.search(data[1][0], k=K)
    assert len(index) == len(data[0])  # the index it did not own stays usable
    index.search(data[1][0], k=K)


async def test_aclose_waits_for_writes_and_reads_on_the_executor(data):
    index = vdb.ClusteredIndex.build(data[0][:500], max_leaf_size=100)
    engine = vdb.AsyncEngine(index)
    real = index.get_metadata
    release = threading.Event()

    def slow(id_):
        release.wait(10)
        return real(id_)

    index.get_metadata = slow  # type: ignore[method-assign]
    read = asyncio.create_task(engine.get_metadata(3))
    write = asyncio.create_task(engine.add(data[1][:2], ids=[9_000, 9_001]))
    await asyncio.sleep(0.05)
    closing = asyncio.create_task(engine.aclose())
    await asyncio.sleep(0.05)
    assert not closing.done()  # the read still runs
    release.set()
    await closing
    assert read.done() and write.done()
    assert await read is None
    assert 9_001 in index


async def test_run_calls_on_the_executor_and_refuses_once_closed(index):
    engine = vdb.AsyncEngine(index)
    loop_thread = threading.get_ident()
    thread = await engine.run(threading.get_ident)
    assert thread != loop_thread
    assert await engine.run(len, index) == len(index)
    await engine.aclose()
    with pytest.raises(vdb.EngineClosedError):
        await engine.run(len, index)
