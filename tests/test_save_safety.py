"""Saves that are cancelled, time out, race, crash between renames, or go onto the index's
own directory: the path always holds the old index or the new one, no lock or temporary
directory is left behind, and writes made before a save are never lost."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from crashpoints import crash_between_renames

import vectordb as vdb
import vectordb.storage.dirswap as dirswap
import vectordb.storage.save as persist
from vectordb.cli import cli

DIM = 24


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return vdb.make_clustered(3000, DIM, seed=5)


def build(x: np.ndarray) -> vdb.ClusteredIndex:
    return vdb.ClusteredIndex.build(x, metric="cosine", max_leaf_size=120)


def snapshot(path: Path) -> dict[int, tuple[bytes, object]]:
    """Every id of the index saved at ``path`` (verified) -> (its vector, its metadata)."""
    with vdb.ClusteredIndex.open(path, mmap=True, verify=True) as index:
        ids = np.sort(index.ids)
        vectors = index.get_vectors(ids)
        return {
            int(i): (v.tobytes(), index.get_metadata(int(i)))
            for i, v in zip(ids, vectors, strict=True)
        }


def expected(
    x: np.ndarray, ids: np.ndarray, meta: list[dict[str, int] | None] | None = None
) -> dict[int, tuple[bytes, object]]:
    """What ``snapshot`` returns for vectors ``x`` (cosine: normalised) under ``ids``."""
    unit = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    docs = meta if meta is not None else [None] * len(ids)
    return {int(i): (v.tobytes(), d) for i, v, d in zip(ids, unit, docs, strict=True)}


def same(got: dict, want: dict) -> bool:
    """Same ids, vectors (to float32 rounding) and metadata."""
    return sorted(got) == sorted(want) and all(
        np.allclose(np.frombuffer(got[i][0], np.float32), np.frombuffer(v, np.float32), atol=1e-6)
        and got[i][1] == doc
        for i, (v, doc) in want.items()
    )


def lock_is_free(parent: Path) -> bool:
    """Whether nobody holds the saves' ``flock`` on ``parent`` (never waits)."""
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def leftovers(parent: Path) -> list[str]:
    return sorted(p for p in os.listdir(parent) if p.startswith("."))


def save_in_subprocess(path: Path, target: Path | None = None, timeout: float = 60) -> None:
    """Open ``path`` and save it (to ``target``, default itself) in another process;
    fails (never hangs) if it cannot."""
    code = (
        "import sys, vectordb as vdb\n"
        "with vdb.ClusteredIndex.open(sys.argv[1]) as index:\n"
        "    index.save(sys.argv[2])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path), str(target or path)],
        timeout=timeout,
        capture_output=True,
    )
    assert done.returncode == 0, done.stderr.decode()


# --------------------------------------------------------------------------- item 2


@pytest.mark.parametrize("mmap", [True, False])
def test_add_save_onto_itself_add_keeps_every_vector(data, tmp_path, mmap):
    path = tmp_path / "idx"
    build(data[:1000]).save(path)
    meta = [{"n": i} for i in range(400)]
    with vdb.ClusteredIndex.open(path, mmap=mmap) as index:
        index.add(data[1000:1400], ids=np.arange(1000, 1400), metadata=meta)
        index.save(path)  # the documented way to persist adds
        index.add(data[1400:1800], ids=np.arange(1400, 1800))
        want = np.arange(1800)
        unit = data / np.linalg.norm(data, axis=1, keepdims=True)
        assert np.allclose(index.get_vectors(want), unit[:1800], atol=1e-6)
        ids, _ = index.search_batch(data[[5, 1200, 1700]], 1, probes=64)
        assert ids[:, 0].tolist() == [5, 1200, 1700]
        index.save(path)
        index.add(data[1800:2000], ids=np.arange(1800, 2000))
        index.delete(np.arange(0, 100))
        index.compact()
        index.save(path)
        index.add(data[2000:2100], ids=np.arange(2000, 2100))
        index.save(path)
        assert np.allclose(index.get_vectors([150, 1999, 2050]), unit[[150, 1999, 2050]], atol=1e-6)
    docs: list[dict[str, int] | None] = [None] * 100 + [None] * 900 + meta + [None] * 700
    want_ids = np.arange(100, 2100)
    assert same(snapshot(path), expected(data[100:2100], want_ids, docs[100:2100]))
    assert os.listdir(tmp_path) == ["idx"]
    assert not leftovers(path)


