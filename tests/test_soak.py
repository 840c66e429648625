"""A short soak of the async engine against a brute-force oracle (see ``soak``)."""

from __future__ import annotations

import asyncio

from soak import soak


def test_concurrent_searches_and_writes_lose_nothing_and_return_no_wrong_id():
    report = asyncio.run(soak(3.0, searchers=16, writers=4, seed=3))
    assert report.searches > 100 and report.adds > 10 and report.deletes > 5
    assert report.upserts > 5
    assert report.wrong_results == 0, report.problems
    assert report.lost_ids == 0 and report.extra_ids == 0, report.problems
    # Bounded memory, loosely (the oracle and the index hold a few MB here): a leak per
    # operation would show as hundreds of MB over these thousands of operations.
    assert max(report.rss_mb) - report.rss_mb[0] < 150, report.rss_mb
