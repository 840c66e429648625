"""Every documented error: its class, its built-in base class, and a message naming the problem."""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import vectordb as vdb
from vectordb.storage.format import sign_manifest

K = 10


@pytest.fixture
def index(small):
    """A small in-RAM l2 index of the test's own."""
    return vdb.ClusteredIndex.build(small.vectors, leaf_scan="codes", max_leaf_size=200)


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"branching_factor": 1}, "branching_factor"),
        ({"branching_factor": 0}, "branching_factor"),
        ({"branching_factor": 2.0}, "branching_factor"),
        ({"branching_factor": True}, "branching_factor"),
        ({"max_leaf_size": 0}, "max_leaf_size"),
        ({"max_leaf_size": "10"}, "max_leaf_size"),
        ({"max_iterations": 0}, "max_iterations"),
        ({"max_iterations": None}, "max_iterations"),
        ({"metric": "l3"}, "metric"),
        ({"metric": "euclidean"}, "metric"),
        ({"metric": None}, "metric"),
        ({"metric": 2}, "metric"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
        ({"seed": "0"}, "seed"),
        ({"rotate": 1}, "rotate"),
        ({"rotate": "yes"}, "rotate"),
    ],
)
def test_bad_build_parameters(small, params, fragment):
    with pytest.raises(vdb.InvalidParameterError, match=fragment) as info:
        vdb.ClusteredIndex.build(small.vectors[:100], leaf_scan="codes", **params)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, vdb.VectorDBError)


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"k": 0}, "k"),
        ({"k": -3}, "k"),
        ({"k": 2.0}, "k"),
        ({"k": True}, "k"),
        ({"k": "5"}, "k"),
        ({"probes": 0}, "probes"),
        ({"probes": "4"}, "probes"),
        ({"probes": 4, "target_recall": 0.9}, "not both"),
        ({"target_recall": 0}, "target_recall"),
        ({"target_recall": 1.5}, "target_recall"),
        ({"target_recall": True}, "target_recall"),
        ({"rerank_factor": 0}, "rerank_factor"),
        ({"rerank_factor": 1.5}, "rerank_factor"),
    ],
)
@pytest.mark.parametrize("batch", [False, True], ids=["search", "search_batch"])
def test_bad_search_parameters(small, shared_index, params, fragment, batch):
    index = shared_index(small, max_leaf_size=200)
    with pytest.raises(vdb.InvalidParameterError, match=fragment) as info:
        if batch:
            index.search_batch(small.queries[:2], **params)
        else:
            index.search(small.queries[0], **params)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("threads", [0, -1, 1.5, "2", None])
def test_bad_thread_count(small, shared_index, threads):
    index = shared_index(small, max_leaf_size=200)
    with pytest.raises(vdb.InvalidParameterError, match="threads"):
        index.search_batch(small.queries[:2], threads=threads)


def test_numpy_integers_are_accepted_as_parameters(small):
    index = vdb.ClusteredIndex.build(
        small.vectors[:300],
        branching_factor=np.int64(4),
        seed=np.uint8(3),
        leaf_scan="codes",
    )
    assert index.params["branching_factor"] == 4 and type(index.params["seed"]) is int
    ids, _ = index.search(
        small.queries[0], k=np.int32(3), probes=np.int64(2), rerank_factor=np.int16(2)
    )
    assert ids.shape == (3,)


# --------------------------------------------------------------------------- vectors


@pytest.mark.parametrize(
    ("vectors", "fragment"),
    [
        pytest.param(np.zeros((0, 8), np.float32), "empty", id="no-rows"),
        pytest.param(np.zeros((8, 0), np.float32), "empty", id="no-columns"),
        pytest.param([], "2-D", id="empty-list"),
        pytest.param([[1.0, 2.0], [3.0]], "rectangular", id="ragged"),
        pytest.param([[1.0, np.nan], [3.0, 4.0]], "NaN", id="nan"),
        pytest.param([[1.0, np.inf], [3.0, 4.0]], "infinite", id="inf"),
        pytest.param([[1.0, 2.0], [-np.inf, 4.0]], "infinite", id="minus-inf"),
        pytest.param([["a", "b"], ["c", "d"]], "real numbers", id="strings"),
        pytest.param(np.array([[1, None]], dtype=object), "real numbers", id="object"),
        pytest.param(np.ones((3, 4), dtype=bool), "real numbers", id="bool"),
        pytest.param(np.ones((3, 4), dtype=complex), "real numbers", id="complex"),
        pytest.param(np.ones(8), "2-D", id="1-D"),
        pytest.param(np.ones((2, 3, 4)), "2-D", id="3-D"),
        pytest.param(5.0, "2-D", id="scalar"),
    ],
)
def test_bad_vectors(vectors, fragment):
    with pytest.raises(vdb.InvalidVectorsError, match=fragment) as info:
        vdb.ClusteredIndex.build(vectors)
    assert isinstance(info.value, ValueError)
    assert not isinstance(info.value, vdb.DimensionMismatchError)


