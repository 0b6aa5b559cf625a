"""Template helpers: times, short ids, JSON, a URL with one query argument changed."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any
from urllib.parse import urlencode

from flask import Flask, g, request


def install(app: Flask) -> None:
    @app.template_filter("when")
    def when(value: dt.datetime | None) -> str:
        return "-" if value is None else value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")

    @app.template_filter("short")
    def short(value: Any) -> str:
        text = str(value) if value else ""
        return f"{text[:8]}…{text[-4:]}" if text else "-"  # uuid7 ids share their leading (time) digits

    @app.template_filter("pretty")
    def pretty(value: Any) -> str:
        return json.dumps(value, indent=2, sort_keys=True, default=str)

    @app.context_processor
    def helpers() -> dict[str, Any]:
        def with_args(**changes: Any) -> str:
            args = {k: v for k, v in request.args.items() if v}
            args.update({k: str(v) for k, v in changes.items() if v is not None})
            return request.path + ("?" + urlencode(args) if args else "")

        return {
            "with_args": with_args,
            "csrf": g.get("csrf", ""),
            "actions_allowed": app.config.get("ALLOW_ACTIONS", False),
        }
