"""The durable living index: the write-ahead log, the writer's lock, readers, checkpoints.

Every write that returned survives SIGKILL at any later moment (``durability="fsync"``
and ``"flush"``); a kill at any file-system step of a write or a checkpoint leaves the
write wholly there or wholly absent; torn log tails are ignored and damage before the
tail is refused; one writer at a time across processes; readers refresh.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from crashpoints import kill_at_step, trace_steps
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vectordb as vdb
from vectordb.index.records import OP_ADD, decode_write, encode_write
from vectordb.storage.wal import LOG, WriteLog, read_log

DIM = 8
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def vectors(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def saved(tmp_path: Path, n: int = 300) -> Path:
    path = tmp_path / "idx"
    docs = [{"i": i} for i in range(n)]
    vdb.ClusteredIndex.build(vectors(n, 0), metadata=docs, max_leaf_size=40, seed=1).save(path)
    return path


def content(path: Path) -> dict[int, tuple[bytes, object]]:
    """id -> (stored vector bytes, metadata) of the index at ``path`` (opened readonly)."""
    with vdb.ClusteredIndex.open(path, readonly=True, verify=True) as index:
        ids = np.sort(index.ids)
        got = index.get_vectors(ids)
        return {
            int(i): (v.tobytes(), index.get_metadata(int(i))) for i, v in zip(ids, got, strict=True)
        }


def run_threads(target, n: int) -> None:
    """``target(i)`` on ``n`` threads at once, ``i`` in ``0..n-1``; waits for them all."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive()


def expected_after(base: dict[int, tuple[bytes, object]], x: np.ndarray, ids, docs):
    out = dict(base)
    for row, i, d in zip(x, ids, docs, strict=True):
        out[int(i)] = (row.astype(np.float32).tobytes(), d)
    return out


# --------------------------------------------------------------------------- the log


def test_records_round_trip_and_a_torn_tail_at_every_byte_is_ignored(tmp_path):
    path = tmp_path / LOG
    WriteLog.create(path, 7)
    log = WriteLog.open(path, "fsync", 7, 7, read_log(path)[2])
    payloads = [os.urandom(n) for n in (0, 1, 100, 3000)]
    for p in payloads:
        log.commit(log.append(p))
    log.close()
    base, records, end = read_log(path)
    assert path.stat().st_size > end  # zeros written ahead: where the next record goes
    whole = path.read_bytes()[:end]
    path.write_bytes(whole)
    assert read_log(path)[2] == end
    assert base == 7 and [r.seq for r in records] == [8, 9, 10, 11]
    assert [r.payload for r in records] == payloads and end == len(whole)
    last = records[-2].end
    for cut in range(last, len(whole)):  # the last record cut anywhere: ignored
        path.write_bytes(whole[:cut])
        _, got, good = read_log(path)
        assert [r.payload for r in got] == payloads[:3] and good == last


def test_a_flipped_byte_in_the_last_record_is_a_torn_tail_in_any_other_an_error(tmp_path):
    path = tmp_path / LOG
    WriteLog.create(path, 0)
    log = WriteLog.open(path, "flush", 0, 0, read_log(path)[2])
    for i in range(4):
        log.append(bytes([i]) * 50)
    log.close()
    whole = bytearray(path.read_bytes()[: read_log(path)[2]])  # without the zeros ahead
    _, records, _ = read_log(path)
    rng = np.random.default_rng(3)
    for _ in range(40):
        at = int(rng.integers(20, len(whole)))
        damaged = bytearray(whole)
        damaged[at] ^= 1 << int(rng.integers(8))
        path.write_bytes(bytes(damaged))
        if at >= records[-2].end:
            assert len(read_log(path)[1]) == 3  # the last write never returned
        else:
            with pytest.raises(vdb.InvalidIndexFileError, match=r"damaged|sequence|header"):
                read_log(path)


