"""What a checkpoint writes: bytes and seconds after each 1% of new vectors.

    python bench/checkpoint_bench.py --index DIR [--share 0.01] [--rounds 3] [--deletes 0.001]
    python bench/checkpoint_bench.py --n 1000000 --dim 384

A copy of the saved index ``DIR`` (or one built on disk from ``make_clustered`` data) is
opened with mmap; each round adds ``share`` of its size in new vectors (each near a vector
drawn from the index, so spread like its data; batches of 1,000, durability "fsync"),
deletes ``deletes`` of it, and checkpoints. A round whose adds fold the delta into the
main layout or split a leaf (``codes.npy`` among the new files) writes the codes again.
Reported per round: the bytes the checkpoint process handed to write calls
(``/proc/self/io`` ``wchar``: every write, pwrite and SQLite page, whether or not it
reached the disk yet), the same as a share of the directory's bytes, the files written
anew (a new inode) against those linked from the version before, and the seconds. Then
``save()`` to another directory (a full, compact copy: what every checkpoint wrote before
version 5) for comparison, and a reopen whose answers must equal the live index's.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from procio import wchar

import vectordb as vdb


def _files(path: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_size) for p in path.iterdir() if p.is_file()}


def _measure(index: vdb.ClusteredIndex, path: Path) -> tuple[int, float, list[str]]:
    before = _files(path)
    written = wchar()
    t = time.perf_counter()
    index.checkpoint()
    seconds = time.perf_counter() - t
    written = wchar() - written
    after = _files(path)
    new = sorted(n for n in after if before.get(n, (0, 0))[0] != after[n][0])
    return written, seconds, new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, help="a saved index to copy (else one is built)")
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--share", type=float, default=0.01)
    parser.add_argument("--deletes", type=float, default=0.001)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(dir=args.index.parent if args.index else None))
    try:
        path = root / "idx"
        if args.index is not None:
            shutil.copytree(args.index, path)
            for left in ("wal.log", "writer.lock"):
                (path / left).unlink(missing_ok=True)
        else:
            x = vdb.make_clustered(args.n, args.dim, seed=0)
            vdb.ClusteredIndex.build(x, metric="cosine", path=path, progress=False).close()
        with vdb.ClusteredIndex.open(path, mmap=True) as index:
            n, dim = len(index), index.dim
            print(f"{n:,} x {dim}, {index.metric}; each round: +{args.share:.1%} vectors, ")
            print(f"-{args.deletes:.1%} deleted, then checkpoint()\n")
            print("| round | bytes written | share of the index | new files | seconds |")
            print("|---|---|---|---|---|")
            rng = np.random.default_rng(7)
            next_id = int(index.ids.max()) + 1
            for r in range(1, args.rounds + 1):
                m = int(n * args.share)
                for start in range(0, m, 1000):
                    rows = min(1000, m - start)
                    # Near vectors drawn from the index: new data spread like the old.
                    like = index.get_vectors(rng.choice(index.ids, rows, replace=False))
                    x = like + rng.standard_normal((rows, dim)).astype(np.float32) * 0.01
                    index.add(x, ids=np.arange(next_id, next_id + rows))
                    next_id += rows
                gone = rng.choice(index.ids, int(n * args.deletes), replace=False)
                index.delete(gone)
                written, seconds, new = _measure(index, path)
                total = sum(size for _, size in _files(path).values())
                print(
                    f"| {r} | {written / 1e6:,.1f} MB | {written / total:.2%} of "
                    f"{total / 1e6:,.0f} MB | {', '.join(new)} | {seconds:.2f} |"
                )
            q = rng.standard_normal((200, dim)).astype(np.float32)
            live = index.search_batch(q, 10)
            written = wchar()
            t = time.perf_counter()
            index.save(root / "copy")
            took = time.perf_counter() - t
            print(
                f"\nsave() to another directory (full, compact): "
                f"{(wchar() - written) / 1e6:,.1f} MB in {took:.2f} s"
            )
        t = time.perf_counter()
        with vdb.ClusteredIndex.open(path, mmap=True) as again:
            opened = time.perf_counter() - t
            got = again.search_batch(q, 10)
            same = bool(np.array_equal(got[0], live[0]))
        print(f"reopen: {opened:.2f} s, answers equal to the live index's: {same}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
