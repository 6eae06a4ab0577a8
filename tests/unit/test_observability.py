"""What the handlers record: metrics (EMF lines), the run's ids on every log line, and errors logged with
them. The dashboard and alarms in template.yaml must name metrics the code really publishes."""

from __future__ import annotations

import json
import re
import threading
import warnings

import pytest
from dalle_plugin.domain.errors import HubUnavailable, PromptNotFound
from dalle_plugin.domain.pricing import DEFAULT_PRICES
from dalle_plugin.domain.run import ImageInfo, ModelInfo, RunRecord, RunRef, TimelineEntry
from dalle_plugin.domain.step_io.generate import GenerateOutcome

from local_stack.template import load_template

GLOBAL_ENV = load_template()["Globals"]["Function"]["Environment"]["Variables"]


@pytest.fixture
def obs(monkeypatch):
    # Powertools reads these when the module is first imported: give it what the template gives Lambda.
    for name in ("POWERTOOLS_SERVICE_NAME", "POWERTOOLS_METRICS_NAMESPACE"):
        monkeypatch.setenv(name, GLOBAL_ENV[name])
    monkeypatch.setenv("POWERTOOLS_TRACE_DISABLED", "true")
    from dalle_plugin import observability

    observability.metrics.clear_metrics()
    yield observability
    observability.metrics.clear_metrics()
    observability.clear_run()


def _run(timeline: list[TimelineEntry], uses_default_key: bool = True, image: bool = True) -> RunRecord:
    return RunRecord(
        session="sess-1",
        task_id="task-1",
        execution_name="exec-1",
        project_id="proj-1",
        prompt_source="entity-annotation",
        model=ModelInfo(requested="dall-e-2", actual="gpt-image-2"),
        size="1536x1024",
        quality="high",
        max_prompt_chars=32000,
        uses_default_key=uses_default_key,
        created_at_ms=1_000,
        updated_at_ms=20_000,
        timeline=timeline,
        image=ImageInfo(
            key="images/exec-1.png",
            sha256="ab",
            bytes=10,
            model="gpt-image-2",
            size="1536x1024",
            quality="high",
        )
        if image
        else None,
    )


# queued at 1 s, two waits for a slot (4 s and 2.5 s), generation from 10 s to 11.5 s
TIMELINE = [
    TimelineEntry(step="queued", status="QUEUED", at_ms=1_000, duration_ms=500),
    TimelineEntry(step="extract", status="EXTRACTING", at_ms=1_500, duration_ms=2_000),
    TimelineEntry(step="wait", status="WAITING_FOR_SLOT", at_ms=3_500, duration_ms=4_000),
    TimelineEntry(step="wait", status="WAITING_FOR_SLOT", at_ms=7_500, duration_ms=2_500),
    TimelineEntry(step="generate", status="GENERATING", at_ms=10_000, duration_ms=1_500),
    TimelineEntry(step="generate", status="GENERATING", at_ms=11_500),
]


def _published(out: str) -> list[dict]:
    """The EMF documents printed, each as {"dimensions", "values"}."""
    docs = []
    for line in out.splitlines():
        doc = json.loads(line)
        if "_aws" not in doc:
            continue
        (directive,) = doc["_aws"]["CloudWatchMetrics"]
        assert directive["Namespace"] == GLOBAL_ENV["POWERTOOLS_METRICS_NAMESPACE"]
        docs.append(
            {
                "dimensions": [sorted(dims) for dims in directive["Dimensions"]],
                "units": {m["Name"]: m["Unit"] for m in directive["Metrics"]},
                "values": {m["Name"]: doc[m["Name"]] for m in directive["Metrics"]},
                "doc": doc,
            }
        )
    return docs


def _flush(obs) -> None:
    obs.log_metrics(lambda event, context: None)({}, None)


# ---- generation facts -------------------------------------------------------------------------------


def test_the_latency_and_the_whole_slot_wait_come_from_the_invocations_timeline(obs):
    facts = obs.generation_facts(_run(TIMELINE), since_ms=9_900)
    assert facts.latency_ms == 1_500
    assert facts.slot_wait_s == 6.5
    # 1536x1024 is 1.5 times the priced 1024x1024 area, at the high-quality price
    assert facts.estimated_cost_usd == pytest.approx(DEFAULT_PRICES["gpt-image-2"]["high"] * 1.5, abs=0.001)


def test_an_invocation_that_found_the_image_already_stored_generated_nothing(obs):
    assert obs.generation_facts(_run(TIMELINE), since_ms=12_000) is None
    assert obs.generation_facts(_run(TIMELINE, image=False), since_ms=9_900) is None


def test_a_run_on_its_own_key_has_no_slot_wait(obs):
    assert obs.generation_facts(_run(TIMELINE, uses_default_key=False), since_ms=9_900).slot_wait_s is None