def test_a_bad_header_and_out_of_order_records_are_refused(tmp_path):
    path = tmp_path / LOG
    path.write_bytes(b"not a log at all, longer than a header")
    with pytest.raises(vdb.InvalidIndexFileError, match="not a vectordb write-ahead log"):
        read_log(path)
    path.unlink()
    WriteLog.create(path, 0)
    log = WriteLog.open(path, "flush", 0, 0, read_log(path)[2])
    log.append(b"a")
    log.seq += 1  # a gap: record 3 after record 1
    log.append(b"b")
    log.close()
    with pytest.raises(vdb.InvalidIndexFileError, match="sequence number 3, expected 2"):
        read_log(path)


def test_writes_encode_and_decode_and_foreign_payloads_are_refused():
    ids = np.array([3, 1, 2**62], dtype=np.int64)
    x = vectors(3, 1)
    docs = ['{"a":1}', None, '{"b":[1,2]}']

    def encoded(*args) -> bytes:
        return b"".join(bytes(p) for p in encode_write(*args))

    op, ids2, x2, docs2 = decode_write(encoded(OP_ADD, ids, x, docs), DIM, "log")
    assert op == OP_ADD and docs2 == docs
    np.testing.assert_array_equal(ids2, ids)
    np.testing.assert_array_equal(x2, x)
    for bad in (b"", b"\x09" + bytes(15), encoded(OP_ADD, ids, x, None)[:-1]):
        with pytest.raises(vdb.InvalidIndexFileError, match="cannot read"):
            decode_write(bad, DIM, "log")


# --------------------------------------------------------------------------- durability


def test_every_write_that_returned_survives_sigkill(tmp_path):
    path = saved(tmp_path)
    base = content(path)
    x = vectors(60, 5)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read)
            index = vdb.ClusteredIndex.open(path)
            for i in range(20):
                index.add(x[i : i + 1], ids=[1000 + i], metadata=[{"k": i}])
                os.write(write, b"a")
            index.upsert(x[20:30], ids=np.arange(5, 15))
            os.write(write, b"u")
            index.delete([0, 1, 1000])
            os.write(write, b"d")
            time.sleep(30)  # killed here, with the log never checkpointed
        finally:
            os._exit(1)
    os.close(write)
    acked = b""
    while len(acked) < 22:
        acked += os.read(read, 64)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(read)
    want = expected_after(base, x[:20], range(1000, 1020), [{"k": i} for i in range(20)])
    for j, i in enumerate(range(5, 15)):
        want[i] = (x[20 + j].tobytes(), want[i][1])  # upsert without metadata keeps it
    for i in (0, 1, 1000):
        del want[i]
    assert content(path) == want


def _one_write(path: Path, x: np.ndarray, marker: Path):
    def action() -> None:
        with vdb.ClusteredIndex.open(path, mmap=True) as index:
            index.add(x, ids=np.arange(2000, 2000 + len(x)), metadata=[{"n": 1}] * len(x))
            marker.write_text("acked")
            index.delete([3])

    return action


def test_a_kill_at_every_step_of_a_write_leaves_it_whole_or_absent(tmp_path):
    path = saved(tmp_path)
    base = content(path)
    x = vectors(5, 9)
    marker = tmp_path / "acked"
    added = expected_after(base, x, range(2000, 2005), [{"n": 1}] * 5)
    deleted = {k: v for k, v in added.items() if k != 3}
    pristine = tmp_path / "pristine"
    subprocess.run(["cp", "-a", str(path), str(pristine)], check=True)
    steps = trace_steps(_one_write(path, x, tmp_path / "trace"))
    (tmp_path / "trace").unlink()
    assert content(path) == deleted
    subprocess.run(["rm", "-rf", str(path)], check=True)
    assert any("pwrite(" in s for s in steps) and any("fdatasync" in s for s in steps)
    for n in range(1, len(steps) + 1):
        subprocess.run(["cp", "-a", str(pristine), str(path)], check=True)
        marker.unlink(missing_ok=True)
        kill_at_step(_one_write(path, x, marker), n)
        got = content(path)
        if marker.exists():
            assert got in (added, deleted), f"acknowledged write lost at step {n}: {steps[n - 1]}"
        else:
            assert got in (base, added), f"half a write at step {n}: {steps[n - 1]}"
        subprocess.run(["rm", "-rf", str(path)], check=True)


