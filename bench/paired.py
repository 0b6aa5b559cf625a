"""Paired rounds: the outbox at this checkout and at other revisions, beside plain Celery, interleaved.

    python -m bench.paired --against HEAD~1 [--against REV ...] [--broker rabbitmq] [--pool threads]
                           [--rounds 4] [-n 6000]

On this shared 2-core machine a run's rate moves by a fifth or more from one minute to the
next, on either side (docs/performance.md), so one run of each cannot tell a change of a few
percent. Here every round runs plain Celery and the outbox at each checkout once, back to
back, the side that goes first rotating from round to round (a run reads differently right
after another's), and each outbox run is read against the Celery run of its own round. It
prints every round, then per side the median rate, the median ratio to Celery and the median
CPU a command of each process group, and per revision the median of this checkout's rate
over the revision's in the same round.

Each revision is exported (``git archive``) into the run's log folder, and its relay and
worker run from there: their ``orch_outbox`` and ``bench.app`` are the revision's. The
tables are created by this checkout, and the commands pushed by it: a revision whose schema
or messages differ cannot be compared this way.
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path

from bench import common
from bench.app import build
from bench.common import BROKERS, Run
from bench.throughput import POOLS, Timed, celery_run, outbox_run

WARMUP = 200
#: The CPU groups printed per side (milliseconds a command, see bench/cpu.py).
GROUPS = ("worker", "relay", "postgres", "total")
CELERY = "celery"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.paired", description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", action="append", default=[], metavar="REV", help="a git revision to compare")
    parser.add_argument("--broker", choices=sorted(BROKERS), default="rabbitmq")
    parser.add_argument("--pool", choices=[pool for pool, _ in POOLS], default="threads")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("-n", type=int, default=6_000, dest="n", help="commands a run (after a warm-up of 200)")
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 50 or not 100 <= args.n <= 100_000:
        parser.error("--rounds must be 1..50 and -n 100..100000")
    return args


def export(rev: str, run: Run) -> Path:
    """The files of ``rev`` in a folder of the run's own (``git archive``); a clear error for an unknown revision."""
    folder = run.log_dir / f"rev-{len(list(run.log_dir.glob('rev-*')))}"
    folder.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(common.ROOT), "archive", "--format=tar", rev], capture_output=True, timeout=120
    )
    if archive.returncode != 0:
        raise common.BenchError(f"cannot export {rev!r}: {archive.stderr.decode(errors='replace').strip()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as files:
        files.extractall(folder, filter="data")
    return folder


def describe(rev: str) -> str:
    """``rev`` and the commit it names (``HEAD~1 (d9971f0)``); this checkout as ``git describe`` has it."""
    args = ["describe", "--always", "--dirty"] if rev == "." else ["rev-parse", "--short", rev]
    named = subprocess.run(["git", "-C", str(common.ROOT), *args], capture_output=True, text=True, timeout=30)
    return f"{'this checkout' if rev == '.' else rev} ({named.stdout.strip() or '?'})"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    common.install_cleanup()
    needed = {"postgresql", "redis", args.broker}  # the handlers of both sides count in Redis
    problems = {k: v for k, v in common.check_servers().items() if v and k in needed}
    if problems:
        print(f"cannot run: {', '.join(sorted(problems))} not answering", file=sys.stderr)
        return 2
    run = Run()
    concurrency = dict(POOLS)[args.pool]
    print(f"run {run.id}: {args.broker} {args.pool} -c{concurrency}, {args.rounds} rounds of {args.n}; {run.log_dir}")
    bench = None
    timed: dict[str, list[Timed]] = {}
    try:
        sides: list[tuple[str, Path | None]] = [(CELERY, None), (describe("."), common.ROOT)]
        sides += [(describe(rev), export(rev, run)) for rev in args.against]
        bench = build(BROKERS[args.broker], run.prefix("pr"))
        bench.outbox.create_tables()
        timed.update((name, []) for name, _ in sides)
        numbered = list(enumerate(sides))
        for i in range(args.rounds):
            turn = i % len(sides)
            for k, (name, checkout) in numbered[turn:] + numbered[:turn]:
                tag = f"pr-{k}-{i}"
                if checkout is None:
                    one = celery_run(run, bench, args.broker, args.pool, concurrency, args.n, WARMUP, tag)
                else:
                    one = outbox_run(
                        run, bench, args.broker, args.pool, concurrency, args.n, WARMUP, tag, checkout=checkout
                    )
                timed[name].append(one)
            base = timed[CELERY][-1].rate
            line = " | ".join(f"{name} {t[-1].rate:,.0f} ({t[-1].rate / base:.2f})" for name, t in timed.items())
            print(f"round {i + 1}: {line}", flush=True)
    except common.BenchError as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 1
    finally:
        common.stop_all()
        if bench is not None:
            common.drop_outbox(bench.outbox)
        common.cleanup_run(run)
    print_summary(timed)
    return 0


def print_summary(timed: dict[str, list[Timed]]) -> None:
    """Per side: median rate, median ratio to Celery's run of the same round, median CPU a command per group;
    per revision: the median of this checkout's rate over the revision's, round by round."""
    celery = timed[CELERY]
    names = list(timed)
    print("\nside | median cmd/s | median ratio to Celery | CPU a command (median ms): " + ", ".join(GROUPS))
    for name in names:
        runs = timed[name]
        ratio = statistics.median([t.rate / c.rate for t, c in zip(runs, celery, strict=True)])
        cpu = ", ".join(f"{group} {statistics.median([t.cpu.get(group, 0.0) for t in runs]):.2f}" for group in GROUPS)
        print(f"{name} | {statistics.median([t.rate for t in runs]):,.0f} | {ratio:.2f} | {cpu}")
    here = timed[names[1]]
    for name in names[2:]:
        paired = [h.rate / r.rate for h, r in zip(here, timed[name], strict=True)]
        low, high = min(paired), max(paired)
        print(f"{names[1]} / {name}: median {statistics.median(paired):.2f} (rounds {low:.2f}..{high:.2f})")


if __name__ == "__main__":
    sys.exit(main())