# ---- what is published -----------------------------------------------------------------------------


def test_a_new_image_publishes_count_latency_cost_and_slot_wait_in_one_document(obs, capsys):
    reads = []
    obs.record_generation(
        GenerateOutcome(status="DONE", image_key="images/exec-1.png"),
        lambda: reads.append(1) or _run(TIMELINE),
        since_ms=9_900,
    )
    _flush(obs)
    (doc,) = _published(capsys.readouterr().out)
    assert reads == [1]
    assert doc["dimensions"] == [["service"]]
    assert doc["doc"]["service"] == GLOBAL_ENV["POWERTOOLS_SERVICE_NAME"]
    assert doc["values"] == {
        "ImagesGenerated": [1.0],
        "GenerationLatency": [1500.0],
        "EstimatedCost": [pytest.approx(DEFAULT_PRICES["gpt-image-2"]["high"] * 1.5, abs=0.001)],
        "RateSlotWaitTime": [6.5],
    }
    assert doc["units"] == {
        "ImagesGenerated": "Count",
        "GenerationLatency": "Milliseconds",
        "EstimatedCost": "None",
        "RateSlotWaitTime": "Seconds",
    }


def test_a_retried_generate_that_found_its_image_counts_nothing(obs, capsys):
    done = GenerateOutcome(status="DONE", image_key="k")
    obs.record_generation(done, lambda: _run(TIMELINE), since_ms=12_000)
    _flush(obs)
    assert _published(capsys.readouterr().out) == []


def test_a_wait_never_reads_the_run_and_counts_only_openai_rate_limits(obs, capsys):
    def must_not_read():
        raise AssertionError("a WAIT outcome must not cost a read")

    obs.record_generation(
        GenerateOutcome(status="WAIT", retry_at="2026-01-01T00:00:05Z", reason="rate_slot"),
        must_not_read,
        since_ms=0,
    )
    _flush(obs)
    assert _published(capsys.readouterr().out) == []
    obs.record_generation(
        GenerateOutcome(status="WAIT", retry_at="2026-01-01T00:00:05Z", reason="openai_rate_limited"),
        must_not_read,
        since_ms=0,
    )
    _flush(obs)
    (doc,) = _published(capsys.readouterr().out)
    assert doc["values"] == {"OpenAIRateLimited": [1.0]}


def test_a_failure_is_counted_in_total_and_by_reason(obs, capsys):
    obs.record_run_failed("prompt_not_found")
    _flush(obs)
    docs = _published(capsys.readouterr().out)
    by_dimensions = {tuple(map(tuple, d["dimensions"])): d for d in docs}
    assert set(by_dimensions) == {(("service",),), (("Reason", "service"),)}
    per_reason = by_dimensions[(("Reason", "service"),)]
    assert per_reason["doc"]["Reason"] == "prompt_not_found" and per_reason["values"] == {"RunsFailed": [1.0]}
    assert by_dimensions[(("service",),)]["values"] == {"RunsFailed": [1.0]}
    assert "Reason" not in by_dimensions[(("service",),)]["doc"]


def test_a_batch_counts_each_run_it_started_and_a_duplicate_counts_none(obs, capsys):
    obs.record_run_accepted(3)
    _flush(obs)
    (doc,) = _published(capsys.readouterr().out)
    assert doc["values"] == {"RunsAccepted": [3.0]}
    obs.record_run_accepted(0)
    _flush(obs)
    (doc,) = _published(capsys.readouterr().out)
    assert doc["values"] == {"DuplicateRunRequests": [1.0]}


def test_a_cancel_counts_the_runs_it_stopped(obs, capsys):
    obs.record_runs_cancelled(0)
    _flush(obs)
    assert _published(capsys.readouterr().out) == []
    obs.record_runs_cancelled(2)
    _flush(obs)
    (doc,) = _published(capsys.readouterr().out)
    assert doc["values"] == {"RunsCancelled": [2.0]}