def _write_and_checkpoint(path: Path, x: np.ndarray):
    def action() -> None:
        with vdb.ClusteredIndex.open(path, mmap=True) as index:
            index.add(x, ids=np.arange(3000, 3000 + len(x)))
            index.save()  # a checkpoint: the log folded in
            index.add(x[:2] * 2, ids=[4000, 4001])

    return action


def test_a_kill_at_every_step_of_a_checkpoint_keeps_every_acknowledged_write(tmp_path):
    path = saved(tmp_path, 200)
    base = content(path)
    x = vectors(4, 11)
    first = expected_after(base, x, range(3000, 3004), [None] * 4)
    last = expected_after(first, x[:2] * 2, [4000, 4001], [None, None])
    steps = trace_steps(_write_and_checkpoint(path, x))
    final = content(path)
    assert final == last
    assert read_log(path / LOG)[0] == 1 and len(read_log(path / LOG)[1]) == 1
    pristine = tmp_path / "pristine"
    subprocess.run(["rm", "-rf", str(path)], check=True)
    vdb.ClusteredIndex.build(
        vectors(200, 0), metadata=[{"i": i} for i in range(200)], max_leaf_size=40, seed=1
    ).save(pristine)
    seen = set()
    for n in range(1, len(steps) + 1):
        subprocess.run(["cp", "-a", str(pristine), str(path)], check=True)
        kill_at_step(_write_and_checkpoint(path, x), n)
        got = content(path)
        assert got in (base, first, last), f"step {n}: {steps[n - 1]}"
        seen.add(len(got))
        subprocess.run(["rm", "-rf", str(path)], check=True)
        for left in tmp_path.glob(".idx.*"):  # a killed save's; the next save removes them
            subprocess.run(["rm", "-rf", str(left)], check=True)
    assert seen == {200, 204, 206}


def test_a_checkpoint_rewrites_the_directory_and_empties_the_log(tmp_path):
    path = saved(tmp_path)
    with vdb.ClusteredIndex.open(path) as index:
        index.add(vectors(50, 2), ids=np.arange(500, 550))
        assert len(read_log(path / LOG)[1]) == 1
        index.checkpoint()
        base, records, _ = read_log(path / LOG)
        assert base == 1 and records == []
        index.delete([500])
        assert [r.seq for r in read_log(path / LOG)[1]] == [2]
    with vdb.ClusteredIndex.open(path) as again:
        assert len(again) == 349 and 500 not in again and 549 in again


def test_durability_none_logs_nothing_and_flush_survives_a_kill(tmp_path):
    path = saved(tmp_path)
    with vdb.ClusteredIndex.open(path, durability="none") as index:
        index.add(vectors(5, 3), ids=np.arange(900, 905))
    assert len(content(path)) == 300  # only a checkpoint would have kept them
    with vdb.ClusteredIndex.open(path, durability="flush") as index:
        index.add(vectors(5, 3), ids=np.arange(900, 905))
    assert len(content(path)) == 305
    with pytest.raises(vdb.InvalidParameterError, match="durability"):
        vdb.ClusteredIndex.open(path, durability="always")
    with pytest.raises(vdb.InvalidParameterError, match="readonly"):
        vdb.ClusteredIndex.open(path, readonly="yes")


def test_concurrent_writers_share_fsyncs(tmp_path, monkeypatch):
    path = saved(tmp_path)
    real = os.fdatasync
    calls = []

    def slow(fd: int) -> None:
        calls.append(fd)
        time.sleep(0.02)  # a slow disk's flush: others append meanwhile
        real(fd)

    monkeypatch.setattr(os, "fdatasync", slow)
    index = vdb.ClusteredIndex.open(path)
    x = vectors(400, 4)

    def writer(t: int) -> None:
        for i in range(50):
            row = t * 50 + i
            index.add(x[row : row + 1], ids=[10_000 + row])

    run_threads(writer, 8)
    index.close()
    # One each without group commit; how many fewer depends on how fast adds are here.
    assert len(calls) < 400, f"{len(calls)} fsyncs for 400 writes: no group commit"
    assert len(content(path)) == 700


