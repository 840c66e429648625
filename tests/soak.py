"""A soak of the async engine: many concurrent callers search, add, upsert and delete for a
bounded time, checked against a brute-force oracle.

Used by ``test_soak.py`` (seconds) and ``bench/reliability.py`` (minutes). Writers own
disjoint id ranges, so the oracle knows, for every id, when each of its vectors may have
been visible: from the start of the call that wrote it to the end of the call that
replaced or deleted it. A search result is wrong if an id it returns could not have been
live during the search, or if the returned distance is not the true distance to one of the
vectors that id could have had. At the end every live id must be found by an exact search
of its own vector, and the index must hold exactly the oracle's ids.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import vectordb as vdb

__all__ = ["SoakReport", "soak"]

INF = math.inf


@dataclass
class _Version:
    vector: np.ndarray
    start: float  # the call that wrote it began
    end: float = INF  # the call that replaced or deleted it ended


@dataclass
class SoakReport:
    seconds: float = 0.0
    callers: int = 0
    searches: int = 0
    adds: int = 0
    upserts: int = 0
    deletes: int = 0
    compactions: int = 0
    wrong_results: int = 0
    lost_ids: int = 0
    extra_ids: int = 0
    final_live: int = 0
    rss_mb: list[float] = field(default_factory=list)
    index_mb: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def operations(self) -> int:
        return self.searches + self.adds + self.upserts + self.deletes


def _rss_anon_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


async def soak(
    seconds: float,
    *,
    searchers: int = 16,
    writers: int = 4,
    dim: int = 32,
    start_size: int = 3000,
    seed: int = 0,
    compact_every: float = 1.0,
) -> SoakReport:
    """Run the soak for ``seconds``; returns what happened (see the module docstring)."""
    rng = np.random.default_rng(seed)
    base = vdb.make_clustered(start_size, dim, seed=seed)
    index = vdb.ClusteredIndex.build(base, metric="l2", max_leaf_size=200, seed=seed)
    history: dict[int, list[_Version]] = {i: [_Version(base[i], -INF)] for i in range(start_size)}
    deleted: dict[int, tuple[float, float]] = {}  # id -> (delete call start, end)
    report = SoakReport(callers=searchers + writers)
    stop_at = time.monotonic() + seconds
    loop = asyncio.get_running_loop()

    def fresh_vectors(n: int) -> np.ndarray:
        centre = base[rng.integers(0, start_size, n)]
        return (centre + rng.normal(0, 0.05, (n, dim))).astype(np.float32)

    async def writer(w: int) -> None:
        next_id = 1_000_000 * (w + 1)
        mine: list[int] = list(range(w, start_size, writers))  # initial ids it may change
        wrng = random.Random(seed * 1000 + w)
        target = len(mine)  # adds and deletes keep the index about its starting size
        last_compact = time.monotonic()
        while time.monotonic() < stop_at:
            if w == 0 and time.monotonic() - last_compact > compact_every:
                await engine.compact()  # tombstones hold memory until compaction
                report.compactions += 1
                last_compact = time.monotonic()
            action = wrng.random()
            if len(mine) < 20 or (action < 0.5 and len(mine) < 2 * target):
                n = wrng.randint(1, 40)
                ids = list(range(next_id, next_id + n))
                next_id += n
                vecs = fresh_vectors(n)
                t0 = loop.time()
                for i, v in zip(ids, vecs, strict=True):  # visible from the start of the call
                    history[i] = [_Version(v, t0)]
                await engine.add(vecs, ids=ids)
                mine.extend(ids)
                report.adds += 1
            elif action < 0.7:
                i = mine[wrng.randrange(len(mine))]
                v = fresh_vectors(1)
                t0 = loop.time()
                history[i].append(_Version(v[0], t0))  # the new vector, from the call's start
                await engine.upsert(v, ids=[i])
                t1 = loop.time()
                history[i][-2].end = t1
                report.upserts += 1
            else:
                gone = wrng.sample(mine, min(len(mine) - 10, wrng.randint(1, 40)))
                t0 = loop.time()
                await engine.delete(gone)
                t1 = loop.time()
                for i in gone:
                    history[i][-1].end = t1
                    deleted[i] = (t0, t1)
                mine = [i for i in mine if i not in set(gone)]
                report.deletes += 1
            await asyncio.sleep(0)

    def possible(i: int, t0: float, t1: float) -> list[np.ndarray]:
        """Vectors id ``i`` may have had during a search from ``t0`` to ``t1``."""
        return [v.vector for v in history.get(i, []) if v.start <= t1 and v.end >= t0]

    in_flight: dict[int, float] = {}  # searcher -> start of its running search

    def prune() -> None:
        """Forget versions no running or later search can see (keeps the oracle bounded)."""
        horizon = min(in_flight.values(), default=loop.time())
        for i in [i for i, (_, end) in deleted.items() if end < horizon]:
            del deleted[i]
            del history[i]
        for versions in history.values():
            while len(versions) > 1 and versions[0].end < horizon:
                versions.pop(0)

    async def searcher(s: int) -> None:
        srng = np.random.default_rng(seed * 7919 + s)
        while time.monotonic() < stop_at:
            q = (base[srng.integers(0, start_size)] + srng.normal(0, 0.1, dim)).astype(np.float32)
            t0 = loop.time()
            in_flight[s] = t0
            ids, dists = await engine.search(q, 10, probes=8, rerank_factor=4)
            del in_flight[s]
            t1 = loop.time()
            report.searches += 1
            for i, d in zip(ids.tolist(), dists.tolist(), strict=True):
                if i < 0:
                    continue
                candidates = possible(i, t0, t1)
                true = [float(np.sum((c.astype(np.float64) - q) ** 2)) for c in candidates]
                if not any(abs(d - t) <= 1e-3 * max(1.0, t) for t in true):
                    report.wrong_results += 1
                    if len(report.problems) < 10:
                        report.problems.append(f"id {i} distance {d} not in {true}")

    async def sample_rss() -> None:
        while time.monotonic() < stop_at:
            prune()
            report.rss_mb.append(_rss_anon_mb())
            report.index_mb.append(index.memory_usage_bytes() / 2**20)
            await asyncio.sleep(max(0.05, seconds / 50))

    started = time.monotonic()
    async with vdb.AsyncEngine(index, max_workers=2) as engine:
        await asyncio.gather(
            *(writer(w) for w in range(writers)),
            *(searcher(s) for s in range(searchers)),
            sample_rss(),
        )
        report.seconds = time.monotonic() - started
        report.rss_mb.append(_rss_anon_mb())
        live = {i for i, versions in history.items() if versions[-1].end == INF}
        prune()
        report.final_live = len(live)
        found = set(index.ids.tolist())
        if found != live:
            report.lost_ids += len(live - found)
            report.extra_ids += len(found - live)
            report.problems.append(
                f"{len(live - found)} live ids missing, {len(found - live)} extra ids"
            )
        check = sorted(live)
        picks = [check[j] for j in np.random.default_rng(seed).choice(len(check), 300)]
        vecs = np.stack([history[i][-1].vector for i in picks])
        got, _ = await engine.search_batch(vecs, 1, probes=index.n_leaves, rerank_factor=64)
        for i, g in zip(picks, got[:, 0].tolist(), strict=True):
            if g != i:
                report.lost_ids += 1
                report.problems.append(f"id {i} not found by its own vector (got {g})")
    return report
