"""Plain-text rendering for people: the tables of ``orch-outbox`` and of the demo."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def table(header: tuple[str, ...], rows: Sequence[Sequence[Any]], empty: str | None = None) -> str:
    """A plain-text table; ``empty`` instead, when given and there are no rows."""
    if not rows and empty is not None:
        return empty
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)
