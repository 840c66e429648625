"""ShardedEngine on Ray actors, on one small local cluster for the whole session.

Few and small (2 cores): Ray and in-process shards give the same answers; writes, save and
reopen; a SIGKILLed actor mid-query (the same answer, after failover or a restart); an
actor killed for good with no replica (the typed error, bounded by ``shard_timeout``).
Skipped without Ray (``pip install 'vectordb-embedded[ray]'``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import warnings

import numpy as np
import pytest

ray = pytest.importorskip("ray")

import vectordb as vdb  # noqa: E402
from vectordb.distributed import ShardedEngine, ShardUnavailableError, build_shards  # noqa: E402

K = 10
# The backend every shard uses, here and in the actors (whose environment is the cluster's).
BACKEND = "numpy"


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for the session (Ray's own testing advice)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Ray's start-up warnings (deprecations, tokens)
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data():
    x = vdb.make_clustered(2_040, 16, seed=9)
    return x[:2_000], x[2_000:]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("ray") / "hash"
    build_shards(data[0], root, shards=2, max_leaf_size=100, progress=False)
    return root


def _copy(root, tmp_path):
    import shutil

    return shutil.copytree(root, tmp_path / "copy")


@pytest.mark.asyncio
async def test_ray_and_local_shards_give_the_same_answers(ray_cluster, sharded, data):
    _, q = data
    async with await ShardedEngine.open(sharded, address="local-threads", backend=BACKEND) as e:
        want = await e.search_batch(q, K)
        one = await e.search(q[0], K, filter=lambda doc: True)
    async with await ShardedEngine.open(sharded, backend=BACKEND, replicas=2) as e:
        assert e.backend_name == "ray"
        assert all(len(a) == 2 for a in e.actors())
        got = await asyncio.gather(*(e.search(qq, K) for qq in q))
        assert (await e.search(q[0], K, filter=lambda doc: True))[0].tolist() == one[0].tolist()
    np.testing.assert_array_equal(np.stack([g[0] for g in got]), want[0])
    np.testing.assert_array_equal(np.stack([g[1] for g in got]), want[1])


@pytest.mark.asyncio
async def test_writes_save_and_reopen_on_ray(ray_cluster, sharded, data, tmp_path):
    x, q = data
    root = _copy(sharded, tmp_path)
    async with await ShardedEngine.open(root, backend=BACKEND, replicas=2) as e:
        new = await e.add(q[:2])
        assert new.tolist() == [2_000, 2_001]
        for _ in range(2):  # both replicas of the owning shard see it
            assert (await e.search(q[0], 1))[0][0] == 2_000
        await e.upsert(q[2:3], [2_001])
        np.testing.assert_allclose(await e.get_vectors([2_001, 3]), np.stack([q[2], x[3]]))
        assert await e.delete([2_000]) == 1
        await e.save()
        handles = [h for shard in e.actors() for h in shard]
    async with await ShardedEngine.open(root, address="local-threads", backend=BACKEND) as e:
        assert await e.count() == 2_001
        assert (await e.search(q[2], 1))[0][0] == 2_001
    for h in handles:  # aclose killed every actor
        with pytest.raises(ray.exceptions.RayActorError):
            await asyncio.wait_for(h.ping.remote(), 30)


@pytest.mark.asyncio
async def test_a_sigkilled_actor_mid_query_gives_the_same_answer(ray_cluster, sharded, data):
    _, q = data
    async with await ShardedEngine.open(
        sharded, backend=BACKEND, max_restarts=1, shard_timeout=60
    ) as e:
        want = await e.search_batch(q, K)
        pid = await e.actors()[1][0].ping.remote()
        running = [asyncio.ensure_future(e.search(qq, K)) for qq in q]
        await asyncio.sleep(0)
        os.kill(pid, signal.SIGKILL)
        got = await asyncio.gather(*running)  # answered by the restarted actor
        np.testing.assert_array_equal(np.stack([g[0] for g in got]), want[0])
        assert await e.actors()[1][0].ping.remote() != pid


@pytest.mark.asyncio
async def test_an_actor_killed_for_good_raises_the_typed_error(ray_cluster, sharded, data):
    _, q = data
    async with await ShardedEngine.open(
        sharded, backend=BACKEND, max_restarts=0, shard_timeout=10, allow_partial=True
    ) as e:
        ray.kill(e.actors()[0][0], no_restart=True)
        with pytest.raises(ShardUnavailableError, match="shard 0"):
            await e.search(q[0], K)
        partial = await e.search(q[0], K, return_partial=True)
        assert partial.missing == (0,)
