"""Reliability figures: kill points, damaged files, fuzzing, soak (issue: crash-safe files).

    python bench/reliability.py [--soak-seconds 60] [--fuzz-scale 20] [--out FILE.json]

1. Kill points: every file-system step (SQLite's included) of each crash scenario of
   ``tests/test_crash.py``, with the rename exchange and with two renames (a forked child
   killed with SIGKILL before step n, for every n): does the index then open with
   ``verify=True`` as the old or the new version (ids, vectors, metadata, results)?
2. Damaged files: every file of a saved index, flipped, zeroed, truncated and extended at
   spread positions, plus hand-made hostile cases: rejected by ``open(verify=True)`` with
   ``InvalidIndexFileError`` naming the file? Without ``verify``: rejected, or opened and
   searched without error?
3. Fuzzing: ``tests/test_fuzz.py`` with ``VECTORDB_FUZZ_SCALE`` times its examples.
4. Soak: the async engine under concurrent searches and writes (``tests/soak.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
sys.path.insert(0, str(TESTS))

import vectordb as vdb  # noqa: E402


def kill_points() -> list[dict[str, Any]]:
    import test_crash as tc

    data = vdb.make_clustered(tc.N_BASE + tc.N_ADD + 100, 48, seed=21)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        first = tc.save_first_version(Path(tmp), data)
        for case in tc.CASES:
            scenario, swap = case.values
            with tempfile.TemporaryDirectory() as case_tmp:
                report = tc.try_kill_points(scenario, swap, data, first, Path(case_tmp))
            results = list(report.outcomes.values())
            old_n, new_n = results.count("old"), results.count("new")
            name = scenario if swap == tc.SWAPS[0] else f"{scenario}, {swap}"
            rows.append(
                {
                    "scenario": name,
                    "steps": len(report.steps),
                    "kill_points": len(results),
                    "recovered_clean": old_n + new_n,
                    "old_version": old_n,
                    "new_version": new_n,
                    "other": sorted({r for r in results if r not in ("old", "new")})[:5],
                }
            )
            print(f"  {name}: {old_n + new_n}/{len(results)} clean", file=sys.stderr)
    return rows


def damaged_files() -> dict[str, int]:
    x = vdb.make_clustered(3000, 48, seed=2)
    meta = [{"user": i % 7} for i in range(len(x))]
    counts = {
        "tried": 0,
        "rejected_by_verify": 0,
        "without_verify_rejected": 0,
        "without_verify_opened_and_searched": 0,
        "other_outcome": 0,
    }
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "saved"
        vdb.ClusteredIndex.build(x, metric="ip", max_leaf_size=200, metadata=meta).save(saved)
        for file in sorted(p.name for p in saved.iterdir()):
            size = (saved / file).stat().st_size
            for how in ("flip", "zero", "truncate", "extend"):
                for where in np.linspace(0, max(size - 1, 0), 12).astype(int).tolist():
                    case = Path(tmp) / "case"
                    shutil.rmtree(case, ignore_errors=True)
                    shutil.copytree(saved, case)
                    raw = bytearray((case / file).read_bytes())
                    if how == "flip":
                        raw[where] ^= 0x04
                    elif how == "zero":
                        if not any(raw[where : where + 8]):
                            continue
                        raw[where : where + 8] = bytes(len(raw[where : where + 8]))
                    elif how == "truncate":
                        del raw[where:]
                    else:
                        raw += b"\x01" * (1 + where % 64)
                    (case / file).write_bytes(bytes(raw))
                    counts["tried"] += 1
                    for verify in (True, False):
                        try:
                            with vdb.ClusteredIndex.open(case, verify=verify) as index:
                                index.search_batch(x[:5], 5)
                                index.search(x[0], 3, filter={"user": 3})
                            outcome = "opened"
                        except vdb.InvalidIndexFileError as exc:
                            outcome = "rejected" if str(case) in str(exc) else "unnamed"
                        except Exception as exc:
                            outcome = f"crash {type(exc).__name__}"
                        if verify:
                            key = "rejected_by_verify" if outcome == "rejected" else "other_outcome"
                        else:
                            key = {
                                "rejected": "without_verify_rejected",
                                "opened": "without_verify_opened_and_searched",
                            }.get(outcome, "other_outcome")
                        counts[key] += 1
    return counts


def fuzz(scale: int) -> dict[str, Any]:
    env = dict(os.environ, VECTORDB_FUZZ_SCALE=str(scale))
    t = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(TESTS / "test_fuzz.py"),
            "--hypothesis-show-statistics",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    passing = sum(int(line.split()[1]) for line in proc.stdout.splitlines() if " passing, " in line)
    return {
        "scale": scale,
        "examples": passing,
        "passed": proc.returncode == 0,
        "seconds": round(time.perf_counter() - t, 1),
        "tail": proc.stdout.splitlines()[-1:],
    }


def soak_run(seconds: float) -> dict[str, Any]:
    from soak import soak

    r = asyncio.run(soak(seconds, searchers=32, writers=8, seed=11, compact_every=5.0))
    return {
        "seconds": round(r.seconds, 1),
        "callers": r.callers,
        "operations": r.operations,
        "searches": r.searches,
        "adds": r.adds,
        "upserts": r.upserts,
        "deletes": r.deletes,
        "compactions": r.compactions,
        "wrong_results": r.wrong_results,
        "lost_ids": r.lost_ids,
        "extra_ids": r.extra_ids,
        "final_live": r.final_live,
        "rss_start_mb": round(r.rss_mb[0], 1),
        "rss_end_mb": round(r.rss_mb[-1], 1),
        "rss_max_mb": round(max(r.rss_mb), 1),
        "problems": r.problems[:5],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--soak-seconds", type=float, default=60.0)
    parser.add_argument("--fuzz-scale", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    print("kill points...", file=sys.stderr)
    result: dict[str, Any] = {"kill_points": kill_points()}
    print("damaged files...", file=sys.stderr)
    result["damaged_files"] = damaged_files()
    print("fuzzing...", file=sys.stderr)
    result["fuzz"] = fuzz(args.fuzz_scale)
    print("soak...", file=sys.stderr)
    result["soak"] = soak_run(args.soak_seconds)
    k = result["kill_points"]
    d, f, s = result["damaged_files"], result["fuzz"], result["soak"]
    lines = [
        "| check | figure |",
        "|---|---|",
        *(
            f"| kill points: {r['scenario']} | {r['recovered_clean']} / {r['kill_points']} "
            f"recovered clean ({r['old_version']} old, {r['new_version']} new) |"
            for r in k
        ),
        f"| damaged-file cases | {d['tried']} tried; rejected by verify=True: "
        f"{d['rejected_by_verify']}; without verify: {d['without_verify_rejected']} rejected, "
        f"{d['without_verify_opened_and_searched']} opened and searched; other outcomes: "
        f"{d['other_outcome']} |",
        f"| fuzz examples | {f['examples']} ({'all passed' if f['passed'] else 'FAILED'}, "
        f"{f['seconds']} s) |",
        f"| soak | {s['operations']:,} operations ({s['searches']:,} searches, {s['adds']:,} adds, "
        f"{s['upserts']:,} upserts, {s['deletes']:,} deletes, {s['compactions']} compactions) "
        f"by {s['callers']} concurrent callers in {s['seconds']} s; wrong results "
        f"{s['wrong_results']}, lost ids {s['lost_ids']}, extra ids {s['extra_ids']}; "
        f"RSS anon {s['rss_start_mb']} -> "
        f"{s['rss_end_mb']} MB (max {s['rss_max_mb']}) |",
    ]
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
