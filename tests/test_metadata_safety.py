"""The metadata store against hostile files and bad input.

Hostile ``metadata.sqlite`` files (views, triggers, foreign schemas, WAL files, documents
too deep or not as ``save`` writes them) are built here with ``sqlite3`` directly, loaded
with ``MetadataStore.load`` and, installed in a saved index under a re-signed manifest,
opened with ``ClusteredIndex.open(verify=True)``. Loads that used to hang run in a child
process under a timeout. Then: metadata keys that are not strings, documents nested too
deep or too large, filters beyond SQLite's limits, and a disk that fills while the
metadata is written.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import vectordb as vdb
from vectordb.storage import filters
from vectordb.storage import metadata as md
from vectordb.storage.format import sign_manifest
from vectordb.storage.metadata import MetadataStore

SCHEMA = "CREATE TABLE meta (id INTEGER PRIMARY KEY, doc TEXT NOT NULL)"
RECURSIVE_VIEW = (
    "CREATE VIEW meta(id, doc) AS WITH RECURSIVE r(i) AS"
    " (SELECT 0 UNION ALL SELECT i + 1 FROM r) SELECT i, '{\"i\":' || i || '}' FROM r"
)  # documents that differ, so that SQLite cannot decide a WHERE on them once for all
N = 300
DIM = 8


# --------------------------------------------------------------------------- helpers


def write_db(path: Path, *statements: str, rows: list[tuple[Any, Any]] | None = None) -> Path:
    """An SQLite file (rollback journal) made of ``statements``, then ``rows`` into meta."""
    db = sqlite3.connect(path)
    try:
        for sql in statements:
            db.execute(sql)
        if rows:
            db.executemany("INSERT INTO meta (id, doc) VALUES (?, ?)", rows)
        db.commit()
    finally:
        db.close()
    return path


def ours(path: Path, rows: list[tuple[Any, Any]]) -> Path:
    return write_db(path, SCHEMA, rows=rows)


def load_fails(path: Path, *fragments: str, **kwargs: Any) -> str:
    with pytest.raises(vdb.InvalidIndexFileError) as info:
        MetadataStore.load(path, **kwargs)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def run_child(code: str, timeout: float = 30.0) -> str:
    """Run ``code`` in a fresh interpreter with at most 4 GiB of address space; its stdout.

    A hang shows as a failure after ``timeout`` seconds instead of a stuck suite."""
    prelude = "import resource\nresource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))\n"
    env = {**os.environ, "PYTHONPATH": str(Path(vdb.__file__).resolve().parents[1])}
    try:
        done = subprocess.run(
            [sys.executable, "-c", prelude + textwrap.dedent(code)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the child did not finish within {timeout} s (a hang)")
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def vectors(n: int = N, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


@pytest.fixture
def index() -> vdb.ClusteredIndex:
    docs = [{"i": i, "even": i % 2 == 0} for i in range(N)]
    return vdb.ClusteredIndex.build(vectors(), metadata=docs, max_leaf_size=64, seed=1)


@pytest.fixture
def saved(index: vdb.ClusteredIndex, tmp_path: Path) -> Path:
    path = tmp_path / "index"
    index.save(path)
    return path


def install_metadata(directory: Path, source: Path) -> None:
    """Replace ``metadata.sqlite`` by ``source``, with its size and CRC32 in a re-signed
    manifest: only the metadata checks themselves can object."""
    data = source.read_bytes()
    (directory / "metadata.sqlite").write_bytes(data)
    manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    manifest["files"]["metadata.sqlite"] = {"size": len(data), "crc32": zlib.crc32(data)}
    (directory / "manifest.json").write_bytes(sign_manifest(manifest))


def open_fails(directory: Path, *fragments: str) -> None:
    with pytest.raises(vdb.InvalidIndexFileError) as info:
        vdb.ClusteredIndex.open(directory, verify=True)
    message = str(info.value)
    assert "metadata.sqlite" in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def nested(levels: int) -> dict[str, Any]:
    """A document ``levels`` containers deep (the document itself is one)."""
    inner: Any = []
    for _ in range(levels - 2):
        inner = [inner]
    return {"a": inner}


# --------------------------------------------------------------------------- the schema


@pytest.mark.parametrize(
    "statements",
    [
        pytest.param(("CREATE TABLE meta (id, doc)",), id="no-primary-key"),
        pytest.param(
            (
                SCHEMA,
                "CREATE TRIGGER t AFTER INSERT ON meta BEGIN"
                " UPDATE meta SET doc = '{\"rewritten\":1}' WHERE id = new.id; END",
            ),
            id="trigger",
        ),
        pytest.param((SCHEMA, "CREATE INDEX by_doc ON meta(doc)"), id="extra-index"),
        pytest.param((SCHEMA, "CREATE TABLE other (x)"), id="extra-table"),
        pytest.param((f"{SCHEMA} WITHOUT ROWID",), id="without-rowid"),
        pytest.param(
            ("CREATE TABLE meta (id INTEGER PRIMARY KEY DESC, doc TEXT NOT NULL)",),
            id="not-a-rowid-alias",
        ),
        pytest.param(
            ("CREATE TABLE meta (id INTEGER PRIMARY KEY, doc TEXT NOT NULL, x AS (id + 1))",),
            id="generated-column",
        ),
        pytest.param(("CREATE TABLE meta (id INTEGER PRIMARY KEY, doc TEXT)",), id="nullable"),
        pytest.param(
            (
                "CREATE TABLE base (id INTEGER PRIMARY KEY, doc TEXT NOT NULL)",
                "CREATE VIEW meta AS SELECT id, doc FROM base",
            ),
            id="plain-view",
        ),
        pytest.param(
            ("CREATE TABLE docs (id INTEGER PRIMARY KEY, doc TEXT NOT NULL)",), id="wrong-name"
        ),
    ],
)
def test_only_our_exact_schema_loads(tmp_path, statements):
    path = write_db(tmp_path / "m.sqlite", *statements)
    load_fails(path, "not a vectordb metadata database", "schema")


def test_a_trigger_in_a_saved_index_is_refused(saved, tmp_path):
    source = write_db(
        tmp_path / "hostile.sqlite",
        SCHEMA,
        "CREATE TRIGGER t AFTER INSERT ON meta BEGIN"
        " UPDATE meta SET doc = '{\"rewritten\":1}' WHERE id = new.id; END",
    )
    install_metadata(saved, source)
    open_fails(saved, "schema")


def test_a_table_without_the_primary_key_in_a_saved_index_is_refused(saved, tmp_path):
    source = write_db(
        tmp_path / "hostile.sqlite", "CREATE TABLE meta (id, doc)", rows=[(0, '{"i":0}')]
    )
    install_metadata(saved, source)
    open_fails(saved, "schema")


def test_our_own_file_still_loads(saved):
    index = vdb.ClusteredIndex.open(saved, verify=True)
    assert index.get_metadata(3) == {"i": 3, "even": False}
    assert index.ids_matching({"even": True}).tolist() == list(range(0, N, 2))


def test_an_endless_view_is_refused_by_load_without_hanging(tmp_path):
    path = write_db(tmp_path / "m.sqlite", RECURSIVE_VIEW)
    out = run_child(
        f"""
        from pathlib import Path
        import vectordb as vdb
        from vectordb.storage.metadata import MetadataStore
        try:
            MetadataStore.load(Path({str(path)!r}))
        except vdb.InvalidIndexFileError as exc:
            print("refused:", exc)
        else:
            print("loaded")
        """
    )
    assert out.startswith("refused:") and "schema" in out and str(path) in out, out


def test_an_endless_view_in_a_saved_index_is_refused_without_hanging(saved, tmp_path):
    install_metadata(saved, write_db(tmp_path / "hostile.sqlite", RECURSIVE_VIEW))
    out = run_child(
        f"""
        import vectordb as vdb
        try:
            index = vdb.ClusteredIndex.open({str(saved)!r}, verify=True)
            print("opened", index.ids_matching({{"i": 1}}).shape)
        except vdb.InvalidIndexFileError as exc:
            print("refused:", exc)
        """
    )
    assert out.startswith("refused:") and "metadata.sqlite" in out, out


def test_every_query_runs_under_a_step_budget(tmp_path, monkeypatch):
    """The budget that stops a query SQLite would run forever (the schema check stops
    the known ways first): with it set to almost nothing, even our own file is refused."""
    path = ours(tmp_path / "m.sqlite", [(i, "{}") for i in range(5000)])
    MetadataStore.load(path)
    monkeypatch.setattr(md, "_STEPS_BASE", 0)
    monkeypatch.setattr(md, "_STEPS_PER_BYTE", 0)
    load_fails(path, "far more work than its size allows")


def test_the_step_budget_leaves_room_for_the_densest_real_file(tmp_path):
    """Empty documents give the most rows, and so SQLite steps, per byte of file."""
    path = ours(tmp_path / "m.sqlite", [(i, "{}") for i in range(100_000)])
    assert len(MetadataStore.load(path)) == 100_000


# --------------------------------------------------------------------------- the file itself


def wal_database(tmp_path: Path) -> Path:
    """A WAL-mode database whose main file says ``{"v":"checked"}`` and whose ``-wal``
    beside it says ``{"v":"override"}``, copied while the writer still held it open."""
    live = tmp_path / "live"
    live.mkdir()
    db = sqlite3.connect(live / "m.sqlite")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute(SCHEMA)
    db.execute("""INSERT INTO meta VALUES (0, '{"v":"checked"}')""")
    db.commit()
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.execute("""UPDATE meta SET doc = '{"v":"override"}' WHERE id = 0""")
    db.commit()
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(live / "m.sqlite", copy / "m.sqlite")
    shutil.copy(live / "m.sqlite-wal", copy / "m.sqlite-wal")
    db.close()
    return copy / "m.sqlite"


def test_a_wal_mode_file_is_refused_and_nothing_is_created_beside_it(tmp_path):
    path = wal_database(tmp_path)
    before = sorted(p.name for p in path.parent.iterdir())
    load_fails(path, "WAL")
    assert sorted(p.name for p in path.parent.iterdir()) == before  # no -shm


def test_a_wal_file_in_a_saved_index_is_refused(saved, tmp_path):
    path = wal_database(tmp_path)
    install_metadata(saved, path)
    shutil.copy(path.with_name("m.sqlite-wal"), saved / "metadata.sqlite-wal")
    open_fails(saved, "WAL")
    assert not (saved / "metadata.sqlite-shm").exists()


def test_loading_reads_no_journal_and_creates_no_file(tmp_path):
    store = MetadataStore()
    store.put(np.arange(3), MetadataStore.encode([{"v": i} for i in range(3)]))
    path = tmp_path / "m.sqlite"
    store.save(path)
    # Junk where SQLite would look for a hot journal or a WAL file: never read.
    (tmp_path / "m.sqlite-journal").write_bytes(os.urandom(4096))
    (tmp_path / "m.sqlite-wal").write_bytes(os.urandom(4096))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    loaded = MetadataStore.load(path)
    assert [loaded.get(i) for i in range(3)] == [{"v": 0}, {"v": 1}, {"v": 2}]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize(
    ("offset", "value", "fragment"),
    [(0, b"SQLite format 4\x00", "header"), (18, b"\x02\x02", "WAL"), (56, b"\0\0\0\2", "UTF-8")],
)
def test_a_foreign_header_is_refused(tmp_path, offset, value, fragment):
    path = ours(tmp_path / "m.sqlite", [(0, "{}")])
    data = bytearray(path.read_bytes())
    data[offset : offset + len(value)] = value
    path.write_bytes(bytes(data))
    load_fails(path, fragment)


def test_a_file_too_short_for_a_header_is_refused(tmp_path):
    path = tmp_path / "m.sqlite"
    path.write_bytes(b"")
    load_fails(path, "header")


def test_a_path_with_uri_characters_loads(tmp_path):
    directory = tmp_path / "a?b#c%20d"
    directory.mkdir()
    path = ours(directory / "m.sqlite", [(7, '{"x":1}')])
    assert MetadataStore.load(path).get(7) == {"x": 1}


# --------------------------------------------------------------------------- documents on disk


def deep_text(levels: int) -> str:
    return '{"a":' + "[" * (levels - 1) + "]" * (levels - 1) + "}"


def test_a_deeply_nested_document_on_disk_is_refused(tmp_path):
    # SQLite's JSON parser takes up to 2000 levels; Python's json.loads would raise
    # RecursionError on every read of this one.
    path = ours(tmp_path / "m.sqlite", [(0, "{}"), (1, deep_text(1500))])
    assert f"deeper than {md.MAX_DEPTH}" in load_fails(path, "id 1", "deeper than")


def test_a_deeply_nested_document_in_a_saved_index_is_refused(saved, tmp_path):
    install_metadata(saved, ours(tmp_path / "hostile.sqlite", [(2, deep_text(1500))]))
    open_fails(saved, "deeper than")


def test_nesting_on_disk_is_checked_exactly(tmp_path):
    ok = ours(tmp_path / "ok.sqlite", [(0, deep_text(md.MAX_DEPTH))])
    assert MetadataStore.load(ok).get(0) == json.loads(deep_text(md.MAX_DEPTH))
    load_fails(ours(tmp_path / "deep.sqlite", [(0, deep_text(md.MAX_DEPTH + 1))]), "deeper")
    # Brackets inside strings are text, not nesting.
    text = json.dumps({"a": "[{" * 200, "b": [["]]]"]]})
    assert MetadataStore.load(ours(tmp_path / "s.sqlite", [(0, text)])).get(0) == json.loads(text)


@pytest.mark.parametrize(
    "doc",
    [
        pytest.param("CAST(x'7b2261223a22ff227d' AS TEXT)", id="invalid-utf8"),
        pytest.param('\'{"a":"é"}\'', id="not-ascii"),
        pytest.param('\'{"a":"\x01"}\'', id="control-char"),
        pytest.param("x'7b7d'", id="blob"),
        pytest.param("'[1,2]'", id="not-an-object"),
        pytest.param("'{\"a\":'", id="not-json"),
    ],
)
def test_a_document_not_as_save_writes_it_is_refused(tmp_path, doc):
    path = write_db(tmp_path / "m.sqlite", SCHEMA, f"INSERT INTO meta VALUES (5, {doc})")
    load_fails(path, "id 5")


def test_an_oversized_document_on_disk_is_refused(tmp_path):
    big = json.dumps({"a": "x" * md.MAX_DOC_BYTES})
    load_fails(ours(tmp_path / "m.sqlite", [(0, big)]), "id 0")


def test_a_negative_id_on_disk_is_refused(tmp_path):
    load_fails(ours(tmp_path / "m.sqlite", [(-4, "{}")]), "id -4")


def test_metadata_of_ids_not_in_the_index_is_refused(tmp_path):
    path = ours(tmp_path / "m.sqlite", [(1, "{}"), (9, "{}")])
    assert len(MetadataStore.load(path, ids=np.array([1, 5, 9], np.int64))) == 2
    load_fails(path, "not in the index", "[9]", ids=np.array([1, 2, 3], np.int64))
    load_fails(path, "2 ids", ids=np.array([1], np.int64))


# --------------------------------------------------------------------------- documents written


@pytest.mark.parametrize(
    ("doc", "where"),
    [
        pytest.param({1: "a", "1": "b"}, "metadata:", id="collision"),
        pytest.param({None: 1}, "metadata:", id="none-key"),
        pytest.param({"a": [{"b": {2.5: 0}}]}, "metadata['a'][0]['b']", id="nested"),
        pytest.param({"a": ({(1, 2): 0},)}, "metadata['a'][0]", id="tuple-key"),
    ],
)
def test_metadata_keys_must_be_strings_at_every_level(index, doc, where):
    x = vectors(1, seed=9)
    for call in (
        lambda: index.add(x, metadata=[doc]),
        lambda: index.upsert(x, ids=[3], metadata=[doc]),
        lambda: vdb.ClusteredIndex.build(x, metadata=[doc]),
    ):
        with pytest.raises(vdb.InvalidParameterError, match="keys must be strings") as info:
            call()
        assert where in str(info.value)
    assert len(index) == N and index.get_metadata(3) == {"i": 3, "even": False}


def test_colliding_keys_never_reach_the_store(index):
    """``{1: "a", "1": "b"}`` used to be stored as ``{"1": "b"}`` while the filter on
    ``"1"`` matched ``"a"``; now the document is refused and a plain one works."""
    x = vectors(1, seed=9)
    with pytest.raises(vdb.InvalidParameterError):
        index.add(x, ids=[N], metadata=[{1: "a", "1": "b"}])
    index.add(x, ids=[N], metadata=[{"1": "b"}])
    assert index.get_metadata(N) == {"1": "b"}
    assert index.ids_matching({"1": "b"}).tolist() == [N]
    assert index.ids_matching({"1": "a"}).tolist() == []


def test_nesting_is_limited_on_write(index, tmp_path):
    x = vectors(1, seed=9)
    with pytest.raises(vdb.InvalidParameterError, match="levels"):  # was RecursionError
        index.add(x, metadata=[nested(5000)])
    index.add(x, ids=[N], metadata=[nested(md.MAX_DEPTH)])
    assert index.get_metadata(N) == nested(md.MAX_DEPTH)
    index.save(tmp_path / "again")
    assert vdb.ClusteredIndex.open(tmp_path / "again").get_metadata(N) == nested(md.MAX_DEPTH)
    for levels in (md.MAX_DEPTH + 1, 5000):
        with pytest.raises(vdb.InvalidParameterError, match=f"at most {md.MAX_DEPTH} levels"):
            index.add(x, metadata=[nested(levels)])
        with pytest.raises(vdb.InvalidParameterError, match=f"at most {md.MAX_DEPTH} levels"):
            index.upsert(x, ids=[N], metadata=[nested(levels)])
    assert len(index) == N + 1 and index.get_metadata(N) == nested(md.MAX_DEPTH)


def test_a_shared_list_nested_too_deep_is_refused(index):
    """The same list reached at two depths: measured once, checked at both."""
    shared = nested(md.MAX_DEPTH - 3)["a"]  # MAX_DEPTH - 4 levels
    ok: Any = {"low": shared, "high": [[[shared]]]}
    index.add(vectors(1, seed=9), ids=[N], metadata=[ok])
    with pytest.raises(vdb.InvalidParameterError, match="levels"):
        index.add(vectors(1, seed=8), metadata=[{"low": shared, "high": [[[[shared]]]]}])


def test_circular_and_exponential_documents_are_refused(index):
    loop: dict[str, Any] = {}
    loop["self"] = loop
    with pytest.raises(vdb.InvalidParameterError, match="circular"):
        index.add(vectors(1, seed=9), metadata=[loop])
    bomb: Any = [0]
    for _ in range(24):  # 2**24 zeros as JSON: over MAX_DOC_BYTES, refused unexpanded
        bomb = [bomb, bomb]
    with pytest.raises(vdb.InvalidParameterError, match="at most"):
        index.add(vectors(1, seed=9), metadata=[{"b": bomb}])
    assert len(index) == N


def test_document_size_is_limited_on_write(index):
    x = vectors(1, seed=9)
    with pytest.raises(vdb.InvalidParameterError, match=str(md.MAX_DOC_BYTES)):
        index.add(x, metadata=[{"a": "x" * md.MAX_DOC_BYTES}])
    with pytest.raises(vdb.InvalidParameterError, match=str(md.MAX_DOC_BYTES)):
        index.add(x, metadata=[{"a": "é" * (md.MAX_DOC_BYTES // 5)}])  # 6 bytes each as JSON
    index.add(x, ids=[N], metadata=[{"a": "x" * 1000}])
    assert len(index) == N + 1


# --------------------------------------------------------------------------- filters


def filter_calls(index: vdb.ClusteredIndex, filt: Any) -> list[Any]:
    q = vectors(1, seed=5)[0]
    return [
        lambda: index.search(q, 5, filter=filt),
        lambda: index.search_batch(q[None, :], 5, filter=filt),
        lambda: index.ids_matching(filt),
        lambda: filters.check_filter(filt),
    ]


@pytest.mark.parametrize(
    "filt",
    [
        {"i": 2**63},
        {"i": -(2**63) - 1},
        {"i": {"$gt": 2**64}},
        {"i": {"$in": [1, 2**63]}},
        {"i": {"$nin": [-(2**70)]}},
    ],
)
def test_filter_integers_beyond_int64_are_refused(index, filt):
    for call in filter_calls(index, filt):
        with pytest.raises(vdb.InvalidParameterError, match=r"2\*\*63"):
            call()


def test_filter_integers_at_the_int64_bounds_match(index):
    x = vectors(2, seed=9)
    index.add(x, ids=[N, N + 1], metadata=[{"i": 2**63 - 1}, {"i": -(2**63)}])
    assert index.ids_matching({"i": 2**63 - 1}).tolist() == [N]
    assert index.ids_matching({"i": {"$in": [-(2**63)]}}).tolist() == [N + 1]


def test_too_many_filter_fields_are_refused(index):
    filt = {f"f{i}": 1 for i in range(2500)}
    for call in filter_calls(index, filt):
        with pytest.raises(vdb.InvalidParameterError, match="fields") as info:
            call()
        assert f"at most {filters.MAX_FILTER_FIELDS} fields" in str(info.value)


def test_a_filter_at_the_limits_runs(index):
    """MAX_FILTER_FIELDS fields with every operator each: within SQLite's limits."""
    fields = {f"f{i}": 5 for i in range(filters.MAX_FILTER_FIELDS)}
    index.add(vectors(1, seed=9), ids=[N], metadata=[fields])
    cond = {"$gt": 0, "$gte": 5, "$lt": 9, "$lte": 5, "$ne": 4, "$in": [5], "$nin": [6]}
    filt = {name: dict(cond) for name in fields}
    # Each field's lists hold 2 values; f0's $in takes the rest of MAX_FILTER_VALUES.
    filt["f0"]["$in"] = [
        5,
        *range(100, 100 + filters.MAX_FILTER_VALUES - 2 * filters.MAX_FILTER_FIELDS),
    ]
    assert index.ids_matching(filt).tolist() == [N]
    ids, _ = index.search(vectors(1, seed=9)[0], 3, filter=filt)
    assert ids.tolist() == [N, -1, -1]


