"""A sharded index served by Ray actors, behind the same ``await search`` as AsyncEngine.

    pip install 'vectordb-embedded[ray]'
    python examples/distributed_search.py [--n 50000] [--dim 128] [--shards 4] [--local-threads]

Builds a kmeans-placed sharded index over synthetic embeddings, starts a local Ray
instance with two replicas of every shard, searches it (every shard, then routed to the 2
nearest), adds and deletes, kills one replica and searches again (the other answers), and
closes. Without Ray installed, or with ``--local-threads``, the same shards run in this
process (``address="local-threads"``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import signal
import tempfile
import time
from pathlib import Path

import numpy as np

import vectordb as vdb
from vectordb.distributed import ShardedEngine, build_shards


async def run(args: argparse.Namespace, root: Path, address: str | None) -> None:
    data = vdb.make_clustered(args.n + 100, args.dim, seed=0)
    vectors, queries = data[: args.n], data[args.n :]
    layout = build_shards(vectors, root, shards=args.shards, metric="cosine", placement="kmeans")
    print(f"built {layout.shards} shards of {list(layout.counts)} vectors")
    async with await ShardedEngine.open(root, replicas=2, address=address) as engine:
        print(f"serving on {engine.backend_name}: {[len(a) for a in engine.actors()]} replicas")
        t = time.perf_counter()
        hits = await asyncio.gather(*(engine.search(q, k=10) for q in queries))
        print(f"100 concurrent searches in {1e3 * (time.perf_counter() - t):.0f} ms")
        routed = await asyncio.gather(*(engine.search(q, k=10, route=2) for q in queries))
        same = np.mean([len(set(a[0]) & set(b[0])) / 10 for a, b in zip(hits, routed, strict=True)])
        print(f"routed to 2 of {layout.shards} shards: {same:.0%} of the neighbours agree")
        new = await engine.add(queries[:2])
        print(f"added ids {new.tolist()}; now {await engine.count()} vectors")
        await engine.delete(new)
        if engine.backend_name == "ray":
            pid = await engine.actors()[0][0].ping.remote()
            os.kill(pid, signal.SIGKILL)
        else:
            await engine.actors()[0][0].kill()
        ids, _ = await engine.search(queries[0], k=10)
        print(f"one replica of shard 0 killed; still answered: {ids[:3].tolist()} ...")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--local-threads", action="store_true", help="no Ray: shards in process")
    args = parser.parse_args()
    use_ray = not args.local_threads and importlib.util.find_spec("ray") is not None
    if not use_ray and not args.local_threads:
        print("Ray is not installed (pip install 'vectordb-embedded[ray]'): shards in process")
    with tempfile.TemporaryDirectory() as tmp:
        if use_ray:
            import ray

            ray.init(address="local", include_dashboard=False, log_to_driver=False)
            try:
                asyncio.run(run(args, Path(tmp) / "sharded", None))
            finally:
                ray.shutdown()
        else:
            asyncio.run(run(args, Path(tmp) / "sharded", "local-threads"))


if __name__ == "__main__":
    main()
