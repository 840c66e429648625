"""Property-based fuzzing (hypothesis) of the public API and of the index file reader.

The properties: a call either does what it documents or raises a ``VectorDBError`` (never
another exception, a crash or a giant allocation); a failed write changes nothing; an
index directory with any byte changed is rejected by ``open(verify=True)``, and opening it
without ``verify`` either fails with ``InvalidIndexFileError`` or gives an index that
searches without error. Example counts are bounded so that CI stays fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import vectordb as vdb
from vectordb.reader import sign_manifest

DIM = 16
#: VECTORDB_FUZZ_SCALE=20 runs twenty times the examples (bench/reliability.py does).
SCALE = int(os.environ.get("VECTORDB_FUZZ_SCALE", "1"))
FUZZ = settings(
    max_examples=60 * SCALE,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

DTYPES = st.sampled_from(
    ["float32", "float64", "float16", "int8", "int64", "uint16", "bool", "complex64", "<U3"]
)
ELEMENTS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.floats(min_value=-1e6, max_value=1e6, width=32),
)


@st.composite
def arrays(draw: st.DrawFn) -> Any:
    """Array-likes of every kind: shapes 0-d to 3-d, odd dtypes, NaN, views, read-only."""
    kind = draw(st.sampled_from(["good", "array", "list", "other"]))
    if kind == "good":
        n = draw(st.integers(1, 5))
        x = draw(hnp.arrays(np.float32, (n, DIM), elements=st.floats(-10, 10, width=32)))
    elif kind == "array":
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=DIM + 1))
        dtype = draw(DTYPES)
        if dtype.startswith("<U"):
            x = np.full(shape, "ab", dtype=dtype)
        else:
            with np.errstate(invalid="ignore", over="ignore"):
                x = draw(hnp.arrays(np.float64, shape, elements=ELEMENTS)).astype(dtype)
    elif kind == "list":
        row = st.lists(st.one_of(st.floats(width=32), st.integers(-5, 5)), max_size=DIM + 1)
        x = draw(st.lists(row, max_size=4))
    else:
        x = draw(st.sampled_from([None, "text", {"a": 1}, b"bytes", 3, 2.5, object()]))
    if isinstance(x, np.ndarray) and x.ndim == 2 and draw(st.booleans()):
        x = x[:, ::-1] if draw(st.booleans()) else x.T  # not C-contiguous
    if isinstance(x, np.ndarray) and draw(st.booleans()):
        x.setflags(write=False)
    return x


PARAMS = st.one_of(
    st.integers(-3, 40),
    st.sampled_from([0, 2**31, 10**12, 1.5, 2.0, None, "3", True, np.int64(3), np.float32(2)]),
)
IDS = st.one_of(
    st.lists(st.integers(-5, 3000), max_size=6),
    st.sampled_from([None, "x", 1.5, [1.0, 2.0], [-1], [2**63], np.array([[1, 2]]), [True]]),
)
FILTERS = st.one_of(
    st.none(),
    st.dictionaries(
        st.sampled_from(["user", "ts", "", 'a"b', 3]),
        st.one_of(
            st.integers(),
            st.text(max_size=3),
            st.floats(),
            st.none(),
            st.dictionaries(st.sampled_from(["$in", "$gt", "$xx", "$nin"]), st.integers()),
            st.lists(st.integers(), max_size=2),
        ),
        max_size=2,
    ),
    st.sampled_from(["user", 3, ["a"]]),
)


@pytest.fixture(scope="module")
def base() -> np.ndarray:
    return vdb.make_clustered(600, DIM, seed=5)


def fresh(base: np.ndarray) -> vdb.ClusteredIndex:
    meta = [{"user": "ann" if i % 2 else "bob", "ts": i} for i in range(len(base))]
    return vdb.ClusteredIndex.build(
        base, metric="cosine", max_leaf_size=60, metadata=meta, leaf_scan="codes"
    )


def check_result(index: vdb.ClusteredIndex, ids: np.ndarray, dists: np.ndarray) -> None:
    assert ids.dtype == np.int64 and dists.dtype == np.float32 and ids.shape == dists.shape
    live = set(index.ids.tolist())
    assert all(i == -1 or i in live for i in ids.ravel().tolist())
    assert (dists[..., 1:] >= dists[..., :-1]).all()  # inf padding sorts last


@FUZZ
@given(query=arrays(), k=PARAMS, probes=PARAMS, rerank_factor=PARAMS, filt=FILTERS)
def test_search_answers_or_raises_a_vectordb_error(base, query, k, probes, rerank_factor, filt):
    index = fresh_index(base)
    for call in (index.search, index.search_batch):
        try:
            ids, dists = call(query, k, probes=probes, rerank_factor=rerank_factor, filter=filt)
        except vdb.VectorDBError:
            continue
        check_result(index, ids, dists)
    try:
        matching = index.ids_matching(filt)
    except vdb.VectorDBError:
        return
    assert matching.dtype == np.int64 and np.isin(matching, index.ids).all()


@FUZZ
@given(
    vectors=arrays(),
    ids=IDS,
    metadata=st.one_of(st.none(), st.lists(st.one_of(st.none(), st.just({"u": 1})))),
    op=st.sampled_from(["add", "upsert"]),
)
def test_a_failed_write_changes_nothing(base, vectors, ids, metadata, op):
    index = fresh(base)
    before = index.ids.copy()
    try:
        getattr(index, op)(vectors, ids=ids, metadata=metadata)
    except vdb.VectorDBError:
        np.testing.assert_array_equal(index.ids, before)
        return
    assert len(index) >= len(before)
    check_result(index, *index.search_batch(base[:3], 5))


@FUZZ
@given(ids=IDS, missing_ok=st.booleans(), probe=st.one_of(st.integers(-2, 700), st.just("x")))
def test_delete_and_lookups_answer_or_raise_a_vectordb_error(base, ids, missing_ok, probe):
    index = fresh(base)
    before = index.ids.copy()
    try:
        index.delete(ids, missing_ok=missing_ok)
    except vdb.VectorDBError:
        np.testing.assert_array_equal(index.ids, before)
    assert isinstance(probe in index, bool)
    try:
        meta = index.get_metadata(probe)  # type: ignore[arg-type]
        assert meta is None or isinstance(meta, dict)
    except vdb.VectorDBError:
        pass
    try:
        got = index.get_vectors(ids)
        assert got.dtype == np.float32 and got.shape == (len(np.asarray(ids)), DIM)
    except vdb.VectorDBError:
        pass


@FUZZ
@given(
    vectors=arrays(),
    branching_factor=PARAMS,
    max_leaf_size=PARAMS,
    metric=st.sampled_from(["l2", "cosine", "ip", "L2", "manhattan", 3, None]),
    leaf_scan=st.sampled_from(["auto", "codes", "vectors", "x", None]),
)
def test_build_answers_or_raises_a_vectordb_error(
    vectors, branching_factor, max_leaf_size, metric, leaf_scan
):
    try:
        index = vdb.ClusteredIndex.build(
            vectors,
            branching_factor=branching_factor,
            max_leaf_size=max_leaf_size,
            metric=metric,
            leaf_scan=leaf_scan,
        )
    except vdb.VectorDBError:
        return
    check_result(index, *index.search(np.asarray(vectors, dtype=np.float32)[0], 3))


@settings(max_examples=25 * SCALE, deadline=None)
@given(query=arrays(), k=PARAMS, vectors=arrays(), ids=IDS)
def test_the_async_engine_answers_or_raises_a_vectordb_error_and_keeps_serving(
    query, k, vectors, ids
):
    data = vdb.make_clustered(300, DIM, seed=1)

    async def run() -> None:
        async with vdb.AsyncEngine(vdb.ClusteredIndex.build(data, max_leaf_size=50)) as engine:
            calls = [
                engine.search(query, k),
                engine.search_batch(query, k),
                engine.add(vectors, ids=ids),
                engine.delete(ids),
            ]
            for call in calls:
                with contextlib.suppress(vdb.VectorDBError):
                    await call
            ids_, _ = await engine.search(data[0], 3)
            assert ids_.shape == (3,)

    asyncio.run(run())


_INDEXES: dict[int, vdb.ClusteredIndex] = {}


def fresh_index(base: np.ndarray) -> vdb.ClusteredIndex:
    """One shared index for read-only fuzzing (building one per example is slow)."""
    key = id(base)
    if key not in _INDEXES:
        _INDEXES[key] = fresh(base)
    return _INDEXES[key]


# --------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def saved(base, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / "index"
    fresh(base).save(path)
    return path


FILE_NAMES = [
    "manifest.json",
    "centroids.npy",
    "children.npy",
    "leaf_of_node.npy",
    "leaf_offsets.npy",
    "codes.npy",
    "norms.npy",
    "ids.npy",
    "perm.npy",
    "blocks.npy",
    "vectors.bin",
    "metadata.sqlite",
]


def opens_cleanly_or_is_rejected(path: Path, base: np.ndarray, verify: bool) -> bool:
    """True if it opened (and searched without error), False if rejected cleanly."""
    try:
        with vdb.ClusteredIndex.open(path, verify=verify) as index:
            index.search_batch(base[:5], 5)
            index.search(base[0], 3, filter={"user": "ann"})
        return True
    except vdb.InvalidIndexFileError as exc:
        assert str(path) in str(exc), f"the error must name the file: {exc}"
        return False


@settings(
    max_examples=80 * SCALE,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    name=st.sampled_from(FILE_NAMES),
    how=st.sampled_from(["flip", "truncate", "extend", "zero"]),
    where=st.floats(0, 1),
    size=st.integers(1, 64),
)
def test_any_changed_byte_is_rejected_by_verify(
    saved, base, tmp_path_factory, name, how, where, size
):
    case = tmp_path_factory.mktemp("case") / "index"
    shutil.copytree(saved, case)
    target = case / name
    raw = bytearray(target.read_bytes())
    at = min(int(where * len(raw)), len(raw) - 1)
    if how == "flip":
        raw[at] ^= 1 << (size % 8)
    elif how == "truncate":
        del raw[at:]
    elif how == "extend":
        raw += bytes(size)
    else:
        before = bytes(raw[at : at + size])
        raw[at : at + size] = bytes(len(raw[at : at + size]))
        assume(before != bytes(len(before)))
    target.write_bytes(bytes(raw))
    assert not opens_cleanly_or_is_rejected(case, base, verify=True)
    opens_cleanly_or_is_rejected(case, base, verify=False)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(
    max_examples=120 * SCALE,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    path=st.lists(
        st.sampled_from(
            [
                "params",
                "files",
                "ids.npy",
                "size",
                "crc32",
                "dim",
                "n",
                "metric",
                "format_version",
                "n_nodes",
                "leaf_scan",
                "../x",
            ]
        ),
        min_size=1,
        max_size=3,
    ),
    value=JSON,
)
def test_any_manifest_value_is_checked(saved, base, tmp_path_factory, path, value):
    case = tmp_path_factory.mktemp("case") / "index"
    shutil.copytree(saved, case)
    manifest = json.loads((case / "manifest.json").read_text())
    node = manifest
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value
    (case / "manifest.json").write_bytes(sign_manifest(manifest))  # reach the deeper checks
    opens_cleanly_or_is_rejected(case, base, verify=False)
