"""Incremental checkpoints: a checkpoint writes what changed, links the rest, and a kill
anywhere in it keeps every acknowledged write; version 5 directories are checked on open."""

from __future__ import annotations

import json
import os
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from crashpoints import kill_at_step, trace_steps

import vectordb as vdb
from vectordb.cli import cli
from vectordb.storage.format import LIVING_VERSION, TAIL, sign_manifest

DIM = 16


def vectors(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def saved(tmp_path: Path, n: int = 2000, **options) -> Path:
    path = tmp_path / "idx"
    vdb.ClusteredIndex.build(vectors(n, 0), max_leaf_size=50, seed=1, **options).save(path)
    return path


def inodes(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in path.iterdir() if p.is_file()}


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def content(path: Path) -> dict[int, bytes]:
    with vdb.ClusteredIndex.open(path, readonly=True, verify=True) as index:
        ids = np.sort(index.ids)
        return {int(i): v.tobytes() for i, v in zip(ids, index.get_vectors(ids), strict=True)}


def brute_top(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    d = ((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return ids[np.argsort(d, axis=1, kind="stable")[:, :k]]


@pytest.mark.parametrize("mmap", [True, False])
def test_a_checkpoint_writes_the_new_rows_and_links_what_did_not_change(tmp_path, mmap):
    path = saved(tmp_path)
    x = vectors(60, 5)
    with vdb.ClusteredIndex.open(path, mmap=mmap) as index:
        before = inodes(path)
        index.add(x[:20], ids=np.arange(5000, 5020))  # 1%: stays in the delta part
        index.checkpoint()
        after = inodes(path)
        m = manifest(path)
        assert m["format_version"] == LIVING_VERSION and m["rows"] == 2020
        assert m["tail_rows"] == 20 and (path / TAIL).stat().st_size == 20 * DIM * 4
        kept = {"vectors.bin", "codes.npy", "factors.npy", "centroids.npy", "leaf_offsets.npy"}
        assert all(after[name] == before[name] for name in kept)
        # Written anew: the per-row ids (8 bytes a row), the delta part, the tail (the new
        # rows alone), the manifest and log; slot_rows only coming from version 3.
        written = {n for n in after if after[n] != before.get(n)}
        assert written <= {
            "ids.npy",
            "slot_rows.npy",
            TAIL,
            "manifest.json",
            "wal.log",
            "writer.lock",
        } | {f"delta_{part}.npy" for part in ("offsets", "rows", "codes", "factors")}
        tail = after[TAIL]
        index.delete([3, 4])
        index.upsert(x[20:22], ids=[7, 5000])
        index.add(x[22:60], ids=np.arange(6000, 6038))
        index.checkpoint()
        again = inodes(path)
        assert {n for n in again if again[n] != after.get(n)} <= written - {"slot_rows.npy"}
        assert again[TAIL] == tail, "the tail is extended in place, not copied"
        assert again["vectors.bin"] == before["vectors.bin"]
        assert manifest(path)["tail_rows"] == 60 and manifest(path)["n"] == 2000 + 20 - 2 + 38
        q = vectors(30, 9)
        live = index.search_batch(q, 10, probes=1000)
    with vdb.ClusteredIndex.open(path, mmap=mmap, verify=True) as reopened:
        got = reopened.search_batch(q, 10, probes=1000)
        assert np.array_equal(got[0], live[0]) and np.allclose(got[1], live[1])
        assert 3 not in reopened and 5000 in reopened and 6037 in reopened
        np.testing.assert_array_equal(reopened.get_vectors([7, 5000]), x[20:22])
        # Exact: every live vector is found where brute force finds it.
        ids = np.sort(reopened.ids)
        top = brute_top(reopened.get_vectors(ids), ids, q, 10)
        assert (got[0] == top).mean() >= 0.99
    code = CliRunner().invoke(cli, ["--no-progress", "verify", str(path)]).exit_code
    assert code == 0


def test_a_leaf_split_between_checkpoints_leaves_the_main_layouts_files_linked(tmp_path):
    path = saved(tmp_path, 1000)
    rng = np.random.default_rng(4)
    with vdb.ClusteredIndex.open(path) as index:
        leaves = index._state.tree.n_leaves
        before = inodes(path)
        # Many vectors near one stored vector: its leaf outgrows its limit and splits.
        near = index.get_vectors([17]) + 0.01 * rng.standard_normal((150, DIM)).astype(np.float32)
        index.add(near.astype(np.float32), ids=np.arange(10_000, 10_150))  # < the fold
        assert index._state.tree.n_leaves > leaves, "no leaf split"
        index.checkpoint()
        after = inodes(path)
        assert all(after[n] == before[n] for n in ("codes.npy", "factors.npy", "vectors.bin"))
        assert after["centroids.npy"] != before["centroids.npy"]
        q = np.concatenate([near[:20], vectors(20, 3)])
        live = index.search_batch(q, 10, probes=10_000, rerank_factor=1000)  # near-duplicates
        ids = np.sort(index.ids)
        x = index.get_vectors(ids)
    with vdb.ClusteredIndex.open(path, verify=True) as again:
        got = again.search_batch(q, 10, probes=10_000, rerank_factor=1000)
        assert np.array_equal(got[0], live[0])
        # Against brute force, ties tolerated: the same distances at every rank.
        exact = np.sort(((q[:, None, :] - x[None, :, :]) ** 2).sum(-1), axis=1)[:, :10]
        np.testing.assert_allclose(got[1], exact, rtol=1e-3, atol=1e-4)
        np.testing.assert_array_equal(again.get_vectors(ids), x)


def test_compact_is_what_rewrites_the_vector_file(tmp_path):
    path = saved(tmp_path, 600)
    with vdb.ClusteredIndex.open(path) as index:
        index.add(vectors(30, 2), ids=np.arange(1000, 1030))
        index.delete(np.arange(100))
        index.checkpoint()
        linked = inodes(path)["vectors.bin"]
        index.compact()
        index.checkpoint()
        m = manifest(path)
        assert inodes(path)["vectors.bin"] != linked
        assert m["tail_rows"] == 0 and m["rows"] == 530 and not (path / TAIL).exists()
        index.add(vectors(5, 3), ids=np.arange(2000, 2005))
        index.checkpoint()
        assert manifest(path)["tail_rows"] == 5
    assert len(content(path)) == 535


def test_a_tail_longer_than_listed_is_a_crashed_checkpoints_and_is_overwritten(tmp_path):
    path = saved(tmp_path, 500)
    x = vectors(10, 4)
    with vdb.ClusteredIndex.open(path) as index:
        index.add(x[:5], ids=np.arange(900, 905))
        index.checkpoint()
    with open(path / TAIL, "ab") as fh:  # what a checkpoint killed before its swap leaves
        fh.write(b"\xff" * (3 * DIM * 4 + 7))
    assert len(content(path)) == 505  # verify=True: the listed prefix's CRC32
    with vdb.ClusteredIndex.open(path) as index:
        index.add(x[5:], ids=np.arange(905, 910))
        index.checkpoint()
    got = content(path)
    assert [got[i] for i in range(900, 910)] == [r.tobytes() for r in x]


def test_warm_reads_the_tail_and_the_rows_added_since(tmp_path):
    path = saved(tmp_path, 500)
    with vdb.ClusteredIndex.open(path) as index:
        index.add(vectors(30, 5), ids=np.arange(900, 930))
        index.checkpoint()
    row = DIM * 4
    with vdb.ClusteredIndex.open(path) as index:
        assert index.warm() == 530 * row  # vectors.bin, then the tail's 30 rows
        index.add(vectors(7, 6), ids=np.arange(930, 937))  # the tail copied, then 7 more
        assert index.warm() == 537 * row
        seen = []

        async def engine_warm():
            async with vdb.AsyncEngine(index) as engine:
                return await engine.warm(progress=lambda done, total: seen.append((done, total)))

        import asyncio

        assert asyncio.run(engine_warm()) == 537 * row
        assert seen[-1] == (537 * row, 537 * row)


def test_metadata_is_linked_while_unchanged(tmp_path):
    path = tmp_path / "idx"
    docs = [{"i": i} for i in range(400)]
    vdb.ClusteredIndex.build(vectors(400, 0), metadata=docs, max_leaf_size=50).save(path)
    with vdb.ClusteredIndex.open(path) as index:
        first = inodes(path)["metadata.sqlite"]
        index.add(vectors(3, 1), ids=[500, 501, 502])
        index.checkpoint()
        assert inodes(path)["metadata.sqlite"] == first
        index.add(vectors(1, 2), ids=[503], metadata=[{"new": True}])
        index.checkpoint()
        assert inodes(path)["metadata.sqlite"] != first
    with vdb.ClusteredIndex.open(path) as again:
        assert again.get_metadata(503) == {"new": True} and again.get_metadata(7) == {"i": 7}


def test_a_reader_beside_checkpoints_keeps_its_version_and_refreshes(tmp_path):
    path = saved(tmp_path, 500)
    x = vectors(40, 6)
    writer = vdb.ClusteredIndex.open(path)
    try:
        writer.add(x[:10], ids=np.arange(700, 710))
        writer.checkpoint()
        with vdb.ClusteredIndex.open(path, readonly=True) as reader:
            assert len(reader) == 510
            writer.add(x[10:20], ids=np.arange(710, 720))
            writer.checkpoint()  # appends to the tail the reader maps
            np.testing.assert_array_equal(reader.get_vectors(np.arange(700, 710)), x[:10])
            assert reader.refresh() == 0 and len(reader) == 520
            writer.add(x[20:40], ids=np.arange(720, 740))  # logged, not checkpointed
            assert reader.refresh() == 1  # replayed: its rows go after the mapped tail
            np.testing.assert_array_equal(reader.get_vectors(np.arange(700, 740)), x)
    finally:
        writer.close()


# --------------------------------------------------------------------------- kills


def _two_checkpoints(path: Path, x: np.ndarray):
    def action() -> None:
        with vdb.ClusteredIndex.open(path, mmap=True) as index:
            index.add(x[:3], ids=[900, 901, 902])
            index.checkpoint()  # the first: makes the tail
            index.delete([5])
            index.add(x[3:], ids=[903, 904])
            index.checkpoint()  # the second: extends it in place

    return action


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_kill_at_every_step_of_two_checkpoints_keeps_every_acknowledged_write(tmp_path):
    pristine = tmp_path / "pristine"
    vdb.ClusteredIndex.build(vectors(120, 0), max_leaf_size=30, rotate=False).save(pristine)
    x = vectors(5, 8)
    path = tmp_path / "idx"
    subprocess.run(["cp", "-a", str(pristine), str(path)], check=True)
    base = content(path)
    first = {**base, **{900 + i: x[i].tobytes() for i in range(3)}}
    deleted = {i: v for i, v in first.items() if i != 5}
    last = {**deleted, 903: x[3].tobytes(), 904: x[4].tobytes()}
    steps = trace_steps(_two_checkpoints(path, x))
    assert content(path) == last
    subprocess.run(["rm", "-rf", str(path)], check=True)
    seen = set()
    for n in range(1, len(steps) + 1):
        subprocess.run(["cp", "-a", str(pristine), str(path)], check=True)
        kill_at_step(_two_checkpoints(path, x), n)
        got = content(path)
        assert any(got == s for s in (base, first, deleted, last)), f"step {n}: {steps[n - 1]}"
        seen.add(len(got))
        # ... and the directory goes on: a checkpoint after the crash, then a reopen.
        with vdb.ClusteredIndex.open(path) as index:
            index.add(x[:1] * 3, ids=[999])
            index.checkpoint()
        assert content(path) == {**got, 999: (x[0] * 3).tobytes()}
        subprocess.run(["rm", "-rf", str(path)], check=True)
        for left in tmp_path.glob(".idx.*"):
            subprocess.run(["rm", "-rf", str(left)], check=True)
    assert seen == {120, 123, 122, 124}


# --------------------------------------------------------------------------- hostile files


def _rewrite(path: Path, name: str, array: np.ndarray | None = None, **fields) -> None:
    """Replace ``name`` with ``array`` (a valid .npy) and the manifest's ``fields``, and
    sign the manifest again: damage that no checksum catches."""
    m = manifest(path)
    if array is not None:
        target = path / name
        target.chmod(0o644)
        np.save(target, array)
        data = target.read_bytes()
        m["files"][name] = {"size": len(data), "crc32": zlib.crc32(data)}
    m.update(fields)
    (path / "manifest.json").chmod(0o644)
    (path / "manifest.json").write_bytes(sign_manifest(m))


@pytest.fixture
def living(tmp_path) -> Path:
    path = saved(tmp_path, 300)
    with vdb.ClusteredIndex.open(path) as index:
        index.add(vectors(10, 3), ids=np.arange(400, 410))
        index.delete([0, 1])
        index.checkpoint()
    return path


def _slot_rows(path: Path) -> np.ndarray:
    return np.load(path / "slot_rows.npy")


@pytest.mark.parametrize(
    "damage",
    [
        "row out of range",
        "row in two slots",
        "live row in no slot",
        "duplicate id",
        "next_id too small",
        "tail_rows past rows",
        "tail shorter than listed",
        "n disagrees",
    ],
)
def test_a_hostile_version_5_directory_is_refused(living, damage):
    m = manifest(living)
    ids = np.load(living / "ids.npy")
    if damage == "row out of range":
        rows = _slot_rows(living)
        rows[-1] = m["rows"] + 5
        _rewrite(living, "slot_rows.npy", rows)
    elif damage == "row in two slots":
        rows = _slot_rows(living)
        rows[1] = rows[0]
        _rewrite(living, "slot_rows.npy", rows)
    elif damage == "live row in no slot":  # the delta's first slot dropped, its row live
        offsets = np.load(living / "delta_offsets.npy")
        leaf = int(np.searchsorted(offsets, 0, side="right")) - 1
        offsets[leaf + 1 :] -= 1
        _rewrite(living, "delta_offsets.npy", offsets)
        _rewrite(living, "delta_rows.npy", np.load(living / "delta_rows.npy")[1:])
        for name in ("delta_codes.npy", "delta_factors.npy"):
            _rewrite(living, name, np.ascontiguousarray(np.load(living / name)[:, 1:]))
        _rewrite(living, "", delta_slots=m["delta_slots"] - 1)
    elif damage == "duplicate id":
        live = np.flatnonzero(ids >= 0)
        ids[live[1]] = ids[live[0]]
        _rewrite(living, "ids.npy", ids)
    elif damage == "next_id too small":
        _rewrite(living, "", next_id=int(ids.max()))
    elif damage == "tail_rows past rows":
        _rewrite(living, "", tail_rows=m["rows"] + 1)
    elif damage == "tail shorter than listed":
        (living / TAIL).chmod(0o644)
        os.truncate(living / TAIL, (living / TAIL).stat().st_size - 4)
    else:
        _rewrite(living, "", n=m["n"] - 1)
    with pytest.raises(vdb.InvalidIndexFileError, match=_WHY[damage]):
        vdb.ClusteredIndex.open(living, readonly=True).close()


_WHY = {
    "row out of range": "must lie in",
    "row in two slots": "in two slots",
    "live row in no slot": "in no slot",
    "duplicate id": "distinct",
    "next_id too small": "next_id",
    "tail_rows past rows": "tail_rows",
    "tail shorter than listed": "size is",
    "n disagrees": "must hold n=",
}
