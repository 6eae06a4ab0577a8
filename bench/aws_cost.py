"""Cost per 1,000 images of what the plugin adds on AWS, counted from real runs on the local stack.

Runs of the sample fox task on the shared key go through the local stack one at a time while bench/probes.py
counts what AWS would bill: state transitions (each execution's history from moto), Lambda invocations and
their GB-seconds (measured duration x the template's memory), DynamoDB request units (the consumed
capacity DynamoDB Local reports), S3, KMS and Secrets Manager requests, API Gateway requests and the log
bytes the functions write. bench/prices.json prices them (us-east-1 list prices, dated) and holds the
OpenAI price of the image, which is the baseline: what the plugin adds is read against what the image costs.

If bench/results/own_key_throughput.json exists, the same counts from that batch (own key under 429
pressure) are priced too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections import Counter
from typing import Any

from bench.common import BENCH_DIR, RESULTS_DIR, Row, document, median, publish, say, update_summary
from bench.probes import (
    SHARED_KEY_AT_BENCH_WINDOW,
    RunPacer,
    StackProbe,
    bench_stack_options,
    billed_transitions,
    execution_histories,
)

NAME = "aws_cost"
SECRET = "bench-aws-cost-secret-long-enough-for-the-authorizer"
PRICES = BENCH_DIR / "prices.json"
GB = 1024**3


def count_runs(runs: int) -> dict[str, Any]:
    """Per-image averages of every billable thing, over ``runs`` sequential runs (after two warm-ups)."""
    from bench.naive import NaiveScript, NaiveTask
    from local_stack.hub_emulator import load_sample_runs
    from local_stack.runner import PluginApi
    from local_stack.stack import LocalStack

    os.environ.pop("OPENAI_API_KEY", None)
    options = bench_stack_options("bench-cost", plugin_secret=SECRET, parameters=SHARED_KEY_AT_BENCH_WINDOW)
    with LocalStack(options) as stack:
        stack.hub.load_samples()
        memory_mb = {spec.logical_id: spec.memory_mb for spec in stack.template.functions().values()}
        api = PluginApi(stack.api_url, SECRET)
        fox = {s.payload["taskId"]: s.payload for s in load_sample_runs(stack.hub.base_url)}["task-fox"]
        with StackProbe(stack) as probe:
            warm_ups = 2  # the steady state, not the first loads
            index = 0
            pacer = RunPacer()
            while index < warm_ups + runs:
                if index == warm_ups:
                    probe.clear()
                    since = time.time()
                pacer.next_run()
                started = time.perf_counter()
                kind = "warm" if index < warm_ups else "run"
                answer = api.run(fox | {"session": f"bench-cost-{kind}-{uuid.uuid4().hex[:10]}"})
                if answer.status_code != 202 and kind == "warm" and warm_ups < 6:
                    # a cold start past the API's timeout on a loaded machine: warm up once more
                    say(f"  warm-up answered {answer.status_code}; once more")
                    warm_ups += 1
                    index += 1
                    continue
                if answer.status_code != 202:
                    raise RuntimeError(f"POST /plugin answered {answer.status_code}: {answer.text[:300]}")
                probe.wait_for_invocation("AttachFunction", since=started, timeout_s=120)
                index += 1
                time.sleep(0.3)  # the execution's last transitions
            invocations = list(probe.invocations)
            calls = list(probe.aws_calls)
            limiter_table = stack.table_name("RateLimitTable")
            log_bytes = probe.log_bytes
            histories = execution_histories(stack, since, name_prefix="bench-cost-run-")
            request = next(r for r in reversed(stack.openai.requests) if r.is_generation and r.status == 200)
            naive = NaiveScript(
                stack.hub.base_url, fox["apiKey"], stack.openai.base_url, "sk-bench-naive-cost"
            )
            task = NaiveTask(
                fox["projectId"],
                fox["taskId"],
                fox["assetId"],
                fox["dataURL"],
                request.prompt,
                request.model,
                request.size,
                request.quality,
            )
            naive_seconds = []
            for _ in range(min(runs, 10)):
                t0 = time.perf_counter()
                naive.run(task)
                naive_seconds.append(time.perf_counter() - t0)
            stored_png = [len(o["Body"].read()) for o in _stored_images(stack)]

    # Only POST /plugin reaches the API function here: the bench waits on the Lambdas, not on GET /sessions.
    per_function = Counter(i.function for i in invocations)
    gb_s = {
        f: sum(i.duration_s for i in invocations if i.function == f) * memory_mb[f] / 1024 / runs
        for f in per_function
    }
    aws = Counter(f"{c.service}.{c.operation}" for c in calls)
    return {
        "runs": runs,
        "execution_statuses": dict(Counter(h["status"] for h in histories)),
        "lambda_invocations": {f: n / runs for f, n in per_function.items()},
        "lambda_gb_s": gb_s,
        "lambda_memory_mb": memory_mb,
        "state_transitions": sum(billed_transitions(h["events"]) for h in histories) / runs,
        "executions": len(histories) / runs,
        "aws_calls": {name: n / runs for name, n in aws.items()},
        # the shared key's queue apart from the run record and the rest of the sessions table
        "dynamodb_calls_by_table": {
            part: sum(1 for c in calls if c.service == "dynamodb" and (limiter_table in c.tables) == limiter)
            / runs
            for part, limiter in (("limiter", True), ("run record and others", False))
        },
        "dynamodb_read_units": sum(c.read_units for c in calls) / runs,
        "dynamodb_write_units": sum(c.write_units for c in calls) / runs,
        "log_bytes": log_bytes / runs,
        "api_requests": 1.0,
        "stored_png_bytes": median(stored_png) if stored_png else None,
        "naive_seconds_p50": median(naive_seconds),
    }


def _stored_images(stack: Any) -> list[dict[str, Any]]:
    s3 = stack.client("s3")
    bucket = stack.table_name("ImagesBucket")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])][:5]
    return [s3.get_object(Bucket=bucket, Key=key) for key in keys]


def price(counts: dict[str, Any], prices: dict[str, Any], openai_latency_s: float | None) -> dict[str, float]:
    """USD per image, by what AWS bills. With ``openai_latency_s``, Generate's billed duration includes the
    time it waits for OpenAI (the emulator answers at once; OpenAI does not)."""
    p = prices["aws_us_east_1"]
    calls = counts["aws_calls"]
    memory = counts.get("lambda_memory_mb", {}).get("GenerateFunction", 512)
    gb_s = sum(counts["lambda_gb_s"].values())
    if openai_latency_s:  # once per image: a 429 answers at once, only the generation itself takes long
        gb_s += openai_latency_s * memory / 1024
    s3_puts = sum(
        v
        for k, v in calls.items()
        if k.startswith("s3.")
        and k.split(".")[1]
        in ("PutObject", "CopyObject", "PostObject", "ListObjectsV2", "CreateMultipartUpload")
    )
    s3_gets = sum(
        v for k, v in calls.items() if k.startswith("s3.") and k.split(".")[1] in ("GetObject", "HeadObject")
    )
    assumptions = prices["assumptions"]
    return {
        "Step Functions state transitions": counts["state_transitions"]
        * p["step_functions_standard_per_state_transition"],
        "Lambda requests": sum(counts["lambda_invocations"].values()) * p["lambda_per_request"],
        "Lambda compute (GB-s)": gb_s * p["lambda_arm64_per_gb_second"],
        "DynamoDB request units": counts["dynamodb_read_units"]
        * p["dynamodb_on_demand_per_read_request_unit"]
        + counts["dynamodb_write_units"] * p["dynamodb_on_demand_per_write_request_unit"],
        "S3 requests": s3_puts * p["s3_standard_per_put_request"]
        + s3_gets * p["s3_standard_per_get_request"],
        f"S3 storage (image kept {assumptions['image_kept_months'] * 30.4:.0f} days)": assumptions[
            "png_bytes"
        ]
        / GB
        * assumptions["image_kept_months"]
        * p["s3_standard_per_gb_month"],
        "KMS requests": sum(v for k, v in calls.items() if k.startswith("kms.")) * p["kms_per_request"],
        "Secrets Manager calls": sum(v for k, v in calls.items() if k.startswith("secretsmanager."))
        * p["secrets_manager_per_api_call"],
        "API Gateway requests": counts["api_requests"] * p["api_gateway_rest_per_request"],
        "CloudWatch Logs ingestion": counts["log_bytes"] / GB * p["cloudwatch_logs_per_gb_ingested"],
        "X-Ray traces (every run traced)": p["xray_per_trace_recorded"],
    }


def naive_floor(counts: dict[str, Any], prices: dict[str, Any]) -> float:
    """One API request and one 512 MB Lambda doing the run in a row (OpenAI's latency included), per image."""
    p = prices["aws_us_east_1"]
    seconds = counts["naive_seconds_p50"] + prices["assumptions"]["openai_latency_s"]
    return (
        p["api_gateway_rest_per_request"]
        + p["lambda_per_request"]
        + seconds * 0.5 * p["lambda_arm64_per_gb_second"]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench aws_cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="5 runs instead of 20")
    parser.add_argument("--runs", type=int, default=None)
    args = parser.parse_args(argv)
    runs = args.runs or (5 if args.quick else 20)
    started = time.monotonic()
    prices = json.loads(PRICES.read_text())
    say(
        f"aws cost: counting what {runs} runs on the shared key bill, priced with bench/prices.json (as of "
        f"{prices['as_of']})…"
    )
    counts = count_runs(runs)
    latency = prices["assumptions"]["openai_latency_s"]
    measured = price(counts, prices, None)
    realistic = price(counts, prices, latency)
    image = prices["openai"]["per_image"]
    rows = [Row(f"{item}", "USD", usd * 1000, None) for item, usd in realistic.items()]
    rows[2].note = (
        f"{sum(counts['lambda_gb_s'].values()):.3f} GB-s measured per image + {latency} s of OpenAI latency "
        f"at Generate's {counts['lambda_memory_mb']['GenerateFunction']} MB"
    )
    total, total_measured = sum(realistic.values()), sum(measured.values())
    rows.append(
        Row(
            "plugin on AWS, total",
            "USD",
            total * 1000,
            image * 1000,
            note=f"baseline: the images themselves ({prices['openai']['model']} "
            f"{prices['openai']['quality']} {prices['openai']['size']}, ${image}/image, uncertain)",
        )
    )
    rows.append(
        Row(
            "plugin on AWS, total, Lambda time as measured locally",
            "USD",
            total_measured * 1000,
            image * 1000,
            note="OpenAI answering at once",
        )
    )
    floor = naive_floor(counts, prices)
    rows.append(
        Row(
            "plugin on AWS vs one synchronous Lambda per image",
            "USD",
            total * 1000,
            floor * 1000,
            note="baseline: one API request + one 512 MB Lambda running the naive script",
        )
    )
    own = _own_key_counts()
    if own is not None:
        own_total = sum(price(own, prices, latency).values())
        rows.append(
            Row(
                "plugin on AWS, own key under 429 pressure (own_key_throughput batch)",
                "USD",
                own_total * 1000,
                total * 1000,
                note="baseline: the shared-key runs above; every 429 is another Generate, Wait and Choice",
            )
        )
    ranked = sorted(realistic.items(), key=lambda item: -item[1])
    findings = [
        f"The plugin adds ${total * 1000:.2f} per 1,000 images on AWS, {total / image:.1%} of what the "
        f"images cost at ${image}/image; the largest parts: "
        + ", ".join(f"{k} ${v * 1000:.3f}" for k, v in ranked[:4])
        + ".",
        (
            f"Per image: {counts['state_transitions']:.1f} state transitions, "
            f"{sum(counts['lambda_invocations'].values()):.0f} Lambda invocations, "
            f"{counts['dynamodb_read_units']:.0f} DynamoDB read units and {counts['dynamodb_write_units']:.0f} "
            f"write units ({sum(v for k, v in counts['aws_calls'].items() if k.startswith('dynamodb.')):.0f} "
            "DynamoDB calls: a step's first write is its read, and each write is one UpdateItem of what changed; "
            f"{counts['dynamodb_calls_by_table']['run record and others']:.1f} on the sessions table, "
            f"{counts['dynamodb_calls_by_table']['limiter']:.1f} on the shared key's queue)."
        ),
        (
            f"The sessions' built-in price for {prices['openai']['model']} {prices['openai']['quality']} "
            f"(dalle_plugin/domain/pricing.py) and this file's agree at ${image}/image (tests/unit/test_pricing.py "
            "keeps them equal; each figure cites its source and date in bench/prices.json)."
        ),
    ]
    if own is not None:
        findings.append(
            f"Under 429 pressure on an own key an image costs {own_total / total:.1f}x the shared-key figure "
            "on AWS: every refused request is a Generate invocation plus Wait and Choice transitions and "
            "run-record writes."
        )
    doc = document(
        NAME,
        "Cost per 1,000 images on AWS",
        method=(
            f"{runs} runs of the sample fox task on the shared key (its queue as deployed, limit 5, the window "
            "scaled to 6 s, runs started 1.4 s apart so none waits; a raised limit would make every run record "
            "carry a larger view of the queue) through the local stack, counted by "
            "bench/probes.py: state transitions from each execution's history (states entered plus Task "
            "retries), Lambda invocations and durations x the template's memory, DynamoDB consumed "
            "capacity, S3/KMS/Secrets Manager requests, one API request per run, CloudWatch log bytes; "
            f"priced with bench/prices.json (us-east-1 list prices as of {prices['as_of']}). Lambda compute "
            f"includes {latency} s of OpenAI latency in Generate (the emulator answers at once; the row "
            "measured locally is shown too). Steady state: the containers are warm, so the secrets read at "
            "a cold start are not counted."
        ),
        baseline=(
            f"The OpenAI price of the images ({prices['openai']['model']}, {prices['openai']['size']}, "
            f"{prices['openai']['quality']}: ${image} per image, {prices['openai']['source']})."
        ),
        rows=rows,
        quick=args.quick,
        findings=findings,
        started=started,
        details={
            "per_image": counts,
            "usd_per_image": realistic,
            "usd_per_image_measured_locally": measured,
            "prices_as_of": prices["as_of"],
            "own_key_per_image": own,
        },
    )
    publish(doc, rows, findings)
    dynamodb_calls = sum(v for k, v in counts["aws_calls"].items() if k.startswith("dynamodb."))
    update_summary(
        {
            "aws_usd_per_1000_images": round(total * 1000, 4),
            "dynamodb_calls_per_image": round(dynamodb_calls, 2),
        },
        quick=args.quick,
    )
    return 0


def _own_key_counts() -> dict[str, Any] | None:
    path = RESULTS_DIR / "own_key_throughput.json"
    if not path.exists():
        return None
    return json.loads(path.read_text()).get("details", {}).get("per_image") or None


if __name__ == "__main__":
    sys.exit(main())
