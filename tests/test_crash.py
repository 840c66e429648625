"""Crash safety: a process killed with SIGKILL at any step of a write leaves an index that
opens, passes ``verify=True``, and is the old version or the new one, never a mix.

Each scenario runs in a forked child that kills itself before its n-th file-system step
(see ``crashpoints``: file writes, fsyncs, renames, and SQLite's own steps as the metadata
database is written). Every kill point of every scenario is tried. The index carries
metadata, and a version is what a reader sees of it: ids, stored vectors, every id's
metadata, plain and filtered search results. Saves over an index are tried with the
rename exchange and with the two renames used where the OS lacks it.
``bench/reliability.py`` runs the same kill points and counts the outcomes.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pytest
from crashpoints import kill_at_step, trace_steps

import vectordb as vdb

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

K = 5
N_BASE = 600
N_ADD = 150
FILTER = {"tag": 2}
MATCHING = {"tag": {"$in": [2, 99]}}


@dataclass(frozen=True)
class Version:
    """What a reader of a saved index sees (compared field by field)."""

    ids: tuple[int, ...]
    vectors: bytes  # the stored float32 vectors of ``ids``, in that order
    metadata: tuple[str, ...]  # every metadata document, as JSON, sorted (each names its id)
    with_metadata: tuple[int, ...]  # the ids that have metadata
    hits: bytes  # ids and distances of a wide search
    filtered: bytes  # ids and distances of a search with ``FILTER``
    matching: tuple[int, ...]  # ids_matching(MATCHING)


def fingerprint(path: Path, queries: np.ndarray) -> Version:
    """The version of the index saved at ``path``, opened with ``verify=True``. On one
    backend whatever the environment: module fixtures are made before the autouse one that
    sets ``VECTORDB_BACKEND``, and backends differ in the last bit of a distance."""
    with vdb.ClusteredIndex.open(path, mmap=True, verify=True, backend="numpy") as index:
        ids = np.sort(index.ids)
        docs: list[str] = []

        def record(doc: dict[str, object]) -> bool:  # one pass, not a query per id
            docs.append(json.dumps(doc, sort_keys=True))
            return True

        with_metadata = index.ids_matching(record)
        hits = index.search_batch(queries, K, probes=64, rerank_factor=50)
        filtered = index.search_batch(queries, K, probes=64, rerank_factor=50, filter=FILTER)
        return Version(
            ids=tuple(ids.tolist()),
            vectors=index.get_vectors(ids).tobytes(),
            metadata=tuple(sorted(docs)),
            with_metadata=tuple(with_metadata.tolist()),
            hits=hits[0].tobytes() + hits[1].tobytes(),
            filtered=filtered[0].tobytes() + filtered[1].tobytes(),
            matching=tuple(index.ids_matching(MATCHING).tolist()),
        )


def outcome(path: Path, queries: np.ndarray, old: Version, new: Version) -> str:
    """What a kill left at ``path``: ``"old"``, ``"new"``, ``"mix: ..."`` naming which
    parts come from which version, ``"absent"`` (no index there, and open says so) or
    ``"unreadable: ..."`` (the error of open). An open may restore what a crash left."""
    absent = not os.path.lexists(path)
    try:
        got = fingerprint(path, queries)
    except vdb.VectorDBError as exc:
        return "absent" if absent else f"unreadable: {type(exc).__name__}: {exc}"
    if got == old:
        return "old"
    if got == new:
        return "new"

    def source(name: str) -> str:
        part = getattr(got, name)
        if part == getattr(old, name):
            return "old"
        return "new" if part == getattr(new, name) else "neither"

    return "mix: " + ", ".join(f"{f.name} of {source(f.name)}" for f in fields(Version))


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return vdb.make_clustered(N_BASE + N_ADD + 100, 48, seed=21)


def queries_of(data: np.ndarray) -> np.ndarray:
    return data[:: len(data) // 20][:20] + np.float32(0.01)


def build(data: np.ndarray) -> vdb.ClusteredIndex:
    """The first version: every vector with metadata."""
    meta = [{"id": i, "tag": i % 5, "name": f"v{i}"} for i in range(N_BASE)]
    return vdb.ClusteredIndex.build(
        data[:N_BASE], metric="cosine", max_leaf_size=150, metadata=meta
    )


#: Every document names its id: the sorted documents are the whole id -> metadata map.
ADDED = [{"id": 10_000 + i, "tag": i % 3, "added": True} for i in range(N_ADD)]
UPSERTED = [{"id": 5, "tag": 99}]


def changes(index: vdb.ClusteredIndex, x: np.ndarray) -> None:
    """The writes every scenario applies: adds with metadata, an upsert that replaces a
    vector's metadata, deletes (their metadata goes with them)."""
    new = x[N_BASE : N_BASE + N_ADD]
    index.add(new, ids=np.arange(10_000, 10_000 + N_ADD), metadata=ADDED)
    index.upsert(x[N_BASE + N_ADD :][:1], ids=[5], metadata=UPSERTED)
    index.delete(np.arange(0, N_BASE, 7))