def test_zero_vector_with_cosine():
    vectors = np.ones((5, 4), np.float32)
    vectors[3] = 0.0
    with pytest.raises(vdb.InvalidVectorsError, match="row 3 is a zero vector"):
        vdb.ClusteredIndex.build(vectors, metric="cosine")
    # Zero vectors are fine for the other metrics.
    vdb.ClusteredIndex.build(vectors, metric="l2")
    vdb.ClusteredIndex.build(vectors, metric="ip")


@pytest.mark.filterwarnings("error")
def test_values_too_large_for_float32_are_rejected_cleanly():
    with pytest.raises(vdb.InvalidVectorsError, match="too large for float32"):
        vdb.ClusteredIndex.build(np.array([[1.0, 1e300], [2.0, 3.0]]))


@pytest.mark.parametrize(
    ("query", "error", "fragment"),
    [
        pytest.param(np.ones(31), vdb.DimensionMismatchError, "dimension 31", id="too-short"),
        pytest.param(np.ones(33), vdb.DimensionMismatchError, "dimension 33", id="too-long"),
        pytest.param(np.ones((2, 32)), vdb.InvalidVectorsError, "search_batch", id="two-queries"),
        pytest.param(np.ones((1, 1, 32)), vdb.InvalidVectorsError, "1-D", id="3-D"),
        pytest.param(np.full(32, np.nan), vdb.InvalidVectorsError, "NaN", id="nan"),
        pytest.param(["x"] * 32, vdb.InvalidVectorsError, "real numbers", id="strings"),
        pytest.param([], vdb.InvalidVectorsError, "empty", id="empty"),
    ],
)
def test_bad_query(small, shared_index, query, error, fragment):
    index = shared_index(small, max_leaf_size=200)
    with pytest.raises(error, match=fragment) as info:
        index.search(query)
    assert isinstance(info.value, vdb.InvalidVectorsError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("queries", "error", "fragment"),
    [
        pytest.param(
            np.ones((3, 31)), vdb.DimensionMismatchError, "dimension 31", id="wrong-width"
        ),
        pytest.param(np.ones(32), vdb.InvalidVectorsError, "2-D", id="1-D"),
        pytest.param(np.zeros((0, 32)), vdb.InvalidVectorsError, "empty", id="no-rows"),
        pytest.param([[1.0] * 32, [1.0] * 31], vdb.InvalidVectorsError, "rectangular", id="ragged"),
        pytest.param(np.full((2, 32), np.inf), vdb.InvalidVectorsError, "infinite", id="inf"),
    ],
)
def test_bad_query_batch(small, shared_index, queries, error, fragment):
    index = shared_index(small, max_leaf_size=200)
    with pytest.raises(error, match=fragment):
        index.search_batch(queries)


def test_dimension_mismatch_is_an_invalid_vectors_error():
    assert issubclass(vdb.DimensionMismatchError, vdb.InvalidVectorsError)
    assert issubclass(vdb.DimensionMismatchError, ValueError)


def test_zero_query_with_cosine(small, shared_index):
    index = shared_index(small, "cosine", max_leaf_size=200)
    with pytest.raises(vdb.InvalidVectorsError, match="zero vector"):
        index.search(np.zeros(small.dim))


# --------------------------------------------------------------------------- mmap state


def test_use_mmap_storage_twice(index, small, tmp_path):
    index.use_mmap_storage(tmp_path / "a.f32")
    with pytest.raises(vdb.AlreadyUsingMmapError, match=r"a\.f32") as info:
        index.use_mmap_storage(tmp_path / "b.f32")
    assert isinstance(info.value, vdb.VectorDBError)
    assert not (tmp_path / "b.f32").exists()
    assert Path(index.mmap_path) == tmp_path / "a.f32"
    assert index.search(small.vectors[9], 1)[0][0] == 9


