"""One trace across real processes: the user's web process pushes inside a request span, beat's relay publishes,
a real ``celery worker`` (with ``opentelemetry-instrumentation-celery``) runs the handler and its chained command.

Every process of the project sets up the OpenTelemetry SDK from ``tracing_setup.py`` (imported by the project's
``celeryconfig``), exporting each finished span as a JSON line into a file of its own; the test reads them all.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .harness import Project, python
from .test_e2e import make_project  # noqa: F401 - the fixture

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

TRACING_SETUP = '''\
"""OpenTelemetry for every process of the project: spans as JSON lines in spans/<pid>.jsonl."""

import json
import os
from pathlib import Path

from opentelemetry import trace
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

FOLDER = Path(__file__).with_name("spans")


class JsonLines(SpanExporter):
    def export(self, spans):
        FOLDER.mkdir(exist_ok=True)
        with open(FOLDER / f"{os.getpid()}.jsonl", "a") as out:
            for span in spans:
                out.write(json.dumps({
                    "name": span.name,
                    "trace": f"{span.context.trace_id:032x}",
                    "span": f"{span.context.span_id:016x}",
                    "parent": f"{span.parent.span_id:016x}" if span.parent else None,
                    "kind": span.kind.name,
                    "attributes": {k: str(v) for k, v in (span.attributes or {}).items()},
                    "status": span.status.status_code.name,
                    "pid": os.getpid(),
                }) + "\\n")
        return SpanExportResult.SUCCESS


if not isinstance(trace.get_tracer_provider(), TracerProvider):
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLines()))
    trace.set_tracer_provider(provider)
    CeleryInstrumentor().instrument()
'''

PUSH_SCRIPT = '''\
"""The user's web process: one request span, a push inside it; prints the command id and the trace id."""

import json
import sys

import sqlalchemy as sa
from opentelemetry import trace
from sqlalchemy.orm import Session

import e2e_commands as c

engine = sa.create_engine(sys.argv[1])
with trace.get_tracer("web").start_as_current_span("POST /signup") as request:
    with Session(engine) as session:
        command_id = c.send_email.push(session, c.Email("ada@example.com", "traced"))
        session.commit()
print(json.dumps({"id": str(command_id), "trace": f"{request.get_span_context().trace_id:032x}"}))
'''


def _spans(root: Path) -> list[dict[str, Any]]:
    found = []
    for path in sorted((root / "spans").glob("*.jsonl")) if (root / "spans").exists() else []:
        found += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return found


def test_push_publish_and_process_are_one_trace_across_processes(make_project: Callable[[str], Project]) -> None:  # noqa: F811
    """Proves, across the web process, beat and a worker: the request's trace holds the create span (in the web
    process), the relay's publish span (in beat), Celery's own worker span and the outbox's process span (in the
    worker) — each the child of the one before — and the chained command's spans (pushed while the handler ran)."""
    project = make_project("rabbitmq")
    (project.root / "tracing_setup.py").write_text(TRACING_SETUP)
    (project.root / "traced_push.py").write_text(PUSH_SCRIPT)
    config = project.root / "celeryconfig.py"
    config.write_text("import tracing_setup  # noqa: F401\n" + config.read_text())
    project.migrate()
    project.start_worker()
    project.start_beat()
    pushed = json.loads(project.run([python(), "traced_push.py", project.database_url]).stdout.strip().splitlines()[-1])
    project.wait_status(pushed["id"], "completed")
    chained = project.wait_for(lambda: _chained(project, pushed["id"]), "the chained command to complete")

    def the_trace() -> list[dict[str, Any]] | None:
        spans = [s for s in _spans(project.root) if s["trace"] == pushed["trace"]]
        names = {s["name"] for s in spans}
        wanted = {"POST /signup", f"create {project.queue}", f"publish {project.queue}", f"process {project.queue}"}
        runs = [s for s in spans if s["name"] == f"process {project.queue}"]
        return spans if wanted <= names and len(runs) >= 2 else None

    spans = project.wait_for(the_trace, "every span of the trace to be exported")
    by_id = {s["span"]: s for s in spans}
    process = next(
        s for s in spans if s["name"] == f"process {project.queue}" and s["attributes"].get("messaging.message.id")
        == pushed["id"]
    )  # fmt: skip
    chain = [process]
    while chain[-1]["parent"] in by_id:
        chain.append(by_id[chain[-1]["parent"]])
    names = [s["name"] for s in chain]
    assert names[0] == f"process {project.queue}" and names[-1] == "POST /signup", names
    assert f"publish {project.queue}" in names and f"create {project.queue}" in names, names
    assert any(n.startswith("run/") for n in names), names  # Celery's instrumentation on the worker
    processes = {s["name"]: s["pid"] for s in chain}
    assert len({processes["POST /signup"], processes[f"publish {project.queue}"], process["pid"]}) == 3
    assert process["kind"] == "CONSUMER" and process["attributes"]["orch_outbox.outcome"] == "success"
    child_run = next(s for s in spans if s["attributes"].get("messaging.message.id") == chained)
    assert child_run["trace"] == pushed["trace"]


def _chained(project: Project, parent: str) -> str | None:
    rows = [r for r in project.rows() if str(r["parent_id"]) == parent and r["status"] == "completed"]
    return str(rows[0]["id"]) if rows else None
