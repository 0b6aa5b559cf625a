"""Who may use the page: a token when it listens beyond loopback, CSRF on every action, a log of each action."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import secrets
from typing import Any

from flask import Flask, Response, abort, g, request

from ..errors import ConfigurationError

log = logging.getLogger("orch_outbox.web")

CSRF_COOKIE = "orch_outbox_csrf"


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_binding(host: str, token: str | None) -> None:
    """Refuse to listen beyond loopback without a token (anyone on the network could read the commands)."""
    if not is_loopback(host) and not token:
        raise ConfigurationError(
            f"orch-outbox web on {host}: bound beyond loopback it needs a token (--token or outbox_web_token)"
        )


def install(app: Flask, token: str | None) -> None:
    """Authentication (when a token is set) and the CSRF cookie, on every request."""

    @app.before_request
    def authenticate() -> Response | None:
        g.user = request.remote_addr or "-"
        if not token:
            return None
        auth = request.authorization
        given = request.headers.get("X-Orch-Outbox-Token") or (auth.password if auth else None) or ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            return Response(
                "a token is required", 401, {"WWW-Authenticate": 'Basic realm="orch-outbox", charset="UTF-8"'}
            )
        g.user = (auth.username if auth and auth.username else None) or g.user
        return None

    @app.before_request
    def csrf_token() -> None:
        g.csrf = request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(32)
        if request.method == "POST":
            sent = request.form.get("csrf", "")
            cookie = request.cookies.get(CSRF_COOKIE, "")
            if not cookie or not hmac.compare_digest(sent.encode(), cookie.encode()):
                abort(403, "the form's CSRF token does not match: reload the page")

    @app.after_request
    def set_csrf_cookie(response: Response) -> Response:
        if request.cookies.get(CSRF_COOKIE) != g.get("csrf"):
            response.set_cookie(CSRF_COOKIE, g.csrf, httponly=True, samesite="Strict")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Content-Security-Policy", "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                                    "script-src 'self' 'unsafe-inline'")  # fmt: skip
        return response


def audit(action: str, count: int, detail: Any) -> None:
    """Every action in the log: who, what, how many rows."""
    log.info("web action %s by %s: %d row(s) %s", action, g.get("user", "-"), count, detail)
