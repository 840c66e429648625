"""Processes sharing one saved index: mapped pages are shared, and a reader keeps the
version it opened while another process saves a new one (it sees it when it reopens)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import vectordb as vdb

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/<pid>/smaps"
)

READER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import vectordb as vdb

    path = sys.argv[1]
    queries = np.load(sys.argv[2])

    def answer(index):
        ids, dists = index.search_batch(queries, 5, probes=64, rerank_factor=20)
        return {"ids": ids.tolist(), "n": len(index)}

    def shared_kb(name):
        total, inside = 0, False
        for line in open("/proc/self/smaps"):
            if "-" in line.split(" ")[0] and len(line.split()) >= 5:
                inside = line.rstrip().endswith(name)
            elif inside and line.startswith("Shared_Clean:"):
                total += int(line.split()[1])
        return total

    index = vdb.ClusteredIndex.open(path, mmap=True)
    float(np.asarray(index._state.storage.vectors).sum())  # map every page of vectors.bin
    print(json.dumps({"before": answer(index)}), flush=True)
    for command in sys.stdin:
        command = command.strip()
        if command == "shared":
            print(json.dumps({"shared_kb": shared_kb("vectors.bin")}), flush=True)
        elif command == "search":
            print(json.dumps({"again": answer(index)}), flush=True)
        elif command == "reopen":
            index.close()
            index = vdb.ClusteredIndex.open(path, mmap=True)
            print(json.dumps({"reopened": answer(index)}), flush=True)
        elif command == "quit":
            break
    """
)


class Reader:
    def __init__(self, path: Path, queries: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", READER, str(path), str(queries)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.first = self.read()["before"]

    def read(self) -> dict:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        assert line, "the reader process died"
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return self.read()

    def ask_quit(self) -> None:
        if self.proc.poll() is None:
            self.proc.communicate("quit\n", timeout=30)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def saved(tmp_path):
    x = vdb.make_clustered(20_000, 64, seed=4)
    path = tmp_path / "index"
    vdb.ClusteredIndex.build(x[:19_000], metric="cosine").save(path)
    queries = tmp_path / "queries.npy"
    np.save(queries, x[19_000:19_020])
    return path, queries, x


def test_two_readers_share_the_pages_of_the_vector_file(saved):
    path, queries, _ = saved
    size_kb = (path / "vectors.bin").stat().st_size // 1024
    a, b = Reader(path, queries), Reader(path, queries)
    try:
        assert a.first == b.first
        for reader in (a, b):
            # Shared_Clean counts mapped file pages that another process maps too.
            assert reader.ask("shared")["shared_kb"] >= 0.9 * size_kb
    finally:
        a.ask_quit()
        b.ask_quit()


def test_a_reader_keeps_its_version_while_another_process_saves_a_new_one(saved):
    path, queries, x = saved
    reader = Reader(path, queries)
    try:
        with vdb.ClusteredIndex.open(path, mmap=True) as writer:
            writer.add(x[19_000:], ids=np.arange(50_000, 51_000))  # the queries themselves
            writer.delete(np.arange(0, 19_000, 3))
            writer.save(path)
            new = writer.search_batch(np.load(queries), 5, probes=64, rerank_factor=20)[0]
        again = reader.ask("search")["again"]
        assert again == reader.first, "a reader sees the version it opened"
        reopened = reader.ask("reopen")["reopened"]
        assert reopened["ids"] == new.tolist() and reopened["n"] == 19_000 - 6334 + 1000
        assert reopened != reader.first
    finally:
        reader.ask_quit()