def test_use_mmap_storage_on_an_opened_mapped_index(saved_index, tmp_path):
    with (
        vdb.ClusteredIndex.open(saved_index, mmap=True) as opened,
        pytest.raises(vdb.AlreadyUsingMmapError),
    ):
        opened.use_mmap_storage(tmp_path / "v.f32")


def test_use_mmap_storage_on_a_directory(index, tmp_path):
    with pytest.raises(vdb.InvalidParameterError, match="directory"):
        index.use_mmap_storage(tmp_path)
    assert not index.is_using_mmap


@pytest.mark.parametrize("how", ["use_mmap_storage", "open"])
def test_searching_a_closed_mapped_index(small, saved_index, tmp_path, how):
    if how == "open":
        closed = vdb.ClusteredIndex.open(saved_index, mmap=True)
    else:
        closed = vdb.ClusteredIndex.build(small.vectors, leaf_scan="codes", max_leaf_size=200)
        closed.use_mmap_storage(tmp_path / "v.f32")
    closed.close()
    with pytest.raises(vdb.IndexClosedError, match="closed") as info:
        closed.search(small.queries[0])
    assert isinstance(info.value, vdb.VectorDBError)
    with pytest.raises(vdb.IndexClosedError):
        closed.search_batch(small.queries)
    with pytest.raises(vdb.IndexClosedError):
        closed.save(tmp_path / "saved")
    assert sorted(os.listdir(tmp_path)) == (["v.f32"] if how == "use_mmap_storage" else [])


# --------------------------------------------------------------------------- damaged index files


@pytest.fixture
def damaged(saved_index, tmp_path) -> Path:
    """A private copy of ``saved_index`` for a test to damage."""
    return Path(shutil.copytree(saved_index, tmp_path / "copy"))


def read_manifest(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "manifest.json").read_text(encoding="utf-8"))


def write_manifest(directory: Path, manifest: Any) -> None:
    """Write ``manifest``, signed (see ``sign_manifest``) so that deeper checks are reached."""
    path = directory / "manifest.json"
    if isinstance(manifest, dict):
        path.write_bytes(sign_manifest(manifest))
    else:
        path.write_text(json.dumps(manifest), encoding="utf-8")


def record_in_manifest(directory: Path, name: str) -> None:
    """Update the manifest's size and CRC32 of ``name`` so that only deeper checks can object."""
    manifest = read_manifest(directory)
    data = (directory / name).read_bytes()
    manifest["files"][name] = {"size": len(data), "crc32": zlib.crc32(data)}
    write_manifest(directory, manifest)


def replace_npy(directory: Path, name: str, array: np.ndarray) -> None:
    np.save(directory / name, array, allow_pickle=False)
    record_in_manifest(directory, name)


def open_fails(directory: Path, *fragments: str, verify: bool = False, mmap: bool = True) -> None:
    """Open ``directory``; expect ``InvalidIndexFileError`` whose message has ``fragments``."""
    with pytest.raises(vdb.InvalidIndexFileError) as info:
        vdb.ClusteredIndex.open(directory, verify=verify, mmap=mmap)
    assert isinstance(info.value, vdb.VectorDBError)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_open_missing_directory(tmp_path):
    open_fails(tmp_path / "nowhere", "nowhere", "not a directory")


def test_open_a_regular_file(saved_index):
    open_fails(saved_index / "manifest.json", "manifest.json", "not a directory")


def test_open_without_manifest(damaged):
    (damaged / "manifest.json").unlink()
    open_fails(damaged, "manifest.json", "missing")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"\x00\xff garbage", "not valid JSON"),
        (b'{"format": ', "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[1, 2, 3]", "JSON object"),
        (b'"text"', "JSON object"),
    ],
)
def test_open_with_garbage_manifest(damaged, content, fragment):
    (damaged / "manifest.json").write_bytes(content)
    open_fails(damaged, "manifest.json", fragment)


def test_open_with_huge_manifest(damaged):
    (damaged / "manifest.json").write_bytes(b" " * (2 << 20))
    open_fails(damaged, "manifest.json", "larger than")


@pytest.mark.parametrize(
    "version",
    [
        6,
        0,
        "1",
        None,
        [1],
        True,
        1.0,
    ],
)
def test_open_with_wrong_format_version(damaged, version):
    manifest = read_manifest(damaged)
    manifest["format_version"] = version
    write_manifest(damaged, manifest)
    open_fails(damaged, "manifest.json", "format_version")