Action = Callable[[Path, np.ndarray], None]
#: The scenarios try the saves: their writes are not logged, so that what a save carries
#: is all that can change (each logged write survives on its own: tests/test_wal.py).
UNLOGGED = "none"


def save_over(path: Path, x: np.ndarray) -> None:
    with vdb.ClusteredIndex.open(path, mmap=True, durability=UNLOGGED) as index:
        changes(index, x)
        index.save(path)


def compact_then_save(path: Path, x: np.ndarray) -> None:
    with vdb.ClusteredIndex.open(path, mmap=True, durability=UNLOGGED) as index:
        changes(index, x)
        index.compact()
        index.save(path)


def engine_save(path: Path, x: np.ndarray) -> None:
    async def run() -> None:
        async with await vdb.AsyncEngine.open(path, mmap=True, durability=UNLOGGED) as engine:
            new = x[N_BASE : N_BASE + N_ADD]
            await engine.add(new, ids=np.arange(10_000, 10_000 + N_ADD), metadata=ADDED)
            await engine.upsert(x[N_BASE + N_ADD :][:1], ids=[5], metadata=UPSERTED)
            await engine.delete(np.arange(0, N_BASE, 7))
            await engine.save(path)

    asyncio.run(run())


def add_without_save(path: Path, x: np.ndarray) -> None:
    with vdb.ClusteredIndex.open(path, mmap=True, durability=UNLOGGED) as index:
        changes(index, x)
        index.compact()


SCENARIOS: dict[str, Action] = {
    "save over the old index": save_over,
    "compact, then save": compact_then_save,
    "async engine save": engine_save,
    "writes in mmap mode, no save": add_without_save,
}
#: How a save swaps its directory in: the rename exchange, or the two renames used where
#: the OS or the file system lacks it (forced in the child).
SWAPS = ("rename exchange", "two renames")


def with_swap(action: Action, swap: str) -> Action:
    """``action`` with ``swap`` forced (it runs in the child: nothing to undo)."""

    def run(path: Path, x: np.ndarray) -> None:
        if swap == "two renames":
            import vectordb.storage.dirswap as dirswap

            assert hasattr(dirswap, "_renameat2_exchange"), "the exchange moved: update me"
            dirswap._renameat2_exchange = lambda: None  # type: ignore[assignment]
        action(path, x)

    return run


@dataclass(frozen=True)
class FirstVersion:
    """A saved first version of the index (never changed) and what a reader sees of it."""

    path: Path
    version: Version


def save_first_version(folder: Path, data: np.ndarray) -> FirstVersion:
    path = folder / "first"
    build(data).save(path)
    return FirstVersion(path, fingerprint(path, queries_of(data)))


@dataclass
class KillReport:
    """Every kill point of one scenario and what it left."""

    old: Version
    new: Version
    steps: list[str]  # the names of the scenario's steps, run to the end
    outcomes: dict[int, str]  # kill point (1-based step) -> outcome()


