"""Both ways of ranking a probed leaf: codes (1 to 4 bits a coordinate), and exact distances on
full vectors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import vectordb as vdb
from vectordb.index.build import AUTO_LOW_DIM_CODE_BITS, AUTO_ONE_BIT_MIN_DIM
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


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_multi_bit_codes_rank_low_dimensional_data_as_the_vectors_do(
    small, truth, oracle, shared_index, metric
):
    # Large leaves and few reranked candidates, so that ranking inside a leaf decides:
    # measured on this 32-d set (cosine; l2) 0.948; 0.936 with exact distances on the
    # vectors, 0.814; 0.792 with 1-bit codes, 0.922; 0.904 with 2 bits, 0.948; 0.936 with 4.
    true = truth(small, metric)
    recall = {}
    for mode, bits in [("vectors", 1), ("codes", 1), ("codes", 2), ("codes", 4)]:
        index = shared_index(small, metric, max_leaf_size=1000, leaf_scan=mode, code_bits=bits)
        assert index.params["code_bits"] == bits
        ids, _ = index.search_batch(small.queries, K, probes=2, rerank_factor=2)
        recall[mode, bits] = oracle.recall(ids, true, K)
    assert recall["vectors", 1] >= recall["codes", 1] + 0.1, recall
    assert recall["codes", 2] >= recall["codes", 1] + 0.05, recall
    assert recall["codes", 4] >= recall["vectors", 1] - 0.02, recall


@pytest.mark.parametrize(
    ("dim", "bits"), [(16, AUTO_LOW_DIM_CODE_BITS), (AUTO_ONE_BIT_MIN_DIM, 1), (200, 1)]
)
def test_auto_codes_take_more_bits_below_the_one_bit_dimension(dim, bits):
    index = vdb.ClusteredIndex.build(vdb.make_clustered(300, dim, seed=1), max_leaf_size=50)
    assert index.leaf_scan == "codes" == index.params["leaf_scan"]
    assert index.params["rotate"] is True
    assert index.params["code_bits"] == bits
    words = -(-dim // 64)
    assert index._state.base.codes.shape == (bits * words, 300)


def test_vectors_mode_takes_no_code_bits(small):
    index = vdb.ClusteredIndex.build(small.vectors, leaf_scan="vectors", code_bits=3)
    assert index.params["code_bits"] == 1 and index.params["rotate"] is False


@pytest.mark.parametrize("bad", [0, 5, -1, 2.5, True, "4", None])
def test_bad_code_bits_are_rejected(small, bad):
    with pytest.raises(vdb.InvalidParameterError, match="code_bits"):
        vdb.ClusteredIndex.build(small.vectors, code_bits=bad)


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


@pytest.mark.parametrize("code_bits", [2, 4])
@pytest.mark.parametrize("mmap", [True, False])
def test_multi_bit_codes_save_as_version_4_and_open_to_the_same_answers(
    small, tmp_path, code_bits, mmap
):
    index = vdb.ClusteredIndex.build(small.vectors, code_bits=code_bits, max_leaf_size=200)
    want = index.search_batch(small.queries, K)
    index.save(tmp_path / "i")
    manifest = json.loads((tmp_path / "i" / "manifest.json").read_text())
    assert manifest["format_version"] == 4 and manifest["params"]["code_bits"] == code_bits
    assert np.load(tmp_path / "i" / "codes.npy").shape == (code_bits, len(small.vectors))
    with vdb.ClusteredIndex.open(tmp_path / "i", mmap=mmap, verify=True) as opened:
        assert opened.params["code_bits"] == code_bits
        for a, b in zip(opened.search_batch(small.queries, K), want, strict=True):
            np.testing.assert_array_equal(a, b)
        opened.add(small.queries[:5])  # new vectors coded with the index's bits
        parts = opened._state.parts
        assert [p.codes.shape[0] for p in parts] == [code_bits] * 2
        assert sum(p.codes.shape[1] for p in parts) == len(small.vectors) + 5
        ids, _ = opened.search_batch(small.queries[:5], 1, probes=opened.n_leaves)
        assert (ids[:, 0] >= len(small.vectors)).all()


def test_one_bit_codes_still_save_as_version_3(small, tmp_path):
    vdb.ClusteredIndex.build(small.vectors, code_bits=1).save(tmp_path / "i")
    manifest = json.loads((tmp_path / "i" / "manifest.json").read_text())
    assert manifest["format_version"] == 3 and manifest["params"]["code_bits"] == 1


@pytest.mark.parametrize(
    ("version", "bits", "message"),
    [
        (4, 5, "params.code_bits must be an integer in [1, 4]"),
        (4, 0, "code_bits"),
        (4, True, "code_bits"),
        (3, 4, "version 3 has 1-bit codes"),
        (4, 2, "codes.npy"),
    ],
)
def test_manifest_with_bad_code_bits_is_rejected(small, tmp_path, version, bits, message):
    vdb.ClusteredIndex.build(small.vectors, code_bits=4, max_leaf_size=500).save(tmp_path / "i")
    path = tmp_path / "i" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"], manifest["params"]["code_bits"] = version, bits
    path.write_bytes(sign_manifest(manifest))
    with pytest.raises(vdb.InvalidIndexFileError, match=re.escape(message)):
        vdb.ClusteredIndex.open(tmp_path / "i")
