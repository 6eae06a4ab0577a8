"""Regenerates docs/performance.md from whatever bench/results/*.json exist: ``python -m bench report``.

A result with ``rows`` (the shape bench/common.py writes) becomes a table of figure / ours / baseline /
ratio; a result shaped ``{"ours": {...}, "baseline...": {...}}`` (bench/limiter.py) becomes one from the
numbers the two sides share; anything else is listed key by key, so a new benchmark shows up even before
it follows the common shape.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.common import PROJECT_ROOT, RESULTS_DIR, ratio_of

DOC_PATH = PROJECT_ROOT / "docs" / "performance.md"
#: the order sections appear in; results not listed here follow, by name
ORDER = ("cold_start", "package_size", "overhead", "own_key_throughput", "limiter", "aws_cost")
TITLES = {"limiter": "Global limit under a backlog (shared key)"}


def load_results(results_dir: Path = RESULTS_DIR) -> list[dict[str, Any]]:
    found = []
    for path in sorted(results_dir.glob("*.json")):
        if path.name == "summary.json":  # the headline figures, rendered by headline_section
            continue
        try:
            doc = json.loads(path.read_text())
        except ValueError:
            continue
        if isinstance(doc, dict):
            doc.setdefault("name", path.stem)
            found.append(doc)
    rank = {name: index for index, name in enumerate(ORDER)}
    return sorted(found, key=lambda d: (rank.get(d["name"], len(ORDER)), d["name"]))


def fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        magnitude = abs(value)
        if isinstance(value, int) or magnitude >= 100:
            text = f"{value:,.0f}"
        elif magnitude >= 10:
            text = f"{value:.1f}"
        elif magnitude >= 1:
            text = f"{value:.2f}"
        elif magnitude == 0:
            text = "0"
        else:
            text = f"{value:.3g}"
        return f"{text} {unit}".strip()
    return str(value).replace("|", "\\|")


def _ratio(ratio: float | None) -> str:
    if ratio is None:
        return "–"
    return f"{ratio:.2f}" if abs(ratio) >= 0.1 or ratio == 0 else f"{ratio:.2g}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def rows_of(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The figure rows of any result shape."""
    if isinstance(doc.get("rows"), list):
        return doc["rows"]
    ours = doc.get("ours")
    baseline_key = next((k for k in doc if k.startswith("baseline") and isinstance(doc[k], dict)), None)
    if isinstance(ours, dict) and baseline_key:
        base = doc[baseline_key]
        settings = set(
            doc.get("scenario") or {}
        )  # the scenario is stated once above the table, not as figures
        rows = []
        for key, value in ours.items():
            other = base.get(key)
            if key in settings:
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key in base:
                rows.append({"figure": key.replace("_", " "), "unit": "", "ours": value, "baseline": other})
        return rows
    return [
        {"figure": key.replace("_", " "), "unit": "", "ours": value, "baseline": None}
        for key, value in doc.items()
        if isinstance(value, (int, float, str, bool)) and key != "name"
    ]


