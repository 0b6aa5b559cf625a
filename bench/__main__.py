"""``python -m bench``: orch_outbox beside plain Celery (and procrastinate), section by section.

    python -m bench                    # every section at the default sizes (≈ 8 minutes on 2 cores)
    python -m bench --quick            # a smoke run at small sizes (≤ 2 minutes)
    python -m bench --full             # 10 M finished rows, 1 M commands through the memory section
    python -m bench --only relay,push  # chosen sections

Prints one table per section and a summary; writes ``bench/results/latest.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import common, cpu
from bench.common import DEFAULT, FULL, QUICK, RESULTS_DIR, Run, Section, Sizes

#: name → (module, title, servers it needs)
SECTIONS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "throughput": ("bench.throughput", "end-to-end no-op throughput", ("postgresql", "redis", "rabbitmq")),
    "latency": ("bench.latency", "commit → handler-start latency", ("postgresql", "redis", "rabbitmq")),
    "relay": ("bench.relay", "relay dispatch rate", ("postgresql", "rabbitmq")),
    "push": ("bench.push", "cost of a push", ("postgresql", "rabbitmq")),
    "bigtable": ("bench.bigtable", "many finished rows in the table", ("postgresql", "redis", "rabbitmq")),
    "memory": ("bench.memory", "RSS of the relay and of the worker", ("postgresql", "redis", "rabbitmq")),
    "redispatch": ("bench.redispatch", "no redispatch storm behind slow handlers", ("postgresql", "redis", "rabbitmq")),
    "scaling": ("bench.scaling", "relays and workers added, one outbox table", ("postgresql", "redis", "rabbitmq")),
    "notify": ("bench.notify", "NOTIFY and the application's commits, 32 committers", ("postgresql",)),
    "burst": ("bench.burst", "a burst into an outbox analysed nearly empty", ("postgresql", "rabbitmq")),
    "flow": ("bench.flow", "the claim under flow control (limits, tenants in turns)", ("postgresql",)),
    "web": ("bench.web", "the operator's page over 100 000 commands", ("postgresql",)),
    # last: it leaves the OpenTelemetry SDK set up in the bench process
    "telemetry": ("bench.telemetry", "cost of tracing and metrics", ("postgresql", "redis", "rabbitmq")),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n", 1)[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes: a smoke run in at most ~2 minutes")
    size.add_argument("--full", action="store_true", help="10 M finished rows (bigtable), 1 M commands (memory)")
    parser.add_argument("--only", metavar="NAME[,NAME]", help=f"sections to run, among {', '.join(SECTIONS)}")
    parser.add_argument("--output", default=str(RESULTS_DIR / "latest.json"), help="where to write the JSON results")
    args = parser.parse_args(argv)
    args.sections = list(SECTIONS)
    if args.only:
        args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in args.sections if s not in SECTIONS]
        if unknown:
            parser.error(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    return args


def sizes_for(args: argparse.Namespace) -> Sizes:
    return QUICK if args.quick else FULL if args.full else DEFAULT


def run_one(name: str, run: Run, sizes: Sizes) -> Section:
    module_name, title, _ = SECTIONS[name]
    section = Section(name, title)
    started = time.monotonic()
    first_process = len(common.STARTED)
    print(f"\n== {name}: {title} ({sizes.mode}) ==", flush=True)
    try:
        module = importlib.import_module(module_name)
        module.run_section(run, sizes, section)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        section.error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        common.stop_all()
        section.seconds = time.monotonic() - started
    # A measurement beside errors in its processes' logs is not one to trust: they are named with the figures.
    section.notes.extend(f"errors logged: {found}" for found in common.logged_errors(common.STARTED[first_process:]))
    print_section(section)
    return section


def print_section(section: Section) -> None:
    if section.setup:
        print("set-up: " + "; ".join(f"{k}={v}" for k, v in section.setup.items()))
    if section.metrics:
        print(common.section_table(section))
    for note in section.notes:
        print(f"  * {note}")
    if section.error:
        print(f"  !! section failed: {section.error}")
    print(f"  ({section.seconds:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = sizes_for(args)
    common.install_cleanup()
    problems = common.check_servers()
    for server, problem in problems.items():
        print(f"{server:10s} {'ok' if problem is None else 'MISSING: ' + problem}")
    needed = {server for name in args.sections for server in SECTIONS[name][2]}
    missing = sorted(server for server in needed if problems[server])
    if missing:
        print(f"cannot run: {', '.join(missing)} not answering (needed by the chosen sections)", file=sys.stderr)
        return 2
    run = Run()
    print(f"run {run.id}, sizes {sizes.mode}, logs in {run.log_dir}", flush=True)
    busy = cpu.busy_note()
    if busy:
        print(f"WARNING: {busy}", flush=True)
    started = time.monotonic()
    sections: list[Section] = []
    try:
        for name in args.sections:
            sections.append(run_one(name, run, sizes))
    except KeyboardInterrupt:
        print("\ninterrupted; stopping subprocesses and cleaning up", file=sys.stderr)
    finally:
        common.stop_all()
        common.cleanup_run(run)
    print("\n== summary ==")
    print(common.summary_table(sections))
    total = time.monotonic() - started
    print(f"total {total:.0f} s")
    if sections:
        write_results(args.output, run, sizes, sections, total, busy)
    return 1 if any(s.error for s in sections) else 0


def write_results(path: str, run: Run, sizes: Sizes, sections: list[Section], total: float, busy: str | None) -> None:
    data: dict[str, Any] = {
        "run": run.id,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sizes": asdict(sizes),
        "host": common.host_facts(),
        "seconds": round(total, 1),
        "warning": busy,
        "sections": [s.to_json() for s in sections],
    }
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"results written to {out}")


if __name__ == "__main__":
    sys.exit(main())
