"""The canvas example's commands, on the ready app (``celery -A orch_outbox worker`` imports this module).

Every command and the one plain Celery task run on one queue: ``CANVAS_QUEUE`` (``canvas`` when unset).
"""

from __future__ import annotations

import os
from typing import Any

from orch_outbox import app, command

QUEUE = os.environ.get("CANVAS_QUEUE", "canvas")

PAGES = {
    "https://example.com/a": "the outbox is the queue",
    "https://example.com/b": "a row in your transaction",
}


# -- a chain: fetch -> parse -> count_words (a plain Celery task) ---------------------------------


@command(target=QUEUE)
def fetch(url: str) -> str:
    """Fetch a page (here: from a dictionary)."""
    return PAGES[url]


@command(target=QUEUE)
def parse(page: str) -> list[str]:
    """A chain step: gets the previous step's output as its first argument."""
    return page.split()


@app.task(name="canvas.count_words", queue=QUEUE)
def count_words(words: list[str]) -> int:
    """A plain Celery task, not an outbox command: a canvas may hold both."""
    return len(words)


# -- a group and a chord: resize each image, then publish them all ---------------------------------


@command(target=QUEUE)
def resize(image: str) -> str:
    return image.replace(".png", "@2x.png")


@command(target=QUEUE)
def publish(thumbnails: list[str]) -> str:
    """A chord's body: gets the list of the members' outputs, once every member completed."""
    return f"published {len(thumbnails)}: {', '.join(thumbnails)}"


# -- batches per tenant: send to each user, then report ---------------------------------------------


@command(target=QUEUE)
def send(user: str) -> str:
    return f"sent to {user}"


@command(target=QUEUE)
def report(outcomes: list[dict[str, Any]]) -> str:
    """A batch's continuation: gets the members' outcomes (id, name, status, output, error) in push order."""
    return "; ".join(f"{o['output']} ({o['status']})" for o in outcomes)