def test_a_commit_covers_every_record_appended_before_its_fsync(tmp_path, monkeypatch):
    path = tmp_path / LOG
    WriteLog.create(path, 0)
    log = WriteLog.open(path, "fsync", 0, 0, read_log(path)[2])
    real, calls = os.fdatasync, []
    appended = threading.Barrier(8)
    lock = threading.Lock()  # the index's write lock

    def counted(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counted)

    def writer(i: int) -> None:
        with lock:
            ticket = log.append(bytes([i]) * 10)
        appended.wait(10)  # all eight appended before any commits
        log.commit(ticket)

    run_threads(writer, 8)
    log.close()
    assert len(calls) == 1 and len(read_log(path)[1]) == 8


# --------------------------------------------------------------------------- writers, readers


_WRITER = """
import sys, time, numpy as np, vectordb as vdb
index = vdb.ClusteredIndex.open(sys.argv[1])
index.add(np.ones((1, 8), np.float32), ids=[77777])
print("holding", flush=True)
time.sleep(60)
"""


def test_a_second_writer_is_refused_at_once_and_a_reader_refreshes(tmp_path):
    path = saved(tmp_path)
    reader = vdb.ClusteredIndex.open(path, readonly=True)
    idle = vdb.ClusteredIndex.open(path)  # opened for writes, has not written
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "holding\n"
        started = time.monotonic()
        with pytest.raises(vdb.IndexLockedError, match=f"process {child.pid}"):
            idle.add(vectors(1, 1), ids=[1_000_001])
        with pytest.raises(vdb.IndexLockedError):
            idle.save()
        with pytest.raises(vdb.IndexLockedError):  # nor a full save over it
            vdb.ClusteredIndex.build(vectors(10, 1)).save(path)
        assert time.monotonic() - started < 5
        assert 77777 not in reader
        assert reader.refresh() == 1 and 77777 in reader and len(reader) == 301
        with pytest.raises(vdb.ReadOnlyIndexError):
            reader.add(vectors(1, 1))
        with pytest.raises(vdb.ReadOnlyIndexError):
            reader.delete([1])
        with pytest.raises(vdb.ReadOnlyIndexError):
            reader.compact()
        with pytest.raises(vdb.ReadOnlyIndexError):
            reader.save()
    finally:
        child.kill()
        child.communicate(timeout=30)
    # The holder died: the lock went with it, and the idle index catches up first.
    idle.add(vectors(1, 2), ids=[88888])
    assert 77777 in idle and len(idle) == 302
    idle.close()
    assert reader.refresh() == 1 and 88888 in reader
    reader.close()
    assert len(content(path)) == 302


def test_the_first_write_reads_the_log_once(tmp_path, monkeypatch):
    path = saved(tmp_path)
    with vdb.ClusteredIndex.open(path) as index:
        index.add(vectors(3, 1), ids=[900, 901, 902])
    import vectordb.index.persistence as persistence

    reads = []
    real = persistence.read_log
    monkeypatch.setattr(persistence, "read_log", lambda p: reads.append(p) or real(p))
    with vdb.ClusteredIndex.open(path) as index:
        assert len(reads) == 1  # the open
        index.add(vectors(1, 2), ids=[903])  # catches up and opens the log: one more read
        assert len(reads) == 2
        index.add(vectors(1, 3), ids=[904])
        assert len(reads) == 2
    with vdb.ClusteredIndex.open(path, readonly=True) as reader:
        assert sorted(reader.ids.tolist())[-5:] == [900, 901, 902, 903, 904]


def test_two_index_objects_in_one_process_take_turns(tmp_path):
    path = saved(tmp_path)
    a, b = vdb.ClusteredIndex.open(path), vdb.ClusteredIndex.open(path)
    a.add(vectors(1, 1), ids=[5000])
    with pytest.raises(vdb.IndexLockedError, match="this one"):
        b.add(vectors(1, 2), ids=[5001])
    a.close()
    b.add(vectors(1, 2), ids=[5001])  # after a's write, replayed first
    assert 5000 in b and 5001 in b
    b.close()
    assert {5000, 5001} <= set(content(path))