def section(doc: dict[str, Any]) -> str:
    name = doc["name"]
    title = doc.get("title") or TITLES.get(name) or name.replace("_", " ").capitalize()
    lines = [f"## {title}", ""]
    meta = [f"`bench/results/{name}.json`"]
    if doc.get("measured_at"):
        meta.append(f"measured {doc['measured_at']}")
    if doc.get("quick"):
        meta.append("**quick mode (smoke run, not for comparison)**")
    if doc.get("duration_s") is not None:
        meta.append(f"took {doc['duration_s']:.0f} s")
    machine = doc.get("environment") or {}
    if machine.get("load_average_1m_at_end") is not None:
        meta.append(
            f"machine load {machine['load_average_1m_at_end']:g} on {machine.get('cpus', '?')} cores at the end"
        )
    lines += [" · ".join(meta), ""]
    if doc.get("method"):
        lines += [doc["method"], ""]
    scenario = doc.get("scenario")
    if isinstance(scenario, dict):
        lines += [
            "Scenario: " + ", ".join(f"{k.replace('_', ' ')} {fmt(v)}" for k, v in scenario.items()) + ".",
            "",
        ]
    if doc.get("baseline") and isinstance(doc["baseline"], str):
        lines += [f"**Baseline:** {doc['baseline']}", ""]
    elif name == "limiter":
        lines += [
            (
                "**Baseline:** the naive fixed-window counter, the same backlog, measured right after in the "
                "same run."
            ),
            "",
        ]
    rows = rows_of(doc)
    if rows:
        lines += ["| figure | ours | baseline | ratio | note |", "|---|---:|---:|---:|---|"]
        for row in rows:
            unit = row.get("unit", "")
            ratio = row.get("ratio", ratio_of(row.get("ours"), row.get("baseline")))
            lines.append(
                f"| {_cell(str(row['figure']))} | {fmt(row.get('ours'), unit)} | "
                f"{fmt(row.get('baseline'), unit)} | {_ratio(ratio)} | {_cell(row.get('note', ''))} |"
            )
        lines.append("")
    for check in doc.get("checks") or []:
        lines.append(f"- check: {check['check']}: **{'passed' if check['passed'] else 'FAILED'}**")
    if doc.get("checks"):
        lines.append("")
    for finding in doc.get("findings") or []:
        lines.append(f"- {finding}")
    if doc.get("findings"):
        lines.append("")
    return "\n".join(lines)


