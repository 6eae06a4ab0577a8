"""What every benchmark shares: the result document, where it is written, and small statistics.

A result document (``bench/results/<name>.json``) is what ``bench/report.py`` renders::

    {
      "name": "overhead", "title": "...", "measured_at": "2026-11-25T16:00:00Z", "quick": false,
      "method": "how it was measured, one paragraph",
      "baseline": "what the baseline is, one sentence",
      "rows": [{"figure": "...", "unit": "ms", "ours": 1.0, "baseline": 2.0, "ratio": 0.5, "note": "..."}],
      "findings": ["what the figures say, one sentence each"],
      "details": {...anything else, not rendered...}
    }

``ratio`` is ours / baseline (omitted when either is missing or not a number).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
CACHE_DIR = PROJECT_ROOT / ".local" / "bench"


@dataclass
class Row:
    figure: str
    unit: str
    ours: float | int | str | None
    baseline: float | int | str | None = None
    note: str = ""
    ratio: float | None = field(default=None)

    def as_dict(self) -> dict[str, Any]:
        ratio = self.ratio if self.ratio is not None else ratio_of(self.ours, self.baseline)
        row = {
            "figure": self.figure,
            "unit": self.unit,
            "ours": _rounded(self.ours),
            "baseline": _rounded(self.baseline),
        }
        if ratio is not None:
            row["ratio"] = round(ratio, 3)
        if self.note:
            row["note"] = self.note
        return row


def ratio_of(ours: Any, baseline: Any) -> float | None:
    if isinstance(ours, bool) or isinstance(baseline, bool):
        return None
    if not isinstance(ours, (int, float)) or not isinstance(baseline, (int, float)) or not baseline:
        return None
    return ours / baseline


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        if value == 0 or not math.isfinite(value):
            return value
        digits = max(0, 3 - math.floor(math.log10(abs(value))))  # about four significant figures
        return round(value, digits)
    return value


def median(values: Iterable[float]) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


def percentile(values: Iterable[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100): the value that at least p% of the samples do not exceed."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def environment() -> dict[str, Any]:
    """What the numbers depend on; the load average tells whether other work shared the machine."""
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(terse=True),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
    }


def document(
    name: str,
    title: str,
    *,
    method: str,
    baseline: str,
    rows: list[Row],
    quick: bool,
    findings: list[str] | None = None,
    details: dict[str, Any] | None = None,
    started: float | None = None,
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": name,
        "title": title,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": quick,
        "environment": environment(),
        "method": method,
        "baseline": baseline,
        "rows": [row.as_dict() for row in rows],
        "findings": findings or [],
        "details": details or {},
    }
    if started is not None:
        doc["duration_s"] = round(time.monotonic() - started, 1)
    return doc


def write_result(doc: dict[str, Any], results_dir: Path = RESULTS_DIR) -> Path:
    """Written whole or not at all: a run cut short never leaves half a file behind."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{doc['name']}.json"
    scratch = path.with_suffix(".json.tmp")
    scratch.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    scratch.replace(path)
    return path


def publish(doc: dict[str, Any], rows: list[Row], findings: Iterable[str] = ()) -> Path:
    """Write the result file, then print its rows and findings: the end of every benchmark."""
    path = write_result(doc)
    print_rows(doc["title"], rows)
    for finding in findings:
        say(f"  - {finding}")
    say(f"wrote {path}")
    return path


def print_rows(title: str, rows: list[Row], out: Any = None) -> None:
    out = out or sys.stdout
    print(f"\n{title}", file=out)
    print(f"  {'figure':<52}{'ours':>14}{'baseline':>14}{'ratio':>8}", file=out)
    for row in rows:
        data = row.as_dict()
        ratio = f"{data['ratio']:.2f}" if "ratio" in data else ""
        ours, baseline = _shown(data["ours"], row.unit), _shown(data["baseline"], row.unit)
        print(f"  {row.figure[:50]:<52}{ours:>14}{baseline:>14}{ratio:>8}", file=out)
    out.flush()


def _shown(value: Any, unit: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value} {unit}".strip() if isinstance(value, (int, float)) else str(value)


def say(message: str) -> None:
    print(message, flush=True)


SUMMARY_PATH = RESULTS_DIR / "summary.json"
#: the figures before issue 13's changes, each with where it comes from: ``<key>_baseline`` in the summary
BASELINES_PATH = BENCH_DIR / "baselines" / "before_issue_13.json"


def update_summary(
    figures: dict[str, Any],
    baselines: dict[str, Any] | None = None,
    quick: bool = False,
    path: Path | None = None,
    recorded_baselines: Path = BASELINES_PATH,
) -> Path:
    """Merge a benchmark's headline figures into bench/results/summary.json, each with ``<key>_baseline``
    beside it: the one given (measured in the same run) or else the recorded figure from before issue 13.
    Every other key in the file (the other benchmarks') stays as it is."""
    path = path or SUMMARY_PATH
    recorded = json.loads(recorded_baselines.read_text())["figures"] if recorded_baselines.exists() else {}
    summary = json.loads(path.read_text()) if path.exists() else {}
    for key, value in figures.items():
        summary[key] = _rounded(value)
        baseline = (baselines or {}).get(key, (recorded.get(key) or {}).get("value"))
        if baseline is not None:
            summary[f"{key}_baseline"] = _rounded(baseline)
        if quick:
            summary.setdefault("quick_keys", [])
            if key not in summary["quick_keys"]:
                summary["quick_keys"].append(key)
        elif key in summary.get("quick_keys", []):
            summary["quick_keys"].remove(key)
    if not summary.get("quick_keys"):
        summary.pop("quick_keys", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(".json.tmp")
    scratch.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    scratch.replace(path)
    return path
