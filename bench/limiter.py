"""The global limit under a backlog, through the real state machine on the local stack.

A backlog of runs on the shared key is sent at once to a stack whose limit window is scaled down; the
OpenAI emulator records when every image request really started. The same backlog runs against the
naive fixed-window counter as the baseline, in a second process right after (each local stack owns its
process: moto's backends and the in-process Lambdas are process-wide).

    python -m bench.limiter                  # both variants, writes bench/results/limiter.json
    python -m bench.limiter --one reservation --runs 12 --window 2 --json   # one variant, JSON on stdout
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "limiter.json"
VARIANTS = ("reservation", "fixed-window")
BENCH_SECRET = "bench-limiter-secret-long-enough-for-the-authorizer"


def max_starts_in_any_window(starts: list[float], window_s: float) -> int:
    """The most request starts that any window of ``window_s`` seconds holds (a strict sliding window:
    a window beginning at each start is enough to find the maximum)."""
    ordered = sorted(starts)
    best, lo = 0, 0
    for hi, start in enumerate(ordered):
        while ordered[lo] <= start - window_s:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def figures(starts: list[float], limit: int, window_s: float, calls: int) -> dict[str, Any]:
    ordered = sorted(starts)
    n = len(ordered)
    span = ordered[-1] - ordered[0] if n > 1 else 0.0
    ideal = (math.ceil(n / limit) - 1) * window_s
    beyond_first = n - min(n, limit)  # requests that had to wait for a slot to free
    return {
        "runs": n,
        "max_starts_in_any_window": max_starts_in_any_window(ordered, window_s),
        "achieved_rate_over_cap": round((beyond_first / span) / (limit / window_s), 4) if span else None,
        "makespan_s": round(span, 3),
        "ideal_makespan_s": ideal,
        "makespan_over_ideal": round(span / ideal, 4) if ideal else None,
        "dynamodb_calls_per_grant": round(calls / n, 3) if n else None,
    }


def run_backlog(variant: str, runs: int, limit: int, window_s: float, margin_ms: int) -> dict[str, Any]:
    """Run in its own process: bring up a local stack with the scaled limit and send the backlog."""
    from dalle_plugin import wiring
    from dalle_plugin.adapters.dynamo_rate_limiter import FixedWindowRateLimiter
    from local_stack.hub_emulator import load_sample_runs
    from local_stack.runner import PluginApi
    from local_stack.stack import LocalStack, StackOptions

    options = StackOptions(stack_name=f"bench-{variant}", plugin_secret=BENCH_SECRET, parameters={
        "RateLimit": str(limit), "RateWindowSeconds": str(window_s), "RateSkewMarginMs": str(margin_ms)})
    with LocalStack(options) as stack:
        stack.hub.load_samples()
        deps = wiring.generate_deps()
        if variant == "fixed-window":
            deps.limiter = FixedWindowRateLimiter(wiring.aws_client("dynamodb"), stack.table_name("RateLimitTable"),
                                                  deps.limiter_settings)
        calls = _count_limiter_calls(deps)
        api = PluginApi(stack.api_url, BENCH_SECRET)
        template = load_sample_runs(stack.hub.base_url)[1].payload  # a text-annotation run
        sessions = [f"{variant}-{i:03d}" for i in range(runs)]
        # The backlog forms within the first window: `limit` runs first, the rest two seconds later.
        # (Sent all in one instant, 30 executions share this process's one interpreter lock, and the
        # first requests' own way out is slowed by it: an artefact of running every Lambda in-process.)
        _send_all(api, template, sessions[:limit])
        time.sleep(2)
        _send_all(api, template, sessions[limit:])
        deadline = (math.ceil(runs / limit) + 2) * (window_s + margin_ms / 1000 + 1) + 60
        statuses = [api.wait_finished(s, timeout_s=deadline)["runs"][0]["status"] for s in sessions]
        starts = stack.openai.generation_starts()
        result = figures(starts, limit, window_s, calls["n"])
        result.update({"variant": variant, "limit": limit, "window_s": window_s, "skew_margin_ms": margin_ms,
                       "succeeded": statuses.count("SUCCEEDED"), "starts_epoch_s": sorted(starts)})
        return result


def _send_all(api: Any, template: dict[str, Any], sessions: list[str]) -> None:
    senders = [threading.Thread(target=api.run, args=(template | {"session": s},)) for s in sessions]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()


def _count_limiter_calls(deps: Any) -> dict[str, int]:
    counter = {"n": 0}
    original = deps.limiter.acquire

    def counted(ticket: str, now_ms: int):
        decision = original(ticket, now_ms)
        counter["n"] += decision.calls
        return decision

    deps.limiter.acquire = counted
    return counter


def _in_subprocess(variant: str, args: argparse.Namespace) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.limiter", "--one", variant, "--json", "--runs", str(args.runs),
         "--limit", str(args.limit), "--window", str(args.window), "--margin-ms", str(args.margin_ms)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.limiter", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", choices=VARIANTS, help="run one variant in this process")
    parser.add_argument("--json", action="store_true", help="print the result as JSON only")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--limit", type=int, default=5)
    parser.add_argument("--window", type=float, default=30.0, help="scaled window, seconds")
    parser.add_argument("--margin-ms", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="a small backlog on a short window")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.window, args.margin_ms = 12, 4.0, 1000
    if args.one:
        result = run_backlog(args.one, args.runs, args.limit, args.window, args.margin_ms)
        print(json.dumps(result) if args.json else json.dumps(result, indent=2), flush=True)
        return 0
    print(f"limiter: {args.runs} runs on the shared key at {args.limit} per {args.window:g} s "
          f"(margin {args.margin_ms} ms), ours, then the fixed-window baseline…", flush=True)
    results = {}
    for variant in VARIANTS:  # one after the other: a variant's bursts must not steal the other's CPU
        process = _in_subprocess(variant, args)
        out, _ = process.communicate()
        if process.returncode:
            raise SystemExit(f"limiter bench ({variant}) failed with exit code {process.returncode}")
        results[variant] = json.loads(out.strip().splitlines()[-1])
    ours, base = results["reservation"], results["fixed-window"]
    report = {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "scenario": {"runs": args.runs, "limit": args.limit, "window_s": args.window, "skew_margin_ms": args.margin_ms,
                     "wait_granularity_ms": 1000},
        "ours": {k: v for k, v in ours.items() if k != "starts_epoch_s"},
        "baseline_fixed_window": {k: v for k, v in base.items() if k != "starts_epoch_s"},
        "starts": {"ours": ours["starts_epoch_s"], "baseline_fixed_window": base["starts_epoch_s"]},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    rows = ["max_starts_in_any_window", "achieved_rate_over_cap", "makespan_over_ideal", "dynamodb_calls_per_grant"]
    print(f"{'figure':<28}{'ours':>12}{'fixed window':>14}")
    for row in rows:
        print(f"{row:<28}{ours[row]!s:>12}{base[row]!s:>14}")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
