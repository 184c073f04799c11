"""A cheap histogram for metrics on hot paths (nodes and gateways share it).

``observe`` is one bisect and two additions, no locks (one event loop thread);
a collector turns the counts into a Prometheus histogram at scrape time.
"""

from __future__ import annotations

import bisect


class Buckets:
    """A cumulative-on-export histogram: ``observe`` is one bisect and two additions."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family_buckets(self) -> list[tuple[str, float]]:
        out = []
        total = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            total += count
            out.append((repr(float(bound)), float(total)))
        total += self.counts[-1]
        out.append(("+Inf", float(total)))
        return out