@pytest.mark.asyncio
async def test_engine_add_save_onto_itself_add_keeps_every_vector(data, tmp_path):
    path = tmp_path / "idx"
    build(data[:1000]).save(path)
    async with await vdb.AsyncEngine.open(path, mmap=True) as engine:
        await engine.add(data[1000:1300], ids=np.arange(1000, 1300), metadata=[{"a": 1}] * 300)
        await engine.save(path)
        await engine.add(data[1300:1600], ids=np.arange(1300, 1600))
        got = await engine.get_vectors(np.arange(1600))
        unit = data[:1600] / np.linalg.norm(data[:1600], axis=1, keepdims=True)
        assert np.allclose(got, unit, atol=1e-6)
        ids, _ = await engine.search(data[1500], 1, probes=64)
        assert ids.tolist() == [1500]
        await engine.save(path)
    docs = [None] * 1000 + [{"a": 1}] * 300 + [None] * 300
    assert same(snapshot(path), expected(data[:1600], np.arange(1600), docs))
    assert os.listdir(tmp_path) == ["idx"] and not leftovers(path)


def test_an_append_that_fails_leaves_no_rows_behind(data, tmp_path, monkeypatch):
    """A failed append (here: the remap) must not shift the rows of the next one."""
    import mmap as mmap_module

    path = tmp_path / "idx"
    build(data[:1000]).save(path)
    with vdb.ClusteredIndex.open(path, mmap=True) as index:
        index.add(data[1000:1100], ids=np.arange(1000, 1100))
        real = mmap_module.mmap

        def failing(*args, **kwargs):
            raise OSError(errno.ENOMEM, "no memory for the mapping")

        monkeypatch.setattr(mmap_module, "mmap", failing)
        with pytest.raises(vdb.StorageError):
            index.add(data[1100:1200], ids=np.arange(1100, 1200))
        monkeypatch.setattr(mmap_module, "mmap", real)
        index.add(data[1200:1300], ids=np.arange(1200, 1300))
        want = np.r_[np.arange(1100), np.arange(1200, 1300)]
        unit = data / np.linalg.norm(data, axis=1, keepdims=True)
        assert np.allclose(index.get_vectors(want), unit[want], atol=1e-6)


def test_closing_after_a_save_onto_itself_removes_nothing_of_the_new_index(data, tmp_path):
    path = tmp_path / "idx"
    build(data[:1000]).save(path)
    index = vdb.ClusteredIndex.open(path, mmap=True)
    index.add(data[1000:1100], ids=np.arange(1000, 1100))
    index.compact()  # a compacted vector file inside the directory, then an append file
    index.add(data[1100:1200], ids=np.arange(1100, 1200))
    index.save(path)
    saved = sorted(os.listdir(path))
    index.close()
    assert sorted(os.listdir(path)) == saved and not leftovers(path)
    assert len(snapshot(path)) == 1200


# --------------------------------------------------------------------------- item 1


def _cancel_inside(monkeypatch, name: str, loop, task_box: list) -> None:
    """Make ``persist.<name>`` cancel the save's task from the executor thread, and give
    the loop time to act on it before the step goes on."""
    real = getattr(persist, name)

    def hooked(*args, **kwargs):
        loop.call_soon_threadsafe(task_box[0].cancel)
        time.sleep(0.2)  # a loop that aborts at once would now remove the temporary dir
        return real(*args, **kwargs)

    monkeypatch.setattr(persist, name, hooked)


