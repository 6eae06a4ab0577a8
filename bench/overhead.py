"""Overhead per image: a run end to end on the local stack, against one script doing the same calls.

Ours: POST /plugin (API Gateway stand-in -> API function -> Step Functions -> Extract -> Generate ->
Attach, all real handlers) until the hub emulator receives POST /v2/attachments, one run at a time, with
the global limit raised so no rate wait is added. The OpenAI emulator answers at once.

Baseline: bench/naive.py, one process making the same hub and OpenAI calls in a row against the same
emulators, timed the same way (until the hub receives the attachment).

Every run is also broken down (Lambda, AWS SDK calls, hub calls, OpenAI, Step Functions between steps), so
the figure comes with what dominates it. When the hub emulator answers with Nagle's algorithm on (its
handler without TCP_NODELAY), both variants are measured again with it off, to show what that costs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections import Counter
from typing import Any

from bench.common import Row, document, median, percentile, publish, say
from bench.probes import StackProbe

NAME = "overhead"
SECRET = "bench-overhead-secret-long-enough-for-the-authorizer"
STEPS = ("ExtractFunction", "GenerateFunction", "AttachFunction")


def _ms(seconds: float) -> float:
    return seconds * 1000


class OverheadBench:
    def __init__(self, stack: Any, probe: StackProbe):
        from local_stack.hub_emulator import load_sample_runs
        from local_stack.runner import PluginApi

        self.stack = stack
        self.probe = probe
        self.api = PluginApi(stack.api_url, SECRET)
        self.payload = {s.payload["taskId"]: s.payload for s in load_sample_runs(stack.hub.base_url)}[
            "task-fox"
        ]
        self.naive_task = None

    # ---- ours -----------------------------------------------------------------------------------

    def pipeline_run(self) -> dict[str, Any]:
        probe = self.probe
        probe.clear()
        payload = self.payload | {"session": f"bench-overhead-{uuid.uuid4().hex[:10]}"}
        started = time.perf_counter()
        answer = self.api.run(payload)
        answered = time.perf_counter()
        if answer.status_code != 202:
            raise RuntimeError(f"POST /plugin answered {answer.status_code}: {answer.text[:300]}")
        attached = probe.wait_for_hub("POST", "/v2/attachments", since=started)[0].at
        finished = probe.wait_for_invocation("AttachFunction", since=started).ended
        with probe._changed:
            invocations = [i for i in probe.invocations if i.started >= started]
            calls = [c for c in probe.aws_calls if c.started >= started]
            spans = [s for s in probe.spans if s.started >= started]
            log_bytes = probe.log_bytes
        steps = {i.function: i for i in invocations if i.function in STEPS}
        api = next(i for i in invocations if i.function == "ApiFunction")
        start_execution = next(c for c in calls if c.operation == "StartExecution")
        extract, generate, attach = (steps[f] for f in STEPS)
        lambda_window = [
            (extract.started, extract.ended),
            (generate.started, generate.ended),
            (attach.started, attached),
        ]

        def inside(t: float) -> bool:
            return any(a <= t <= b for a, b in lambda_window)

        aws_ms = _ms(sum(c.ended - c.started for c in calls if inside(c.started)))
        hub_ms = _ms(sum(s.ended - s.started for s in spans if s.kind == "hub" and inside(s.started)))
        openai_ms = _ms(sum(s.ended - s.started for s in spans if s.kind == "openai"))
        in_lambdas = _ms(sum(b - a for a, b in lambda_window))
        if self.naive_task is None:
            self.naive_task = self._naive_task_from_emulator()
        return {
            "end_to_end_ms": _ms(attached - started),
            "to_run_finished_ms": _ms(finished - started),
            "api_answer_ms": _ms(answered - started),
            "breakdown_ms": {
                "api_until_execution_started": _ms(start_execution.ended - started),
                "step_functions_start_to_first_step": _ms(extract.started - start_execution.ended),
                "step_functions_between_steps": _ms(
                    (generate.started - extract.ended) + (attach.started - generate.ended)
                ),
                "aws_sdk_calls_in_steps": aws_ms,
                "hub_calls_in_steps": hub_ms,
                "openai_request": openai_ms,
                "python_in_steps": max(0.0, in_lambdas - aws_ms - hub_ms - openai_ms),
            },
            "lambda_ms": {f: _ms(i.duration_s) for f, i in steps.items()}
            | {"ApiFunction": _ms(api.duration_s)},
            "aws_calls": dict(Counter(f"{c.service}.{c.operation}" for c in calls)),
            "hub_calls": sum(1 for s in spans if s.kind == "hub"),
            "dynamodb_read_units": sum(c.read_units for c in calls),
            "dynamodb_write_units": sum(c.write_units for c in calls),
            "log_bytes": log_bytes,
        }

    def _naive_task_from_emulator(self) -> Any:
        from bench.naive import NaiveTask

        request = next(r for r in reversed(self.stack.openai.requests) if r.is_generation and r.status == 200)
        return NaiveTask(
            project_id=self.payload["projectId"],
            task_id=self.payload["taskId"],
            asset_id=self.payload["assetId"],
            data_url=self.payload["dataURL"],
            prompt=request.prompt,
            model=request.model,
            size=request.size,
            quality=request.quality,
        )

    # ---- baseline -------------------------------------------------------------------------------

    def naive_run(self, script: Any) -> dict[str, Any]:
        self.probe.clear()
        started = time.perf_counter()
        timings = script.run(self.naive_task)
        attached = self.probe.wait_for_hub("POST", "/v2/attachments", since=started)[0].at
        finished = time.perf_counter()
        return {
            "end_to_end_ms": _ms(attached - started),
            "to_run_finished_ms": _ms(finished - started),
            "hub_calls": timings["hub_calls"],
            "breakdown_ms": {
                "hub_calls": _ms(timings["hub"]),
                "openai_request": _ms(timings["openai"]),
                "python": _ms(finished - started - timings["hub"] - timings["openai"]),
            },
        }

    def measure(self, runs: int, nagle_settings: tuple[bool, ...]) -> list[dict[str, Any]]:
        """``runs`` of ours and of the baseline under each hub-emulator Nagle setting, all interleaved, so a
        change in the machine's load hits every variant alike."""
        from bench.naive import NaiveScript

        script = NaiveScript(
            self.stack.hub.base_url,
            self.payload["apiKey"],
            self.stack.openai.base_url,
            "sk-bench-naive-script-key",
        )
        results = [{"ours": [], "naive": []} for _ in nagle_settings]
        try:
            for _ in range(runs):
                for setting, result in zip(nagle_settings, results, strict=True):
                    # applies to connections accepted from now on; each run opens its own
                    _set_nagle(self.stack, setting)
                    result["ours"].append(self.pipeline_run())
                    result["naive"].append(self.naive_run(script))
        finally:
            _set_nagle(self.stack, nagle_settings[0])
        return results


