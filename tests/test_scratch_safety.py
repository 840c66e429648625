"""Working files and saves onto an index's own directory: ``warm`` and ``drop_cache`` read
the file actually mapped, ``vectordb verify`` tells a live compacted vector file from a
dead one's, and the text stores recover from a crash between the two fallback renames."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from crashpoints import crash_between_renames

import vectordb as vdb
import vectordb.integrations._persist as store_persist
import vectordb.storage.vectors as storage_module
from vectordb.cli import cli

DIM = 24


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return vdb.make_clustered(1500, DIM, seed=9)


def build(x: np.ndarray) -> vdb.ClusteredIndex:
    return vdb.ClusteredIndex.build(x, metric="cosine", max_leaf_size=120)


def inode(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def fadvised(monkeypatch) -> list[tuple[int, int]]:
    """Record the file (device, inode) of every ``posix_fadvise`` call."""
    seen: list[tuple[int, int]] = []
    real = os.posix_fadvise

    def record(fd: int, *args: int) -> None:
        st = os.fstat(fd)
        seen.append((st.st_dev, st.st_ino))
        real(fd, *args)

    monkeypatch.setattr(os, "posix_fadvise", record)
    return seen


# --------------------------------------------------------------------------- item 1


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise")
@pytest.mark.parametrize("compact", [True, False])
def test_warm_and_drop_cache_after_a_save_onto_itself_read_the_mapped_file(
    data, tmp_path, monkeypatch, compact
):
    path = tmp_path / "idx"
    build(data[:1000]).save(path)
    with vdb.ClusteredIndex.open(path, mmap=True) as index:
        index.add(data[1000:1200], ids=np.arange(1000, 1200))
        if compact:
            index.compact()  # now maps .vectors.bin.compact-*, inside the directory
        rows = 1200 if compact else 1000
        mapped = index.mmap_path
        assert mapped is not None
        mapped_inode = inode(mapped)
        index.save(path)  # the old directory, and every name in it, goes
        if compact:
            assert not mapped.exists()
        else:  # a checkpoint links the unchanged file and puts the added rows in the tail
            assert inode(mapped) == mapped_inode and mapped.stat().st_size == 1000 * DIM * 4
            manifest = json.loads((path / "manifest.json").read_text())
            tail = (path / "vectors.tail.bin").stat().st_size
            # The 200 added rows, and the rows a leaf split moved (stored again).
            assert tail == manifest["tail_rows"] * DIM * 4 >= 200 * DIM * 4
            rows += manifest["tail_rows"]  # warmed too, after the file
        assert index.warm(progress=False) == rows * DIM * 4
        seen = fadvised(monkeypatch)
        index.drop_cache()
        assert seen == [mapped_inode]
        monkeypatch.undo()
        ids, _ = index.search_batch(data[[3, 1100]], 1, probes=64)
        assert ids[:, 0].tolist() == [3, 1100]
    assert not [p for p in os.listdir(path) if p.startswith(".")]


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise")
def test_in_ram_drop_cache_and_warm_touch_no_file(data, monkeypatch):
    index = build(data[:300])
    seen = fadvised(monkeypatch)
    index.drop_cache()
    assert seen == [] and index.warmer() is None and index.warm(progress=False) == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("compact", [True, False])
async def test_engine_warm_after_a_save_onto_itself_reads_the_mapped_file(data, tmp_path, compact):
    path = tmp_path / "idx"
    build(data[:1000]).save(path)
    async with await vdb.AsyncEngine.open(path, mmap=True) as engine:
        await engine.add(data[1000:1200], ids=np.arange(1000, 1200))
        if compact:
            await engine.compact()
        await engine.save(path)
        tail_rows = json.loads((path / "manifest.json").read_text()).get("tail_rows", 0)
        rows = 1200 if compact else 1000 + tail_rows  # the file, then the rows past it
        assert compact or tail_rows >= 200
        seen: list[tuple[int, int]] = []
        done = await asyncio.wait_for(engine.warm(lambda d, total: seen.append((d, total))), 30)
        assert done == rows * DIM * 4
        assert seen and seen[-1] == (done, done)
    assert vdb.ClusteredIndex.open(path).__len__() == 1200


def test_warm_after_close_raises_index_closed(data, tmp_path):
    path = tmp_path / "idx"
    build(data[:200]).save(path)
    index = vdb.ClusteredIndex.open(path, mmap=True)
    storage = index._state.storage
    index.close()
    assert isinstance(storage, storage_module.MmapStorage)
    with pytest.raises(vdb.IndexClosedError):
        storage.mapped_fd()
    with pytest.raises(vdb.IndexClosedError):
        storage.warm()


# --------------------------------------------------------------------------- item 2


def verify(path: Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["--no-progress", "verify", str(path)])
    return result.exit_code, result.stdout, result.stderr


def test_verify_reports_a_compaction_still_writing_as_in_use(data, tmp_path, monkeypatch):
    path = tmp_path / "idx"
    build(data[:1000]).save(path)
    entered, go = threading.Event(), threading.Event()
    real = storage_module.write_rows

    def held(take, order, dim, target, on_bytes=None):
        def hook(n: int) -> None:
            entered.set()
            go.wait(10)
            if on_bytes is not None:
                on_bytes(n)

        return real(take, order, dim, target, hook)

    monkeypatch.setattr(storage_module, "write_rows", held)
    with vdb.ClusteredIndex.open(path, mmap=True) as index:
        index.delete(np.arange(10))
        worker = threading.Thread(target=index.compact)
        worker.start()
        try:
            assert entered.wait(10)
            code, out, err = verify(path)
            assert out.startswith("OK:")
        finally:
            go.set()
            worker.join(30)
        assert not worker.is_alive()
        assert code == 0 and ".vectors.bin.compact-" in err
        assert "in use by a running process" in err and "died" not in err


# --------------------------------------------------------------------------- item 3


@pytest.fixture
def embedding():
    from langchain_core.embeddings import DeterministicFakeEmbedding

    return DeterministicFakeEmbedding(size=16)


def texts(lo: int, hi: int) -> tuple[list[str], list[str]]:
    return [f"passage {i} about topic {i % 5}" for i in range(lo, hi)], [
        f"id-{i}" for i in range(lo, hi)
    ]


@pytest.fixture
def crashed_store(embedding, tmp_path):
    """A LangChain store whose save crashed between the renames: (path, old ids, new ids)."""
    from vectordb.integrations.langchain import VectorDBStore

    path = tmp_path / "store"
    store = VectorDBStore(embedding, max_leaf_size=40)
    words, ids = texts(0, 60)
    store.add_texts(words, ids=ids)
    store.save(path)
    store.close()

    def save() -> None:
        # A store built anew replaces the saved one: the store's own directory swap (a
        # save onto the store it was loaded from is the index's checkpoint instead).
        again = VectorDBStore(embedding, max_leaf_size=40)
        words, ids = texts(0, 80)
        again.add_texts(words, ids=ids)
        again.save(path)

    crash_between_renames(path, save)
    return path, set(texts(0, 60)[1]), set(texts(0, 80)[1])


def stored_ids(path: Path, embedding) -> set[str]:
    from vectordb.integrations.langchain import VectorDBStore

    store = VectorDBStore.load(path, embedding)
    try:
        candidates = [f"id-{i}" for i in range(100)]
        return {doc.id for doc in store.get_by_ids(candidates) if doc.id is not None}
    finally:
        store.close()


def test_load_after_a_crash_between_the_renames_restores_the_new_store(crashed_store, embedding):
    from vectordb.integrations.langchain import VectorDBStore

    path, _, new = crashed_store
    assert stored_ids(path, embedding) == new
    store = VectorDBStore.load(path, embedding)
    store.save(path)  # the old copy stays beside it until the next save removes it
    store.close()
    assert os.listdir(path.parent) == ["store"]
    assert stored_ids(path, embedding) == new


def test_a_failing_save_after_a_crash_between_the_renames_keeps_the_new_store(
    crashed_store, embedding, monkeypatch
):
    from vectordb.integrations.langchain import VectorDBStore

    path, _, new = crashed_store

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_persist, "atomic_write", full)
    other = VectorDBStore(embedding, max_leaf_size=40)
    other.add_texts(["something else"], ids=["other"])
    with pytest.raises(vdb.StorageError):
        other.save(path)  # its cleanup rolls the crashed save forward first
    monkeypatch.undo()
    other.close()
    assert os.listdir(path.parent) == ["store"]
    assert stored_ids(path, embedding) == new


@pytest.mark.parametrize("damage", ["store.json", "index/ids.npy"])
def test_a_damaged_new_store_is_not_restored_the_old_one_is(crashed_store, embedding, damage):
    path, old, _ = crashed_store
    (tmp,) = [p for p in path.parent.iterdir() if ".tmp-" in p.name]
    target = tmp / damage
    os.chmod(target, 0o644)
    target.write_bytes(b"damaged")
    assert stored_ids(path, embedding) == old


def test_a_load_while_a_save_holds_the_lock_between_renames_says_try_again(
    crashed_store, embedding
):
    path, _, new = crashed_store
    holder = os.open(path.parent, os.O_RDONLY)  # as a save between its renames would
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        with pytest.raises(vdb.StorageError) as caught:
            stored_ids(path, embedding)
        assert caught.value.errno == errno.EAGAIN
    finally:
        os.close(holder)
    assert stored_ids(path, embedding) == new


def test_llamaindex_load_after_a_crash_between_the_renames_restores_the_new_store(tmp_path):
    from llama_index.core.schema import TextNode

    from vectordb.integrations.llamaindex import VectorDBVectorStore

    rng = np.random.default_rng(4)

    def nodes(lo: int, hi: int) -> list[TextNode]:
        return [
            TextNode(text=f"text {i}", id_=f"n{i}", embedding=rng.standard_normal(8).tolist())
            for i in range(lo, hi)
        ]

    path = tmp_path / "store.vectordb"
    store = VectorDBVectorStore(metric="ip")
    store.add(nodes(0, 30))  # (every below draws 40 more: its first 30 differ from these)
    store.persist(str(tmp_path / "store.json"))
    store.close()

    every = nodes(0, 40)

    def save() -> None:  # a store built anew replaces it: the store's own swap
        again = VectorDBVectorStore(metric="ip")
        again.add(every)
        again.persist(str(tmp_path / "store.json"))

    crash_between_renames(path, save)
    back = VectorDBVectorStore.from_persist_path(tmp_path / "store.json")
    try:
        assert len(back.client) == 40
    finally:
        back.close()
