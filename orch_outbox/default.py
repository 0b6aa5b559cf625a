"""The ready-made app: ``celery -A orch_outbox worker -Q email-worker``.

Configuration, lowest to highest precedence:

1. built-in defaults: JSON only, the outbox's beat scheduler, and the *embedded
   default* (a SQLite file and kombu's filesystem broker under ``outbox_home``) when
   no database or broker is configured;
2. the ``celeryconfig`` module, if one can be imported (the current directory is
   searched), or the module named by ``ORCH_OUTBOX_CONFIG_MODULE``;
3. environment variables: Celery's ``CELERY_BROKER_URL``, ``ORCH_OUTBOX_*`` for the
   outbox settings, and ``ORCH_OUTBOX_IMPORTS`` (comma-separated modules to import,
   added to Celery's ``imports``).
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import types
from typing import Any

from celery import Celery
from kombu.transport import TRANSPORT_ALIASES

from .outbox import Outbox

_lock = threading.RLock()
_default: Outbox | None = None


def base_config() -> dict[str, Any]:
    """Settings every orch_outbox app wants: JSON only and the in-process service scheduler."""
    return {
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "beat_scheduler": "orch_outbox.beat:Scheduler",
        "broker_connection_retry_on_startup": True,
        # After a broker reconnect while tasks run, Celery 5.7's prefetch-count reduction can
        # leave the worker blocked in basic_qos, consuming nothing (seen in tests/faults).
        "worker_enable_prefetch_count_reduction": False,
        "enable_utc": True,
        "timezone": "UTC",
        "worker_hijack_root_logger": True,
    }


# kombu's filesystem transport with atomic writes (see fsbroker.py), as ``orchfs://``.
TRANSPORT_ALIASES.setdefault("orchfs", "orch_outbox.fsbroker:Transport")


def embedded_broker(home: str) -> dict[str, Any]:
    """Celery settings for kombu's filesystem broker under ``home``: no server, several processes.

    The folders are made when the broker is first used (see fsbroker.py), not when a command is declared.
    """
    folder = os.path.abspath(os.path.join(home, "broker"))
    data, control = os.path.join(folder, "data"), os.path.join(folder, "control")
    return {
        "broker_url": "orchfs://",
        "broker_transport_options": {
            "data_folder_in": data,
            "data_folder_out": data,
            "control_folder": control,
            "store_processed": False,
            "polling_interval": 0.1,
        },
    }


def load_config(env: dict[str, str] | os._Environ[str] | None = None) -> dict[str, Any]:
    """The ready app's configuration, from defaults, ``celeryconfig`` and the environment."""
    env = os.environ if env is None else env
    config = base_config()
    config.update(_user_module(env.get("ORCH_OUTBOX_CONFIG_MODULE") or "celeryconfig"))
    imports = list(config.get("imports") or ())
    imports += [m.strip() for m in env.get("ORCH_OUTBOX_IMPORTS", "").split(",") if m.strip()]
    config["imports"] = tuple(dict.fromkeys(imports))
    if not config.get("broker_url") and not env.get("CELERY_BROKER_URL"):
        home = env.get("ORCH_OUTBOX_HOME") or config.get("outbox_home") or ".orch_outbox"
        config.update(embedded_broker(home))
    return config


def _user_module(name: str) -> dict[str, Any]:
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        return {}
    return {
        key: value
        for key, value in vars(module).items()
        if not key.startswith("_") and not isinstance(value, types.ModuleType)
    }


def default_outbox() -> Outbox:
    """The outbox of the ready app, created (and configured) on first use."""
    global _default
    with _lock:
        if _default is None:
            app = Celery("orch_outbox", set_as_current=False)
            app.config_from_object(load_config())
            outbox = Outbox(app)
            outbox.settings  # noqa: B018 - validate now: `celery -A orch_outbox` fails at once on bad settings
            _default = outbox
        return _default


def command(fn: Any = None, **options: Any) -> Any:
    """Declare a command on the ready app: ``@orch_outbox.command(target="email-worker")``."""
    return default_outbox().command(fn, **options)
