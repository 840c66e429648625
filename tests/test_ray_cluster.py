"""ShardedEngine on a simulated multi-node Ray cluster (issue 19).

``tests/ray_cluster_scenario.py`` starts a ``ray.cluster_utils.Cluster`` of three nodes
(a head and two workers, one CPU each) in its own process, since a process holds one Ray
connection and tests/test_ray.py holds this session's. It writes what it saw as JSON; the
tests below assert on it. The subprocess is bounded (``TIMEOUT``; on expiry it is sent
SIGTERM, which shuts its cluster down, then killed with its process group) and every wait
inside it is bounded too. Skipped without Ray.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")

SCENARIO = Path(__file__).with_name("ray_cluster_scenario.py")
TIMEOUT = 240  # seconds; the scenario takes about 60 on 2 shared cores


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ray-cluster") / "result.json"
    proc = subprocess.Popen(
        [sys.executable, str(SCENARIO), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: nothing of it outlives a kill
    )
    try:
        log, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the scenario's finally shuts its cluster down
        try:
            log, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
        pytest.fail(f"the cluster scenario ran past {TIMEOUT}s (a hang):\n{log[-6000:]}")
    assert out.exists(), f"no result (exit {proc.returncode}):\n{log[-6000:]}"
    result = json.loads(out.read_text())
    assert result["ok"], f"{result['error']}\n{log[-6000:]}"
    return result


def test_search_writes_save_and_reopen_across_nodes(cluster_run):
    r = cluster_run
    assert r["nodes"] == 3
    # each shard's two replicas on the two worker nodes, as replica_options asked
    assert r["placement"] == [["node_a", "node_b"], ["node_b", "node_a"]]
    assert r["placement_reopened"] == r["placement"]
    assert r["same_as_local"]  # the same answers as in-process shards
    assert r["writes_seen_by_every_replica"] and r["upsert_seen"] and r["deleted"] == 1
    assert r["count"] == r["count_after_reopen"] == 3_003
    assert r["same_after_reopen"]  # save(), aclose(), open again: the same answers
    assert r["alive_after_close"] == 0  # aclose() killed every actor
    assert r["alive_in_gcs_after_close"] in (0, None)  # None: Ray's private table unread


def test_a_node_removed_mid_query_answers_from_the_other_node(cluster_run):
    r, timeout = cluster_run, cluster_run["shard_timeout"]
    load = r["load"]
    before, _during, after = load["rounds"]
    assert before > 0 and after > 0  # searches ran before, across and after the removal
    assert load["outcomes"] == ["answer"]  # every search answered, right: no error, no hang
    assert load["slowest_round_after_s"] < timeout  # failover well inside shard_timeout
    assert r["live_replicas_after_removal"] == [1, 1]
    assert r["placement_after_removal"] == [["node_a"], ["node_a"]]
    assert r["same_after_removal"]
    # shard 0's writer is on node_a: writes go on; shard 1's was on node_b: the typed error
    assert r["write_to_shard_0_after_removal"] == "ok"
    assert r["write_to_shard_1_after_removal"] == "ShardUnavailableError"
    assert r["write_to_shard_1_s"] < timeout + 1
    assert r["alive_after_close_2"] == 0


def test_a_node_removed_with_every_replica_raises_the_typed_error_in_time(cluster_run):
    r, timeout = cluster_run, cluster_run["shard_timeout"]
    assert r["placement_one_node"] == [["node_a"], ["node_a"]]
    # Ray would wait forever to place the restarts (their resource left with the node);
    # the engine gives up after shard_timeout.
    assert r["in_flight_when_lost"] == ["ShardUnavailableError"]
    assert r["after_lost"] == "ShardUnavailableError"
    assert r["lost_to_last_error_s"] < 2 * timeout + 5
    assert r["partial_missing"] == [0, 1]  # return_partial=True: both shards missing
    assert r["alive_after_close_3"] == 0
    assert r["alive_in_gcs_at_end"] in (0, None)
