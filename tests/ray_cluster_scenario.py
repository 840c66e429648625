"""ShardedEngine on a simulated 3-node Ray cluster; run by tests/test_ray_cluster.py.

A process holds one Ray connection (tests/test_ray.py holds the session's), so this runs in
its own process: ``python tests/ray_cluster_scenario.py OUT.json``. It starts a
``ray.cluster_utils.Cluster`` (a head and two worker nodes, one CPU each, on this machine),
builds a small sharded index (2 shards, replicas=2, each shard's replicas on different
worker nodes) and

1. searches, writes, saves and closes (no actor left alive), then reopens it (the same
   answers);
2. removes a worker node while searches are in flight: every search gets the answer (from
   the replica on the other node, or a restarted one) or ``ShardUnavailableError``, never a
   hang; the lost replicas come back on the nodes left, and writes go on;
3. with one replica per shard, all on one node, removes that node: the typed error within
   ``shard_timeout`` (Ray would wait forever to place the restart: its resource is gone).

It writes what it saw, timings included, as JSON to OUT.json (the test asserts on it), and
always shuts the cluster down. Every wait is bounded (``asyncio.wait_for``).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np

K = 10
BACKEND = "numpy"  # no JIT compile in every actor
SHARD_TIMEOUT = 10.0
WAIT = 60.0  # bound on any one step of the scenario
# Fast node-death detection (the defaults take ~15 s to declare a node dead); the engine's
# failover does not depend on it, the restarts' placement on the nodes left does.
SYSTEM_CONFIG = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 2,
}


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _raylet_pid(node: Any) -> int:
    from ray._private import ray_constants

    return int(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)


def _node_of(pid: int, raylets: dict[int, str]) -> str:
    """The node (its name here) whose raylet started the worker process ``pid``."""
    try:
        while pid > 1:
            if pid in raylets:
                return raylets[pid]
            pid = _ppid(pid)
    except OSError:
        pass
    return "?"


async def _bounded(aw: Any, seconds: float = WAIT) -> Any:
    return await asyncio.wait_for(aw, seconds)


async def _placement(engine: Any, raylets: dict[int, str]) -> list[list[str]]:
    return [
        [_node_of(await _bounded(h.ping.remote(), 30), raylets) for h in shard]
        for shard in engine.actors()
    ]


async def _alive(handles: list[Any], grace: float = 15.0) -> int:
    """How many of ``handles`` still answer a ping (each asked for at most 30 s), asked
    again until none does or ``grace`` seconds passed: ``ray.kill`` returns before the
    actor is gone, so one killed a moment ago may answer once more."""
    import ray

    deadline = time.monotonic() + grace
    while True:
        alive = 0
        for h in handles:
            try:
                await _bounded(h.ping.remote(), 30)
                alive += 1
            except ray.exceptions.RayActorError:
                pass
        if alive == 0 or time.monotonic() > deadline:
            return alive
        await asyncio.sleep(0.5)


def _alive_in_gcs() -> int | None:
    """Actors ALIVE in the cluster's actor table (``ray.util.state`` needs the dashboard,
    which is off here; the GCS table is what it reads)."""
    try:
        import ray

        table = ray._private.state.actors()
        return sum(1 for a in table.values() if a.get("State") == "ALIVE")
    except Exception:  # a private API: report nothing rather than fail
        return None


async def _load(engine: Any, q: np.ndarray, want: np.ndarray, t0: list[float], stop: asyncio.Event):
    """Rounds of concurrent single searches, back to back, until ``stop``; each round's
    start, end and outcome ("answer", "ShardUnavailableError", "wrong", "timeout", other)."""
    from vectordb.distributed import ShardUnavailableError

    rounds = []
    while not stop.is_set():
        start = time.monotonic()
        outcomes = []
        results = await asyncio.gather(
            *(asyncio.wait_for(engine.search(qq, K), 3 * SHARD_TIMEOUT) for qq in q),
            return_exceptions=True,
        )
        end = time.monotonic()
        for i, r in enumerate(results):
            if isinstance(r, ShardUnavailableError):
                outcomes.append("ShardUnavailableError")
            elif isinstance(r, asyncio.TimeoutError):
                outcomes.append("timeout")
            elif isinstance(r, BaseException):
                outcomes.append(f"{type(r).__name__}: {r}")
            else:
                outcomes.append("answer" if np.array_equal(r[0], want[i]) else "wrong")
        rounds.append({"start": start, "end": end, "outcomes": sorted(set(outcomes))})
    base = t0[0] if t0 else 0.0
    for r in rounds:
        r["start"], r["end"] = round(r["start"] - base, 4), round(r["end"] - base, 4)
    return rounds


def _summary(rounds: list[dict[str, Any]], removed: float, per_round: int) -> dict[str, Any]:
    """The load's rounds around the removal (times in seconds from its start)."""
    before = [r for r in rounds if r["end"] <= 0]
    during = [r for r in rounds if r["end"] > 0 and r["start"] < removed]
    after = [r for r in rounds if r["start"] >= removed]

    def took(rs: list[dict[str, Any]]) -> list[float]:
        return [r["end"] - r["start"] for r in rs]

    return {
        "queries_per_round": per_round,
        "rounds": [len(before), len(during), len(after)],  # before, during, after removal
        "outcomes": sorted({o for r in rounds for o in r["outcomes"]}),
        "median_round_before_s": round(float(np.median(took(before))), 4) if before else None,
        # the searches in flight when the node went: removal to their last answer
        "in_flight_answered_s": round(max(r["end"] for r in during), 4) if during else None,
        # the first searches sent once the node was gone (they meet its dead replicas)
        "first_round_after_s": round(took(after)[0], 4) if after else None,
        "slowest_round_after_s": round(max(took(after)), 4) if after else None,
    }


