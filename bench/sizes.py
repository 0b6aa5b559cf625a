"""How much each section of the benchmark does: ``--quick``, the default, ``--full``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    """How much each section does; ``--quick`` / default / ``--full``."""

    mode: str
    throughput_n: int  # commands per (broker, pool) scenario and side
    procrastinate_n: int
    #: commands run before a timed run, per worker: enough for every thread of a -c8 worker to have its connections
    #: and its prepared statements, so the timed run measures the steady state on both sides
    warmup: int
    latency_samples: int
    relay_n: int
    push_n: int
    bulk_calls: int  # push_many calls of BULK_SIZE commands
    big_rows: int  # finished rows in the large table
    big_relay_n: int
    big_e2e_n: int
    memory_n: int
    #: interleaved rounds of the relay, bigtable and notify sections; the best of each side counts
    rounds: int = 1
    #: interleaved rounds of each throughput scenario, each side first in turn; the best of each side counts. Three:
    #: this machine's speed drifts by 15 % within seconds (a fixed Python loop), which two rounds did not outlast
    throughput_rounds: int = 1


QUICK = Sizes("quick", 200, 200, 8, 50, 1_000, 300, 2, 100_000, 1_000, 200, 1_000)
DEFAULT = Sizes(
    "default", 6_000, 2_000, 200, 300, 10_000, 2_000, 5, 1_000_000, 5_000, 5_000, 20_000, rounds=2, throughput_rounds=3
)
FULL = Sizes(
    "full", 10_000, 5_000, 32, 1_000, 50_000, 5_000, 10, 10_000_000, 20_000, 10_000, 1_000_000, 3, throughput_rounds=3
)
BULK_SIZE = 10_000
