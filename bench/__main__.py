"""``python -m bench [name ...] [--quick]``: run the benchmarks, then regenerate docs/performance.md.

Every benchmark is a module ``bench/<name>.py`` with ``main(argv) -> int`` that accepts ``--quick`` and
writes ``bench/results/<name>.json`` (and its headline figures into ``bench/results/summary.json``, through
``bench.common.update_summary``); adding one is adding its name to ``MODULES``. Each runs in a process of its
own: a local stack owns its process (moto's backends and the Lambda runtime's patches are process-wide).
``python -m bench report`` only regenerates the document.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from bench import report
from bench.common import PROJECT_ROOT

#: run in this order; aws_cost comes after own_key_throughput, whose batch it also prices
MODULES = [
    "package_size",
    "cold_start",
    "overhead",
    "own_key_throughput",
    "limiter",
    "aws_cost",
]


def run_module(name: str, quick: bool) -> tuple[int, float]:
    started = time.monotonic()
    command = [sys.executable, "-m", f"bench.{name}"] + (["--quick"] if quick else [])
    print(f"\n=== {name} ===", flush=True)
    code = subprocess.run(command, cwd=PROJECT_ROOT, check=False).returncode
    return code, time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "names", nargs="*", metavar="name", help=f"one or more of {', '.join(MODULES)}, or report"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer samples, smaller batches")
    args = parser.parse_args(argv)
    names = args.names or MODULES
    unknown = [n for n in names if n not in MODULES and n != "report"]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(MODULES)} or report")
    started = time.monotonic()
    failed = []
    for name in (n for n in names if n != "report"):
        code, took = run_module(name, args.quick)
        print(f"=== {name}: {'ok' if code == 0 else f'FAILED (exit {code})'} in {took:.0f} s", flush=True)
        if code:
            failed.append(name)
    path = report.write_report()
    print(
        f"\nwrote {path.relative_to(PROJECT_ROOT)} from bench/results/*.json "
        f"(total {time.monotonic() - started:.0f} s)",
        flush=True,
    )
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
