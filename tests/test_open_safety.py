"""Opening an index safely: hostile sizes, files replaced under a mapping, and saves by
another process while the directory is being opened.

- A manifest and ``.npy`` headers that declare huge counts (re-signed, with sparse files
  that cost nothing on disk) are refused before anything is allocated: checked in a
  child process whose address space is capped, so that an allocation would fail.
- A file replaced under a reader (``cp -f``, ``mv``) leaves its mapping intact; a file
  truncated in place kills a reader that touches the lost pages (SIGBUS): documented
  here, which is why a restore must swap whole directories.
- Every open, while another process saves new versions in a loop, sees exactly one
  version: ``n``, ids, vectors and metadata agree, and ``verify=True`` passes.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import vectordb as vdb
from vectordb.backends import resolve_backend
from vectordb.storage import load as reader
from vectordb.storage.format import sign_manifest
from vectordb.storage.load import load_index
from vectordb.storage.metadata import MetadataStore
from vectordb.storage.vectors import MmapStorage

LINUX = sys.platform.startswith("linux")
#: Keep children's thread pools (and their address space) small.
CHILD_ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def read_manifest(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "manifest.json").read_text(encoding="utf-8"))


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    (directory / "manifest.json").write_bytes(sign_manifest(manifest))


def record(manifest: dict[str, Any], directory: Path, name: str, *, crc: bool = True) -> None:
    """Put ``name``'s size (and CRC32 unless ``crc`` is false: huge sparse files) in the
    manifest, so that only deeper checks can object."""
    path = directory / name
    crc32 = zlib.crc32(path.read_bytes()) if crc else 0
    manifest["files"][name] = {"size": path.stat().st_size, "crc32": crc32}


def writable(path: Path) -> None:
    """Give the owner write permission (saves may write read-only files)."""
    path.chmod(path.stat().st_mode | stat.S_IWUSR)


def sparse_npy(path: Path, dtype: Any, shape: tuple[int, ...]) -> None:
    """An ``.npy`` whose header declares ``shape`` and whose data is one hole: the file
    is as long as the header says and occupies a few kilobytes."""
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
        "fortran_order": False,
        "shape": shape,
    }
    if path.exists():
        writable(path)
        path.unlink()
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        fh.truncate(fh.tell() + int(np.prod(shape)) * np.dtype(dtype).itemsize)


def sparse_file(path: Path, size: int) -> None:
    if path.exists():
        writable(path)
        path.unlink()
    with open(path, "wb") as fh:
        fh.truncate(size)


def file_system_reports_holes(directory: Path) -> bool:
    probe = directory / "probe"
    sparse_file(probe, 16 << 20)
    try:
        fd = os.open(probe, os.O_RDONLY)
        try:
            return os.lseek(fd, 0, os.SEEK_HOLE) == 0
        finally:
            os.close(fd)
    except (AttributeError, OSError):
        return False
    finally:
        probe.unlink()


# --------------------------------------------------------------------------- item 8: sizes

HUGE_N = 1 << 27  # 1 GiB of int64 ids, 4 GiB of float32 vectors at dim 8
HUGE_NODES = 1 << 23  # 640 MiB of children at branching 10

SIZE_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    import vectordb as vdb

    good, *cases = sys.argv[1:]
    vdb.ClusteredIndex.open(good, verify=True, mmap=False).close()  # every lazy import
    with open("/proc/self/status") as fh:
        vm_kb = next(int(line.split()[1]) for line in fh if line.startswith("VmSize:"))
    limit = vm_kb * 1024 + (384 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    try:
        np.empty(1 << 30, np.uint8)
        guard = False
    except MemoryError:
        guard = True
    vdb.ClusteredIndex.open(good, verify=True, mmap=False).close()  # room for a real open
    results = {}
    for case in cases:
        for verify in (False, True):
            for mmap in (False, True):
                key = f"{case} verify={verify} mmap={mmap}"
                try:
                    vdb.ClusteredIndex.open(case, verify=verify, mmap=mmap).close()
                    results[key] = "opened"
                except vdb.InvalidIndexFileError as exc:
                    results[key] = "rejected: " + str(exc)
                except BaseException as exc:
                    results[key] = f"{type(exc).__name__}: {exc}"
    print(json.dumps({"guard": guard, "results": results}))
    """
)


@pytest.fixture
def plain(tmp_path):
    """A small saved index with few files tied to ``n`` (no codes, no rotation)."""
    x = vdb.make_clustered(300, 8, seed=3)
    path = tmp_path / "plain"
    vdb.ClusteredIndex.build(x, leaf_scan="vectors", rotate=False, max_leaf_size=40).save(path)
    return path


