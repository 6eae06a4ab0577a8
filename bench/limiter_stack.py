"""A backlog on the shared key through the whole local stack (API, state machine, Lambdas, DynamoDB
Local, the OpenAI emulator), at a scaled window; prints the OpenAI emulator's arrival stamps as JSON.

It runs in a process of its own (a local stack owns its process), with the local AWS profile of
``LOCAL_AWS_PROFILE`` (``aws`` by default, ``hostile`` for the unkind one):

    python -m bench.limiter_stack --runs 12 --limit 5 --window 4
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
from typing import Any

SECRET = "bench-limiter-stack-secret-long-enough-for-the-authorizer"


def run_backlog(runs: int, limit: int, window_s: float, margin_ms: int, orgs: int) -> dict[str, Any]:
    from local_stack.hub_emulator import load_sample_runs
    from local_stack.runner import PluginApi
    from local_stack.stack import LocalStack, StackOptions

    options = StackOptions(
        stack_name="bench-queue",
        plugin_secret=SECRET,
        parameters={
            "RateLimit": str(limit),
            "RateWindowSeconds": str(window_s),
            "RateSkewMarginMs": str(margin_ms),
        },
    )
    with LocalStack(options) as stack:
        stack.hub.load_samples()
        api = PluginApi(stack.api_url, SECRET)
        template = load_sample_runs(stack.hub.base_url)[1].payload  # a text-annotation run
        sessions = [f"queue-{i:03d}" for i in range(runs)]
        payloads = [
            template | {"session": s, "orgId": f"org-{i % orgs}", "workflow": True}
            for i, s in enumerate(sessions)
        ]
        answers: dict[str, list[str]] = {s: [] for s in sessions}
        senders = [
            threading.Thread(target=_send_as_the_hub, args=(api, p, answers[p["session"]])) for p in payloads
        ]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        resent = {s: a[:-1] for s, a in answers.items() if len(a) > 1}
        if resent:
            print(f"POSTs the hub would have sent again (after a 5xx): {resent}", file=sys.stderr)
        refused = {s: a for s, a in answers.items() if not a or not a[-1].startswith("202")}
        if refused:
            _print_api_logs(stack)
            raise SystemExit(f"runs not accepted by the API: {refused}")
        deadline = (math.ceil(runs / limit) + 2) * (
            window_s + margin_ms / 1000 + 6
        ) + 600  # a deadline, not a wait
        try:
            statuses = [api.wait_finished(s, timeout_s=deadline)["runs"][0]["status"] for s in sessions]
        except TimeoutError:
            _print_api_logs(stack)
            raise
        return {
            "limit": limit,
            "window_s": window_s,
            "margin_ms": margin_ms,
            "succeeded": statuses.count("SUCCEEDED"),
            "arrivals_epoch_s": stack.openai.generation_starts(),
        }


#: a run's POST and the hub's resends of it after a 5xx (a cold API on a loaded machine can outlast its
#: timeout when a dozen runs arrive at once; a resend is safe, the product promises it)
HUB_SENDS = 3


def _send_as_the_hub(api: Any, payload: dict[str, Any], answers: list[str]) -> None:
    import requests

    for _ in range(HUB_SENDS):
        try:
            answer = api.run(payload)
        except requests.RequestException as error:
            answers.append(repr(error))
            continue
        answers.append(f"{answer.status_code} {answer.text[:300]}")
        if answer.status_code < 500:
            return


def _print_api_logs(stack: Any, lines: int = 60) -> None:
    """The API's log lines on stderr, for a run the API did not take."""
    logs = stack.client("logs")
    group = f"/aws/lambda/{stack.template.physical['ApiFunction']}"
    try:
        events = logs.filter_log_events(logGroupName=group, limit=10_000)["events"]
    except Exception as error:  # noqa: BLE001 - a diagnostic only
        print(f"(no API logs: {error!r})", file=sys.stderr)
        return
    errors = [e for e in events if '"level":"ERROR"' in e["message"] or "Traceback" in e["message"]]
    for event in [*errors[:20], *events[-lines:]]:
        print(event["message"][:800], file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.limiter_stack",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--limit", type=int, default=5)
    parser.add_argument("--window", type=float, default=4.0)
    parser.add_argument("--margin-ms", type=int, default=1500)
    parser.add_argument("--orgs", type=int, default=2)
    args = parser.parse_args(argv)
    result = run_backlog(args.runs, args.limit, args.window, args.margin_ms, args.orgs)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
