"""bench/report.py turns whatever result files exist into docs/performance.md (small synthetic results)."""

from __future__ import annotations

import json

from bench.common import Row, document, percentile, write_result
from bench.report import load_results, render, rows_of, write_report


def _result(name: str, rows: list[Row], **extra) -> dict:
    doc = document(
        name,
        extra.pop("title", name.title()),
        method="Measured somehow.",
        baseline="The old way.",
        rows=rows,
        quick=False,
        **extra,
    )
    return doc


def test_each_row_shows_ours_baseline_and_their_ratio(tmp_path):
    write_result(
        _result(
            "overhead",
            [Row("end to end, p50", "ms", 300.0, 100.0, note="one at a time")],
            title="Overhead per image",
            findings=["Hub calls dominate."],
        ),
        tmp_path,
    )
    text = render(tmp_path)
    assert "## Overhead per image" in text
    assert "| end to end, p50 | 300 ms | 100 ms | 3.00 | one at a time |" in text
    assert "**Baseline:** The old way." in text
    assert "- Hub calls dominate." in text


def test_a_missing_baseline_or_a_text_value_has_no_ratio(tmp_path):
    write_result(
        _result(
            "cold_start",
            [Row("api: openai imported", "", False, True), Row("POST answered", "ms", 12.5, None)],
        ),
        tmp_path,
    )
    text = render(tmp_path)
    assert "| api: openai imported | no | yes | – |" in text
    assert "| POST answered | 12.5 ms | – | – |" in text


def test_limiter_results_in_their_own_shape_are_included(tmp_path):
    limiter = {
        "measured_at": "2026-11-25T15:49:21Z",
        "scenario": {"runs": 30, "limit": 5, "window_s": 30.0},
        "ours": {
            "max_starts_in_any_window": 5,
            "achieved_rate_over_cap": 0.9,
            "variant": "reservation",
            "limit": 5,
        },
        "baseline_fixed_window": {"max_starts_in_any_window": 10, "achieved_rate_over_cap": 1.1, "limit": 5},
        "starts": {"ours": [1.0, 2.0]},
    }
    (tmp_path / "limiter.json").write_text(json.dumps(limiter))
    write_result(
        _result("aws_cost", [Row("total", "USD", 0.5, 53.0)], title="Cost per 1,000 images"), tmp_path
    )
    rows = {row["figure"]: row for row in rows_of(limiter)}
    assert (
        rows["max starts in any window"]["ours"] == 5 and rows["max starts in any window"]["baseline"] == 10
    )
    assert "variant" not in " ".join(rows)  # text fields are not figures
    assert "limit" not in rows  # nor the scenario's settings, stated once above the table
    text = render(tmp_path)
    assert "## Global limit under a backlog (shared key)" in text
    assert "| max starts in any window | 5 | 10 | 0.50 |" in text
    assert "Scenario: runs 30, limit 5, window s 30.0." in text
    # sections follow the documented order whatever the file names sort to
    assert text.index("Global limit under a backlog") < text.index("## Cost per 1,000 images")


def test_failed_checks_are_shown_loudly(tmp_path):
    doc = _result("cold_start", [Row("extract: openai imported", "", True, True)])
    doc["checks"] = [{"check": "extract never imports openai", "passed": False}]
    write_result(doc, tmp_path)
    assert "extract never imports openai: **FAILED**" in render(tmp_path)


def test_unreadable_files_are_skipped_and_no_results_says_how_to_get_them(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    assert load_results(tmp_path) == []
    assert "run `make bench`" in render(tmp_path)


def test_write_report_writes_the_document(tmp_path):
    write_result(_result("package_size", [Row("layer", "MB", 20.0, None)]), tmp_path)
    target = write_report(tmp_path, tmp_path / "docs" / "performance.md")
    assert target.read_text().startswith("# Performance")
    assert not list(tmp_path.glob("*.tmp"))


def test_percentile_is_nearest_rank():
    values = list(range(1, 21))  # 1..20
    assert percentile(values, 50) == 10
    assert percentile(values, 95) == 19
    assert percentile([7.0], 95) == 7.0
    assert percentile([], 50) is None


def test_summary_keeps_other_benchmarks_keys_and_puts_a_baseline_beside_each_figure(tmp_path):
    from bench.common import update_summary

    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"limiter_limit": 5}))
    recorded = tmp_path.parent / f"{tmp_path.name}-before.json"
    recorded.write_text(json.dumps({"figures": {"dynamodb_calls_per_image": {"value": 29, "source": "x"}}}))
    update_summary(
        {"dynamodb_calls_per_image": 12.0, "cold_start_import_over_floor_api": 1.3},
        baselines={"cold_start_import_over_floor_api": 3.1},
        path=summary,
        recorded_baselines=recorded,
    )
    merged = json.loads(summary.read_text())
    assert merged == {
        "limiter_limit": 5,
        "dynamodb_calls_per_image": 12.0,
        "dynamodb_calls_per_image_baseline": 29,
        "cold_start_import_over_floor_api": 1.3,
        "cold_start_import_over_floor_api_baseline": 3.1,
    }
    text = render(tmp_path)
    assert (
        "| DynamoDB calls per image, shared key (`dynamodb_calls_per_image`) | 12.0 | 29 | at most 8 |"
        in text
    )
    assert "`own_key_429_share`" in text  # a slot for the figures not measured yet
    assert "## Summary" not in text  # the summary is the headline table, not a section of its own


def test_the_environment_probe_reads_dynamodb_units_either_way_they_are_reported():
    from bench.env_probe import consumed_units

    assert consumed_units("GetItem", {"ConsumedCapacity": {"CapacityUnits": 0.5}}) == (0.5, 0.0)
    assert consumed_units("UpdateItem", {"ConsumedCapacity": {"CapacityUnits": 2.0}}) == (0.0, 2.0)
    both = {"ConsumedCapacity": [{"ReadCapacityUnits": 1.0, "WriteCapacityUnits": 3.0}]}
    assert consumed_units("TransactWriteItems", both) == (1.0, 3.0)
    assert consumed_units("PutItem", None) == (0.0, 0.0)