#: issue 13's figures (bench/results/summary.json), in order: what each is, its target, what changed it
HEADLINES = {
    "overhead_product_ratio_p50": (
        "product's own time per image / naive script, p50",
        "at most 1.5",
        (
            "end to end less the local engine's time, warm to warm, both to the run's end, the naive script "
            "making the same 14 hub calls (it made 7 and stopped at the attachment before). Most of the "
            "product's time is its AWS calls, DynamoDB Local's above all (see the overhead section); progress "
            "lines of Extract and Generate now go out while the step works"
        ),
    ),
    "overhead_end_to_end_ratio_p50": (
        "end to end per image / naive script, p50",
        "–",
        (
            "the plain ratio, local engine included (API Gateway stand-in, the Lambda runtime's pipe to each "
            "environment process, moto's Step Functions)"
        ),
    ),
    "overhead_engine_ms_p50": (
        "local engine's own time per run, p50 (ms)",
        "–",
        "measured apart so the product's figure does not carry it; none of it runs on AWS",
    ),
    "dynamodb_calls_per_image": (
        "DynamoDB calls per image, shared key",
        "at most 8",
        (
            "run record written with one UpdateItem per step's write, no read first (was a consistent GetItem "
            "and a whole-item PutItem per progress line); a step's first write is its read (a conditional "
            "UpdateItem answering with the whole record, or with the record as it is when refused), and what a "
            "step learns after it (Extract's prompt, Generate's images) goes through the state to the next "
            "step's first write. Now 8 (was 9): the first Generate of a run no longer reads first (its "
            "BatchGetItem of the run and any offered image is gone): the API's create transaction also checks, "
            "per run, that no image of its task is on offer and says so on the record, and Generate's first "
            "write spends attempt 1 only while no attempt is spent (two deliveries of the step: one spends, "
            "the other finds it spent and sends nothing; tests/integration/test_generate_first_spend_race.py). "
            "A Generate after a Wait (Generate Image Again), a retried one, a re-run or a task with an image on "
            "offer reads as before. It trades the read's 2 read units for 3 write units (the check is a transactional "
            "write): DynamoDB's cost per 1,000 images rose by about $0.001. What is left, by step: API 1 (create: TransactWriteItems, a put and an offer check per "
            "run), Extract 1 (UpdateItem: EXTRACTING, the run and its sealed hub key come back), Generate 2 "
            "(UpdateItem: attempt 1 spent, with Extract's prompt and lines, the run comes back; plus the "
            "queue's claim), Attach 3 (UpdateItem: Generate's images and line and "
            "'Uploading', only on a run without an image, the run comes back; UpdateItem: intents before the "
            "first send, never twice; UpdateItem: finish, secrets removed). Run record and others 6; the "
            "shared key's queue 2 (UpdateItem each: the join at acceptance, one write nothing refuses since "
            "each line keeps its ticket counter in an attribute of its own (it was two: its first write, built "
            "on the state the API's environment last saw, was refused); and the claim; a re-stamp is made only "
            "for a send that leaves late, none in these runs). The bench sends batches of one: the create and "
            "the join are made once per batch (or chunk), so a batch of N tasks should pay about 6 + 2/N "
            "(estimated, not measured)"
        ),
    ),
    "aws_usd_per_1000_images": (
        "AWS cost per 1,000 images (USD)",
        "at most 0.30",
        (
            "images kept 7 days instead of 90, Lambda's own tracing instead of the X-Ray SDK, Generate at 256 MB "
            "(decided by its peak memory, ~111 MB, while it waits ~20 s on OpenAI), 6 state transitions per "
            "image instead of 7 (the Map ends the execution: no Session Done state)"
        ),
    ),
    "cold_start_import_over_floor_api": (
        "api: init + first event's imports / floor",
        "at most 1.5",
        (
            "baseline: an eager module. What a cold start pays in all (init imports only Powertools' Logger; the "
            "routes load on the first request). Cut by shipping the layer's bytecode, by AWS clients from "
            "botocore alone, and by a router of the plugin's own instead of Powertools' event handler (its "
            "package imported every resolver and its OpenAPI validation), by reading the Secret without "
            "Powertools Parameters (which imported boto3) and loading the batch starter and the hub client only "
            "when a request needs them; then by loading only the POST route's domain on a POST, the model "
            "catalogue and run options as NamedTuples instead of pydantic models (a static table, never input), "
            "no CommonSettings built for the Secrets reader and annotations evaluated as objects instead of "
            "compiled strings (callgrind 1.67 -> 1.60 of the floor); then by validators in annotations or one "
            "model validator instead of field_validator methods, aliases without to_camel's regexes, no class "
            "a POST never uses (ExtractedPrompt, the authorizer's and the session routes' models) and "
            "PYTHONTZPATH (callgrind 1.561 -> 1.533 as the bench runs); left: pydantic (its import alone "
            "about 0.45 of the floor), the run record's models and the request validation only the API does "
            "(run payload, Config JSON), and the shared key's queue settings"
        ),
    ),
    "cold_start_import_over_floor_extract": (
        "extract: init + first event's imports / floor",
        "at most 1.5",
        (
            "baseline: an eager module. What a cold start pays in all. Cut by shipping the layer's bytecode, "
            "building other functions' models (Generate's and Attach's inputs among them) on first use only, "
            "Generate's port values kept out of ports.py, no port's Protocol class or other function's settings "
            "class created, records as NamedTuples, and AWS clients from botocore alone (no boto3); left: "
            "pydantic (its import alone about 0.45 of the floor) and the run record's models"
        ),
    ),
    "cold_start_import_over_floor_generate": (
        "generate: init + first event's imports / floor",
        "at most 1.5",
        (
            "baseline: an eager module; the floor includes openai (which brings pydantic), shipped compiled "
            "too; generate imports botocore alone, not the floor's boto3"
        ),
    ),
    "cold_start_import_over_floor_attach": (
        "attach: init + first event's imports / floor",
        "at most 1.5",
        (
            "baseline: an eager module. What a cold start pays in all. Cut by shipping the layer's bytecode, "
            "building other functions' models (Generate's and Attach's inputs among them) on first use only, "
            "Generate's port values kept out of ports.py, no port's Protocol class or other function's settings "
            "class created, records as NamedTuples, and AWS clients from botocore alone (no boto3); left: "
            "pydantic (its import alone about 0.45 of the floor) and the run record's models"
        ),
    ),
    "package_mb_total": (
        "every function + the layer, zipped (MB)",
        "–",
        (
            "aws-xray-sdk and the botocore it pulled into the layer are gone; the layer and generate's openai now "
            "ship bytecode (larger zips, no compiling at each cold start)"
        ),
    ),
    "own_key_rate_over_cap": ("own key: rate reached / key's cap", "at least 0.95", "own keys' pacing"),
    "own_key_429_share": ("own key: share of requests refused (429)", "at most 0.05", "own keys' pacing"),
    "own_key_tasks_lost": ("own key: tasks lost", "0", "own keys' pacing"),
}


