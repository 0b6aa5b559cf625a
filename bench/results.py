"""The benchmark's results: a metric beside its baseline and target, a section of them, and the printed tables."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Target:
    """A goal: ``kind`` is ``ratio_min``, ``ratio_max``, ``value_min`` or ``value_max``."""

    kind: str
    bound: float
    text: str

    def met(self, value: float | None, ratio: float | None) -> bool | None:
        subject = ratio if self.kind.startswith("ratio") else value
        if subject is None or math.isnan(subject):
            return None
        return subject >= self.bound if self.kind.endswith("min") else subject <= self.bound


@dataclass
class Metric:
    """One line of a results table: orch_outbox's figure beside its baseline."""

    name: str
    value: float | None
    baseline: float | None
    unit: str
    baseline_name: str = ""
    target: Target | None = None
    note: str = ""
    #: False when a ratio means nothing (e.g. two growth percentages near zero).
    compare: bool = True

    @property
    def ratio(self) -> float | None:
        if not self.compare or self.value is None or not self.baseline:
            return None
        return self.value / self.baseline

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.target.met(self.value, self.ratio)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(ratio=self.ratio, met=self.met)
        return data


@dataclass
class Section:
    """What one section measured: its metrics, its facts (sizes, set-up) and notes."""

    name: str
    title: str
    metrics: list[Metric] = field(default_factory=list)
    setup: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "setup": self.setup,
            "metrics": [m.to_json() for m in self.metrics],
            "notes": self.notes,
            "error": self.error,
            "seconds": round(self.seconds, 1),
        }


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    if abs(value) >= 1000:
        text = f"{value:,.0f}"
    elif abs(value) >= 100:
        text = f"{value:.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".rstrip()


def fmt_ratio(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio:.2f}x"


def fmt_met(met: bool | None) -> str:
    return {True: "yes", False: "NO", None: "—"}[met]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table with a header rule."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def section_table(section: Section) -> str:
    """A section's metrics side by side: metric | orch_outbox | baseline | ratio | target | met?"""
    header = ("metric", "orch_outbox", "baseline", "ratio", "target", "met?")
    rows = []
    for m in section.metrics:
        base = fmt(m.baseline, m.unit) + (f" ({m.baseline_name})" if m.baseline_name and m.baseline else "")
        rows.append(
            (m.name, fmt(m.value, m.unit), base, fmt_ratio(m.ratio), m.target.text if m.target else "", fmt_met(m.met))
        )
    return table(header, rows)


def summary_table(sections: Sequence[Section]) -> str:
    """Every metric that has a target, across sections."""
    header = ("section", "metric", "orch_outbox", "baseline", "ratio", "target", "met?")
    rows = []
    for s in sections:
        if s.error:
            rows.append((s.name, "(section failed)", "—", "—", "—", "—", "—"))
        for m in s.metrics:
            if m.target is None:
                continue
            rows.append(
                (
                    s.name,
                    m.name,
                    fmt(m.value, m.unit),
                    fmt(m.baseline, m.unit),
                    fmt_ratio(m.ratio),
                    m.target.text,
                    fmt_met(m.met),
                )
            )
    return table(header, rows)