def hostile(plain: Path, tmp_path: Path, case: str) -> Path:
    """A copy of ``plain`` whose re-signed manifest declares huge counts, backed by sparse
    files that agree with it (all of them where ``case`` says "consistent")."""
    path = tmp_path / case
    shutil.copytree(plain, path)
    for child in path.iterdir():
        writable(child)
    manifest = read_manifest(path)
    dim, bf = manifest["dim"], manifest["params"]["branching_factor"]
    if case in ("n-raised", "n-consistent"):
        manifest["n"] = HUGE_N
        sparse_npy(path / "ids.npy", np.int64, (HUGE_N,))
        record(manifest, path, "ids.npy", crc=False)
    if case == "n-consistent":
        sparse_file(path / "vectors.bin", HUGE_N * dim * 4)
        record(manifest, path, "vectors.bin", crc=False)
        offsets = np.load(path / "leaf_offsets.npy")
        offsets[-1] = HUGE_N
        np.save(path / "leaf_offsets.npy", offsets)
        record(manifest, path, "leaf_offsets.npy")
    if case == "nodes-consistent":
        manifest["n_nodes"] = HUGE_NODES
        sparse_npy(path / "children.npy", np.int64, (HUGE_NODES, bf))
        sparse_npy(path / "leaf_of_node.npy", np.int64, (HUGE_NODES,))
        sparse_npy(path / "centroids.npy", np.float32, (HUGE_NODES, dim))
        for name in ("children.npy", "leaf_of_node.npy", "centroids.npy"):
            record(manifest, path, name, crc=False)
    write_manifest(path, manifest)
    return path