@pytest.mark.asyncio
# extend_rows: a checkpoint appends the added rows to the directory's tail (write_rows is
# a full save's: test_a_failing_save_...)
@pytest.mark.parametrize("step", ["remove_leftovers", "extend_rows", "fsync_dir", "install_dir"])
async def test_a_save_cancelled_at_any_step_leaves_the_old_or_the_new_index(
    data, tmp_path, monkeypatch, step
):
    path = tmp_path / "idx"
    build(data[:1000]).save(path)
    old = snapshot(path)
    loop = asyncio.get_running_loop()
    box: list = []
    async with await vdb.AsyncEngine.open(path, mmap=True) as engine:
        await engine.add(data[1000:1200], ids=np.arange(1000, 1200))
        new = {**old, **expected(data[1000:1200], np.arange(1000, 1200))}
        _cancel_inside(monkeypatch, step, loop, box)
        box.append(asyncio.ensure_future(engine.save(path)))
        with contextlib.suppress(asyncio.CancelledError):
            await box[0]
        monkeypatch.undo()
        assert lock_is_free(tmp_path), "a cancelled save kept the parent's lock"
        assert os.listdir(tmp_path) == ["idx"], "a cancelled save left files beside it"
        got = snapshot(path)
        assert same(got, old) or same(got, new)
        await engine.save(path)  # the engine and the directory still work
    assert same(snapshot(path), new)


@pytest.mark.asyncio
async def test_saves_cancelled_at_random_moments_never_lose_the_index(data, tmp_path):
    path = tmp_path / "idx"
    build(data[:1500]).save(path)
    rng = random.Random(3)
    async with await vdb.AsyncEngine.open(path, mmap=True) as engine:
        started = time.perf_counter()
        await engine.save(path)
        took = time.perf_counter() - started
        saved = snapshot(path)
        for attempt in range(12):
            lo = 1500 + 20 * attempt
            await engine.add(data[lo : lo + 20], ids=np.arange(lo, lo + 20))
            memory = {**saved, **expected(data[1500 : lo + 20], np.arange(1500, lo + 20))}
            task = asyncio.ensure_future(engine.save(path))
            await asyncio.sleep(rng.uniform(0, took * 1.2))
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert lock_is_free(tmp_path), f"attempt {attempt}"
            assert os.listdir(tmp_path) == ["idx"], f"attempt {attempt}"
            got = snapshot(path)
            assert same(got, saved) or same(got, memory), f"attempt {attempt}"
            saved = got


# --------------------------------------------------------------------------- the swap


def _fake_exchange(code: int):
    def fn(*args):
        ctypes.set_errno(code)
        return -1

    return lambda: fn


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOENT, errno.EBUSY])
def test_an_exchange_failure_is_raised_not_worked_around(data, tmp_path, monkeypatch, code):
    path = tmp_path / "idx"
    build(data[:1000]).save(path)
    old = snapshot(path)
    monkeypatch.setattr(dirswap, "_renameat2_exchange", _fake_exchange(code))
    index = build(data[:1100])
    with pytest.raises(vdb.StorageError) as caught:
        index.save(path)
    assert caught.value.errno == code
    assert snapshot(path) == old
    assert os.listdir(tmp_path) == ["idx"] and lock_is_free(tmp_path)


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP])
def test_an_unsupported_exchange_falls_back_to_two_renames(data, tmp_path, monkeypatch, code):
    path = tmp_path / "idx"
    build(data[:1000]).save(path)
    monkeypatch.setattr(dirswap, "_renameat2_exchange", _fake_exchange(code))
    with vdb.ClusteredIndex.open(path, mmap=True) as index:
        for lo in (1000, 1100):
            index.add(data[lo : lo + 100], ids=np.arange(lo, lo + 100))
            index.save(path)
    assert len(snapshot(path)) == 1200
    assert os.listdir(tmp_path) == ["idx"]


# --------------------------------------------------------------------------- item 4


def _crash_between_renames(path: Path, x: np.ndarray) -> None:
    """In a child forced onto the two-rename swap: open, add ``x``, save, SIGKILLed right
    after the first rename."""

    def save() -> None:
        # Unlogged adds: only the save can carry them, so old and new differ.
        with vdb.ClusteredIndex.open(path, mmap=True, durability="none") as index:
            index.add(x, ids=np.arange(5000, 5000 + len(x)))
            index.save(path)

    crash_between_renames(path, save)


@pytest.fixture
def crashed(data, tmp_path):
    """An index whose save crashed between the two renames: (path, old, new)."""
    path = tmp_path / "idx"
    build(data[:1000]).save(path)
    old = snapshot(path)
    new = {**old, **expected(data[1000:1100], np.arange(5000, 5100))}
    _crash_between_renames(path, data[1000:1100])
    return path, old, new