@pytest.mark.parametrize("size", [300_000, "limit + 1"])  # 300,000: beyond SQLite's own limit
def test_too_many_filter_values_are_refused(index, size):
    size = filters.MAX_FILTER_VALUES + 1 if size == "limit + 1" else size
    for filt in ({"i": {"$in": list(range(size))}}, {"a": {"$in": [1]}, "b": {"$nin": [0] * size}}):
        for call in filter_calls(index, filt):
            with pytest.raises(vdb.InvalidParameterError, match="values") as info:
                call()
            assert f"at most {filters.MAX_FILTER_VALUES} values" in str(info.value)


@pytest.mark.parametrize(
    "filt",
    [{"a\x00b": 1}, {"s": "x\x00y"}, {"s": {"$in": ["x", "x\x00y"]}}, {"s": {"$gt": "\x00"}}],
)
def test_a_nul_in_a_filter_is_refused(index, filt):
    """A NUL in a field name was a raw SQLite error; in a value it could never match
    (SQLite's JSON functions cut a stored string at its first NUL)."""
    for call in filter_calls(index, filt):
        with pytest.raises(vdb.InvalidParameterError, match="NUL"):
            call()


# --------------------------------------------------------------------------- disk full


@pytest.fixture
def full_disk(monkeypatch):
    """SQLite finds the disk full after 2 pages of any file it writes (a real SQLITE_FULL
    from SQLite itself, through ``PRAGMA max_page_count``)."""
    real = sqlite3.connect

    def connect(database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        db = real(database, *args, **kwargs)
        if str(database) != ":memory:":
            db.execute("PRAGMA max_page_count = 2")
        return db

    monkeypatch.setattr(sqlite3, "connect", connect)


def big_store() -> MetadataStore:
    store = MetadataStore()
    store.put(np.arange(2000), MetadataStore.encode([{"t": "x" * 200}] * 2000))
    return store


def test_disk_full_while_saving_metadata_is_a_storage_error(tmp_path, full_disk):
    path = tmp_path / "m.sqlite"
    with pytest.raises(vdb.StorageError) as info:
        big_store().save(path)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert list(tmp_path.iterdir()) == []


def test_disk_full_while_saving_an_index_keeps_the_old_one(index, saved, full_disk):
    index.add(vectors(2000, seed=3), metadata=[{"t": "x" * 200}] * 2000)
    with pytest.raises(vdb.StorageError) as info:
        index.save(saved)
    assert info.value.errno == errno.ENOSPC
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]  # no temporary left
    index.close()
    # The old checkpoint, and over it the adds, which returned: the log holds them.
    with vdb.ClusteredIndex.open(saved, verify=True) as reopened:
        assert len(reopened) == N + 2000 and reopened.get_metadata(1) == {"i": 1, "even": False}
        assert reopened.get_metadata(N + 5) == {"t": "x" * 200}


def test_other_sqlite_failures_while_saving_are_storage_errors(tmp_path, monkeypatch):
    def refuse(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        raise sqlite3.OperationalError("unable to open database file")

    store = MetadataStore()
    monkeypatch.setattr(sqlite3, "connect", refuse)
    with pytest.raises(vdb.StorageError) as info:
        store.save(tmp_path / "m.sqlite")
    assert info.value.errno == errno.EIO and "unable to open" in str(info.value)


def test_a_full_tmpfs_while_saving_metadata_is_enospc(tmp_path):
    """A real full file system, where this process may mount one (root on Linux)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    try:
        made = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("cannot run mount here")
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode(errors='replace')}")
    try:
        with pytest.raises(vdb.StorageError) as info:
            big_store().save(mount / "m.sqlite")
        assert info.value.errno == errno.ENOSPC
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True, timeout=30, check=False)