async def scenario(cluster: Any, a: Any, b: Any, root: Path, out: dict[str, Any]) -> None:
    import vectordb as vdb
    from vectordb.distributed import ShardedEngine, ShardUnavailableError, build_shards
    from vectordb.distributed.placement import hash_shards

    x = vdb.make_clustered(3_040, 32, seed=19)
    x, q = x[:3_000], x[3_000:]
    build_shards(x, root, shards=2, max_leaf_size=100, progress=False)
    raylets = {
        _raylet_pid(cluster.head_node): "head",
        _raylet_pid(a): "node_a",
        _raylet_pid(b): "node_b",
    }

    def spread(shard: int, replica: int) -> dict[str, Any]:
        # Shard 0: writer on node_a, reader on node_b; shard 1 the other way round. A custom
        # resource pins a replica for sure (NodeAffinitySchedulingStrategy(soft=True) is a
        # preference: here Ray put such a replica on the head node now and then).
        return {"resources": {("node_a", "node_b")[(shard + replica) % 2]: 0.01}}

    opts = {
        "replicas": 2,
        "shard_timeout": SHARD_TIMEOUT,
        "max_restarts": 2,
        "backend": BACKEND,
        "actor_options": {"num_cpus": 0},
        "replica_options": spread,
    }

    # ---------------------------------------------------------------- 1. across nodes
    async with await ShardedEngine.open(root, address="local-threads", backend=BACKEND) as e:
        want = (await _bounded(e.search_batch(q, K)))[0]
    t = time.monotonic()
    e = await _bounded(ShardedEngine.open(root, **opts))
    out["open_s"] = round(time.monotonic() - t, 3)
    try:
        out["placement"] = await _placement(e, raylets)
        got = await _bounded(asyncio.gather(*(e.search(qq, K) for qq in q)))
        out["same_as_local"] = bool(np.array_equal(np.stack([g[0] for g in got]), want))
        new = await _bounded(e.add(q[:4]))
        seen = []
        for i, id_ in enumerate(new.tolist()):
            for _ in range(2):  # round robin: both replicas of its shard
                seen.append(int((await _bounded(e.search(q[i], 1)))[0][0]) == id_)
        out["writes_seen_by_every_replica"] = all(seen)
        out["deleted"] = await _bounded(e.delete([int(new[3])]))
        await _bounded(e.upsert(q[10:11], [int(new[2])]))
        out["upsert_seen"] = int((await _bounded(e.search(q[10], 1)))[0][0]) == int(new[2])
        await _bounded(e.save())
        after = (await _bounded(e.search_batch(q, K)))[0]
        out["count"] = await _bounded(e.count())
        handles = [h for shard in e.actors() for h in shard]
    finally:
        await _bounded(e.aclose())
    out["alive_after_close"] = await _alive(handles)
    out["alive_in_gcs_after_close"] = _alive_in_gcs()

    # ---------------------------------------------------------------- reopen, then lose a node
    e = await _bounded(ShardedEngine.open(root, **opts))
    try:
        out["same_after_reopen"] = bool(
            np.array_equal((await _bounded(e.search_batch(q, K)))[0], after)
        )
        out["count_after_reopen"] = await _bounded(e.count())
        out["placement_reopened"] = await _placement(e, raylets)
        handles = [h for shard in e.actors() for h in shard]
        stop, t0 = asyncio.Event(), []
        load = asyncio.ensure_future(_load(e, q, after, t0, stop))
        await asyncio.sleep(1.0)  # a few rounds on 3 nodes first
        t0.append(time.monotonic())
        await _bounded(asyncio.to_thread(cluster.remove_node, b, False))
        removed = time.monotonic() - t0[0]
        await asyncio.sleep(2 * SHARD_TIMEOUT)  # rounds facing the lost replicas
        stop.set()
        out["load"] = _summary(await _bounded(load), removed, len(q))
        out["node_removal_s"] = round(removed, 4)
        # node_b's replicas cannot come back while it is gone (their resource left with
        # it): their restarts time out; the replicas on node_a answer every read.
        out["live_replicas_after_removal"] = [len(s) for s in e.actors()]
        out["placement_after_removal"] = await _placement(e, raylets)
        out["same_after_removal"] = bool(
            np.array_equal((await _bounded(e.search_batch(q, K)))[0], after)
        )
        # Writes: shard 0's writer (node_a) takes them; shard 1's (node_b) is gone.
        fresh = np.arange(10_000, 10_040)
        for shard in (0, 1):
            id_ = int(fresh[hash_shards(fresh, 2) == shard][0])
            t = time.monotonic()
            try:
                await _bounded(e.add(q[4 + shard][None], ids=[id_]))
                found = int((await _bounded(e.search(q[4 + shard], 1)))[0][0])
                outcome = "ok" if found == id_ else f"wrong {found}"
            except ShardUnavailableError:
                outcome = "ShardUnavailableError"
            out[f"write_to_shard_{shard}_after_removal"] = outcome
            out[f"write_to_shard_{shard}_s"] = round(time.monotonic() - t, 3)
        handles += [h for shard in e.actors() for h in shard]
    finally:
        await _bounded(e.aclose())
    out["alive_after_close_2"] = await _alive(handles)

    # ---------------------------------------------------------------- 3. no replica left
    on_a = {"resources": {"node_a": 0.01}}
    e = await _bounded(
        ShardedEngine.open(
            root,
            replicas=1,
            shard_timeout=SHARD_TIMEOUT,
            max_restarts=1,
            allow_partial=True,
            backend=BACKEND,
            actor_options={"num_cpus": 0},
            replica_options=lambda shard, replica: on_a,
        )
    )
    try:
        out["placement_one_node"] = await _placement(e, raylets)
        handles = [h for shard in e.actors() for h in shard]
        running = [asyncio.ensure_future(e.search(qq, K)) for qq in q[:8]]
        t = time.monotonic()
        await _bounded(asyncio.to_thread(cluster.remove_node, a, False))
        errors = []
        for r in await asyncio.gather(
            *(asyncio.wait_for(f, 3 * SHARD_TIMEOUT) for f in running), return_exceptions=True
        ):
            errors.append(type(r).__name__ if isinstance(r, BaseException) else "answer")
        out["in_flight_when_lost"] = sorted(set(errors))
        t1 = time.monotonic()
        try:
            await asyncio.wait_for(e.search(q[0], K), 3 * SHARD_TIMEOUT)
            out["after_lost"] = "answer"
        except ShardUnavailableError:
            out["after_lost"] = "ShardUnavailableError"
        out["typed_error_s"] = round(time.monotonic() - t1, 3)
        out["lost_to_last_error_s"] = round(time.monotonic() - t, 3)
        partial = await asyncio.wait_for(e.search(q[0], K, return_partial=True), 3 * SHARD_TIMEOUT)
        out["partial_missing"] = list(partial.missing)
    finally:
        await _bounded(e.aclose())
    out["alive_after_close_3"] = await _alive(handles)
    out["alive_in_gcs_at_end"] = _alive_in_gcs()