def test_open_after_a_crash_between_the_renames_restores_the_new_index(crashed):
    path, _, new = crashed
    assert same(snapshot(path), new)  # ClusteredIndex.open(verify=True) found it again
    with vdb.ClusteredIndex.open(path) as index:
        index.save(path)
    assert os.listdir(path.parent) == ["idx"]
    assert same(snapshot(path), new)


@pytest.mark.asyncio
async def test_engine_open_after_a_crash_between_the_renames_restores_it(crashed):
    path, _, new = crashed
    async with await vdb.AsyncEngine.open(path, verify=True) as engine:
        assert len(engine.index) == len(new)
    assert same(snapshot(path), new)


def test_a_failing_save_after_a_crash_between_the_renames_keeps_an_index(crashed, monkeypatch):
    path, _, new = crashed

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(persist, "write_rows", full)
    with pytest.raises(vdb.StorageError):
        build(np.ones((200, DIM), np.float32) + np.arange(200)[:, None]).save(path)
    monkeypatch.undo()
    assert os.listdir(path.parent) == ["idx"]
    assert same(snapshot(path), new)


def test_a_damaged_new_copy_is_not_restored_the_old_one_is(crashed):
    path, old, _ = crashed
    (tmp,) = [p for p in path.parent.iterdir() if ".tmp-" in p.name]
    (tmp / "ids.npy").write_bytes(b"damaged")
    assert snapshot(path) == old


# --------------------------------------------------------------------------- item 5


@pytest.mark.asyncio
async def test_a_save_timed_out_while_being_prepared_releases_the_lock(data, tmp_path, monkeypatch):
    path = tmp_path / "idx"
    build(data[:1000]).save(path)
    old = snapshot(path)
    real = persist.remove_leftovers

    def slow(*args, **kwargs):
        time.sleep(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(persist, "remove_leftovers", slow)
    # Unlogged adds: the directory shows them only once a save succeeds.
    async with await vdb.AsyncEngine.open(path, mmap=True, durability="none") as engine:
        await engine.add(data[1000:1100], ids=np.arange(1000, 1100))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(engine.save(path), 0.05)
        monkeypatch.undo()
        assert lock_is_free(tmp_path), "the timed-out save kept the parent's lock"
        assert os.listdir(tmp_path) == ["idx"]
        assert snapshot(path) == old
        save_in_subprocess(path, tmp_path / "other")  # another process saves into the parent
        shutil.rmtree(tmp_path / "other")
        await asyncio.wait_for(engine.save(path), 60)
    assert len(snapshot(path)) == 1100


@pytest.mark.asyncio
async def test_a_save_waiting_for_another_saves_lock_can_time_out(data, tmp_path):
    path = tmp_path / "idx"
    build(data[:1000]).save(path)
    holder = os.open(tmp_path, os.O_RDONLY)  # as a save in another process would
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        async with await vdb.AsyncEngine.open(path, mmap=True) as engine:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(engine.save(path), 0.2)
            assert os.listdir(tmp_path) == ["idx"]
            os.close(holder)
            holder = -1
            assert lock_is_free(tmp_path)  # the given-up save holds no lock
        save_in_subprocess(path, timeout=30)  # nor, once closed, the writer's
    finally:
        if holder >= 0:
            os.close(holder)
    assert len(snapshot(path)) == 1000


@pytest.mark.asyncio
async def test_aclose_during_a_save_waits_for_it(data, tmp_path, monkeypatch):
    path = tmp_path / "idx"
    build(data[:1000]).save(path)
    entered, go = threading.Event(), threading.Event()
    real = persist.extend_rows  # a checkpoint's one write of vectors: the added rows

    def held(*args, **kwargs):
        entered.set()
        go.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(persist, "extend_rows", held)
    engine = await vdb.AsyncEngine.open(path, mmap=True)
    await engine.add(data[1000:1100], ids=np.arange(1000, 1100))
    saving = asyncio.ensure_future(engine.save(path))
    assert await asyncio.to_thread(entered.wait, 10)
    closing = asyncio.ensure_future(engine.aclose())
    await asyncio.sleep(0.1)  # aclose is under way
    go.set()
    await asyncio.wait_for(closing, 30)
    await asyncio.wait_for(saving, 30)  # the save completed: no error
    assert engine.state is vdb.EngineState.CLOSED
    assert lock_is_free(tmp_path) and os.listdir(tmp_path) == ["idx"]
    assert len(snapshot(path)) == 1100
    with pytest.raises(vdb.EngineClosedError):
        await engine.save(path)


# --------------------------------------------------------------------------- races


def test_two_saves_racing_into_one_path_leave_one_of_them(data, tmp_path):
    """Each index's first save binds it to the path; its next, a checkpoint, makes it the
    directory's writer: the other's saves are then refused (IndexLockedError), never
    silently laid over its writes. Whatever the order, one whole index is left."""
    path = tmp_path / "idx"
    a, b = build(data[:800]), build(data[800:1800])
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []
    saved = {800: 0, 1000: 0}

    def save(index: vdb.ClusteredIndex) -> None:
        try:
            barrier.wait(10)
            for _ in range(3):
                try:
                    index.save(path)
                    saved[len(index)] += 1
                except vdb.IndexLockedError:
                    pass
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(i,)) for i in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)
    assert saved[800] + saved[1000] >= 3  # the writer's three, at least
    assert len(snapshot(path)) in (800, 1000)
    assert sorted(os.listdir(tmp_path)) == ["idx"]
    a.close()
    b.close()