def test_unsigned_or_edited_manifest_is_rejected(damaged):
    manifest = read_manifest(damaged)
    manifest["params"]["seed"] = 1234
    (damaged / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    open_fails(damaged, "manifest.json", "checksum")
    (damaged / "manifest.json").write_bytes(sign_manifest(manifest) + b" ")
    open_fails(damaged, "manifest.json", "checksum")


def as_version_2(directory: Path) -> None:
    """Turn the saved index ``directory`` into what format version 2 wrote: residual norms
    (and, for ip, ``<residual, centroid>``) in place of the code factors, and no
    ``code_bits`` (its codes had one bit a coordinate)."""
    manifest = read_manifest(directory)
    assert manifest["params"].pop("code_bits") == 1, "version 2 held 1-bit codes only"
    with vdb.ClusteredIndex.open(directory, mmap=False) as index:
        st = index._state
        centres = st.tree.centroids[st.tree.leaf_nodes[st.base.leaf_of_slot]]
        residual = st.quantizer.rotate(st.storage.take(np.arange(len(index)))) - centres
    (directory / "factors.npy").unlink()
    del manifest["files"]["factors.npy"]
    arrays = {"norms.npy": np.sqrt(np.einsum("nd,nd->n", residual, residual))}
    if manifest["metric"] == "ip":
        arrays["dots.npy"] = np.einsum("nd,nd->n", residual, centres)
    for name, array in arrays.items():
        np.save(directory / name, array.astype(np.float32))
        data = (directory / name).read_bytes()
        manifest["files"][name] = {"size": len(data), "crc32": zlib.crc32(data)}
    manifest["format_version"] = 2
    write_manifest(directory, manifest)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_version_2_directories_open_with_factors_from_their_vectors(
    small, tmp_path, metric, caplog
):
    index = vdb.ClusteredIndex.build(
        small.vectors, metric=metric, max_leaf_size=200, leaf_scan="codes", code_bits=1
    )
    index.save(tmp_path / "v3")
    index.save(tmp_path / "v2")
    as_version_2(tmp_path / "v2")
    with caplog.at_level("INFO", logger="vectordb"):
        old = vdb.ClusteredIndex.open(tmp_path / "v2", verify=True)
    assert "format version 2" in caplog.text
    with old, vdb.ClusteredIndex.open(tmp_path / "v3") as new:
        np.testing.assert_array_equal(old._state.base.factors, new._state.base.factors)
        got, expected = old.search_batch(small.queries, 5), new.search_batch(small.queries, 5)
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a, b)
        old.save(tmp_path / "again")  # saved again: the current version, with its factors
    assert read_manifest(tmp_path / "again")["format_version"] == 3
    assert (tmp_path / "again" / "factors.npy").exists()
    assert not (tmp_path / "again" / "norms.npy").exists()


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda c: c.update(probes=[4, 2]), "rising"),
        (lambda c: c.update(probes=[]), "rising"),
        (lambda c: c.update(probes=[0]), "rising"),
        (lambda c: c.update(recall=c["recall"][:-1]), "as long as"),
        (lambda c: c.update(recall=[2.0] * len(c["recall"])), "[0, 1]"),
        (lambda c: c.update(recall=[True] * len(c["recall"])), "[0, 1]"),
        (lambda c: c.update(k=0), "k must"),
        (lambda c: c.update(n=10**400), "n must"),
        (lambda c: c.update(leaves=2**49), "leaves must"),
        (lambda c: c.update(probes=[1, 10**400], recall=[0.5, 0.9]), "rising"),
        (lambda c: c.pop("k"), "an object"),
        (lambda c: c.update(extra=1), "an object"),
    ],
)
def test_open_with_a_bad_calibration(damaged, change, fragment):
    manifest = read_manifest(damaged)
    change(manifest["params"]["calibration"])
    write_manifest(damaged, manifest)
    open_fails(damaged, "manifest.json", fragment)


@pytest.mark.parametrize("value", [0, 1.5, "0.9", True, None])
def test_open_with_a_bad_target_recall(damaged, value):
    manifest = read_manifest(damaged)
    manifest["params"]["target_recall"] = value
    write_manifest(damaged, manifest)
    if value is None:  # absent means the default
        vdb.ClusteredIndex.open(damaged).close()
    else:
        open_fails(damaged, "manifest.json", "target_recall")


