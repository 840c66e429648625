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
from vectordb.storage.format import sign_manifest

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


N = 600
#: The indexed vectors, and the metadata of vector ``i``.
BASE = vdb.make_clustered(N, DIM, seed=5)
BASE.setflags(write=False)


def meta_of(i: int) -> dict[str, Any]:
    return {"user": "ann" if i % 2 else "bob", "ts": i}


@pytest.fixture(scope="module")
def base() -> np.ndarray:
    return BASE


def fresh(base: np.ndarray) -> vdb.ClusteredIndex:
    meta = [meta_of(i) for i in range(len(base))]
    return vdb.ClusteredIndex.build(
        base, metric="cosine", max_leaf_size=60, metadata=meta, leaf_scan="codes"
    )


def check_result(index: vdb.ClusteredIndex, ids: np.ndarray, dists: np.ndarray) -> None:
    assert ids.dtype == np.int64 and dists.dtype == np.float32 and ids.shape == dists.shape
    live = set(index.ids.tolist())
    assert all(i == -1 or i in live for i in ids.ravel().tolist())
    assert (dists[..., 1:] >= dists[..., :-1]).all()  # inf padding sorts last


def unit(x: Any) -> np.ndarray:
    """Rows of ``x`` as float32, then normalised in float64 (what cosine compares)."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float32)).astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@st.composite
def good_queries(draw: st.DrawFn) -> np.ndarray:
    """(n, DIM) float32 queries near the indexed vectors."""
    rows = draw(st.lists(st.integers(0, N - 1), min_size=1, max_size=4))
    noise = draw(hnp.arrays(np.float32, (len(rows), DIM), elements=st.floats(-1, 1, width=32)))
    return BASE[rows] + noise


def as_caller_would(draw: st.DrawFn, q: np.ndarray) -> Any:
    """``q`` as float32, float64, float16 (rounded first, so the oracle sees the same
    numbers) or a list of lists."""
    form = draw(st.sampled_from(["float32", "float64", "float16", "list"]))
    if form == "float16":
        q = q.astype(np.float16).astype(np.float32)
    return q.tolist() if form == "list" else q.astype(form)


def _range(a: int, b: int) -> tuple[Any, Any]:
    return {"ts": {"$gte": a, "$lt": b}}, lambda m: a <= m["ts"] < b


#: (filter, the same predicate in Python on a metadata dict)
GOOD_FILTERS = st.one_of(
    st.just((None, lambda m: True)),
    st.sampled_from(["ann", "bob", "zed"]).map(lambda u: ({"user": u}, lambda m: m["user"] == u)),
    st.tuples(st.integers(-5, N + 5), st.integers(-5, N + 5)).map(lambda ab: _range(*ab)),
    st.lists(st.integers(0, N + 50), max_size=6).map(
        lambda v: ({"ts": {"$in": v}}, lambda m: m["ts"] in v)
    ),
    st.integers(0, N).map(
        lambda t: ({"user": "ann", "ts": {"$gt": t}}, lambda m: m["user"] == "ann" and m["ts"] > t)
    ),
    st.integers(2, 9).map(lambda d: (lambda m: m["ts"] % d == 0, lambda m: m["ts"] % d == 0)),
)


def check_answer(
    index: vdb.ClusteredIndex, query: Any, k: int, ids: np.ndarray, dists: np.ndarray, pred: Any
) -> None:
    """A valid search's answer: per query ``min(k, matches)`` distinct matching ids, then
    ``-1``/``inf`` padding, at their exact (float64 brute-force) cosine distances."""
    check_result(index, ids, dists)
    ids2, dists2 = np.atleast_2d(ids), np.atleast_2d(dists)
    q = unit(query)
    assert ids2.shape == (q.shape[0], k)
    matching = np.array([i for i in range(N) if pred(meta_of(i))], dtype=np.int64)
    found = min(k, matching.shape[0])
    assert (ids2[:, :found] >= 0).all(), f"fewer than {found} results"
    assert (ids2[:, found:] == -1).all() and np.isposinf(dists2[:, found:]).all()
    got = ids2[:, :found]
    assert np.isin(got, matching).all(), "a result that does not match the filter"
    assert all(np.unique(row).size == found for row in got)
    true = 1.0 - np.einsum("qd,qkd->qk", q, unit(BASE)[got])
    np.testing.assert_allclose(dists2[:, :found], true, rtol=1e-4, atol=1e-4)


@st.composite
def valid_searches(draw: st.DrawFn) -> tuple[tuple[Any, Any], dict[str, Any], Any]:
    """``((query for search, queries for search_batch), kwargs, predicate of the filter)``:
    calls that must answer, so that the answer can be checked against brute force."""
    q = draw(good_queries())
    one = q[0] if draw(st.booleans()) else q[:1]
    filt, pred = draw(GOOD_FILTERS)
    kwargs = {
        "k": draw(st.integers(1, 40) | st.integers(N - 5, N + 5)),
        "probes": draw(st.integers(1, 40)),
        "rerank_factor": draw(st.integers(1, 40)),
        "filter": filt,
    }
    return (as_caller_would(draw, one), as_caller_would(draw, q)), kwargs, pred


@FUZZ
@given(case=valid_searches())
def test_valid_searches_equal_brute_force(base, case):
    index = fresh_index(base)
    queries, kwargs, pred = case
    for call, query in zip((index.search, index.search_batch), queries, strict=True):
        ids, dists = call(query, **kwargs)
        check_answer(index, query, kwargs["k"], ids, dists, pred)
    if kwargs["filter"] is not None:
        matching = index.ids_matching(kwargs["filter"])
        assert matching.dtype == np.int64
        assert matching.tolist() == [i for i in range(N) if pred(meta_of(i))]


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
        if filt is not None:
            assert np.isin(ids[ids >= 0], index.ids_matching(filt)).all()
    try:
        matching = index.ids_matching(filt)
    except vdb.VectorDBError:
        return
    assert matching.dtype == np.int64 and np.isin(matching, index.ids).all()


def snapshot(index: vdb.ClusteredIndex) -> dict[str, Any]:
    """Everything a caller can see: ids, stored vectors, metadata, an exact search."""
    ids = index.ids
    return {
        "ids": ids,
        "vectors": index.get_vectors(ids),
        "metadata": [index.get_metadata(i) for i in ids.tolist()],
        "search": index.search_batch(BASE[::50], 5, probes=10_000, rerank_factor=1_000),
    }


def assert_unchanged(index: vdb.ClusteredIndex, before: dict[str, Any]) -> None:
    after = snapshot(index)
    np.testing.assert_array_equal(after["ids"], before["ids"])
    np.testing.assert_array_equal(after["vectors"], before["vectors"])
    assert after["metadata"] == before["metadata"]
    for got, want in zip(after["search"], before["search"], strict=True):
        np.testing.assert_array_equal(got, want)


#: What makes a write fail, each past the first checks: ids already taken (add), repeated,
#: negative or too few; metadata of the wrong length or not JSON; a NaN; a wrong dimension.
FLAWS = (
    "taken",
    "repeated",
    "negative",
    "too few ids",
    "metadata length",
    "not JSON",
    "nan",
    "dim",
)


def writes(expect: str) -> st.SearchStrategy[tuple[str, Any, Any, Any]]:
    """``(op, vectors, ids, metadata)`` for add / upsert: a valid write (``expect="ok"``),
    a valid write but for the flaw ``expect`` (one of ``FLAWS``), or any input
    (``"either"``). Flawed writes carry metadata, so that a leak of it would show."""

    @st.composite
    def draw_write(draw: st.DrawFn) -> tuple[str, Any, Any, Any]:
        op = draw(st.sampled_from(["add", "upsert"]))
        if expect == "either":
            meta = st.none() | st.lists(st.none() | st.just({"u": 1}))
            return op, draw(arrays()), draw(IDS), draw(meta)
        n = draw(st.integers(1, 4))
        noise = draw(hnp.arrays(np.float32, (n, DIM), elements=st.floats(-5, 5, width=32)))
        vectors = as_caller_would(draw, noise + BASE[draw(st.integers(0, N - 1))])
        taken, new = st.integers(0, N - 1), st.integers(N, N + 20)
        doc = st.fixed_dictionaries({"user": st.sampled_from(["ann", "cy"])})
        if expect == "ok":
            if op == "upsert":
                ids = draw(st.lists(taken | new, min_size=n, max_size=n, unique=True))
            else:
                ids = draw(st.none() | st.lists(new, min_size=n, max_size=n, unique=True))
            metadata = draw(st.none() | st.lists(st.none() | doc, min_size=n, max_size=n))
            return op, vectors, ids, metadata
        ids = draw(st.lists(taken | new, min_size=n, max_size=n, unique=True))
        metadata = draw(st.lists(doc, min_size=n, max_size=n))
        at = draw(st.integers(0, n - 1))
        if expect == "taken":
            op, ids[at] = "add", draw(taken)
        elif expect == "repeated":
            ids = [*ids, ids[at]]
            vectors = np.concatenate([np.asarray(vectors, np.float32)] * 2)[: n + 1]
            metadata = [*metadata, metadata[at]]
        elif expect == "negative":
            ids[at] = draw(st.integers(-(2**63), -1))
        elif expect == "too few ids":
            ids = ids[:at]
        elif expect == "metadata length":
            metadata = draw(st.lists(doc, max_size=5).filter(lambda m: len(m) != n))
        elif expect == "not JSON":
            metadata[at] = draw(st.sampled_from([{"a": {1, 2}}, {"a": float("nan")}, {"a": b"x"}]))
        elif expect == "nan":
            vectors = np.array(vectors, dtype=np.float64)
            vectors[at, draw(st.integers(0, DIM - 1))] = draw(st.sampled_from([np.nan, np.inf]))
        else:
            vectors = np.asarray(vectors, dtype=np.float32)[:, : draw(st.integers(1, DIM - 1))]
        return op, vectors, ids, metadata

    return draw_write()


def check_written(index, before, op, vectors, ids, metadata, new) -> None:
    """After a successful write: the new ids, their vectors and metadata, the rest as it was."""
    old = dict(zip(before["ids"].tolist(), before["metadata"], strict=True))
    x = unit(vectors)
    assert new.dtype == np.int64 and new.shape == (x.shape[0],)
    if ids is not None:
        np.testing.assert_array_equal(new, np.asarray(ids))
    np.testing.assert_array_equal(index.ids, np.union1d(before["ids"], new))
    np.testing.assert_allclose(index.get_vectors(new), x, rtol=1e-5, atol=1e-6)
    for j, i in enumerate(new.tolist()):
        if metadata is not None:
            assert index.get_metadata(i) == metadata[j]
        else:  # upsert keeps an id's metadata; an added id has none
            assert index.get_metadata(i) == (old.get(i) if op == "upsert" else None)
    rest = np.setdiff1d(before["ids"], new)
    np.testing.assert_array_equal(
        index.get_vectors(rest), before["vectors"][np.searchsorted(before["ids"], rest)]
    )
    assert [index.get_metadata(i) for i in rest.tolist()] == [old[i] for i in rest.tolist()]
    check_result(index, *index.search_batch(BASE[:3], 5))
    # Every new vector is found, by an exact search, at distance 0 from itself.
    _, dists = index.search_batch(x.astype(np.float32), 1, probes=10_000, rerank_factor=10_000)
    np.testing.assert_allclose(dists[:, 0], 0.0, atol=1e-5)


def check_write(base: np.ndarray, expect: str, write: tuple[str, Any, Any, Any]) -> None:
    op, vectors, ids, metadata = write
    index = fresh(base)
    before = snapshot(index)
    try:
        new = getattr(index, op)(vectors, ids=ids, metadata=metadata)
    except vdb.VectorDBError:
        assert expect != "ok", "a valid write failed"
        assert_unchanged(index, before)
        return
    assert expect in ("ok", "either"), f"a write with a flaw ({expect}) succeeded"
    check_written(index, before, op, vectors, ids, metadata, new)


@settings(FUZZ, max_examples=30 * SCALE)
@given(write=writes("ok"))
def test_a_valid_write_does_what_it_says(base, write):
    check_write(base, "ok", write)


@pytest.mark.parametrize("flaw", FLAWS)
@settings(FUZZ, max_examples=5 * SCALE)
@given(data=st.data())
def test_a_failed_write_changes_nothing(base, flaw, data):
    check_write(base, flaw, data.draw(writes(flaw)))


@settings(FUZZ, max_examples=15 * SCALE)
@given(write=writes("either"))
def test_any_write_succeeds_or_changes_nothing(base, write):
    check_write(base, "either", write)


def deletions(expect: str) -> st.SearchStrategy[tuple[Any, bool]]:
    """``(ids, missing_ok)``: live ids, or live and unknown ids with ``missing_ok``
    (``expect="ok"``); live and unknown ids without it (``"error"``); anything
    (``"either"``)."""
    live = st.lists(st.integers(0, N - 1), max_size=6)
    unknown = st.lists(st.integers(N, 2**63 - 1), min_size=1, max_size=3)
    mixed = st.tuples(live, unknown).flatmap(lambda p: st.permutations(p[0] + p[1]))
    if expect == "ok":
        return st.tuples(live, st.booleans()) | st.tuples(mixed, st.just(True))
    if expect == "error":
        return st.tuples(mixed, st.just(False))
    return st.tuples(IDS, st.booleans())


@pytest.mark.parametrize("expect", ["ok", "error", "either"])
@settings(FUZZ, max_examples=12 * SCALE)
@given(data=st.data(), probe=st.one_of(st.integers(-2, 700), st.just("x")))
def test_delete_and_lookups_answer_or_raise_a_vectordb_error(base, expect, data, probe):
    ids, missing_ok = data.draw(deletions(expect))
    index = fresh(base)
    before = snapshot(index)
    try:
        count = index.delete(ids, missing_ok=missing_ok)
    except vdb.VectorDBError:
        assert expect != "ok", "a valid delete failed"
        assert_unchanged(index, before)
    else:
        assert expect != "error", "a delete of unknown ids succeeded"
        gone = np.intersect1d(before["ids"], np.asarray(ids, dtype=np.int64).reshape(-1))
        assert count == gone.shape[0]
        rest = np.setdiff1d(before["ids"], gone)
        np.testing.assert_array_equal(index.ids, rest)
        np.testing.assert_array_equal(index.get_vectors(rest), before["vectors"][rest])
        assert [index.get_metadata(i) for i in rest.tolist()] == [meta_of(i) for i in rest]
        if gone.size:
            assert not np.isin(index.search_batch(BASE[gone], 3)[0], gone).any()
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
    "factors.npy",
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