@pytest.mark.asyncio
async def test_an_engine_save_racing_a_sync_save_of_the_same_index(data, tmp_path):
    path = tmp_path / "idx"
    build(data[:1000]).save(path)
    async with await vdb.AsyncEngine.open(path, mmap=True) as engine:
        await engine.add(data[1000:1200], ids=np.arange(1000, 1200))
        await asyncio.wait_for(
            asyncio.gather(
                engine.save(path),
                asyncio.to_thread(engine.index.save, path),
                engine.save(path),
            ),
            60,
        )
        await engine.add(data[1200:1300], ids=np.arange(1200, 1300))
        await engine.save(path)
    assert len(snapshot(path)) == 1300 and os.listdir(tmp_path) == ["idx"]


# --------------------------------------------------------------------------- item 13


def verify(path: Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["--no-progress", "verify", str(path)])
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("kind", ["append", "compact"])
def test_verify_reports_the_scratch_file_of_a_running_process(data, tmp_path, kind):
    """An append file (adds since open), or the compacted vector file after ``compact``."""
    path = tmp_path / "idx"
    build(data[:1000]).save(path)
    code, out, err = verify(path)
    assert code == 0 and out.startswith("OK:") and err == ""
    with vdb.ClusteredIndex.open(path, mmap=True) as index:
        index.add(data[1000:1100], ids=np.arange(1000, 1100))
        if kind == "compact":
            index.compact()  # the append file goes; the compacted file is the only one
        code, out, err = verify(path)
        assert code == 0 and out.startswith("OK:")
        assert f".vectors.bin.{kind}-" in err
        assert "in use by a running process" in err and "died" not in err
        if kind == "compact":
            assert ".append-" not in err
    assert verify(path)[2] == ""  # closed: the scratch file went with it


@pytest.mark.parametrize("kind", ["append", "compact"])
def test_verify_reports_the_scratch_file_a_killed_process_left(data, tmp_path, kind):
    path = tmp_path / "idx"
    build(data[:1000]).save(path)
    pid = os.fork()
    if pid == 0:
        try:
            index = vdb.ClusteredIndex.open(path, mmap=True)
            index.add(data[1000:1100], ids=np.arange(1000, 1100))
            if kind == "compact":
                index.compact()
            os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)
    code, out, err = verify(path)
    assert code == 0 and "1,100 vectors" in out  # the adds returned: the log holds them
    assert f".vectors.bin.{kind}-" in err and "died" in err and "no part of the saved" in err
    assert "safe to delete" in err and "still running" not in err
    with vdb.ClusteredIndex.open(path) as index:
        index.save(path)
    assert verify(path)[2] == ""


def test_leftovers_of_a_name_with_glob_characters_are_found(tmp_path):
    """``idx[1]`` must match its own ``.idx[1].tmp-*`` (and not ``.idx1.tmp-*``)."""
    for name in (".idx[1].tmp-a", ".idx[1].old-b", ".idx1.tmp-c"):
        (tmp_path / name).mkdir()
    tmps, olds = dirswap.leftovers(tmp_path, "idx[1]")
    assert [p.name for p in tmps] == [".idx[1].tmp-a"]
    assert [p.name for p in olds] == [".idx[1].old-b"]
