"""Ids at the edges of int64, odd id types, and writes that fail: a refused or failed write
changes nothing (ids, vectors, metadata, search results), in RAM and in mmap mode."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import vectordb as vdb
from vectordb.index import update

MAX_ID = 2**63 - 1
DIM = 16
N = 60


class Boom(Exception):
    """A failure injected into one step of a write."""


def _boom(*_: Any, **__: Any) -> None:
    raise Boom("injected")


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return vdb.make_clustered(N + 40, DIM, seed=11)


def _build(data: np.ndarray, ids: np.ndarray, mode: str, tmp_path: Path) -> vdb.ClusteredIndex:
    meta = [{"g": int(i % 3), "i": int(i % 1000)} if i % 4 else None for i in ids]
    index = vdb.ClusteredIndex.build(data[: len(ids)], ids=ids, metadata=meta, max_leaf_size=8)
    if mode == "ram":
        return index
    index.save(tmp_path / "ix")
    return vdb.ClusteredIndex.open(tmp_path / "ix", mmap=True)


@pytest.fixture(params=["ram", "mmap"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def index(data: np.ndarray, mode: str, tmp_path: Path) -> Iterator[vdb.ClusteredIndex]:
    ix = _build(data, np.arange(N, dtype=np.int64) * 7 + 3, mode, tmp_path)
    yield ix
    ix.close()


def snapshot(index: vdb.ClusteredIndex, queries: np.ndarray) -> dict[str, Any]:
    """Everything a user can observe: ids, vectors, metadata, exact and default searches."""
    ids = index.ids
    exact = index.search_batch(queries, 10, probes=10_000, rerank_factor=len(index) + 1)
    approx = index.search_batch(queries, 5, probes=1, rerank_factor=1)
    return {
        "len": len(index),
        "ids": ids.tolist(),
        "vectors": index.get_vectors(ids).tolist(),
        "metadata": [index.get_metadata(int(i)) for i in ids],
        "matching": index.ids_matching({"g": 1}).tolist(),
        "exact": (exact[0].tolist(), exact[1].tolist()),
        "approx": (approx[0].tolist(), approx[1].tolist()),
    }


def scratch_files(index: vdb.ClusteredIndex) -> list[str]:
    path = index.mmap_path
    if path is None:
        return []
    # The writer's lock file comes with the first write, refused or not (its lock is
    # held until close): no scratch file.
    return sorted(p for p in os.listdir(path.parent) if p != "writer.lock")


# --------------------------------------------------------------------------- int64 edge


@pytest.mark.parametrize(
    ("top", "n_ok", "n_refused"),
    [
        pytest.param(MAX_ID - 2, 2, 1, id="next-id-2**63"),  # was OverflowError
        pytest.param(MAX_ID - 3, 1, 3, id="would-wrap-negative"),  # was negative ids
    ],
)
def test_assigned_ids_never_pass_int64(data, mode, tmp_path, top, n_ok, n_refused):
    ids = np.concatenate([np.arange(N - 1, dtype=np.int64), [top]])
    index = _build(data, ids, mode, tmp_path)
    added = index.add(data[N : N + n_ok])
    assert added.tolist() == list(range(top + 1, top + 1 + n_ok))
    queries = data[N + 20 : N + 25]
    before, files, rows = snapshot(index, queries), scratch_files(index), index._state.storage.n
    with pytest.raises(vdb.InvalidParameterError, match="2\\*\\*63 - 1"):
        index.add(data[N + 5 : N + 5 + n_refused], metadata=[{"g": 1}] * n_refused)
    assert snapshot(index, queries) == before
    assert index._state.storage.n == rows and scratch_files(index) == files  # storage untouched
    assert (index.ids >= 0).all()
    # Explicit free ids still work, and the saved index opens again.
    index.add(data[N + 10 : N + 11], ids=[N + 1000])
    index.save(tmp_path / "again")
    with vdb.ClusteredIndex.open(tmp_path / "again", mmap=False) as reopened:
        assert reopened.ids.tolist() == index.ids.tolist()
        with pytest.raises(vdb.InvalidParameterError):
            reopened.add(data[N + 11 : N + 11 + n_refused])
    index.close()


def test_an_id_of_2_63_minus_1_is_usable(data, tmp_path):
    index = _build(data, np.array([0, MAX_ID], dtype=np.int64), "ram", tmp_path)
    assert MAX_ID in index and index.get_metadata(MAX_ID) == {"g": MAX_ID % 3, "i": MAX_ID % 1000}
    np.testing.assert_array_equal(index.get_vectors([MAX_ID]), data[1:2])
    assert index.delete([MAX_ID]) == 1 and MAX_ID not in index
    index.upsert(data[2:3], ids=[MAX_ID])
    assert MAX_ID in index


# --------------------------------------------------------------------------- lookups


@pytest.mark.parametrize(
    "probe",
    [2**63, 2**70, -(2**70), -1, np.uint64(2**64 - 1), 3.0, True, np.bool_(True), "3", None],
    ids=repr,
)
def test_membership_of_anything_that_is_not_an_id_is_false(index, probe):
    assert (probe in index) is False


def test_membership_of_numpy_and_python_ints(index):
    assert 3 in index and np.int64(10) in index and np.uint8(17) in index and 4 not in index


@pytest.mark.parametrize("missing", [2**63, 2**70, -1, -(2**70), 4, np.uint64(2**64 - 1)])
def test_get_metadata_of_an_int_no_vector_has_is_unknown(index, missing):
    with pytest.raises(vdb.UnknownIdError, match="not in the index"):
        index.get_metadata(missing)


@pytest.mark.parametrize("bad", [3.0, True, "3", None, [3]], ids=repr)
def test_get_metadata_of_a_non_int_is_invalid(index, bad):
    with pytest.raises(vdb.InvalidParameterError, match="an id must be an integer"):
        index.get_metadata(bad)


BAD_IDS = [
    pytest.param(2**63, id="2**63"),
    pytest.param([2**70], id="2**70"),
    pytest.param([2**63, -1], id="2**63-and-negative"),  # NumPy makes this float64
    pytest.param(np.uint64(2**63), id="uint64-2**63"),
    pytest.param(-1, id="negative"),
    pytest.param(True, id="bool"),
    pytest.param([10, True], id="bool-in-list"),  # NumPy makes this int64
    pytest.param(np.array([True]), id="bool-array"),
    pytest.param(10.0, id="whole-float"),
    pytest.param([10.0], id="whole-float-list"),
    pytest.param(np.array([10.0]), id="float-array"),
    pytest.param([float(2**62 + 1)], id="float-beyond-2**53"),
    pytest.param("a", id="string"),
    pytest.param([[10, 17]], id="2-d"),
    pytest.param([[10], [10, 17]], id="ragged"),
    pytest.param({10}, id="set"),
]


def _n(ids: Any) -> int:
    try:
        return len(ids)
    except TypeError:
        return 1


OPS: dict[str, Callable[[vdb.ClusteredIndex, Any, np.ndarray], Any]] = {
    "delete": lambda ix, ids, x: ix.delete(ids),
    "delete-missing-ok": lambda ix, ids, x: ix.delete(ids, missing_ok=True),
    "get_vectors": lambda ix, ids, x: ix.get_vectors(ids),
    "upsert": lambda ix, ids, x: ix.upsert(x[: _n(ids)], ids),
    "add": lambda ix, ids, x: ix.add(x[: _n(ids)], ids),
}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("bad", BAD_IDS)
def test_batch_calls_refuse_ids_outside_int64_and_non_ints(data, tmp_path, op, bad):
    index = _build(data, np.arange(N, dtype=np.int64) * 7 + 3, "ram", tmp_path)
    queries = data[N : N + 4]
    before = snapshot(index, queries)
    with pytest.raises(vdb.InvalidParameterError) as caught:
        OPS[op](index, bad, data[N:])
    assert caught.type is not vdb.DuplicateIdError  # refused for what it is, not as taken
    assert snapshot(index, queries) == before


# --------------------------------------------------------------------------- failed writes


def _fail_and_compare(
    index: vdb.ClusteredIndex, data: np.ndarray, write: Callable[[], Any], tmp_path: Path
) -> None:
    queries = data[N + 20 : N + 25]
    before = snapshot(index, queries)
    with pytest.raises(Boom):
        write()
    assert snapshot(index, queries) == before
    # What a failed write left behind (unreferenced rows) never reaches the saved index.
    index.save(tmp_path / "after")
    with vdb.ClusteredIndex.open(tmp_path / "after", mmap=True) as reopened:
        assert snapshot(reopened, queries) == before


@pytest.mark.parametrize(
    "ids",
    [[10, 17], [10, 10, 17], [10, 999_999], [10, 17, 24, 31]],
    ids=["two", "dup", "missing", "four"],
)
def test_delete_changes_nothing_when_the_metadata_step_fails(
    index, data, tmp_path, monkeypatch, ids
):
    monkeypatch.setattr(index._metadata, "delete", _boom)
    _fail_and_compare(index, data, lambda: index.delete(ids, missing_ok=True), tmp_path)
    monkeypatch.undo()
    assert index.delete(ids, missing_ok=True) == len({10, 17, 24, 31} & set(ids))
    assert not any(i in index for i in ids)


def test_delete_changes_nothing_when_preparing_the_state_fails(index, data, tmp_path, monkeypatch):
    monkeypatch.setattr(update, "deleted", _boom)
    _fail_and_compare(index, data, lambda: index.delete([10, 17]), tmp_path)


@pytest.mark.parametrize(
    ("method", "write"),
    [
        ("put", lambda ix, x: ix.add(x[:3], metadata=[{"g": 1}] * 3)),
        ("delete", lambda ix, x: ix.add(x[:3], ids=[4, 5, 6])),
        ("put", lambda ix, x: ix.upsert(x[:3], [10, 17, 5], metadata=[{"g": 1}, None, None])),
    ],
    ids=["add-with-metadata", "add-without", "upsert"],
)
def test_add_and_upsert_change_nothing_when_the_metadata_step_fails(
    index, data, tmp_path, monkeypatch, method, write
):
    monkeypatch.setattr(index._metadata, method, _boom)
    _fail_and_compare(index, data, lambda: write(index, data[N:]), tmp_path)


BAD_WRITES: list[Any] = [
    pytest.param(lambda ix, x: ix.add(x[:2], ids=[10, 4]), vdb.DuplicateIdError, id="taken-id"),
    pytest.param(lambda ix, x: ix.add(x[:2], ids=[4, 4]), vdb.DuplicateIdError, id="dup-add"),
    pytest.param(
        lambda ix, x: ix.upsert(x[:2], ids=[10, 10]), vdb.DuplicateIdError, id="dup-upsert"
    ),
    pytest.param(lambda ix, x: ix.add(x[:3], ids=[4, 5]), vdb.InvalidParameterError, id="n-ids"),
    pytest.param(lambda ix, x: ix.add(x[:0]), vdb.InvalidVectorsError, id="empty"),
    pytest.param(lambda ix, x: ix.add([]), vdb.InvalidVectorsError, id="empty-list"),
    pytest.param(lambda ix, x: ix.upsert(x[:0], []), vdb.InvalidVectorsError, id="empty-upsert"),
    pytest.param(lambda ix, x: ix.add(x[:2, :-1]), vdb.DimensionMismatchError, id="dim"),
    pytest.param(lambda ix, x: ix.add(x[0]), vdb.InvalidVectorsError, id="1-d"),
    pytest.param(
        lambda ix, x: ix.add(np.where(np.eye(2, DIM) > 0, np.nan, x[:2])),
        vdb.InvalidVectorsError,
        id="nan",
    ),
    pytest.param(
        lambda ix, x: ix.upsert(np.where(np.eye(2, DIM) > 0, np.inf, x[:2]), [10, 4]),
        vdb.InvalidVectorsError,
        id="inf-upsert",
    ),
    pytest.param(
        lambda ix, x: ix.add(x[:2], metadata=[{"g": 1}]), vdb.InvalidParameterError, id="meta-n"
    ),
    pytest.param(
        lambda ix, x: ix.upsert(x[:2], [10, 4], metadata=[{"g": 1}, "x"]),
        vdb.InvalidParameterError,
        id="meta-not-dict",
    ),
    pytest.param(
        lambda ix, x: ix.add(x[:1], metadata=[{"g": float("nan")}]),
        vdb.InvalidParameterError,
        id="meta-nan",
    ),
    pytest.param(lambda ix, x: ix.delete([10, 4]), vdb.UnknownIdError, id="delete-missing"),
    pytest.param(lambda ix, x: ix.delete([10, 10, 4]), vdb.UnknownIdError, id="delete-dup-miss"),
    pytest.param(lambda ix, x: ix.get_vectors([10, 4]), vdb.UnknownIdError, id="get-missing"),
]


@pytest.mark.parametrize(("write", "error"), BAD_WRITES)
def test_a_refused_write_changes_nothing(index, data, write, error):
    queries = data[N + 20 : N + 25]
    before, files = snapshot(index, queries), scratch_files(index)
    with pytest.raises(error):
        write(index, data[N:])
    assert snapshot(index, queries) == before
    assert scratch_files(index) == files


def test_delete_of_repeated_ids_counts_each_once(index):
    assert index.delete([10, 10, 17]) == 2
    assert 10 not in index and 17 not in index and len(index) == N - 2
    assert index.delete([], missing_ok=False) == 0