def test_an_invocation_with_nothing_to_count_publishes_nothing_and_warns_nothing(obs, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert obs.log_metrics(lambda event, context: "ok")({}, None) == "ok"
    assert capsys.readouterr().out == ""
    assert [str(w.message) for w in caught] == []


# ---- log lines carry the run's ids -----------------------------------------------------------------


def _log_lines(out: str) -> list[dict]:
    return [doc for doc in map(json.loads, out.splitlines()) if "_aws" not in doc]


def test_every_line_carries_the_runs_ids_and_a_new_binding_replaces_them(obs, capsys):
    obs.bind_run("sess-1", "task-1")
    obs.logger.info("first")
    obs.bind_run("sess-2")
    obs.logger.info("second")
    obs.clear_run()
    obs.logger.info("third")
    first, second, third = _log_lines(capsys.readouterr().out)
    assert (first["session"], first["task_id"]) == ("sess-1", "task-1")
    assert first["execution"] == RunRef(session="sess-1", task_id="task-1").execution_name
    assert second["session"] == "sess-2" and "task_id" not in second and "execution" not in second
    assert not {"session", "task_id", "execution"} & set(third)


def test_the_ids_are_kept_per_thread(obs, capsys):
    obs.bind_run("sess-main", "task-main")

    def elsewhere():
        obs.bind_run("sess-other", "task-other")
        obs.logger.info("other")

    other = threading.Thread(target=elsewhere)
    other.start()
    other.join()
    obs.logger.info("main")
    lines = {line["message"]: line for line in _log_lines(capsys.readouterr().out)}
    assert lines["other"]["session"] == "sess-other"
    assert lines["main"]["session"] == "sess-main"


@pytest.mark.parametrize(
    ("error", "transient"),
    [(PromptNotFound("No prompt in the task."), False), (HubUnavailable("The hub answered 503."), True)],
)
def test_a_named_error_is_logged_with_the_runs_ids_and_raised_unchanged(obs, capsys, error, transient):
    def handler(event, context):
        obs.bind_run("sess-err", "task-err")
        raise error

    with pytest.raises(type(error)) as raised:
        obs.log_errors(handler)({}, None)
    assert raised.value is error
    (line,) = _log_lines(capsys.readouterr().out)
    assert line["level"] == "WARNING" and line["session"] == "sess-err"
    assert line["error"] == type(error).__name__ and line["reason"] == error.reason
    assert error.message in line["message"] and ("(transient)" in line["message"]) == transient


def test_an_unexpected_error_is_logged_with_its_trace(obs, capsys):
    def handler(event, context):
        obs.bind_run("sess-bug", "task-bug")
        raise KeyError("oops")

    with pytest.raises(KeyError):
        obs.log_errors(handler)({}, None)
    (line,) = _log_lines(capsys.readouterr().out)
    assert line["level"] == "ERROR" and line["session"] == "sess-bug" and "KeyError" in line["exception"]


# ---- the template names what the code publishes -----------------------------------------------------


def _published_names(obs) -> set[str]:
    return {value for name, value in vars(obs).items() if name.isupper() and isinstance(value, str)}


def test_alarms_and_dashboard_use_the_namespace_service_and_metric_names_the_code_publishes(obs):
    resources = load_template()["Resources"]
    namespace = GLOBAL_ENV["POWERTOOLS_METRICS_NAMESPACE"]
    service = GLOBAL_ENV["POWERTOOLS_SERVICE_NAME"]
    names = _published_names(obs)
    assert all(re.fullmatch(r"(?:[A-Z][a-z0-9]*|AI)+", name) for name in names), names  # PascalCase

    used = set()
    for resource in resources.values():
        if resource["Type"] != "AWS::CloudWatch::Alarm":
            continue
        props = resource["Properties"]
        stats = [m["MetricStat"]["Metric"] for m in props.get("Metrics", []) if "MetricStat" in m] or [props]
        for metric in stats:
            if metric["Namespace"] == namespace:
                assert metric["Dimensions"] == [{"Name": "service", "Value": service}]
                used.add(metric["MetricName"])
    dashboard = resources["RunsDashboard"]["Properties"]["DashboardBody"]["Fn::Sub"]
    for metric_namespace, metric_name, dimension, value in re.findall(
        r'\["(\w+)", "(\w+)", "(\w+)", "([^"]+)"', dashboard
    ):
        if metric_namespace == namespace:
            assert (dimension, value) == ("service", service)
            used.add(metric_name)
    used |= set(re.findall(r'MetricName=\\"(\w+)\\"', dashboard))
    assert used and used <= names, used - names
    assert {
        "RunsAccepted",
        "RunsFailed",
        "RateSlotWaitTime",
        "GenerationLatency",
        "ImagesGenerated",
        "EstimatedCost",
    } <= used


def test_the_session_story_query_reads_every_functions_log_group_by_the_logged_keys():
    resources = load_template()["Resources"]
    query = resources["SessionStoryQuery"]["Properties"]
    groups = {ref["Ref"] for ref in query["LogGroupNames"]}
    functions = {lid for lid, r in resources.items() if r["Type"] == "AWS::Serverless::Function"}
    assert groups == {f"{lid}LogGroup" for lid in functions}
    for lid in functions:
        group = resources[f"{lid}LogGroup"]["Properties"]
        assert group["LogGroupName"] == {"Fn::Sub": f"/aws/lambda/${{{lid}}}"}
        assert group["RetentionInDays"] == {"Ref": "LogRetentionDays"}
    assert re.search(r"\| filter session = ", query["QueryString"])
    assert re.search(r"\| sort @timestamp asc", query["QueryString"])