def _stats(samples: list[dict[str, Any]], key: str) -> dict[str, float]:
    values = [s[key] for s in samples]
    return {"p50": median(values), "p95": percentile(values, 95), "min": min(values), "max": max(values)}


def _breakdown(samples: list[dict[str, Any]]) -> dict[str, float]:
    return {part: median(s["breakdown_ms"][part] for s in samples) for part in samples[0]["breakdown_ms"]}


def _nagle_is_on() -> bool:
    from local_stack.hub_emulator import _HubRequestHandler

    return not getattr(_HubRequestHandler, "disable_nagle_algorithm", False)


def _set_nagle(stack: Any, on: bool) -> None:
    stack.hub.set_nagle(on)  # in the hub emulator's own process


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench overhead",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="5 runs per variant instead of 30")
    parser.add_argument("--runs", type=int, default=None)
    args = parser.parse_args(argv)
    runs = args.runs or (5 if args.quick else 30)
    started = time.monotonic()
    from local_stack.stack import LocalStack, StackOptions

    os.environ.pop("OPENAI_API_KEY", None)
    options = StackOptions(
        stack_name="bench-overhead", plugin_secret=SECRET, parameters={"RateLimit": "1000"}
    )
    shipped_nagle = _nagle_is_on()
    with LocalStack(options) as stack:
        stack.hub.load_samples()
        with StackProbe(stack) as probe:
            bench = OverheadBench(stack, probe)
            load_before = os.getloadavg()[0]
            first = bench.pipeline_run()  # the in-process Lambdas' first loads, reported apart
            bench.pipeline_run()
            say(
                f"overhead: {runs} runs of the pipeline and of the naive script, interleaved (first run "
                f"after start-up: {first['end_to_end_ms']:.0f} ms, not counted)"
            )
            say(
                f"  each also with Nagle's algorithm {'off' if shipped_nagle else 'on'} in the hub emulator "
                f"(as shipped: {'on' if shipped_nagle else 'off'}), interleaved"
            )
            shipped, toggled = bench.measure(runs, (shipped_nagle, not shipped_nagle))
            load_after = os.getloadavg()[0]

    ours, naive = shipped["ours"], shipped["naive"]
    e2e, base = _stats(ours, "end_to_end_ms"), _stats(naive, "end_to_end_ms")
    rows = [
        Row("end to end, p50 (POST /plugin to attachment at the hub)", "ms", e2e["p50"], base["p50"]),
        Row("end to end, p95", "ms", e2e["p95"], base["p95"]),
        Row(
            "to the run's end (task submitted, run recorded), p50",
            "ms",
            median(s["to_run_finished_ms"] for s in ours),
            median(s["to_run_finished_ms"] for s in naive),
        ),
        Row("POST /plugin answered (202), p50", "ms", median(s["api_answer_ms"] for s in ours), None),
        Row(
            "hub calls per run",
            "",
            median(s["hub_calls"] for s in ours),
            median(s["hub_calls"] for s in naive),
            note="ours adds the progress lines (POST /v2/pluginLog) and re-reads the task before submitting",
        ),
    ]
    breakdown = _breakdown(ours)
    naive_breakdown = _breakdown(naive)
    for part, value in breakdown.items():
        base_value = {
            "hub_calls_in_steps": naive_breakdown["hub_calls"],
            "openai_request": naive_breakdown["openai_request"],
        }.get(part)
        rows.append(Row(f"  of which {part.replace('_', ' ')}, p50", "ms", value, base_value))
    added = e2e["p50"] - base["p50"]
    rows.insert(
        2,
        Row(
            "added per image (ours - baseline), p50",
            "ms",
            added,
            None,
            note=f"{added / 200:.1f}% of a 20 s gpt-image-2 generation",
        ),
    )
    findings = []

    def where(parts: dict[str, float]) -> str:
        ranked = sorted(parts.items(), key=lambda item: -item[1])
        return ", ".join(f"{k.replace('_', ' ')} {v:.0f}" for k, v in ranked)

    nodelay_parts = _breakdown(toggled["ours"]) if shipped_nagle else breakdown
    nagle_parts = breakdown if shipped_nagle else _breakdown(toggled["ours"])
    findings.append(
        f"Where a run's time goes (median ms), hub emulator with TCP_NODELAY: {where(nodelay_parts)}. With "
        f"Nagle's algorithm on: {where(nagle_parts)}."
    )
    aws = Counter()
    for sample in ours:
        aws.update(sample["aws_calls"])
    per_run = {name: count / len(ours) for name, count in aws.most_common()}
    findings.append(
        f"Step Functions on the local stack: {nodelay_parts['step_functions_start_to_first_step']:.0f} ms "
        "from StartExecution to the first Lambda (moto's execution thread and the Map state), then "
        f"{nodelay_parts['step_functions_between_steps'] / 2:.0f} ms per transition between steps (moto's "
        "ASL interpreter builds a new boto3 Lambda client for every Task, about 5 ms). Nothing to fix in "
        "the product; on AWS a transition takes tens of milliseconds too."
    )
    findings.append(
        "AWS calls per run: " + ", ".join(f"{name} {count:g}" for name, count in per_run.items()) + "."
    )
    record_calls = per_run.get("dynamodb.GetItem", 0) + per_run.get("dynamodb.PutItem", 0)
    findings.append(
        f"Product: {record_calls:.0f} of the {sum(per_run.values()):.0f} AWS calls are the run record's "
        "read-modify-write (DynamoRunStore.update: a consistent GetItem, then a conditional PutItem of the "
        "whole item), once per timeline entry and per field set. Fewer, larger updates per step (one per "
        "step instead of one per progress line), or UpdateItem with SET/list_append under the version "
        "condition (no read first), would remove most of the AWS SDK time above and the read units; write "
        "units stay (DynamoDB bills an update by the whole item's size)."
    )
    details: dict[str, Any] = {
        "runs": runs,
        "first_run_after_start_ms": first["end_to_end_ms"],
        "hub_emulator_nagle_on": shipped_nagle,
        "ours": {"end_to_end": e2e, "breakdown_p50_ms": breakdown},
        "baseline": {"end_to_end": base, "breakdown_p50_ms": naive_breakdown},
        "aws_calls_per_run": per_run,
        "dynamodb_units_per_run": {
            "read": median(s["dynamodb_read_units"] for s in ours),
            "write": median(s["dynamodb_write_units"] for s in ours),
        },
        "lambda_ms_p50": {f: median(s["lambda_ms"][f] for s in ours) for f in ours[0]["lambda_ms"]},
        "load_average_1m": {"before": load_before, "after": load_after},
        "samples": {
            "ours_end_to_end_ms": [s["end_to_end_ms"] for s in ours],
            "baseline_end_to_end_ms": [s["end_to_end_ms"] for s in naive],
        },
    }
    other = _stats(toggled["ours"], "end_to_end_ms")
    other_base = _stats(toggled["naive"], "end_to_end_ms")
    label = "without TCP_NODELAY (Nagle on)" if not shipped_nagle else "with TCP_NODELAY (Nagle off)"
    rows.append(Row(f"end to end p50, hub emulator {label}", "ms", other["p50"], other_base["p50"]))
    rows.append(Row(f"end to end p95, hub emulator {label}", "ms", other["p95"], other_base["p95"]))
    with_nagle, without = (e2e, other) if shipped_nagle else (other, e2e)
    hub_with = (breakdown if shipped_nagle else _breakdown(toggled["ours"]))["hub_calls_in_steps"]
    hub_without = (_breakdown(toggled["ours"]) if shipped_nagle else breakdown)["hub_calls_in_steps"]
    state = "ships with Nagle's algorithm on" if shipped_nagle else "now sets TCP_NODELAY"
    findings.append(
        f"Local-stack artefact: the hub emulator {state}. With Nagle on, its handler's two sends (headers, "
        "then body) wait for the client's delayed ACK, about 40 ms per hub call: hub calls take "
        f"{hub_with:.0f} ms of a run with Nagle on and {hub_without:.0f} ms with TCP_NODELAY, and a run "
        f"reaches the attachment {with_nagle['p50'] - without['p50']:.0f} ms sooner (p50 "
        f"{with_nagle['p50']:.0f} -> {without['p50']:.0f} ms). "
        + (
            "The fix is _HubRequestHandler.disable_nagle_algorithm = True in local_stack/hub_emulator.py, "
            "as the OpenAI emulator already has. "
            if shipped_nagle
            else "Fixed: local_stack/hub_emulator.py sets _HubRequestHandler.disable_nagle_algorithm = "
            "True, as the OpenAI emulator already did. "
        )
        + "It says nothing about the product on AWS, but it made every local run, test and benchmark slower."
    )
    details["other_nagle_setting"] = {
        "hub_emulator_nagle_on": not shipped_nagle,
        "ours": {"end_to_end": other, "breakdown_p50_ms": _breakdown(toggled["ours"])},
        "baseline": {"end_to_end": other_base, "breakdown_p50_ms": _breakdown(toggled["naive"])},
    }
    doc = document(
        NAME,
        "Overhead per image",
        method=(
            f"{runs} runs of the sample fox task (workflow, entity prompt, shared key with the global limit "
            "raised to 1000) through the local stack one at a time, alternated with the baseline; the time "
            "is from POST /plugin to the hub emulator receiving POST /v2/attachments. The OpenAI emulator "
            "answers at once, so the figure is the pipeline's own cost. Everything runs in one process on 2 "
            "cores, so the absolute numbers are the local stack's, not AWS's."
        ),
        baseline="One Python process (bench/naive.py) making the same hub and OpenAI calls in a row against "
        "the same emulators: get task, fetch text, generate, upload, look up the asset, attach, "
        "submit.",
        rows=rows,
        quick=args.quick,
        findings=findings,
        details=details,
        started=started,
    )
    publish(doc, rows, findings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