def test_version_1_manifests_still_open_and_may_not_carry_a_checksum(small, tmp_path):
    damaged = tmp_path / "v1"
    vdb.ClusteredIndex.build(small.vectors, max_leaf_size=200, code_bits=1).save(damaged)
    as_version_2(damaged)
    manifest = read_manifest(damaged)
    manifest["format_version"] = 1
    del manifest["checksum"]
    (damaged / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    with vdb.ClusteredIndex.open(damaged, verify=True) as index:
        assert index.search(small.queries[0], 3)[0].shape == (3,)
    manifest["checksum"] = 5
    (damaged / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    open_fails(damaged, "manifest.json", "version 1")


def test_open_without_format_version(damaged):
    manifest = read_manifest(damaged)
    del manifest["format_version"]
    write_manifest(damaged, manifest)
    open_fails(damaged, "format_version")


def test_open_foreign_format(damaged):
    manifest = read_manifest(damaged)
    manifest["format"] = "something.Else"
    write_manifest(damaged, manifest)
    open_fails(damaged, "manifest.json", "something.Else")


def _set(manifest: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for parent in parents:
        manifest = manifest[parent]
    manifest[last] = value


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("dim", "32", "'dim'"),
        ("dim", 32.0, "'dim'"),
        ("dim", True, "'dim'"),
        ("dim", 0, "'dim'"),
        ("n", -5, "'n'"),
        ("n", None, "'n'"),
        ("n_nodes", [3], "'n_nodes'"),
        ("n_leaves", 0, "'n_leaves'"),
        ("metric", "euclid", "metric"),
        ("metric", ["l2"], "metric"),
        ("metric", None, "metric"),
        ("params", [], "params"),
        ("params.branching_factor", 1, "branching_factor"),
        ("params.branching_factor", "10", "branching_factor"),
        ("params.rotate", "yes", "rotate"),
        ("files", [], "files"),
        ("files.codes.npy", 12, "codes.npy"),
        ("files.codes.npy", {"size": "12", "crc32": 0}, "codes.npy"),
        ("files.codes.npy", {"size": 12}, "codes.npy"),
        ("files.codes.npy", {"size": 12, "crc32": -1}, "codes.npy"),
    ],
)
def test_open_with_mistyped_manifest(damaged, key, value, fragment):
    manifest = read_manifest(damaged)
    if key.startswith("files."):
        manifest["files"][key.removeprefix("files.")] = value
    else:
        _set(manifest, key, value)
    write_manifest(damaged, manifest)
    open_fails(damaged, "manifest.json", fragment)


@pytest.mark.parametrize(
    ("key", "value"), [("dim", 31), ("n", 1999), ("n_nodes", 7), ("n_leaves", 3)]
)
def test_open_with_manifest_inconsistent_with_files(damaged, key, value):
    manifest = read_manifest(damaged)
    manifest[key] = value
    write_manifest(damaged, manifest)
    open_fails(damaged, "expected")


def test_open_with_a_file_missing_from_the_manifest(damaged):
    manifest = read_manifest(damaged)
    del manifest["files"]["factors.npy"]
    write_manifest(damaged, manifest)
    open_fails(damaged, "manifest.json", "factors.npy")


@pytest.mark.parametrize("name", ["codes.npy", "ids.npy", "blocks.npy", "vectors.bin"])
def test_open_with_a_file_deleted(damaged, name):
    (damaged / name).unlink()
    open_fails(damaged, name, "missing")


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize("change", [-4, -4000, +4, +1])
def test_open_with_vectors_bin_of_the_wrong_size(damaged, small, change, mmap):
    path = damaged / "vectors.bin"
    expected = len(small.vectors) * small.dim * 4
    data = path.read_bytes()
    path.write_bytes(data[:change] if change < 0 else data + b"\0" * change)
    open_fails(damaged, "vectors.bin", str(expected), str(expected + change), mmap=mmap)


@pytest.mark.parametrize("mmap", [True, False])
def test_open_with_vectors_bin_and_manifest_both_of_the_wrong_size(damaged, small, mmap):
    """Even when the manifest agrees with the file, vectors.bin must hold n x dim float32."""
    path = damaged / "vectors.bin"
    path.write_bytes(path.read_bytes()[: -small.dim * 4])
    record_in_manifest(damaged, "vectors.bin")
    open_fails(damaged, "vectors.bin", str(len(small.vectors) * small.dim * 4), mmap=mmap)


@pytest.mark.parametrize("name", ["codes.npy", "ids.npy", "vectors.bin", "manifest.json"])
def test_bit_flip_is_caught_by_verify(damaged, name):
    path = damaged / name
    data = bytearray(path.read_bytes())
    position = len(data) - 3 if name != "manifest.json" else data.index(b"l2")
    data[position] ^= 0x10
    path.write_bytes(bytes(data))
    if name == "manifest.json":  # "l2" became "|2": the manifest's own checksum objects
        open_fails(damaged, "manifest.json", "checksum")
        return
    open_fails(damaged, name, "CRC32", verify=True)
    # Without verify only sizes, dtypes, shapes and structure are checked.
    vdb.ClusteredIndex.open(damaged, verify=False).close()


@pytest.mark.parametrize(
    ("name", "make", "fragment"),
    [
        pytest.param("codes.npy", lambda a: a.astype(np.int64), "int64", id="codes-int64"),
        pytest.param(
            "codes.npy", lambda a: a.astype(">u8"), "expected uint64", id="codes-big-endian"
        ),
        pytest.param("codes.npy", lambda a: a.T.copy(), "expected uint64", id="codes-transposed"),
        pytest.param("codes.npy", lambda a: a[:, :-1], "expected uint64", id="codes-one-short"),
        pytest.param(
            "factors.npy", lambda a: a.astype(np.float64), "float64", id="factors-float64"
        ),
        pytest.param("factors.npy", lambda a: a[:3].copy(), "expected float32", id="factors-3"),
        pytest.param("ids.npy", lambda a: a.astype(np.int32), "int32", id="ids-int32"),
        pytest.param("ids.npy", lambda a: a.reshape(1, -1), "expected int64", id="ids-2-D"),
        pytest.param("blocks.npy", np.asfortranarray, "Fortran", id="blocks-fortran-order"),
        pytest.param(
            "centroids.npy", lambda a: a[:, :16], "expected float32", id="centroids-narrow"
        ),
    ],
)
def test_open_with_npy_of_wrong_dtype_or_shape(damaged, name, make, fragment):
    replace_npy(damaged, name, make(np.load(damaged / name)))
    open_fails(damaged, name, fragment)
    open_fails(damaged, name, fragment, verify=True)  # checksums agree; the header does not


def test_open_with_npy_of_wrong_dtype_but_same_size(damaged):
    """No manifest update: the size matches, so only the header check can catch it."""
    codes = np.load(damaged / "codes.npy")
    np.save(damaged / "codes.npy", codes.view(np.int64))
    open_fails(damaged, "codes.npy", "int64")


@pytest.mark.parametrize(
    ("keep", "fragment"),
    [
        (-8, "truncated"),
        (-1, "truncated"),
        (100, "truncated"),
        (20, "not a valid .npy"),
        (3, "not a valid .npy"),
    ],
)
def test_open_with_truncated_npy(damaged, keep, fragment):
    path = damaged / "codes.npy"
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    open_fails(damaged, "codes.npy", "size is")  # the manifest's size catches it first
    record_in_manifest(damaged, "codes.npy")
    open_fails(damaged, "codes.npy", fragment)


def test_open_with_garbage_npy(damaged):
    path = damaged / "factors.npy"
    path.write_bytes(os.urandom(path.stat().st_size))
    record_in_manifest(damaged, "factors.npy")
    open_fails(damaged, "factors.npy", "not a valid .npy")


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("leaf_offsets.npy", lambda a: a[::-1].copy()),
        ("leaf_offsets.npy", lambda a: a + 1),
        ("children.npy", lambda a: np.where(a >= 0, a + 10_000, a)),
        ("children.npy", lambda a: np.full_like(a, -1)),
        ("leaf_of_node.npy", lambda a: np.where(a >= 0, 0, a)),
        ("perm.npy", lambda a: np.zeros_like(a)),
        (
            "centroids.npy",
            lambda a: np.where(np.arange(a.size).reshape(a.shape) == 5, np.nan, a).astype(a.dtype),
        ),
        ("factors.npy", lambda a: np.full_like(a, np.nan)),
        ("factors.npy", lambda a: np.where(np.arange(4)[:, None] == 3, -1.0, a).astype(a.dtype)),
    ],
)
def test_open_with_inconsistent_arrays(damaged, name, damage):
    replace_npy(damaged, name, damage(np.load(damaged / name)))
    open_fails(damaged, name)


