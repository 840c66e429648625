"""A living index on 100k x 384: inserts, deletes, compaction, filtered search.

    python bench/living_bench.py [--n 100000] [--dim 384] [--batch 1000]
    python bench/living_bench.py --durable [--n 100000] [--dim 384]

Reports insert throughput (vectors/s) in RAM and in mmap mode (half the data built, half
added in batches); batched search QPS and recall@10 with 30% of the vectors deleted versus
after ``compact()``; and a filter matching 1% of the vectors versus no filter. Recall is
against brute force over the live (and, for the filter, matching) vectors.

``--durable``: the write-ahead log instead. An index of ``n`` vectors saved and opened
with each ``durability`` (``none``, ``flush``, ``fsync``): single-vector adds from 64
concurrent ``await engine.add`` callers (adds/s), the latency of one add from one caller
(median), 10,000-vector batch adds through the index (median of 5, the modes in turn), the bytes a
checkpoint writes after 1% new vectors, and the time to open an index whose log holds
100,000 single-vector writes (a process that died before its checkpoint). Beside it,
where installed, LanceDB's and Qdrant's local mode's adds (one vector a call from one
caller, and 10,000 in one call), and the log itself against SQLite in WAL mode.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from procio import wchar

import vectordb as vdb


def brute(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int = 10) -> np.ndarray:
    """Exact cosine top-k ids among rows ``ids`` of ``x``."""
    xn = x[ids] / np.linalg.norm(x[ids], axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    sims = qn @ xn.T
    return ids[np.argsort(-sims, axis=1)[:, :k]]


def qps_recall(index: vdb.ClusteredIndex, q: np.ndarray, truth: np.ndarray, **kw: object):
    index.search_batch(q[:50], 10, **kw)
    runs = []
    for _ in range(3):
        t = time.perf_counter()
        ids, _ = index.search_batch(q, 10, **kw)
        runs.append(time.perf_counter() - t)
    rec = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth, strict=True)])
    return len(q) / statistics.median(runs), float(rec)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir())


async def _concurrent_adds(path: Path, durability: str, x: np.ndarray, first: int) -> tuple:
    """(adds/s from 64 callers, median ms of one caller's add) with ``durability``."""
    async with await vdb.AsyncEngine.open(path, durability=durability) as engine:
        per = len(x) // 64

        async def caller(c: int) -> None:
            for i in range(per):
                row = c * per + i
                await engine.add(x[row : row + 1], ids=[first + row])

        t = time.perf_counter()
        await asyncio.gather(*(caller(c) for c in range(64)))
        rate = 64 * per / (time.perf_counter() - t)
        alone = []
        for i in range(200):
            t = time.perf_counter()
            await engine.add(x[i : i + 1], ids=[first + 1_000_000 + i])
            alone.append(time.perf_counter() - t)
        return rate, statistics.median(alone) * 1e3


def _log_choice(tmp: Path, x: np.ndarray) -> None:
    """Durable writes of one vector, and of 10,000 in one write: the write-ahead log
    against SQLite in WAL mode with ``synchronous=FULL`` (a transaction per write), the
    same rows, the two in turn, five rounds; medians."""
    import sqlite3

    from vectordb.index.records import OP_ADD, encode_write
    from vectordb.storage.wal import WriteLog, read_log

    log_path = tmp / "choice.log"
    WriteLog.create(log_path, 0)
    log = WriteLog.open(log_path, "fsync", 0, 0, read_log(log_path)[2])
    db = sqlite3.connect(tmp / "choice.sqlite", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE w (id INTEGER PRIMARY KEY, vec BLOB NOT NULL, doc TEXT)")
    single: dict[str, list[float]] = {"log": [], "sqlite": []}
    batch: dict[str, list[float]] = {"log": [], "sqlite": []}
    rows, block = x[:500], x[500:10_500]
    for r in range(5):
        first = r * 20_000
        t = time.perf_counter()
        for i, row in enumerate(rows):
            payload = encode_write(OP_ADD, np.array([first + i], np.int64), row[None], ['{"t":1}'])
            log.commit(log.append(payload))
        single["log"].append(len(rows) / (time.perf_counter() - t))
        t = time.perf_counter()
        for i, row in enumerate(rows):
            db.execute("BEGIN")
            db.execute("INSERT INTO w VALUES (?, ?, ?)", (first + i, row.tobytes(), '{"t":1}'))
            db.execute("COMMIT")
        single["sqlite"].append(len(rows) / (time.perf_counter() - t))
        ids = np.arange(first + 1_000, first + 1_000 + len(block), dtype=np.int64)
        t = time.perf_counter()
        log.commit(log.append(encode_write(OP_ADD, ids, block, None)))
        batch["log"].append(time.perf_counter() - t)
        t = time.perf_counter()
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO w VALUES (?, ?, NULL)",
            ((int(i), v.tobytes()) for i, v in zip(ids, block, strict=True)),
        )
        db.execute("COMMIT")
        batch["sqlite"].append(time.perf_counter() - t)
    log.close()
    db.close()
    med = {k: statistics.median(v) for k, v in single.items()}
    mb = {k: statistics.median(v) * 1e3 for k, v in batch.items()}
    print(
        f"\nthe log itself, durable writes of {x.shape[1]}-d vectors (medians of 5 rounds):"
        f" one vector a write: wal.log {med['log']:,.0f}/s, SQLite (WAL, synchronous=FULL,"
        f" a transaction each) {med['sqlite']:,.0f}/s ({med['log'] / med['sqlite']:.2f}x);"
        f" 10,000 in one write: wal.log {mb['log']:,.0f} ms, SQLite {mb['sqlite']:,.0f} ms"
        f" ({mb['sqlite'] / mb['log']:.2f}x as long)"
    )


def _peers(tmp: Path, x: np.ndarray) -> None:
    """The same durable adds in LanceDB and Qdrant's local mode, where installed: one
    caller adding one vector at a time, and 10,000 in one call (medians of 3)."""
    rows = x[:2_000]
    batch = x[2_000:12_000]
    try:
        import lancedb

        db = lancedb.connect(str(tmp / "lance"))
        table = db.create_table("t", data=[{"id": -1, "vector": x[0].tolist(), "text": "t"}])
        t = time.perf_counter()
        for i, row in enumerate(rows):
            table.add([{"id": i, "vector": row.tolist(), "text": "t"}])
        single = len(rows) / (time.perf_counter() - t)
        times = []
        for r in range(3):
            data = [
                {"id": 10**6 * (r + 1) + i, "vector": v.tolist(), "text": "t"}
                for i, v in enumerate(batch)
            ]
            t = time.perf_counter()
            table.add(data)
            times.append(time.perf_counter() - t)
        version = importlib.metadata.version("lancedb")
        print(
            f"| LanceDB {version} | {single:,.0f} adds/s (one caller) |"
            f" {statistics.median(times) * 1e3:,.0f} ms |"
        )
    except ImportError:
        print("| LanceDB | not installed | |")
    try:
        import qdrant_client
        from qdrant_client.models import Distance, PointStruct, VectorParams

        client = qdrant_client.QdrantClient(path=str(tmp / "qdrant"))
        client.create_collection(
            "t", vectors_config=VectorParams(size=x.shape[1], distance=Distance.COSINE)
        )
        t = time.perf_counter()
        for i, row in enumerate(rows):
            client.upsert(
                "t", points=[PointStruct(id=i, vector=row.tolist(), payload={"text": "t"})]
            )
        single = len(rows) / (time.perf_counter() - t)
        times = []
        for r in range(3):
            points = [
                PointStruct(id=10**6 * (r + 1) + i, vector=v.tolist(), payload={"text": "t"})
                for i, v in enumerate(batch)
            ]
            t = time.perf_counter()
            client.upsert("t", points=points)
            times.append(time.perf_counter() - t)
        client.close()
        version = importlib.metadata.version("qdrant-client")
        print(
            f"| Qdrant local mode ({version}) | {single:,.0f} adds/s (one caller) |"
            f" {statistics.median(times) * 1e3:,.0f} ms |"
        )
    except ImportError:
        print("| Qdrant local mode | not installed | |")


def durable(args: argparse.Namespace) -> None:
    x = vdb.make_clustered(args.n + 200_000, args.dim, seed=0)
    base, extra = x[: args.n], x[args.n :]
    print(f"{args.n:,} x {args.dim}, cosine; durable writes (the write-ahead log)\n")
    print("| durability | 64 callers, 1 vector each | one caller, 1 vector | 10,000 in one add |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        built = vdb.ClusteredIndex.build(base, metric="cosine")
        modes = ("none", "flush", "fsync")
        single = {}
        for durability in modes:
            path = Path(tmp) / durability
            built.save(path)
            built.detach()
            single[durability] = asyncio.run(
                _concurrent_adds(path, durability, extra[:3_840], 10**7)
            )
        # Batches: the three modes in turn, five rounds (the machine's noise spread evenly).
        indexes = {d: vdb.ClusteredIndex.open(Path(tmp) / d, durability=d) for d in modes}
        batch: dict[str, list[float]] = {d: [] for d in modes}
        for r in range(5):
            rows = extra[10_000 + r * 10_000 : 20_000 + r * 10_000]
            ids = np.arange(2 * 10**7 + r * 10_000, 2 * 10**7 + (r + 1) * 10_000)
            for durability in modes:
                t = time.perf_counter()
                indexes[durability].add(rows, ids=ids)
                batch[durability].append(time.perf_counter() - t)
        for durability in modes:
            indexes[durability].close()
            rate, ms = single[durability]
            took = statistics.median(batch[durability])
            ratio = took / statistics.median(batch["none"])
            print(
                f"| {durability} | {rate:,.0f} adds/s | {ms:.2f} ms | "
                f"{took * 1e3:,.0f} ms ({ratio:.2f}x) |"
            )
        print("\n| peer | one vector at a time | 10,000 in one add |")
        print("|---|---|---|")
        _peers(Path(tmp), extra)
        _log_choice(Path(tmp), extra[:10_500])
        path = Path(tmp) / "checkpoint"
        built.save(path)
        built.detach()
        with vdb.ClusteredIndex.open(path) as index:
            index.add(extra[: args.n // 100], ids=np.arange(3 * 10**7, 3 * 10**7 + args.n // 100))
            written = wchar()
            t = time.perf_counter()
            index.checkpoint()
            seconds = time.perf_counter() - t
            written = wchar() - written
        size = _dir_bytes(path)
        print(
            f"\ncheckpoint after 1% new vectors: wrote {written / 1e6:,.1f} MB"
            f" ({written / size:.1%} of the index's {size / 1e6:,.1f} MB) in {seconds:.2f} s"
            " (bench/checkpoint_bench.py: several rounds, and at 1M)"
        )
        path = Path(tmp) / "replay"
        built.save(path)
        built.detach()
        with vdb.ClusteredIndex.open(path, durability="flush") as index:
            t = time.perf_counter()
            for i in range(100_000):
                index.add(extra[i : i + 1], ids=[4 * 10**7 + i])
            logging = time.perf_counter() - t
        log_mb = (path / "wal.log").stat().st_size / 1e6
        opens = []
        for _ in range(3):
            t = time.perf_counter()
            with vdb.ClusteredIndex.open(path, readonly=True) as index:
                assert len(index) == args.n + 100_000
            opens.append(time.perf_counter() - t)
        built.save(Path(tmp) / "plain")
        t = time.perf_counter()
        with vdb.ClusteredIndex.open(Path(tmp) / "plain", readonly=True):
            plain = time.perf_counter() - t
        print(
            f"open with 100,000 logged single-vector writes ({log_mb:,.0f} MB of log, written at"
            f" {100_000 / logging:,.0f} adds/s): {statistics.median(opens):.2f} s"
            f" (median of 3; {plain:.2f} s without a log)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--durable", action="store_true", help="the write-ahead log's figures")
    args = parser.parse_args()
    if args.durable:
        durable(args)
        return
    data = vdb.make_clustered(args.n + args.queries, args.dim, seed=0)
    x, q = data[: args.n], data[args.n :]
    half = args.n // 2
    print(f"{args.n:,} x {args.dim}, cosine, k=10, default search parameters\n")
    print("| step | figure |")
    print("|---|---|")
    for mode in ("RAM", "mmap"):
        with tempfile.TemporaryDirectory() as tmp:
            index = vdb.ClusteredIndex.build(x[:half], metric="cosine")
            if mode == "mmap":
                index.use_mmap_storage(Path(tmp) / "vectors.bin")
            t = time.perf_counter()
            for start in range(half, args.n, args.batch):
                stop = min(args.n, start + args.batch)
                index.add(x[start:stop], ids=np.arange(start, stop))
            rate = (args.n - half) / (time.perf_counter() - t)
            print(f"| insert, {mode}, batches of {args.batch:,} | {rate:,.0f} vectors/s |")
            if mode == "RAM":
                single = time.perf_counter()
                for i in range(200):
                    index.upsert(x[i : i + 1], ids=[i])
                per = (time.perf_counter() - single) / 200 * 1e3
                print(f"| upsert one vector, {mode} | {per:.2f} ms each |")
                grown = index
            else:
                index.close()

    index = grown
    all_ids = np.arange(args.n)
    truth = brute(x, all_ids, q)
    qps, rec = qps_recall(index, q, truth)
    print(f"| search, all {args.n:,} live (grown by adds) | {qps:,.0f} QPS, recall {rec:.3f} |")
    rng = np.random.default_rng(1)
    gone = rng.choice(args.n, size=int(0.3 * args.n), replace=False)
    index.delete(gone)
    live = np.setdiff1d(all_ids, gone)
    truth = brute(x, live, q)
    qps, rec = qps_recall(index, q, truth)
    print(f"| search, 30% deleted | {qps:,.0f} QPS, recall {rec:.3f} |")
    t = time.perf_counter()
    index.compact()
    print(f"| compact() | {time.perf_counter() - t:.2f} s |")
    qps, rec = qps_recall(index, q, truth)
    print(f"| search, after compact() | {qps:,.0f} QPS, recall {rec:.3f} |")

    meta = [{"tenant": int(i % 100)} for i in range(args.n)]
    tagged = vdb.ClusteredIndex.build(x, metadata=meta, metric="cosine")
    truth = brute(x, all_ids, q)
    qps, rec = qps_recall(tagged, q, truth)
    print(f"| search, no filter | {qps:,.0f} QPS, recall {rec:.3f} |")
    truth = brute(x, np.arange(7, args.n, 100), q)
    qps, rec = qps_recall(tagged, q, truth, filter={"tenant": 7})
    print(f"| search, filter matching 1% | {qps:,.0f} QPS, recall {rec:.3f} |")
    truth = brute(x, np.flatnonzero(np.arange(args.n) % 100 < 10), q)
    qps, rec = qps_recall(tagged, q, truth, filter={"tenant": {"$lt": 10}})
    print(f"| search, filter matching 10% | {qps:,.0f} QPS, recall {rec:.3f} |")


if __name__ == "__main__":
    main()
