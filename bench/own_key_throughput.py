"""Throughput on the user's own OpenAI key, against an enforced per-key rate limit.

The OpenAI emulator enforces a sliding-window cap per key (scaled down: by default 3 requests in any 15 s,
a cap the local stack outruns even on a loaded 2-core machine, so the backlog is always bigger than the cap)
and answers 429 above it, with exact retry-after / retry-after-ms / x-ratelimit-reset-requests headers, and
``x-ratelimit-limit-requests`` on every answer.

Ours: one batch request (POST /plugin with ``tasks``) of N tasks whose Config JSON carries an own key,
through the real state machine (Map, MapMaxConcurrency from the template), with own-key pacing on
(``OWN_KEY_PACING=on``, the window the emulator's cap is per, ``OWN_KEY_WINDOW_SECONDS``): each send is
claimed on the key's pacing item right before it leaves, at most the learned limit per window.

Baseline, in the same run: the same batch on a stack of its own with pacing off (``OWN_KEY_PACING=off``,
the behaviour before pacing): a run sends at once and a 429 makes Generate return WAIT with OpenAI's retry
time, the Wait state sleeping until then, rounded up to the whole second. The two phases run one after the
other (each its own local stack, in a process of its own), so neither steals the other's CPU.

Figures, from the emulator's own request log: achieved rate over the cap (1.0 = every slot used), the share
of image requests refused with 429, tasks that got no image, and the makespan against the ideal one. The
issue's keys (``own_key_rate_over_cap``, ``own_key_429_share``, ``own_key_tasks_lost`` and each
``_baseline``) are merged into bench/results/summary.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from typing import Any

from bench.common import PROJECT_ROOT, RESULTS_DIR, Row, document, publish, say
from bench.probes import StackProbe, billed_transitions, execution_histories

NAME = "own_key_throughput"
SECRET = "bench-own-key-secret-long-enough-for-the-authorizer"
OWN_KEY = "sk-own-bench-pipeline-0001"


def rate_figures(
    ok_starts: list[float], limit: int, window_s: float, requests: int, refused: int
) -> dict[str, Any]:
    """Achieved rate over the cap: past the first window's burst of ``limit``, how fast successful requests
    came compared with the cap's limit / window (1.0 = every slot used the moment it freed)."""
    ordered = sorted(ok_starts)
    n = len(ordered)
    span = ordered[-1] - ordered[0] if n > 1 else 0.0
    beyond_first = n - min(n, limit)
    ideal = (math.ceil(n / limit) - 1) * window_s if n else 0.0
    # how long after a send its slot was used again (the window when every slot is reused at once)
    reuse = sorted(ordered[i] - ordered[i - limit] for i in range(limit, n))
    return {
        "slot_reuse_s_p50": reuse[len(reuse) // 2] if reuse else None,
        "slot_reuse_s_p90": reuse[int(len(reuse) * 0.9)] if reuse else None,
        "slot_reuse_s_max": reuse[-1] if reuse else None,
        "succeeded": n,
        "requests": requests,
        "refused_429": refused,
        "share_429": refused / requests if requests else None,
        "achieved_rate_over_cap": (beyond_first / span) / (limit / window_s)
        if span and beyond_first
        else None,
        "makespan_s": span,
        "ideal_makespan_s": ideal,
        "makespan_over_ideal": span / ideal if ideal else None,
    }


# ---- ours ----------------------------------------------------------------------------------------


def _batch_payload(stack: Any, tasks: int, key: str = OWN_KEY, prefix: str = "bench-own") -> dict[str, Any]:
    from local_stack.hub_emulator import load_sample_runs

    fox = {s.payload["taskId"]: s.payload for s in load_sample_runs(stack.hub.base_url)}["task-fox"]
    answer = stack.hub.task("task-fox")["answer"]
    task_ids = [f"{prefix}-{i:04d}" for i in range(tasks)]
    for task_id in task_ids:
        stack.hub.add_task(fox["projectId"], task_id, fox["assetId"], answer)
    config = json.loads(fox["configJSON"]) | {"openai_api_key": key}
    payload = {k: v for k, v in fox.items() if k not in ("taskId", "assetId", "dataURL")}
    return payload | {
        "session": f"{prefix}-batch-{uuid.uuid4().hex[:8]}",
        "configJSON": json.dumps(config),
        "tasks": [{"taskId": t, "assetId": fox["assetId"]} for t in task_ids],
    }


def _warm_up(stack: Any, api: Any, map_concurrency: int) -> None:
    """A batch of Map-concurrency tasks on another key (no cap yet), so the measured batch finds as many
    warm execution environments of each function as it runs at once. Without it, the measured batch's
    first minute is the local stack's cold starts: ten environments of each function starting together on
    a shared 2-core machine, which on AWS start in parallel in about a second each."""
    payload = _batch_payload(stack, map_concurrency, key="sk-own-bench-warm-up-0001", prefix="bench-own-warm")
    answer = api.run(payload)
    if answer.status_code != 202:
        raise RuntimeError(f"POST /plugin answered {answer.status_code}: {answer.text[:300]}")
    api.wait_finished(payload["session"], timeout_s=300)


def _wait_for_executions(stack: Any, since_epoch: float, timeout_s: float) -> None:
    """Until every execution started since ``since_epoch`` has ended (cheaper than polling the session)."""
    sfn = stack.client("stepfunctions")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        executions = [
            e
            for e in sfn.list_executions(stateMachineArn=stack.state_machine_arn)["executions"]
            if e["startDate"].timestamp() + 1 >= since_epoch and e["name"].startswith("bench-own-batch-")
        ]
        if executions and all(e["status"] != "RUNNING" for e in executions):
            return
        time.sleep(1.0)
    raise TimeoutError(f"the batch did not finish within {timeout_s:.0f} s")


# ---- one phase: a stack of its own, pacing on or off ---------------------------------------------


def run_phase(pacing: str, tasks: int, limit: int, window_s: float, margin_ms: int) -> dict[str, Any]:
    """The batch through a local stack whose Generate paces own keys (``on``) or does not (``off``)."""
    from local_stack.openai_emulator import key_fingerprint
    from local_stack.runner import PluginApi
    from local_stack.stack import LocalStack, StackOptions

    os.environ.pop("OPENAI_API_KEY", None)
    environment = {
        "OWN_KEY_PACING": pacing,
        "OWN_KEY_WINDOW_SECONDS": f"{window_s:g}",
        "OWN_KEY_PACE_MARGIN_MS": str(margin_ms),
    }
    options = StackOptions(
        stack_name=f"bench-own-key-{pacing}",
        plugin_secret=SECRET,
        parameters={"RateLimit": "1000"},
        environment=environment,
    )
    with LocalStack(options) as stack:
        stack.hub.load_samples()
        map_concurrency = int(stack.template.parameters.get("MapMaxConcurrency", 10))
        api = PluginApi(stack.api_url, SECRET, timeout_s=120)
        _warm_up(stack, api, map_concurrency)
        payload = _batch_payload(stack, tasks)
        stack.openai.reset()
        stack.openai.set_rate_cap(limit, window_s)
        say(
            f"pacing {pacing}: {tasks} tasks in one batch (Map concurrency {map_concurrency}) against a cap "
            f"of {limit} requests per {window_s:g} s…"
        )
        with StackProbe(stack) as probe:
            wall_before = time.monotonic()
            since_epoch = time.time()
            answer = api.run(payload)
            if answer.status_code != 202:
                raise RuntimeError(f"POST /plugin answered {answer.status_code}: {answer.text[:300]}")
            deadline_s = max(180.0, 4 * tasks / limit * window_s + 120)
            progress = threading.Event()

            def report() -> None:
                while not progress.wait(15):
                    done = sum(1 for r in stack.openai.requests if r.is_generation and r.status == 200)
                    say(f"  … {done} images so far ({time.monotonic() - wall_before:.0f} s)")

            threading.Thread(target=report, daemon=True).start()
            try:
                _wait_for_executions(stack, since_epoch, deadline_s)
            finally:
                progress.set()
            view = api.session(payload["session"])
            wall = time.monotonic() - wall_before
            log = stack.openai.requests
            histories = execution_histories(stack, since_epoch, name_prefix="bench-own-batch-")
            invocations = list(probe.invocations)
            aws_calls = list(probe.aws_calls)
            log_bytes = probe.log_bytes
            waits = [w for w in stack.step_functions.waits if w.execution.startswith("bench-own-batch-")]
            epoch_minus_perf = time.time() - time.perf_counter()

    mine = [r for r in log if r.is_generation and r.key_fingerprint == key_fingerprint(OWN_KEY)]
    figures = rate_figures(
        [r.started_at for r in mine if r.status == 200],
        limit,
        window_s,
        len(mine),
        sum(1 for r in mine if r.status == 429),
    )
    statuses = Counter(run["status"] for run in view["runs"])
    reasons = Counter(
        (run.get("failure") or {}).get("reason") for run in view["runs"] if run["status"] == "FAILED"
    )
    delivered = statuses.get("SUCCEEDED", 0)
    images = max(1, figures["succeeded"])
    transitions = sum(billed_transitions(h["events"]) for h in histories)
    per_image = {
        "state_transitions": transitions / images,
        "lambda_invocations": {f: n / images for f, n in Counter(i.function for i in invocations).items()},
        "lambda_gb_s": {
            f: sum(i.duration_s for i in invocations if i.function == f) * 0.5 / images
            for f in {i.function for i in invocations}
        },
        "aws_calls": {
            name: n / images for name, n in Counter(f"{c.service}.{c.operation}" for c in aws_calls).items()
        },
        "dynamodb_read_units": sum(c.read_units for c in aws_calls) / images,
        "dynamodb_write_units": sum(c.write_units for c in aws_calls) / images,
        "log_bytes": log_bytes / images,
        "api_requests": 1 / images,
    }
    return figures | {
        "pacing": pacing,
        "tasks_lost": tasks - delivered,
        "task_statuses": dict(statuses),
        "failure_reasons": {str(k): v for k, v in reasons.items()},
        "generate_invocations_per_image": sum(1 for i in invocations if i.function == "GenerateFunction")
        / images,
        "wall_s": wall,
        "map_max_concurrency": map_concurrency,
        "per_image": per_image,
        "timeline": _timeline(mine, waits, invocations, epoch_minus_perf),
    }


def _timeline(mine: list[Any], waits: list[Any], invocations: list[Any], epoch_minus_perf: float) -> dict:
    """Seconds from the first image request: each request (status), each Wait's target and wake, each
    Generate invocation: where an idle slot's time went."""
    if not mine:
        return {}
    zero = min(r.started_at for r in mine)
    return {
        "requests": [
            [round(r.started_at - zero, 3), r.status] for r in sorted(mine, key=lambda r: r.started_at)
        ],
        "waits": [[round(w.target - zero, 3), round(w.woke - zero, 3), w.execution[-12:]] for w in waits],
        "generate": [
            [round(i.started + epoch_minus_perf - zero, 3), round(i.ended + epoch_minus_perf - zero, 3)]
            for i in invocations
            if i.function == "GenerateFunction"
        ],
    }


def _run_phase_in_a_process(pacing: str, tasks: int, limit: int, window_s: float, margin_ms: int) -> dict:
    spec = {"pacing": pacing, "tasks": tasks, "limit": limit, "window_s": window_s, "margin_ms": margin_ms}
    done = subprocess.run(
        [sys.executable, "-m", "bench.own_key_throughput", "--phase", json.dumps(spec)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=PROJECT_ROOT,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


SUMMARY_KEYS = {
    "own_key_rate_over_cap": "achieved_rate_over_cap",
    "own_key_429_share": "share_429",
    "own_key_tasks_lost": "tasks_lost",
}


def write_summary(ours: dict[str, Any], base: dict[str, Any]) -> None:
    """The issue's keys, merged into bench/results/summary.json (other benchmarks write theirs too)."""
    path = RESULTS_DIR / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    for key, figure in SUMMARY_KEYS.items():
        summary[key] = _round(ours[figure])
        summary[f"{key}_baseline"] = _round(base[figure])
    path.write_text(json.dumps(dict(sorted(summary.items())), indent=2) + "\n")


def summary_finding(ours: dict[str, Any], base: dict[str, Any]) -> str:
    """The issue's figures as bench/results/summary.json holds them, each beside its baseline."""
    shown = ", ".join(
        f"{key} {_round(ours[figure])} (baseline {_round(base[figure])})"
        for key, figure in SUMMARY_KEYS.items()
    )
    return f"In bench/results/summary.json: {shown}; the issue asks for at least 0.95, at most 0.05 and 0."


def own_key_findings(
    ours: dict[str, Any], base: dict[str, Any], window_s: float, margin_ms: int
) -> list[str]:
    """What the figures say: the baseline's failure, ours, where the rest of the cap goes, and why the
    measure is fair."""
    spacing_s = window_s + margin_ms / 1000
    reuse = (ours["slot_reuse_s_p50"], ours["slot_reuse_s_p90"], ours["slot_reuse_s_max"])
    return [
        (
            f"Pacing off (the behaviour before): {base['share_429'] or 0:.0%} of image requests refused with "
            f"429 and {base['achieved_rate_over_cap'] or 0:.2f} of the cap reached: each refused task waits "
            "OpenAI's retry time rounded up to the whole second, so waiting tasks wake together and all but "
            "the first few are refused again."
        ),
        (
            f"Pacing on: {ours['share_429'] or 0:.1%} refused and {ours['achieved_rate_over_cap'] or 0:.3f} of "
            "the cap reached. Each send is claimed on the key's pacing item (one conditional write) right "
            "before it leaves, at most the limit OpenAI states in x-ratelimit-limit-requests per window; a "
            "served send is then dated by when it reached OpenAI at the latest (its answer less "
            "openai-processing-ms), its slot freeing one window plus a "
            f"{margin_ms} ms margin after that (the margin alone costs {margin_ms / (spacing_s * 1000):.1%} of "
            "the cap); a 429 met within the stated limit widens the key's margin by how early the send came."
        ),
        (
            "Where the rest of the cap goes: a slot is reused a median "
            + (f"{reuse[0]:.2f} s, a p90 {reuse[1]:.2f} s and at most {reuse[2]:.2f} s" if reuse[0] else "-")
            + f" after its send (a window and the margin: {spacing_s:.2f} s): what passes the margin is the "
            "answer's way back to the loaded sender (a send is dated when its answer is in hand, so it errs "
            "late, never early) and runs that were not back from their Wait state when the slot freed; and "
            "the first window's second and later sends wait for the probe's answer, which teaches the limit."
        ),
        (
            "The measure is fair: successful requests past the first window's `limit`, over the time from "
            "the first successful send to the last, so neither the ramp-up before the first send nor a tail "
            "after the backlog empties is in it (with a batch a multiple of the limit, pacing that reuses "
            "every slot the moment it frees scores exactly 1.0). What was not fair was the batch: its first "
            "minute was the local stack starting ten cold execution environments of each function at once "
            "on a shared 2-core machine (on AWS they start in parallel, about a second each), so no run was "
            "at the key when the first slots freed; each phase now first runs a Map-concurrency batch on "
            "another key, and the measured batch finds warm environments."
        ),
    ]


def _round(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench own_key_throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="24 tasks instead of 60")
    parser.add_argument("--tasks", type=int, default=None)
    parser.add_argument("--limit", type=int, default=3, help="requests allowed per window, per key")
    parser.add_argument("--window", type=float, default=15.0, help="the cap's sliding window, seconds")
    parser.add_argument(
        "--margin-ms",
        type=int,
        default=150,
        help="the pacing margin: twice the aws profile's clock offsets and some (sends are dated by their "
        "arrival at OpenAI, so the margin no longer covers the sender's delay; deployed default: 1000 ms)",
    )
    parser.add_argument("--phase", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        print(json.dumps(run_phase(**json.loads(args.phase))), flush=True)
        return 0
    tasks = args.tasks or (24 if args.quick else 60)
    started = time.monotonic()
    base = _run_phase_in_a_process("off", tasks, args.limit, args.window, args.margin_ms)
    ours = _run_phase_in_a_process("on", tasks, args.limit, args.window, args.margin_ms)
    map_concurrency = ours["map_max_concurrency"]
    rows = [
        Row(
            "achieved rate over the cap",
            "",
            ours["achieved_rate_over_cap"],
            base["achieved_rate_over_cap"],
            note="1.0 = every slot used as soon as it freed (successful requests past the first window)",
        ),
        Row("share of image requests refused with 429", "", ours["share_429"], base["share_429"]),
        Row(
            "image requests sent per image",
            "",
            ours["requests"] / max(1, ours["succeeded"]),
            base["requests"] / max(1, base["succeeded"]),
        ),
        Row(
            f"tasks that got no image (of {tasks})",
            "",
            ours["tasks_lost"],
            base["tasks_lost"],
            note="ours: "
            + (", ".join(f"{r} {n}" for r, n in ours["failure_reasons"].items()) or "none")
            + "; baseline: "
            + (", ".join(f"{r} {n}" for r, n in base["failure_reasons"].items()) or "none"),
        ),
        Row(
            "makespan over the ideal",
            "",
            ours["makespan_over_ideal"],
            base["makespan_over_ideal"],
            note=f"ideal: {ours['ideal_makespan_s']:.0f} s for {ours['succeeded']} images at the cap",
        ),
        Row(
            "Generate invocations per image",
            "",
            ours["generate_invocations_per_image"],
            base["generate_invocations_per_image"],
        ),
    ]
    findings = own_key_findings(ours, base, args.window, args.margin_ms)
    findings.append(summary_finding(ours, base))
    details = {
        "tasks": tasks,
        "cap": {"limit": args.limit, "window_s": args.window},
        "margin_ms": args.margin_ms,
        "map_max_concurrency": map_concurrency,
        "ours": {k: v for k, v in ours.items() if k not in ("per_image", "timeline")},
        "baseline": {k: v for k, v in base.items() if k not in ("per_image", "timeline")},
        "per_image": ours["per_image"],
        "per_image_baseline": base["per_image"],
        "wait_granularity_s": 1,
    }
    doc = document(
        NAME,
        "Throughput on an own OpenAI key",
        method=(
            f"One batch of {tasks} tasks with an own key through the local stack's state machine (Map "
            f"concurrency {map_concurrency}), the OpenAI emulator capping each key at {args.limit} image "
            f"requests in any {args.window:g} s window (a scaled per-minute limit) and answering 429 with "
            "exact retry headers above it; own-key pacing on, its window set to the emulator's. Rates come "
            "from the emulator's request log (arrival times, status)."
        ),
        baseline=(
            "The same batch on a stack of its own with own-key pacing off (OWN_KEY_PACING=off: send at "
            "once, wait out each 429), in the same run, just before."
        ),
        rows=rows,
        quick=args.quick,
        findings=findings,
        details=details,
        started=started,
    )
    publish(doc, rows, findings)
    if not args.quick:
        write_summary(ours, base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