# --------------------------------------------------------------------------- storage errors


def test_storage_error_is_an_os_error():
    assert issubclass(vdb.StorageError, OSError)
    assert issubclass(vdb.StorageError, vdb.VectorDBError)


def test_save_refuses_to_replace_a_regular_file(index, tmp_path):
    target = tmp_path / "file"
    target.write_text("precious")
    with pytest.raises(vdb.StorageError) as info:
        index.save(target)
    assert isinstance(info.value, OSError)
    assert info.value.errno == errno.EEXIST
    assert info.value.filename == str(target)
    assert target.read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_save_refuses_to_replace_a_directory_that_is_not_an_index(index, tmp_path):
    target = tmp_path / "photos"
    target.mkdir()
    (target / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(vdb.StorageError, match="not a vectordb index") as info:
        index.save(target)
    assert info.value.errno == errno.EEXIST
    assert sorted(os.listdir(target)) == ["cat.jpg"]
    assert sorted(os.listdir(tmp_path)) == ["photos"]


def test_save_into_a_missing_parent_directory(index, tmp_path):
    with pytest.raises(vdb.StorageError) as info:
        index.save(tmp_path / "missing" / "index")
    assert info.value.errno == errno.ENOENT
    assert os.listdir(tmp_path) == []


def test_use_mmap_storage_into_a_missing_directory(index, small, tmp_path):
    with pytest.raises(vdb.StorageError) as info:
        index.use_mmap_storage(tmp_path / "missing" / "v.f32")
    assert info.value.errno == errno.ENOENT
    assert not index.is_using_mmap
    assert index.search(small.vectors[1], 1)[0][0] == 1


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permissions")
def test_save_into_a_read_only_directory(index, tmp_path):
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(vdb.StorageError) as info:
            index.save(parent / "index")
        assert info.value.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
        assert os.listdir(parent) == []
    finally:
        parent.chmod(0o755)


# ENOSPC is simulated by making one os.fsync call fail: every file the library writes is
# fsynced, and so is every directory it changes.


@contextmanager
def fsync_fails_on_call(monkeypatch: pytest.MonkeyPatch, n: int) -> Iterator[None]:
    """Within the block, the ``n``-th call of ``os.fsync`` raises ENOSPC."""
    real = os.fsync
    calls = itertools.count(1)

    def fsync(fd: int) -> None:
        if next(calls) == n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", fsync)
        yield


def count_fsyncs(monkeypatch: pytest.MonkeyPatch, action: Callable[[], None]) -> int:
    real = os.fsync
    calls = 0

    def fsync(fd: int) -> None:
        nonlocal calls
        calls += 1
        real(fd)

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", fsync)
        action()
    return calls


@pytest.fixture
def old_and_new(small, tmp_path):
    """An index saved at ``tmp_path/work/index`` (``old``), and a different one (``new``)."""
    old = vdb.ClusteredIndex.build(small.vectors, leaf_scan="codes", metric="l2", max_leaf_size=200)
    new = vdb.ClusteredIndex.build(small.vectors, leaf_scan="codes", metric="ip", max_leaf_size=100)
    parent = tmp_path / "work"
    parent.mkdir()
    old.save(parent / "index")
    return old, new, parent / "index"


def assert_holds(directory: Path, index: vdb.ClusteredIndex, queries: np.ndarray) -> None:
    with vdb.ClusteredIndex.open(directory, verify=True) as opened:
        assert opened.metric == index.metric
        for got, want in zip(
            opened.search_batch(queries, K), index.search_batch(queries, K), strict=True
        ):
            np.testing.assert_array_equal(got, want)


def save_with_failing_fsync(
    monkeypatch: pytest.MonkeyPatch, n: int, index: vdb.ClusteredIndex, path: Path
) -> vdb.StorageError:
    """Save with the ``n``-th fsync failing; return the ``StorageError`` it must raise."""
    try:
        with fsync_fails_on_call(monkeypatch, n):
            index.save(path)
    except vdb.StorageError as exc:
        assert isinstance(exc, OSError)
        assert exc.errno == errno.ENOSPC, f"fsync #{n}: {exc!r}"
        assert exc.filename, f"fsync #{n}: {exc!r} names no file"
        return exc
    raise AssertionError(f"save() succeeded although fsync #{n} failed")


def test_failed_save_keeps_the_previous_index(old_and_new, small, tmp_path, monkeypatch):
    old, new, target = old_and_new
    total = count_fsyncs(monkeypatch, lambda: new.save(tmp_path / "scratch"))
    assert total >= 10
    # Every failure point but the last, which comes after the new index was swapped in.
    for n in range(1, total):
        save_with_failing_fsync(monkeypatch, n, new, target)
        assert os.listdir(target.parent) == ["index"], f"fsync #{n}: temporary files left"
        assert_holds(target, old, small.queries)
    # The index that failed to save is intact and saves fine afterwards.
    new.save(target)
    assert_holds(target, new, small.queries)


def test_failed_final_fsync_of_save_leaves_the_complete_new_index(
    old_and_new, small, tmp_path, monkeypatch
):
    # The last step, fsync of the parent after the swap, fails: the switch may not be durable,
    # so save() raises, but the directory already holds the complete new index, not a mix.
    _, new, target = old_and_new
    total = count_fsyncs(monkeypatch, lambda: new.save(tmp_path / "scratch"))
    with fsync_fails_on_call(monkeypatch, total), pytest.raises(vdb.StorageError):
        new.save(target)
    assert os.listdir(target.parent) == ["index"]
    assert_holds(target, new, small.queries)


def test_failed_first_save_creates_nothing(index, tmp_path, monkeypatch):
    total = count_fsyncs(monkeypatch, lambda: index.save(tmp_path / "scratch"))
    parent = tmp_path / "work"
    parent.mkdir()
    for n in range(1, total):
        save_with_failing_fsync(monkeypatch, n, index, parent / "index")
        assert os.listdir(parent) == [], f"fsync #{n}: something was left behind"


def test_failed_use_mmap_storage_keeps_vectors_in_ram(index, small, tmp_path, monkeypatch):
    expected = index.search_batch(small.queries, K)
    before = index.memory_usage_bytes()
    with fsync_fails_on_call(monkeypatch, 1), pytest.raises(vdb.StorageError) as info:
        index.use_mmap_storage(tmp_path / "v.f32")
    assert info.value.errno == errno.ENOSPC
    assert "v.f32" in info.value.filename
    assert os.listdir(tmp_path) == [], "no partial or temporary file may remain"
    assert not index.is_using_mmap and index.mmap_path is None
    assert index.memory_usage_bytes() == before
    for got, want in zip(index.search_batch(small.queries, K), expected, strict=True):
        np.testing.assert_array_equal(got, want)
    index.use_mmap_storage(tmp_path / "v.f32")  # and it can still succeed afterwards
    assert index.is_using_mmap


def _child_pointing_up(children: np.ndarray) -> np.ndarray:
    """A grandchild's slot made to point back at its grandparent: a loop under the root."""
    out = children.copy()
    inner = [int(c) for c in out[0] if c >= 0 and (out[c] >= 0).any()]
    node = inner[0]
    out[node, np.flatnonzero(out[node] >= 0)[0]] = 0
    return out


def _two_parents(children: np.ndarray) -> np.ndarray:
    out = children.copy()
    kids = out[0][out[0] >= 0]
    out[0, 1] = kids[0]  # the root lists one child twice, another not at all
    return out


def _disconnected_cycle(children: np.ndarray) -> np.ndarray:
    """Two inner nodes that each list the other: each has one parent, neither is reachable."""
    out = children.copy()
    inner = [int(c) for c in out[0] if c >= 0 and (out[c] >= 0).any()]
    a, b = inner[0], inner[1]
    slot_a, slot_b = int(np.flatnonzero(out[0] == a)[0]), int(np.flatnonzero(out[0] == b)[0])
    out[0, slot_a], out[0, slot_b] = out[b, 0], out[a, 0]  # the root adopts a grandchild each
    out[a, 0], out[b, 0] = b, a
    return out


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        pytest.param(_child_pointing_up, "exactly one", id="child-points-to-the-root"),
        pytest.param(_two_parents, "exactly one", id="a-node-listed-twice"),
        pytest.param(_disconnected_cycle, "not reachable", id="a-cycle-off-the-root"),
    ],
)
def test_open_with_a_children_array_that_is_not_a_tree(damaged, make, fragment):
    # Such a file once made routing loop forever; it must be refused at open.
    replace_npy(damaged, "children.npy", make(np.load(damaged / "children.npy")))
    open_fails(damaged, "children.npy", fragment)
