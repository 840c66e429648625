"""Crash safety: a process killed with SIGKILL at any step of a write leaves an index that
opens, passes ``verify=True``, and is the old version or the new one, never a mix.

Each scenario runs in a forked child that kills itself before its n-th file-system step
(see ``crashpoints``). CI tries a spread of kill points per scenario; set
``VECTORDB_CRASH_ALL=1`` to try every one (``bench/reliability.py`` does, and counts them).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from crashpoints import count_steps, kill_at_step

import vectordb as vdb

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

K = 5
N_BASE = 1500


def kill_points(total: int) -> list[int]:
    """Every step with VECTORDB_CRASH_ALL=1; else the first and last few and a spread."""
    if os.environ.get("VECTORDB_CRASH_ALL"):
        return list(range(1, total + 1))
    spread = np.linspace(1, total, num=min(total, 10)).round().astype(int).tolist()
    return sorted({1, 2, 3, total - 2, total - 1, total, *spread} & set(range(1, total + 1)))


def fingerprint(path: Path, queries: np.ndarray) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Ids, and search results of ``queries``, of the index saved at ``path`` (verified)."""
    with vdb.ClusteredIndex.open(path, mmap=True, verify=True) as index:
        ids, dists = index.search_batch(queries, K, probes=64, rerank_factor=50)
        return sorted(index.ids.tolist()), ids, dists


def same(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return vdb.make_clustered(N_BASE + 400, 48, seed=21)


def changes(index: vdb.ClusteredIndex, x: np.ndarray) -> None:
    """The writes every scenario applies: adds (with metadata), an upsert, deletes."""
    index.add(x[N_BASE : N_BASE + 300], ids=np.arange(10_000, 10_300))
    index.upsert(x[N_BASE + 300 : N_BASE + 301], ids=[5])
    index.delete(np.arange(0, N_BASE, 7))


def save_over(path: Path, x: np.ndarray) -> None:
    with vdb.ClusteredIndex.open(path, mmap=True) as index:
        changes(index, x)
        index.save(path)


def compact_then_save(path: Path, x: np.ndarray) -> None:
    with vdb.ClusteredIndex.open(path, mmap=True) as index:
        changes(index, x)
        index.compact()
        index.save(path)


def engine_save(path: Path, x: np.ndarray) -> None:
    async def run() -> None:
        async with await vdb.AsyncEngine.open(path, mmap=True) as engine:
            await engine.add(x[N_BASE : N_BASE + 300], ids=np.arange(10_000, 10_300))
            await engine.upsert(x[N_BASE + 300 : N_BASE + 301], ids=[5])
            await engine.delete(np.arange(0, N_BASE, 7))
            await engine.save(path)

    asyncio.run(run())


def add_without_save(path: Path, x: np.ndarray) -> None:
    with vdb.ClusteredIndex.open(path, mmap=True) as index:
        changes(index, x)
        index.compact()


SCENARIOS: dict[str, Callable[[Path, np.ndarray], None]] = {
    "save over the old index": save_over,
    "compact, then save": compact_then_save,
    "async engine save": engine_save,
    "writes in mmap mode, no save": add_without_save,
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_a_kill_at_any_step_leaves_the_old_or_the_new_index(scenario, data, tmp_path):
    action = SCENARIOS[scenario]
    queries = data[:: len(data) // 20][:20] + np.float32(0.01)
    work = tmp_path / "work"
    work.mkdir()
    path = work / "index"
    vdb.ClusteredIndex.build(data[:N_BASE], metric="cosine", max_leaf_size=150).save(path)
    pristine = tmp_path / "pristine"
    shutil.copytree(path, pristine)
    old = fingerprint(path, queries)
    total = count_steps(lambda: action(path, data))
    new = fingerprint(path, queries)
    if scenario != "writes in mmap mode, no save":
        assert not same(old, new), "the scenario must change the index"
    assert total >= 5
    for n in kill_points(total):
        shutil.rmtree(path)
        shutil.copytree(pristine, path)
        kill_at_step(lambda: action(path, data), n)
        got = fingerprint(path, queries)
        assert same(got, old) or same(got, new), f"{scenario}: step {n} of {total} left a mix"
    # A save after a crash finds its way and leaves nothing of the crashed one behind.
    with vdb.ClusteredIndex.open(path) as index:
        index.save(path)
    assert sorted(os.listdir(work)) == ["index"]


def test_a_kill_during_a_first_save_leaves_nothing_or_the_whole_index(data, tmp_path):
    index = vdb.ClusteredIndex.build(data[:N_BASE], metric="l2", max_leaf_size=150)
    queries = data[:10]
    work = tmp_path / "work"
    work.mkdir()
    path = work / "index"
    total = count_steps(lambda: index.save(path))
    whole = fingerprint(path, queries)
    for n in kill_points(total):
        shutil.rmtree(work)
        work.mkdir()
        kill_at_step(lambda: index.save(path), n)
        if path.exists():
            assert same(fingerprint(path, queries), whole), f"step {n} of {total}"
        assert {p for p in os.listdir(work) if not p.startswith(".")} <= {"index"}
    index.save(path)  # cleans up what the crashed saves left
    assert os.listdir(work) == ["index"]


def test_a_kill_during_use_mmap_storage_leaves_no_partial_file(data, tmp_path):
    x = data[:N_BASE]
    target = tmp_path / "vectors.f32"

    def move() -> None:
        vdb.ClusteredIndex.build(x, max_leaf_size=150).use_mmap_storage(target)

    total = count_steps(move)
    whole = target.read_bytes()
    for n in kill_points(total):
        target.unlink(missing_ok=True)
        kill_at_step(move, n)
        assert not target.exists() or target.read_bytes() == whole, f"step {n} of {total}"
