"""Bit-flip sweep of a saved index: every flipped bit must open and search, or be refused.

    python bench/bitflip_sweep.py [--seed 0] [--sample 3000]

Saves a small index (600 x 64, cosine, codes, metadata), then for each of its array files
flips bits one case at a time: every bit of every byte of files up to 4 KiB (the tree, ids,
offsets, permutation, norms), and bits 0, 3 and 7 at ``--sample`` random positions of the
larger ones (centroids, codes, rotation blocks, vectors). Each case is opened without
``verify`` and searched (a batch, a filtered query, a wide beam) under a 5 s alarm.

A case passes when it opens and searches, or raises ``InvalidIndexFileError``. A hang
(the alarm fired) or any other exception is printed and counted as bad. The script prints
the counts and the cases that took more than a second.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import vectordb as vdb

FILES = [
    "children.npy",
    "leaf_of_node.npy",
    "leaf_offsets.npy",
    "ids.npy",
    "perm.npy",
    "factors.npy",
    "centroids.npy",
    "codes.npy",
    "blocks.npy",
    "vectors.bin",
]


class _Hang(Exception):
    pass


def _alarm(*_: Any) -> None:
    raise _Hang


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample", type=int, default=3000)
    args = parser.parse_args()
    signal.signal(signal.SIGALRM, _alarm)
    base = vdb.make_clustered(600, 64, seed=5)
    meta = [{"user": "ann" if i % 2 else "bob", "ts": i} for i in range(len(base))]
    tmp = Path(tempfile.mkdtemp())
    saved = tmp / "saved"
    vdb.ClusteredIndex.build(
        base, metric="cosine", max_leaf_size=60, metadata=meta, leaf_scan="codes"
    ).save(saved)
    rng = np.random.default_rng(args.seed)
    cases = bad = refused = 0
    slow: list[tuple[str, int, int, float]] = []
    for name in FILES:
        size = (saved / name).stat().st_size
        small = size <= 4096
        positions = range(size) if small else rng.integers(0, size, args.sample).tolist()
        for at in positions:
            for bit in range(8) if small else (0, 3, 7):
                case = tmp / "case"
                shutil.rmtree(case, ignore_errors=True)
                shutil.copytree(saved, case)
                raw = bytearray((case / name).read_bytes())
                raw[at] ^= 1 << bit
                (case / name).write_bytes(bytes(raw))
                cases += 1
                started = time.perf_counter()
                signal.alarm(5)
                try:
                    with vdb.ClusteredIndex.open(case) as index:
                        index.search_batch(base[:5], 5)
                        index.search(base[0], 3, filter={"user": "ann"})
                        index.search_batch(base[:40], 5, probes=20)
                except vdb.InvalidIndexFileError:
                    refused += 1
                except _Hang:
                    bad += 1
                    print(f"HANG {name} byte {at} bit {bit}", flush=True)
                except Exception as exc:
                    bad += 1
                    print(f"ERROR {name} byte {at} bit {bit}: {exc!r}", flush=True)
                finally:
                    signal.alarm(0)
                took = time.perf_counter() - started
                if took > 1:
                    slow.append((name, at, bit, took))
        print(f"{name}: {cases} cases so far, {bad} bad", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"cases {cases}; refused at open {refused}; opened and searched {cases - refused - bad}")
    print(f"bad (hang or other exception) {bad}; slower than 1 s: {slow[:10] or 'none'}")


if __name__ == "__main__":
    main()