def headline_section(results_dir: Path = RESULTS_DIR) -> list[str]:
    """Issue 13's figures from summary.json, each beside its baseline (measured in the same run where the
    summary's ``<key>_baseline`` came from one, else the recorded figure from before the issue)."""
    path = results_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    found = [key for key in HEADLINES if key in summary]
    if not found:
        return []
    lines = [
        "## Headline figures (bench/results/summary.json)",
        "",
        (
            "Each figure beside its baseline: measured in the same run where one can be (the eager import; the "
            "naive script), else the figure before issue 13's changes (bench/baselines/before_issue_13.json, "
            "each with its source)."
        ),
        "",
        "| figure | ours | baseline | target | what changed it |",
        "|---|---:|---:|---|---|",
    ]
    for key in found:
        what, target, why = HEADLINES[key]
        lines.append(
            f"| {_cell(what)} (`{key}`) | {fmt(summary[key])} | {fmt(summary.get(f'{key}_baseline'))} | "
            f"{target} | {_cell(why)} |"
        )
    missing = [key for key in HEADLINES if key not in summary]
    if missing:
        lines += ["", "Not measured yet: " + ", ".join(f"`{key}`" for key in missing) + "."]
    if summary.get("quick_keys"):
        lines += ["", "From a quick (smoke) run: " + ", ".join(f"`{k}`" for k in summary["quick_keys"]) + "."]
    return [*lines, ""]


def render(results_dir: Path = RESULTS_DIR) -> str:
    docs = load_results(results_dir)
    head = [
        "# Performance",
        "",
        (
            "Generated by `make bench` (`python -m bench`; `bench/report.py` rewrites this file from "
            "`bench/results/*.json`, so do not edit it by hand). Every figure stands next to a baseline "
            "measured in the same run; **ratio = ours / baseline**. The local stack runs on the bench machine "
            "(2 cores shared with other work): DynamoDB Local, moto, the hub and OpenAI emulators each in a "
            "process of their own, and every Lambda execution environment an OS process of its own, whose AWS "
            "calls, hub and OpenAI requests and handler runs bench/env_probe.py journals for the bench. "
            "Absolute times are the local stack's; the ratios and counts are what carry over."
        ),
        "",
    ]
    head += headline_section(results_dir)
    if not docs:
        head.append("No results yet: run `make bench`.")
        return "\n".join(head) + "\n"
    titles = [d.get("title") or TITLES.get(d["name"]) or d["name"] for d in docs]
    head.append("Contents: " + " · ".join(f"[{title}](#{_anchor(title)})" for title in titles))
    head.append("")
    return "\n".join(head) + "\n" + "\n".join(section(d) for d in docs)


def _anchor(title: str) -> str:
    kept = "".join(ch for ch in title.lower() if ch.isalnum() or ch in " -_")
    return kept.replace(" ", "-")


def write_report(results_dir: Path = RESULTS_DIR, target: Path = DOC_PATH) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render(results_dir))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench report", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="ignored: the report is the same either way")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    parser.add_argument("--out", type=Path, default=DOC_PATH)
    args = parser.parse_args(argv)
    path = write_report(args.results, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