def test_a_reader_reads_a_new_checkpoint_in_full(tmp_path):
    path = saved(tmp_path)
    reader = vdb.ClusteredIndex.open(path, readonly=True, mmap=True)
    before = reader.search(vectors(1, 3)[0], 5)
    with vdb.ClusteredIndex.open(path) as writer:
        writer.add(vectors(100, 6), ids=np.arange(600, 700))
        writer.delete(np.arange(0, 50))
        writer.checkpoint()
        writer.add(vectors(1, 7), ids=[9999])
    assert len(reader) == 300
    np.testing.assert_array_equal(reader.search(vectors(1, 3)[0], 5)[0], before[0])
    assert reader.refresh() == 1
    assert len(reader) == 351 and 9999 in reader and 0 not in reader
    assert reader.refresh() == 0
    reader.close()


def test_a_bound_index_saved_elsewhere_stays_bound_and_detach_unbinds(tmp_path):
    path = saved(tmp_path)
    index = vdb.ClusteredIndex.open(path)
    index.add(vectors(1, 1), ids=[12345])
    index.save(tmp_path / "copy")
    assert index.path == path and not (tmp_path / "copy" / "writer.lock").exists()
    index.add(vectors(1, 2), ids=[12346])
    assert 12346 in content(path) and 12346 not in content(tmp_path / "copy")
    assert 12345 in content(tmp_path / "copy")
    index.detach()
    index.add(vectors(1, 3), ids=[12347])
    assert index.path is None and 12347 not in content(path)
    with vdb.ClusteredIndex.open(path) as other:  # the lock went with detach
        assert other.add(vectors(1, 4), ids=[12348]).tolist() == [12348]
    with pytest.raises(vdb.InvalidParameterError, match="needs a path"):
        index.save()
    index.close()


def test_the_first_save_binds_an_index_built_in_ram(tmp_path):
    index = vdb.ClusteredIndex.build(vectors(100, 0), max_leaf_size=40)
    assert index.path is None
    index.save(tmp_path / "idx")
    index.add(vectors(3, 1), ids=[500, 501, 502])  # logged in the directory
    assert index.path == tmp_path / "idx"
    index.close()
    assert len(content(tmp_path / "idx")) == 103


@pytest.mark.asyncio
async def test_engine_writes_are_durable_and_a_readonly_engine_refuses_them(tmp_path):
    path = saved(tmp_path)
    x = vectors(64, 8)
    async with await vdb.AsyncEngine.open(path) as engine:
        await asyncio.gather(
            *(engine.add(x[i : i + 1], ids=[7000 + i], metadata=[{"i": i}]) for i in range(64))
        )
        await engine.save()  # a checkpoint
        await engine.delete([7000])
    async with await vdb.AsyncEngine.open(path, readonly=True) as reader:
        with pytest.raises(vdb.ReadOnlyIndexError):
            await reader.add(x[:1])
        assert len(reader.index) == 363 and 7000 not in reader.index
        assert reader.index.get_metadata(7005) == {"i": 5}


# --------------------------------------------------------------------------- an oracle

_OPS = st.lists(
    st.tuples(
        st.sampled_from(["add", "upsert", "delete", "checkpoint", "reopen"]), st.integers(0, 40)
    ),
    min_size=1,
    max_size=12,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=_OPS)
