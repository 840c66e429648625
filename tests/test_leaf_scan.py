"""Both ways of ranking a probed leaf: 1-bit codes, and exact distances on full vectors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import vectordb as vdb
from vectordb.index.build import AUTO_CODES_MIN_DIM
from vectordb.storage.format import sign_manifest

K = 10
MODES = ("codes", "vectors")


@pytest.mark.parametrize("leaf_scan", MODES)
def test_recall_and_exact_mode_in_both_modes(small, truth, oracle, shared_index, leaf_scan, metric):
    index = shared_index(small, metric, max_leaf_size=100, leaf_scan=leaf_scan)
    assert index.leaf_scan == leaf_scan
    true = truth(small, metric)
    ids, _ = index.search_batch(small.queries, K, probes=16, rerank_factor=10)
    assert oracle.recall(ids, true, K) >= 0.95  # measured 0.978-0.994
    ids, dists = index.search_batch(small.queries, K, **oracle.exact_params(index, K))
    oracle.assert_exact(ids, dists, true, K)


def test_vectors_mode_beats_codes_on_low_dimensional_data(small, truth, oracle, shared_index):
    # Large leaves and few reranked candidates, so that ranking inside a leaf decides:
    # measured 0.81 (RaBitQ codes; 0.66 with the earlier Hamming estimate) vs 0.95
    # (vectors) on this 32-d set.
    true = truth(small, "cosine")
    by_mode = {}
    for mode in MODES:
        index = shared_index(small, "cosine", max_leaf_size=1000, leaf_scan=mode)
        ids, _ = index.search_batch(small.queries, K, probes=2, rerank_factor=2)
        by_mode[mode] = oracle.recall(ids, true, K)
    assert by_mode["vectors"] >= by_mode["codes"] + 0.1, by_mode


@pytest.mark.parametrize(("dim", "expected"), [(16, "vectors"), (AUTO_CODES_MIN_DIM, "codes")])
def test_auto_picks_by_dimension(dim, expected):
    index = vdb.ClusteredIndex.build(vdb.make_clustered(300, dim, seed=1), max_leaf_size=50)
    assert index.leaf_scan == expected == index.params["leaf_scan"]
    assert index.params["rotate"] is (expected == "codes")


def test_unknown_leaf_scan_is_rejected(small):
    with pytest.raises(vdb.InvalidParameterError, match="leaf_scan"):
        vdb.ClusteredIndex.build(small.vectors, leaf_scan="hamming")


def test_vectors_mode_holds_no_codes_and_mmap_frees_almost_everything(small, tmp_path):
    index = vdb.ClusteredIndex.build(small.vectors, max_leaf_size=100, leaf_scan="vectors")
    in_ram = index.memory_usage_bytes()
    expected = index.search_batch(small.queries, K)
    index.use_mmap_storage(tmp_path / "v.f32")
    assert index.memory_usage_bytes() <= in_ram - small.vectors.nbytes
    got = index.search_batch(small.queries, K)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)
    index.close()


#: Run in a fresh process: anonymous (heap) memory resident before and after the switch
#: to mmap, searches included. MALLOC_MMAP_THRESHOLD_ (glibc) gives every large array its
#: own mapping, returned to the OS when freed; else the allocator may keep freed memory.
_RSS_PROBE = """
import gc, sys
import vectordb as vdb

def anon():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise SystemExit("no RssAnon")

x = vdb.make_clustered(8_020, 768, seed=4)
queries, x = x[8_000:].copy(), x[:8_000]
index = vdb.ClusteredIndex.build(x, max_leaf_size=1000, leaf_scan=sys.argv[1], progress=False)
nbytes = x.nbytes
del x
gc.collect()
want = index.search_batch(queries, 10)
before = anon()
index.use_mmap_storage(sys.argv[2], progress=False)
gc.collect()
got = index.search_batch(queries, 10)
after = anon()
assert (got[0] == want[0]).all()
print(before, after, nbytes)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("leaf_scan", MODES)
def test_mmap_frees_the_vectors_from_process_memory(tmp_path, leaf_scan):
    """Measured, not the library's own count: RssAnon falls by the vectors' size (a
    second copy kept in RAM, say, would not show in ``memory_usage_bytes``)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, leaf_scan, str(tmp_path / "v.f32")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    before, after, nbytes = map(int, out.split())
    # Measured: falls by 1.00 x the vectors (24.6 MB) in both modes.
    assert before - after >= 0.9 * nbytes, (before, after, nbytes)


@pytest.mark.parametrize("open_mmap", [True, False])
def test_vectors_mode_round_trip(small, tmp_path, open_mmap):
    index = vdb.ClusteredIndex.build(small.vectors, metric="ip", leaf_scan="vectors")
    index.save(tmp_path / "index")
    names = {p.name for p in (tmp_path / "index").iterdir()}
    assert "codes.npy" not in names and "norms.npy" not in names and "perm.npy" not in names
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["params"]["leaf_scan"] == "vectors"
    with vdb.ClusteredIndex.open(tmp_path / "index", mmap=open_mmap, verify=True) as opened:
        assert opened.leaf_scan == "vectors"
        for a, b in zip(
            opened.search_batch(small.queries, K), index.search_batch(small.queries, K), strict=True
        ):
            np.testing.assert_array_equal(a, b)


def test_vectors_mode_batch_equals_single(small, shared_index):
    index = shared_index(small, "l2", max_leaf_size=100, leaf_scan="vectors")
    batch_ids, batch_dists = index.search_batch(small.queries, K, probes=3, rerank_factor=2)
    for i, query in enumerate(small.queries):
        ids, dists = index.search(query, K, probes=3, rerank_factor=2)
        np.testing.assert_array_equal(ids, batch_ids[i])
        np.testing.assert_array_equal(dists, batch_dists[i])


def test_manifest_with_unknown_leaf_scan_is_rejected(small, tmp_path):
    vdb.ClusteredIndex.build(small.vectors, leaf_scan="vectors").save(tmp_path / "i")
    path = tmp_path / "i" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["params"]["leaf_scan"] = "magic"
    path.write_bytes(sign_manifest(manifest))
    with pytest.raises(vdb.InvalidIndexFileError, match="leaf_scan"):
        vdb.ClusteredIndex.open(tmp_path / "i")
