"""The table of what `accelerate` replaced and what it left, and why."""

from __future__ import annotations

from dataclasses import dataclass

LEFT = "PyTorch (left)"


@dataclass(frozen=True)
class Row:
    module: str  # the module's path in the model ("" for the model itself)
    pattern: str  # what the code there computes, e.g. "conv2d + batch_norm2d + relu"
    runs_on: str  # the fastunet op, or LEFT
    why: str


class AccelerationReport:
    """Rows in the order they were found. Layers in Sequentials and leaf modules are decided by
    `accelerate`; patterns in a forward's own code when that forward first runs with a new call
    signature, so print the report after a forward pass to see them."""

    def __init__(self) -> None:
        self._rows: dict[Row, None] = {}  # ordered and without repeats

    def add(self, module: str, pattern: str, runs_on: str, why: str = "") -> None:
        self._rows[Row(module or "(model)", pattern, runs_on, why)] = None

    @property
    def rows(self) -> list[Row]:
        return list(self._rows)

    def replaced(self) -> list[Row]:
        return [row for row in self._rows if row.runs_on != LEFT]

    def left(self) -> list[Row]:
        return [row for row in self._rows if row.runs_on == LEFT]

    def __str__(self) -> str:
        header = ("module", "pattern", "runs on", "why")
        rows = [header] + [(r.module, r.pattern, r.runs_on, r.why) for r in self._rows]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [
            "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True))
            + "  "
            + row[3]
            for row in rows
        ]
        replaced, left = len(self.replaced()), len(self.left())
        summary = f"fastunet.accelerate: {replaced} replaced, {left} left"
        return "\n".join([summary, *(line.rstrip() for line in lines)])

    def __repr__(self) -> str:
        return f"<AccelerationReport: {len(self.replaced())} replaced, {len(self.left())} left>"