def test_writes_checkpoints_and_reopens_match_an_oracle(tmp_path_factory, ops):
    path = tmp_path_factory.mktemp("oracle") / "idx"
    x0 = vectors(60, 0)
    vdb.ClusteredIndex.build(x0, max_leaf_size=20, seed=2).save(path)
    oracle = {i: x0[i].tobytes() for i in range(60)}
    index = vdb.ClusteredIndex.open(path, durability="flush")
    rng = np.random.default_rng(len(ops))
    try:
        for op, arg in ops:
            if op == "add":
                new = [i for i in range(100 + arg, 104 + arg) if i not in oracle]
                if new:
                    rows = rng.standard_normal((len(new), DIM)).astype(np.float32)
                    index.add(rows, ids=new)
                    oracle.update({i: r.tobytes() for i, r in zip(new, rows, strict=True)})
            elif op == "upsert":
                ids = [arg, arg + 50]
                rows = rng.standard_normal((2, DIM)).astype(np.float32)
                index.upsert(rows, ids=ids)
                oracle.update({i: r.tobytes() for i, r in zip(ids, rows, strict=True)})
            elif op == "delete":
                index.delete([arg, arg + 1], missing_ok=True)
                oracle.pop(arg, None)
                oracle.pop(arg + 1, None)
            elif op == "checkpoint":
                index.checkpoint()
            else:
                index.close()  # as a crash would leave it: the log not folded in
                index = vdb.ClusteredIndex.open(path, durability="flush")
        index.close()
        with vdb.ClusteredIndex.open(path, readonly=True) as again:
            ids = np.sort(again.ids)
            assert ids.tolist() == sorted(oracle)
            got = again.get_vectors(ids)
            assert {int(i): v.tobytes() for i, v in zip(ids, got, strict=True)} == oracle
    finally:
        index.close()


def test_a_log_with_a_damaged_middle_record_refuses_to_open(tmp_path):
    path = saved(tmp_path)
    with vdb.ClusteredIndex.open(path) as index:
        for i in range(3):
            index.add(vectors(1, i), ids=[800 + i])
    _, records, end = read_log(path / LOG)
    whole = (path / LOG).read_bytes()[:end]  # without the zeros written ahead
    middle = bytearray(whole)
    middle[records[0].end - 3] ^= 0xFF  # inside the first record's payload
    (path / LOG).write_bytes(bytes(middle))
    with pytest.raises(vdb.InvalidIndexFileError, match="damaged and sound records follow"):
        vdb.ClusteredIndex.open(path)
    last = bytearray(whole)
    last[-3] ^= 0xFF  # the last write's record: it never returned, as far as a reader knows
    (path / LOG).write_bytes(bytes(last))
    with vdb.ClusteredIndex.open(path) as index:
        assert {800, 801} <= set(index.ids.tolist()) and 802 not in index
        index.add(vectors(1, 9), ids=[803])  # the writer cuts the torn tail off first
    assert read_log(path / LOG)[2] == len(whole)  # 802's record gave way to 803's
    assert {800, 801, 803} <= set(content(path)) and 802 not in content(path)


# --------------------------------------------------------------------------- group commit


@pytest.mark.asyncio
async def test_concurrent_engine_adds_are_written_in_groups_each_with_its_own_ids(tmp_path):
    path = saved(tmp_path)
    x = vectors(64, 12)
    async with await vdb.AsyncEngine.open(path) as engine:
        got = await asyncio.gather(
            *(engine.add(x[i : i + 1], metadata=[{"caller": i}]) for i in range(64))
        )
        for i, ids in enumerate(got):
            assert ids.shape == (1,)
            assert engine.index.get_metadata(int(ids[0])) == {"caller": i}
            np.testing.assert_array_equal(engine.index.get_vectors(ids), x[i : i + 1])  # l2
        assert len({int(i[0]) for i in got}) == 64
    records = read_log(path / LOG)[1]
    assert 1 < len(records) < 64, f"{len(records)} log records for 64 adds: no groups"
    assert len(content(path)) == 364


@pytest.mark.asyncio
async def test_a_bad_add_in_a_group_fails_alone(tmp_path):
    path = saved(tmp_path)
    x = vectors(10, 13)
    async with await vdb.AsyncEngine.open(path) as engine:

        def call(i: int):
            if i == 4:
                return engine.add(x[4:5], ids=[7])  # taken: DuplicateIdError
            if i == 6:
                return engine.add(x[6:8], ids=[9100, 9100])  # twice in one call
            return engine.add(x[i : i + 1], ids=[9000 + i])

        results = await asyncio.gather(*(call(i) for i in range(10)), return_exceptions=True)
    assert isinstance(results[4], vdb.DuplicateIdError)
    assert isinstance(results[6], vdb.InvalidParameterError)
    ok = [i for i in range(10) if i not in (4, 6)]
    assert all(results[i].tolist() == [9000 + i] for i in ok)
    assert {9000 + i for i in ok} <= set(content(path)) and 9100 not in content(path)