def try_kill_points(
    scenario: str, swap: str, data: np.ndarray, first: FirstVersion, tmp: Path
) -> KillReport:
    """Copy the first version to ``tmp/work/index``, then kill ``scenario`` at every step
    (each time on a fresh copy) and record what each kill left at the path.

    With two renames only the steps from the swap on are tried: the steps before it are
    the same code as with the exchange, tried there."""
    action = with_swap(SCENARIOS[scenario], swap)
    queries = queries_of(data)
    work = tmp / "work"
    path = work / "index"

    def fresh() -> None:
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(first.path, path)

    fresh()
    steps = trace_steps(lambda: action(path, data))
    new = fingerprint(path, queries)
    start = 1
    if swap == "two renames":
        assert not any(s.startswith("renameat2") for s in steps), "the exchange still ran"
        fresh()
        plain = trace_steps(lambda: with_swap(SCENARIOS[scenario], SWAPS[0])(path, data))
        start = 1 + next(i for i, s in enumerate(plain) if s.startswith("renameat2"))
        same_code = [s.split("(")[0] for s in steps[: start - 1]]
        assert same_code == [s.split("(")[0] for s in plain[: start - 1]]
    outcomes = {}
    for n in range(start, len(steps) + 1):
        fresh()
        kill_at_step(lambda: action(path, data), n)
        outcomes[n] = outcome(path, queries, first.version, new)
    return KillReport(first.version, new, steps, outcomes)


CASES = [pytest.param(s, SWAPS[0], id=s) for s in SCENARIOS] + [
    pytest.param(s, SWAPS[1], id=f"{s}, two renames")
    for s in SCENARIOS
    if s != "writes in mmap mode, no save"
]


@pytest.fixture(scope="module")
def first(data: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> FirstVersion:
    return save_first_version(tmp_path_factory.mktemp("crash"), data)


@pytest.mark.parametrize(("scenario", "swap"), CASES)
def test_a_kill_at_any_step_leaves_the_old_or_the_new_index(scenario, swap, data, first, tmp_path):
    report = try_kill_points(scenario, swap, data, first, tmp_path)
    if scenario != "writes in mmap mode, no save":
        assert report.old != report.new, "the scenario must change the index"
        assert report.old.metadata != report.new.metadata
    assert any(s.startswith("sqlite backup page") for s in report.steps) == (
        scenario != "writes in mmap mode, no save"
    )
    total = len(report.steps)
    bad = {
        n: f"step {n} of {total} ({report.steps[n - 1]}) left {result}"
        for n, result in report.outcomes.items()
        if result not in ("old", "new")
    }
    assert not bad, f"{scenario}, {swap}: {len(bad)} bad kill points:\n" + "\n".join(bad.values())
    # A save after a crash finds its way and leaves nothing of the crashed one behind.
    path = tmp_path / "work" / "index"
    with vdb.ClusteredIndex.open(path) as index:
        index.save(path)
    assert sorted(os.listdir(tmp_path / "work")) == ["index"]


def test_a_kill_during_a_first_save_leaves_nothing_or_the_whole_index(data, tmp_path):
    index = build(data)
    queries = queries_of(data)
    work = tmp_path / "work"
    work.mkdir()
    path = work / "index"
    steps = trace_steps(lambda: index.save(path))
    assert any(s.startswith("sqlite backup page") for s in steps)
    whole = fingerprint(path, queries)
    for n in range(1, len(steps) + 1):
        shutil.rmtree(work)
        work.mkdir()
        kill_at_step(lambda: index.save(path), n)
        result = outcome(path, queries, whole, whole)
        assert result in ("absent", "old"), f"step {n} of {len(steps)} ({steps[n - 1]}): {result}"
        assert {p for p in os.listdir(work) if not p.startswith(".")} <= {"index"}
    index.save(path)  # cleans up what the crashed saves left
    assert os.listdir(work) == ["index"]


def test_a_kill_during_use_mmap_storage_leaves_no_partial_file(data, tmp_path):
    x = data[:N_BASE]
    target = tmp_path / "vectors.f32"

    def move() -> None:
        vdb.ClusteredIndex.build(x, max_leaf_size=150).use_mmap_storage(target)

    steps = trace_steps(move)
    whole = target.read_bytes()
    for n in range(1, len(steps) + 1):
        target.unlink(missing_ok=True)
        kill_at_step(move, n)
        assert not target.exists() or target.read_bytes() == whole, f"step {n} ({steps[n - 1]})"