@pytest.mark.skipif(not LINUX, reason="caps the address space of a Linux child process")
def test_huge_declared_counts_are_refused_before_any_allocation(plain, tmp_path):
    """Each case once made open allocate what the headers declare (1 GiB and more, or a
    MemoryError) before a cross-check refused it; now the checks come first, and a
    sparse file cannot stand in for arrays that never hold runs of zeros."""
    cases = ["n-raised"]
    if file_system_reports_holes(tmp_path):
        cases += ["n-consistent", "nodes-consistent"]
    dirs = [hostile(plain, tmp_path, case) for case in cases]
    for path in dirs:
        # Sparse: the directory holds far less than its files' sizes add up to.
        du = sum(p.stat().st_blocks * 512 for p in path.iterdir())
        assert du < 64 << 20 < sum(p.stat().st_size for p in path.iterdir())
    proc = subprocess.run(
        [sys.executable, "-c", SIZE_CHILD, str(plain), *map(str, dirs)],
        capture_output=True,
        text=True,
        timeout=300,
        env=CHILD_ENV,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["guard"], "the address-space cap did not stop a 1 GiB allocation"
    for key, result in out["results"].items():
        assert result.startswith("rejected: "), f"{key}: {result}"
        if "consistent" in key:
            assert "sparse" in result, f"{key}: {result}"


def test_a_sparse_ids_file_is_named(plain, tmp_path):
    """Small and in process: a hole in ids.npy (zeros never written) is refused by name,
    even when every size, header and checksum agrees with the re-signed manifest."""
    if not file_system_reports_holes(tmp_path):
        pytest.skip("this file system does not report holes")
    path = tmp_path / "holey"
    shutil.copytree(plain, path)
    for child in path.iterdir():
        writable(child)
    manifest = read_manifest(path)
    ids = np.load(path / "ids.npy")
    n = ids.shape[0] + 100_000
    manifest["n"] = n
    sparse_npy(path / "ids.npy", np.int64, (n,))
    with open(path / "ids.npy", "r+b") as fh:  # the real ids first, then a hole
        np.lib.format.read_magic(fh)
        np.lib.format.read_array_header_1_0(fh)
        fh.write(ids.tobytes())
    sparse_file(path / "vectors.bin", n * manifest["dim"] * 4)
    offsets = np.load(path / "leaf_offsets.npy")
    offsets[-1] = n
    np.save(path / "leaf_offsets.npy", offsets)
    for name in ("ids.npy", "vectors.bin", "leaf_offsets.npy"):
        record(manifest, path, name)
    write_manifest(path, manifest)
    for verify in (False, True):
        with pytest.raises(vdb.InvalidIndexFileError, match=r"ids\.npy: sparse"):
            vdb.ClusteredIndex.open(path, verify=verify)


# --------------------------------------------------------------------------- item 9: SIGBUS

MAPPED_READER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import vectordb as vdb

    index = vdb.ClusteredIndex.open(sys.argv[1], mmap=True)
    vectors = index._state.storage.vectors
    print(float(vectors.astype(np.float64).sum()), flush=True)  # touches every page
    for line in sys.stdin:
        print(float(vectors.astype(np.float64).sum()), flush=True)
    """
)


@pytest.mark.skipif(not LINUX, reason="the signal is Linux's (and POSIX's) behaviour")
def test_a_mapped_reader_survives_files_replaced_and_dies_when_truncated_in_place(tmp_path):
    """What happens to a process that maps ``vectors.bin`` when the file changes:

    - replaced by a new file (``cp -f``, ``mv``, a save's directory swap): the reader
      keeps the old file's pages and reads the same values;
    - truncated in place (``cp`` onto the file, ``truncate``): the OS kills the reader
      with SIGBUS at its next touch of a lost page. No library can turn that signal into
      an exception; hence read-only saved files and whole-directory restores.
    """
    x = vdb.make_clustered(4_000, 32, seed=5)
    path = tmp_path / "index"
    vdb.ClusteredIndex.build(x, max_leaf_size=200).save(path)
    backup = tmp_path / "backup"
    shutil.copytree(path, backup)
    proc = subprocess.Popen(
        [sys.executable, "-c", MAPPED_READER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=CHILD_ENV,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        first = proc.stdout.readline()
        assert first, "the reader died before mapping"

        def ask() -> str:
            proc.stdin.write("again\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
            return proc.stdout.readline()  # type: ignore[union-attr]

        vec = path / "vectors.bin"
        mapped = tmp_path / "mapped.bin"
        os.link(vec, mapped)  # a name for the file the reader maps, to truncate it later
        size = vec.stat().st_size
        vec.unlink()  # cp -f: unlink, then a new file (inode) of other content
        vec.write_bytes(bytes(size))
        assert ask() == first
        shutil.copy(backup / "vectors.bin", tmp_path / "new.bin")
        os.replace(tmp_path / "new.bin", vec)  # mv over it
        assert ask() == first

        writable(mapped)
        os.truncate(mapped, 0)  # what `cp backup/vectors.bin index/` does to the file
        assert ask() == "", "the reader read pages of a file truncated under it"
        assert proc.wait(timeout=30) == -signal.SIGBUS
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def test_mmap_storage_maps_the_descriptor_it_checked(tmp_path):
    """Given a descriptor, the store checks and maps that file, not what the path names
    by now."""
    path = tmp_path / "v.f32"
    ours = np.arange(24, dtype=np.float32).reshape(6, 4)
    path.write_bytes(ours.tobytes())
    fd = os.open(path, os.O_RDONLY)
    try:
        path.unlink()
        path.write_bytes(np.ones((9, 4), np.float32).tobytes())  # another size and content
        store = MmapStorage(path, 6, 4, fd=fd)
    finally:
        os.close(fd)
    np.testing.assert_array_equal(store.vectors, ours)  # the mapping outlives the fd
    store.close()
    with pytest.raises(vdb.InvalidIndexFileError, match="size is 144 bytes, expected 96"):
        MmapStorage(path, 6, 4)


@pytest.mark.parametrize("mmap", [True, False])
def test_open_reads_the_vector_file_it_checked(tmp_path, monkeypatch, mmap):
    """A vector file replaced between the checks and the mapping (here: while the
    metadata loads) does not reach the index: it reads the file it checked."""
    x = vdb.make_clustered(500, 8, seed=6)
    path = tmp_path / "index"
    vdb.ClusteredIndex.build(x, max_leaf_size=50).save(path)
    with vdb.ClusteredIndex.open(path) as index:
        expected = index.get_vectors(index.ids)
    load = MetadataStore.load

    def load_and_swap(p: Path, **kw: Any) -> Any:
        vec = path / "vectors.bin"
        other = tmp_path / "other.bin"
        other.write_bytes(bytes(vec.stat().st_size))  # same size, all zeros
        os.replace(other, vec)
        return load(p, **kw)

    monkeypatch.setattr(MetadataStore, "load", staticmethod(load_and_swap))
    with vdb.ClusteredIndex.open(path, mmap=mmap) as index:
        np.testing.assert_array_equal(index.get_vectors(index.ids), expected)


def test_saved_files_are_read_only(tmp_path):
    """``cp backup/vectors.bin index/`` truncates the file in place (SIGBUS for its
    readers): saved files carry no write permission, so that it fails for ordinary
    users; replacing them (``cp -f``, ``mv``, a save) still works."""
    x = vdb.make_clustered(300, 8, seed=7)
    path = tmp_path / "index"
    index = vdb.ClusteredIndex.build(x, metadata=[{"i": i} for i in range(300)])
    index.save(path)
    for child in path.iterdir():
        if child.name in ("wal.log", "writer.lock"):  # appended to and locked, never mapped
            continue
        assert child.stat().st_mode & 0o222 == 0, f"{child.name} is writable"
    if os.name == "posix" and os.geteuid() != 0:
        with pytest.raises(PermissionError), open(path / "vectors.bin", "r+b"):
            pass
    index.save(path)  # a save replaces the directory regardless
    with vdb.ClusteredIndex.open(path, verify=True) as again:
        assert again.get_metadata(5) == {"i": 5}


# --------------------------------------------------------------------------- item 10: versions

VERSIONS = 3


def version_data(v: int) -> tuple[np.ndarray, np.ndarray]:
    """Version ``v``'s vectors ``(200 + 50 v, 8)`` float32 and ids ``1000 v + i``."""
    n = 200 + 50 * v
    x = np.random.default_rng(v).standard_normal((n, 8)).astype(np.float32)
    x[:, 0] = v
    return x, 1000 * v + np.arange(n, dtype=np.int64)


SAVER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import vectordb as vdb

    def version_data(v):
        n = 200 + 50 * v
        x = np.random.default_rng(v).standard_normal((n, 8)).astype(np.float32)
        x[:, 0] = v
        return x, 1000 * v + np.arange(n, dtype=np.int64)

    if sys.argv[3] == "renames":  # as where the OS cannot exchange two directories
        import vectordb.storage.dirswap
        vectordb.storage.dirswap._renameat2_exchange = lambda: None

    indexes = []
    for v in range(int(sys.argv[2])):
        x, ids = version_data(v)
        meta = [{"v": v}] * len(ids)
        indexes.append(vdb.ClusteredIndex.build(x, ids=ids, metadata=meta, max_leaf_size=40))
    from pathlib import Path
    from vectordb.storage.save import SaveJob

    def save(index):  # a full save of each version in turn (index.save would bind the
        # first index to the directory, and its next save, a checkpoint, would make it
        # the directory's one writer: the next version's save is then refused)
        SaveJob(index.snapshot, Path(sys.argv[1]), stoppable=False, log_seq=0).run()

    save(indexes[0])
    print("ready", flush=True)
    i = 0
    while True:  # until killed
        i += 1
        save(indexes[i % len(indexes)])
    """
)


def check_one_version(index: vdb.ClusteredIndex) -> int:
    """Assert ``index`` is exactly one saved version; return which."""
    ids = index.ids
    v = int(ids[0]) // 1000
    x, expected_ids = version_data(v)
    assert len(index) == len(expected_ids)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(index.get_vectors(ids), x)
    assert index.get_metadata(int(ids[-1])) == {"v": v}
    found, _ = index.search(x[7], 1, probes=1000, rerank_factor=100)
    assert int(found[0]) == int(ids[7])
    return v


async def engine_version(path: Path, mmap: bool) -> int:
    engine = await vdb.AsyncEngine.open(path, mmap=mmap, verify=True)
    try:
        return check_one_version(engine.index)
    finally:
        await engine.aclose()


def open_direct(path: Path, mmap: bool, verify: bool) -> vdb.ClusteredIndex:
    """``vectordb.storage.load.load_index`` without the recovery ``ClusteredIndex.open`` runs
    first."""
    data = load_index(path, mmap=mmap, verify=verify, recover=False)
    return vdb.ClusteredIndex(data, resolve_backend("numpy"))


@pytest.mark.parametrize("swap", ["exchange", "renames"])
def test_every_open_sees_one_version_while_another_process_saves(tmp_path, swap):
    """Once 29% of opens during saves mixed two versions' files (or failed on a file the
    saver had just removed). Now each open, sync or async, sees one whole version.

    "renames": a save that swaps directories with two renames, as where the OS cannot
    exchange them, leaves the path missing for a moment; the reader's own open waits that
    out (``ClusteredIndex.open`` and the engine add checks of their own around it, which
    are not this test's).
    """
    path = tmp_path / "index"
    saver = subprocess.Popen(
        [sys.executable, "-c", SAVER, str(path), str(VERSIONS), swap],
        stdout=subprocess.PIPE,
        text=True,
        env=CHILD_ENV,
    )
    assert saver.stdout is not None
    seen: set[int] = set()
    opens = retryable = 0
    try:
        assert saver.stdout.readline() == "ready\n"
        while opens < 600 and (opens < 120 or len(seen) < VERSIONS):
            opens += 1
            mmap, verify = opens % 2 == 0, opens % 3 != 0
            try:
                if swap == "renames":
                    with open_direct(path, mmap, verify) as index:
                        seen.add(check_one_version(index))
                elif opens % 7 == 0:
                    seen.add(asyncio.run(engine_version(path, mmap)))
                else:
                    with vdb.ClusteredIndex.open(path, mmap=mmap, verify=verify) as index:
                        seen.add(check_one_version(index))
            except vdb.StorageError as exc:  # the documented "replaced too often: retry"
                assert exc.errno == errno.EAGAIN, exc
                retryable += 1
        assert saver.poll() is None, "the saver died"
    finally:
        saver.kill()
        saver.communicate(timeout=30)
    assert seen == set(range(VERSIONS)), "the saver's versions did not all show up"
    assert retryable <= opens // 10


def test_an_open_gives_up_with_a_retryable_error_when_every_attempt_is_raced(tmp_path, monkeypatch):
    """Should every attempt find its directory replaced, the open stops after
    ``OPEN_ATTEMPTS`` with ``StorageError(EAGAIN)``, not a damaged-file error."""
    x = vdb.make_clustered(200, 8, seed=8)
    path = tmp_path / "index"
    other = tmp_path / "other"
    vdb.ClusteredIndex.build(x, max_leaf_size=50).save(path)
    vdb.ClusteredIndex.build(x[:150], max_leaf_size=50).save(other)
    attempts = 0
    load = MetadataStore.load

    def load_and_replace(p: Path, **kw: Any) -> Any:
        nonlocal attempts
        attempts += 1
        os.rename(path, tmp_path / f"gone-{attempts}")  # swap a new version in
        shutil.copytree(other, path)
        return load(p, **kw)

    monkeypatch.setattr(MetadataStore, "load", staticmethod(load_and_replace))
    with pytest.raises(vdb.StorageError, match="try again") as info:
        vdb.ClusteredIndex.open(path)
    assert info.value.errno == errno.EAGAIN
    assert attempts == reader.OPEN_ATTEMPTS
    monkeypatch.undo()
    with vdb.ClusteredIndex.open(path, verify=True) as index:  # a calm directory opens
        assert len(index) == 150


def test_a_manifest_rewritten_during_the_open_is_the_one_used(tmp_path, monkeypatch):
    """The manifest is read again at the end of an open; a change (here: rewritten in
    place while the metadata loads) starts the open again, with the new one."""
    x = vdb.make_clustered(200, 8, seed=9)
    path = tmp_path / "index"
    vdb.ClusteredIndex.build(x, max_leaf_size=50, seed=1).save(path)
    manifest = read_manifest(path)
    manifest["params"]["seed"] = 2
    load = MetadataStore.load
    calls = 0

    def load_and_rewrite(p: Path, **kw: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            writable(path / "manifest.json")
            write_manifest(path, manifest)
        return load(p, **kw)

    monkeypatch.setattr(MetadataStore, "load", staticmethod(load_and_rewrite))
    with vdb.ClusteredIndex.open(path, verify=True) as index:
        assert index.params["seed"] == 2
    # The load's own look again at the manifest, then the log's check that the checkpoint
    # it belongs to is the one loaded (the manifest changed since the open began).
    assert calls == 3


def test_an_open_waits_out_a_save_between_its_two_renames(tmp_path, monkeypatch):
    """Where a save needs two renames the path is missing for a moment, the old version
    beside it as ``.NAME.old-*``: the reader tries again instead of calling the index
    missing (its pause between tries is where the save's second rename lands here)."""
    x = vdb.make_clustered(200, 8, seed=10)
    path = tmp_path / "index"
    vdb.ClusteredIndex.build(x, max_leaf_size=50).save(path)
    old = tmp_path / ".index.old-0123456789ab"
    os.rename(path, old)
    pauses: list[float] = []

    def second_rename(seconds: float) -> None:
        pauses.append(seconds)
        os.rename(old, path)

    monkeypatch.setattr(reader.time, "sleep", second_rename)
    with open_direct(path, mmap=True, verify=True) as index:
        assert len(index) == 200
    assert len(pauses) == 1
    os.rename(path, tmp_path / "elsewhere")  # missing, and no save under way: at once
    with pytest.raises(vdb.InvalidIndexFileError, match="not a directory"):
        open_direct(path, mmap=True, verify=False)
    assert len(pauses) == 1