@pytest.mark.asyncio
async def test_an_add_cancelled_while_queued_is_not_written(tmp_path):
    path = saved(tmp_path)
    async with await vdb.AsyncEngine.open(path) as engine:
        first = asyncio.ensure_future(
            engine.add(vectors(2000, 1), ids=np.arange(10**5, 10**5 + 2000))
        )
        await asyncio.sleep(0)  # the first holds the write lock
        queued = asyncio.ensure_future(engine.add(vectors(1, 2), ids=[555_555]))
        await asyncio.sleep(0)
        queued.cancel()
        await first
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert 555_555 not in engine.index
        assert (await engine.add(vectors(1, 3), ids=[555_556])).tolist() == [555_556]
    assert 555_555 not in content(path) and 555_556 in content(path)


# --------------------------------------------------------------------------- empty indexes


def brute(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    d = ((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return ids[np.argsort(d, axis=1, kind="stable")[:, :k]]


def test_an_index_created_empty_grows_a_tree_and_stays_accurate(tmp_path):
    path = tmp_path / "memories"
    index = vdb.ClusteredIndex.create(path, dim=16, max_leaf_size=60, seed=3)
    assert len(index) == 0 and index.path == path and index.n_leaves == 1
    ids, dists = index.search(np.ones(16, np.float32), 5)
    assert ids.tolist() == [-1] * 5 and np.isinf(dists).all()
    x = vdb.make_clustered(3000, 16, seed=4)
    q = vdb.make_clustered(50, 16, seed=5)
    for i in range(0, 20):  # the first adds, one by one: searched exactly
        index.add(x[i : i + 1], metadata=[{"turn": i}])
    got = index.search_batch(q, 5)[0]
    assert (got == brute(x[:20], np.arange(20), q, 5)).all()
    for start in range(20, 3000, 70):
        index.add(x[start : start + 70])
    assert index.n_leaves > 10  # split as it grew, no call needed
    want = brute(x, np.arange(3000), q, 10)
    got = index.search_batch(q, 10)[0]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want, strict=True)])
    assert recall >= 0.9
    index.close()
    with vdb.ClusteredIndex.open(path, readonly=True) as again:  # every add durable
        assert len(again) == 3000 and again.get_metadata(7) == {"turn": 7}


def test_create_refuses_what_it_cannot_make(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    with pytest.raises(vdb.StorageError, match="exists"):
        vdb.ClusteredIndex.create(tmp_path / "full", dim=8)
    for bad in (0, -1, 2**17, 1.5, True):
        with pytest.raises(vdb.InvalidParameterError, match="dim"):
            vdb.ClusteredIndex.create(tmp_path / "a", dim=bad)
    with pytest.raises(vdb.InvalidParameterError, match="unknown build options"):
        vdb.ClusteredIndex.create(tmp_path / "a", dim=8, leaf_size=3)
    with pytest.raises(vdb.InvalidParameterError, match="durability"):
        vdb.ClusteredIndex.create(tmp_path / "a", dim=8, durability="maybe")
    with pytest.raises(vdb.InvalidParameterError):
        vdb.ClusteredIndex.create(tmp_path / "a", dim=8, max_leaf_size=0)
    assert sorted(os.listdir(tmp_path)) == ["full"]
    index = vdb.ClusteredIndex.create(tmp_path / "empty-dir-ok", dim=8, metric="cosine")
    with pytest.raises(vdb.DimensionMismatchError):
        index.add(np.ones((1, 9), np.float32))
    index.close()


@pytest.mark.asyncio
async def test_an_engine_created_empty_serves_and_keeps_its_writes(tmp_path):
    path = tmp_path / "memories"
    async with await vdb.AsyncEngine.create(path, dim=8, metric="cosine") as engine:
        assert (await engine.search(vectors(1, 1)[0], 3))[0].tolist() == [-1, -1, -1]
        await asyncio.gather(*(engine.add(vectors(1, i), metadata=[{"i": i}]) for i in range(30)))
        ids, _ = await engine.search(vectors(1, 7)[0], 1)
        assert engine.index.get_metadata(int(ids[0])) == {"i": 7}
    assert len(content(path)) == 30
