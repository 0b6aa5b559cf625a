"""``orch-outbox web``: the operator's page, server-rendered (Flask and its Jinja templates; no build step).

``create_app(outbox)`` returns a WSGI app to serve alone (``orch-outbox web``) or to mount
in your own (``werkzeug.middleware.dispatcher.DispatcherMiddleware``, or an ASGI server's
WSGI adapter). Read-only unless ``allow_actions``; with a ``token``, every request needs
it (basic auth password, or the ``X-Orch-Outbox-Token`` header).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigurationError

if TYPE_CHECKING:
    from flask import Flask

    from ..outbox import Outbox


def create_app(
    outbox: Outbox, *, allow_actions: bool = False, token: str | None = None, flower_url: str | None = None
) -> Flask:
    """The page's WSGI app over ``outbox``."""
    try:
        from flask import Flask
    except ImportError:
        raise ConfigurationError("the web page needs the web extra: pip install 'orch-outbox[web]'") from None
    from . import filters, security
    from .actions import actions
    from .views import pages

    app = Flask(__name__)
    app.config.update(OUTBOX=outbox, ALLOW_ACTIONS=allow_actions, FLOWER_URL=(flower_url or "").rstrip("/") or None)
    security.install(app, token)
    filters.install(app)
    app.register_blueprint(pages)
    app.register_blueprint(actions)
    return app


def serve(
    outbox: Outbox,
    host: str = "127.0.0.1",
    port: int = 9811,
    *,
    allow_actions: bool = False,
    token: str | None = None,
    flower_url: str | None = None,
) -> None:
    """Serve the page (threaded) until interrupted."""
    from werkzeug.serving import run_simple

    from .security import check_binding

    check_binding(host, token)
    app = create_app(outbox, allow_actions=allow_actions, token=token, flower_url=flower_url)
    run_simple(host, port, app, threaded=True)