def main() -> int:
    out_path = Path(sys.argv[1])
    # Warnings are errors (as under pytest), Ray's own excepted.
    warnings.simplefilter("error")
    warnings.filterwarnings("ignore", module=r"ray(\.|$)")
    warnings.filterwarnings("ignore", module=r"google\.protobuf")

    def terminated(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # run the finally: below, shut the cluster down

    signal.signal(signal.SIGTERM, terminated)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import ray
        from ray.cluster_utils import Cluster

    out: dict[str, Any] = {"ok": False, "error": None, "shard_timeout": SHARD_TIMEOUT}
    work = Path(tempfile.mkdtemp(prefix="vdb-cluster-"))
    cluster = Cluster()
    started = time.monotonic()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # start-up deprecations and notices
            cluster.add_node(
                num_cpus=1,
                resources={"head": 1},
                include_dashboard=False,
                _system_config=SYSTEM_CONFIG,
            )
            a = cluster.add_node(num_cpus=1, resources={"node_a": 1})
            b = cluster.add_node(num_cpus=1, resources={"node_b": 1})
            cluster.wait_for_nodes(WAIT)
            ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        out["cluster_start_s"] = round(time.monotonic() - started, 3)
        out["nodes"] = len([n for n in ray.nodes() if n["Alive"]])
        asyncio.run(asyncio.wait_for(scenario(cluster, a, b, work / "sharded", out), 200))
        out["ok"] = True
    except BaseException:
        out["error"] = traceback.format_exc()
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ray.shutdown()
            finally:
                cluster.shutdown()
        shutil.rmtree(work, ignore_errors=True)
        out["total_s"] = round(time.monotonic() - started, 3)
        out_path.write_text(json.dumps(out, indent=1))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
