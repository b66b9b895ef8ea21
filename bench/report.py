"""Benchmark results: one row per measured value, printed as a table and written as JSON.

The JSON is a list of rows, the shape every bench script uses (bench.py and live.py alike):
{"bench": "B1", "case": str, "metric": str, "value": float, "unit": str, "target": str | null, "ok": bool | null}.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Row:
    bench: str
    case: str
    metric: str
    value: float
    unit: str
    target: str | None = None
    ok: bool | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Row:
        return cls(
            bench=str(data["bench"]),
            case=str(data["case"]),
            metric=str(data["metric"]),
            value=float(data["value"]),
            unit=str(data["unit"]),
            target=None if data.get("target") is None else str(data["target"]),
            ok=None if data.get("ok") is None else bool(data["ok"]),
        )


def _value(value: float) -> str:
    if value == int(value) and abs(value) >= 100:
        return f"{int(value)}"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def table(rows: list[Row]) -> str:
    header = ["bench", "case", "metric", "value", "unit", "target", "ok"]
    lines = [
        [r.bench, r.case, r.metric, _value(r.value), r.unit, r.target or "", {True: "yes", False: "NO", None: ""}[r.ok]]
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = []
    for line in [header, *lines]:
        cells = [c.rjust(w) if i == 3 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def markdown(rows: list[Row]) -> str:
    lines = ["| bench | case | metric | value | unit | target | ok |", "|---|---|---|--:|---|---|---|"]
    for r in rows:
        ok = {True: "yes", False: "**no**", None: ""}[r.ok]
        lines.append(f"| {r.bench} | {r.case} | {r.metric} | {_value(r.value)} | {r.unit} | {r.target or ''} | {ok} |")
    return "\n".join(lines)


def write_json(rows: list[Row], path: Path) -> None:
    path.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")


def read_json(path: Path) -> list[Row]:
    return [Row.from_dict(item) for item in json.loads(path.read_text())]
