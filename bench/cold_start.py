"""Cold start per function: import the handler and serve a first event in a fresh interpreter.

Each sample is a new Python process (bench/_cold_child.py) with the function's code directory and the layer
on the import path, as Lambda arranges them, and the environment the local stack gives the function. The
first event is the function's events/ file, served against a running local stack (DynamoDB Local, moto,
the hub and OpenAI emulators): the API gets events/api_post_plugin.json carrying a fresh session (its
StartExecution goes to a one-state machine so no run starts behind the bench's back), and that session is
then what Extract, Generate and Attach get (events/*.json with the session replaced); Record Failure gets
its event for another fresh run, created through the stack's API.

Baseline: the same, after importing every dependency (openai, boto3, pydantic, Powertools, every plugin
module) and creating the AWS and OpenAI clients up front, as an eager module would.

The headline, each function's import over its floor, counts what a cold start pays in all: the handler's
import plus what it imports on its first event (moving an import to the first event does not remove it).
The layer is imported as the build ships it, with its bytecode (layers/shared/Makefile), and the floor's
packages with theirs (pip compiles them).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.common import PROJECT_ROOT, Row, document, median, print_rows, say, update_summary, write_result

NAME = "cold_start"
EVENTS = PROJECT_ROOT / "events"
CHILD = Path(__file__).resolve().parent / "_cold_child.py"
FUNCTIONS = {  # short name -> template logical id, in the order a run meets them
    "api": "ApiFunction",
    "extract": "ExtractFunction",
    "generate": "GenerateFunction",
    "attach": "AttachFunction",
    "record_failure": "RecordFailureFunction",
}
#: what each handler imports on its first event instead of at init: timed after its import, so that a figure
#: of the import never hides what the first invocation then pays
FIRST_EVENT_MODULES = {
    "api": (
        "dalle_plugin.rest_api",
        "dalle_plugin.adapters.dynamo_rate_limiter",  # the shared key's queue, which an accepted run joins
    ),
    "extract": (
        "dalle_plugin.wiring",
        "dalle_plugin.domain.steps.extract",
        "dalle_plugin.adapters.hub_http",
        "dalle_plugin.adapters.url_guard",
    ),
    "generate": (
        "dalle_plugin.wiring",
        "dalle_plugin.domain.steps.generate",
        "dalle_plugin.adapters.openai_images",
        "dalle_plugin.adapters.dynamo_rate_limiter",
        "dalle_plugin.adapters.dynamo_key_pacer",
        "dalle_plugin.adapters.hub_http",
        "dalle_plugin.adapters.url_guard",
        "openai.resources.images",
        # what openai's HTTP client loads when it first sends
        "httpcore2",
        "h11",
        "anyio.to_thread",
        "anyio.streams",
        "truststore",
    ),
    "attach": (
        "dalle_plugin.wiring",
        "dalle_plugin.domain.steps.attach",
        "dalle_plugin.adapters.hub_http",
        "dalle_plugin.adapters.url_guard",
    ),
    "record_failure": (
        "dalle_plugin.wiring",
        "dalle_plugin.domain.steps.failure",
        "dalle_plugin.adapters.dynamo_rate_limiter",
        "dalle_plugin.adapters.hub_http",
        "dalle_plugin.adapters.url_guard",
    ),
}
#: the models a function's first event builds that are built on first use (pydantic's defer_build), not at
#: import: the import figure builds them too, so that deferring a model never flatters it
FIRST_EVENT_MODELS = {
    "api": (
        "dalle_plugin.settings.api:ApiSettings",
        "dalle_plugin.domain.rate_limit:LimiterSettings",
    ),
    "extract": (
        "dalle_plugin.settings.extract:ExtractSettings",
        "dalle_plugin.domain.step_io.extract:ExtractResult",
        "dalle_plugin.domain.prompt:Prompt",
    ),
    "generate": (
        "dalle_plugin.settings.generate:GenerateSettings",
        "dalle_plugin.domain.step_io.generate:GenerateInput",
        "dalle_plugin.domain.step_io.generate:GenerateOutcome",
        "dalle_plugin.domain.step_io.generate:GeneratedImages",
        "dalle_plugin.domain.rate_limit:LimiterSettings",
        "openai.types.images_response:ImagesResponse",
        "openai.types.images_response:Usage",
    ),
    "attach": (
        "dalle_plugin.settings.attach:AttachSettings",
        "dalle_plugin.domain.step_io.attach:AttachInput",
        "dalle_plugin.domain.step_io.attach:AttachResult",
    ),
    "record_failure": (
        "dalle_plugin.settings.rate_limit:RateLimitSettings",
        "dalle_plugin.domain.step_io.failure:FailureInput",
        "dalle_plugin.domain.rate_limit:LimiterSettings",
    ),
}
#: the modes that import the handler and what its first event imports: from the layer as built, and from
#: the layer without its bytecode (what compiling it at each cold start costs)
OURS = ("ours", "source")
#: rounds of "the function's import beside its floor" per trial: each a pair of fresh processes, in
#: alternating order, whose ratio is one sample (a pair shares the machine's load of its moment). One pair's
#: ratio strays by a fifth from the next on 2 shared cores: with 4 rounds (12 pairs) the API's median moved
#: between 1.51 and 1.68 over three runs of the same code, more than a change to its imports moves it; 12
#: rounds (36 pairs) bring that spread down by about the square root of three
IMPORT_ROUNDS = 12
#: the functions that never generate an image must never load the openai package
WITHOUT_OPENAI = ("api", "extract", "attach", "record_failure")
SECRET = "bench-cold-start-secret-long-enough-for-the-authorizer"
NOOP_DEFINITION = json.dumps({"StartAt": "Accepted", "States": {"Accepted": {"Type": "Succeed"}}})


class ColdStartBench:
    def __init__(self, stack: Any):
        self.stack = stack
        self.specs = stack.template.functions()
        self.scratch = Path(tempfile.mkdtemp(prefix="bench-cold-"))
        self.layer_dir = built_layer(stack.template.layer_dirs()[0], self.scratch / "layer")
        # what the layer was before its build compiled it: the plugin's code and its requirements as sources
        self.source_layer_dir = layer_without_bytecode(
            stack.template.layer_dirs()[0], self.scratch / "source"
        )
        # Every run the bench starts (the children's and its own) goes to a one-state machine: no pipeline
        # runs in the background while a cold start is timed.
        self.noop_arn = self._noop_state_machine()
        os.environ["STATE_MACHINE_ARN"] = self.noop_arn
        from local_stack.hub_emulator import load_sample_runs

        samples = {s.payload["taskId"]: s.payload for s in load_sample_runs(stack.hub.base_url)}
        self.payload = samples["task-fox"]

    def _noop_state_machine(self) -> str:
        role = self.stack.client("iam").get_role(RoleName=f"{self.stack.template.stack_name}-execution")
        return self.stack.client("stepfunctions").create_state_machine(
            name="bench-cold-start-noop",
            definition=NOOP_DEFINITION,
            roleArn=role["Role"]["Arn"],
            type="STANDARD",
        )["stateMachineArn"]

    # ---- events ---------------------------------------------------------------------------------

    def api_event(self, session: str) -> dict[str, Any]:
        event = json.loads((EVENTS / "api_post_plugin.json").read_text())
        event["body"] = json.dumps(self.payload | {"session": session})
        for headers in (event["headers"], event["multiValueHeaders"]):
            headers["Secret"] = SECRET if headers is event["headers"] else [SECRET]
        return event

    @staticmethod
    def step_event(function: str, session: str) -> dict[str, Any]:
        event = json.loads((EVENTS / f"{function}.json").read_text())
        event["session"] = session
        return event

    # ---- one fresh process ----------------------------------------------------------------------

    def child(
        self,
        function: str,
        event: dict[str, Any] | None,
        eager: bool,
        importtime: bool = False,
        mode: str | None = None,
    ) -> dict[str, Any]:
        spec = self.specs[FUNCTIONS[function]]
        module, handler = spec.handler.rsplit(".", 1)
        out = self.scratch / f"{uuid.uuid4().hex}.json"
        spec_file = self.scratch / f"{uuid.uuid4().hex}-spec.json"
        spec_file.write_text(
            json.dumps(
                {
                    "code_dir": str(spec.code_dir),
                    "layer_dir": str(self.source_layer_dir if mode == "source" else self.layer_dir),
                    "module": module,
                    "handler": handler,
                    "event": event,
                    "eager": eager,
                    "out": str(out),
                    "function_name": spec.physical_name,
                    "memory_mb": spec.memory_mb,
                    "mode": mode,
                    "needs_openai": function == "generate",
                    "first_event_modules": FIRST_EVENT_MODULES[function] if mode in OURS else (),
                    "first_event_models": FIRST_EVENT_MODELS[function] if mode in OURS else (),
                }
            )
        )
        env = dict(os.environ)
        env.update(self.stack.template.environment(spec))
        # /var/task is read-only on Lambda: a function's own app.py (a few lines) compiles at each start
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.pop("PYTHONPATH", None)
        env["STATE_MACHINE_ARN"] = self.noop_arn
        command = (
            [sys.executable] + (["-X", "importtime"] if importtime else []) + [str(CHILD), str(spec_file)]
        )
        started = time.perf_counter()
        completed = subprocess.run(
            command,
            env=env,
            cwd=spec.code_dir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,  # a failure is raised below with the child's stderr
        )
        wall_ms = (time.perf_counter() - started) * 1000
        if completed.returncode or not out.exists():
            raise RuntimeError(f"cold start of {function} failed: {completed.stderr[-2000:]}")
        measured = json.loads(out.read_text())
        measured["process_wall_ms"] = wall_ms
        if importtime:
            measured["imports_by_package_ms"] = imports_by_package(completed.stderr)
        if measured["error"] or (measured["status_code"] is not None and measured["status_code"] >= 300):
            raise RuntimeError(
                f"{function}'s first event failed: {measured['error'] or measured['status_code']}"
            )
        return measured

    def trial(self, eager: bool, importtime: bool = False) -> dict[str, dict[str, Any]]:
        """One fresh process per function, in a run's order, on a session of its own."""
        tag = "eager" if eager else "lazy"
        session = f"bench-cold-{tag}-{uuid.uuid4().hex[:8]}"
        failing = f"bench-cold-{tag}-fail-{uuid.uuid4().hex[:8]}"
        result = {"api": self.child("api", self.api_event(session), eager, importtime)}
        for function in ("extract", "generate", "attach"):
            event = self.step_event(function, session)
            # what the state machine hands on (statemachine/run_plugin.asl.json): Generate gets Extract's
            # prompt and fingerprint, Attach the images Generate stored for this session
            if function == "generate":
                extracted = result["extract"]["result"]
                event |= {
                    "imageFingerprint": extracted["imageFingerprint"],
                    "extracted": extracted["extracted"],
                }
            elif function == "attach":
                event["generation"] = result["generate"]["result"]
            result[function] = self.child(function, event, eager, importtime)
        # a run for the Catch path to fail, made by an API process of the bench's (the child raises unless it
        # answers 202): through the stack's own API it started the real pipeline, whose Generate raced this
        # Record Failure for the run's ticket and left its paid image on offer to the next trial's Generate
        self.child("api", self.api_event(failing), eager)
        result["record_failure"] = self.child(
            "record_failure", self.step_event("record_failure", failing), eager, importtime
        )
        return result

    def import_trial(self, round_index: int, eager: bool) -> dict[str, dict[str, float]]:
        """Each function's import beside its floor, in fresh processes one after the other (ours first in
        even rounds, the floor first in odd ones, so neither always meets the machine warmer), and the eager
        baseline and ours from a layer without bytecode when asked. ``first_event`` is ours plus what the
        handler imports on its first event (``source_first_event`` the same without the layer's bytecode)."""
        modes = ("ours", "floor") if round_index % 2 == 0 else ("floor", "ours")
        trial: dict[str, dict[str, float]] = {}
        for function in FUNCTIONS:
            timed = {}
            for mode in modes + (("eager", "source") if eager else ()):
                measured = self.child(function, None, False, mode=mode)
                timed[mode] = measured["import_ms"]
                if mode in OURS:
                    first_event = measured["import_ms"] + measured["first_event_import_ms"]
                    timed["first_event" if mode == "ours" else "source_first_event"] = first_event
            trial[function] = timed
        return trial


def layer_without_bytecode(source: Path, target: Path) -> Path:
    """The layer as a build that only unpacks wheels ships it (SAM's python3.11 build method did): the
    plugin's code and its requirements (the bench's installed copies) with no .pyc, so each start compiles
    what it imports, as on Lambda's read-only /opt."""
    shutil.copytree(
        source / "dalle_plugin", target / "dalle_plugin", ignore=shutil.ignore_patterns("__pycache__")
    )
    names = [line.split("==")[0].strip() for line in (source / "requirements.txt").read_text().splitlines()]
    for root in _import_roots([name for name in names if name and not name.startswith("#")]):
        located = Path(metadata.distribution(root[0]).locate_file(root[1]))
        copy = target / root[1]
        if located.is_dir():
            shutil.copytree(located, copy, ignore=shutil.ignore_patterns("__pycache__"))
        elif located.exists():
            shutil.copy2(located, copy)
    return target


def _import_roots(names: list[str]) -> set[tuple[str, str]]:
    """(distribution, top-level file or package) of each named distribution and what it requires (extras
    left out), as installed for the bench."""
    roots: set[tuple[str, str]] = set()
    seen: set[str] = set()
    pending = list(names)
    while pending:
        name = pending.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        dist = metadata.distribution(name)
        for file in dist.files or ():
            top = file.parts[0]
            if top.endswith((".dist-info", ".data")) or top in ("..", "__pycache__", "bin"):
                continue
            roots.add((name, top))
        required = (r for r in dist.requires or () if "extra ==" not in r)
        pending.extend(re.split(r"[^A-Za-z0-9_.-]", requirement, maxsplit=1)[0] for requirement in required)
    return roots


def built_layer(source: Path, target: Path) -> Path:
    """The layer's own code as ``sam build`` ships it: copied, then compiled by layers/shared/Makefile's
    ``compile`` target (the build's own step), so a cold start reads bytecode instead of compiling."""
    shutil.copytree(
        source / "dalle_plugin", target / "dalle_plugin", ignore=shutil.ignore_patterns("__pycache__")
    )
    subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-C",
            str(source),
            "compile",
            f"LAYER_DIR={target}",
            f"PYTHON={sys.executable}",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return target


_IMPORTTIME = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)")


def imports_by_package(stderr: str) -> dict[str, float]:
    """``-X importtime`` self times summed by top-level package: where a cold import spends its time."""
    by_package: dict[str, float] = defaultdict(float)
    for match in _IMPORTTIME.finditer(stderr):
        by_package[match.group(4).split(".")[0]] += int(match.group(1)) / 1000
    ranked = sorted(by_package.items(), key=lambda item: -item[1])
    return {name: round(ms, 1) for name, ms in ranked[:8]}


def summarise(samples: list[dict[str, Any]], key: str) -> float:
    return median(sample[key] for sample in samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench cold_start",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help="2 processes per function and variant instead of 3"
    )
    parser.add_argument("--trials", type=int, default=None)
    args = parser.parse_args(argv)
    trials = args.trials or (
        2 if args.quick else 3
    )  # each trial also times the eager import beside the floor
    started = time.monotonic()
    from local_stack.stack import LocalStack, StackOptions

    os.environ.pop("OPENAI_API_KEY", None)  # never the real API from a benchmark
    options = StackOptions(stack_name="bench-cold", plugin_secret=SECRET, parameters={"RateLimit": "1000"})
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {
        "lazy": defaultdict(list),
        "eager": defaultdict(list),
    }
    with LocalStack(options) as stack:
        stack.hub.load_samples()
        bench = ColdStartBench(stack)
        say(f"cold start: {trials} fresh processes per function and variant, first event on the local stack")
        imports: dict[str, dict[str, list[float]]] = {
            f: {
                "ours": [],
                "floor": [],
                "eager": [],
                "first_event": [],
                "ratio": [],
                "first_event_ratio": [],
                "source": [],
                "source_first_event": [],
                "source_over_built": [],
            }
            for f in FUNCTIONS
        }
        for index in range(trials):
            for variant in ("lazy", "eager"):  # interleaved, so drift in the machine's load hits both alike
                for function, measured in bench.trial(eager=variant == "eager").items():
                    samples[variant][function].append(measured)
            for round_index in range(IMPORT_ROUNDS):
                for function, pair in bench.import_trial(round_index, eager=round_index < 2).items():
                    for mode, ms in pair.items():
                        imports[function][mode].append(ms)
                    imports[function]["ratio"].append(pair["ours"] / pair["floor"])
                    imports[function]["first_event_ratio"].append(pair["first_event"] / pair["floor"])
                    if "source_first_event" in pair:
                        imports[function]["source_over_built"].append(
                            pair["source_first_event"] / pair["first_event"]
                        )
            say(f"  trial {index + 1}/{trials} done")
        profile = bench.trial(eager=False, importtime=True)
        shutil.rmtree(bench.scratch, ignore_errors=True)  # the children's specs and answers

    rows: list[Row] = []
    per_function: dict[str, Any] = {}
    checks = []
    for function in FUNCTIONS:
        lazy, eager = samples["lazy"][function], samples["eager"][function]
        figures = {
            variant: {
                "init_ms": summarise(group, "init_ms"),
                "first_event_ms": summarise(group, "first_event_ms"),
                "cold_total_ms": median(s["init_ms"] + s["first_event_ms"] for s in group),
                "process_wall_ms": summarise(group, "process_wall_ms"),
                "openai_imported": any(s["openai_imported"] for s in group),
                "modules_loaded": summarise(group, "modules_loaded"),
                "peak_rss_mb": max(s["peak_rss_mb"] for s in group),
                "samples": len(group),
            }
            for variant, group in (("lazy", lazy), ("eager", eager))
        }
        figures["lazy"]["imports_by_package_ms"] = profile[function]["imports_by_package_ms"]
        per_function[function] = figures
        ours, base = figures["lazy"], figures["eager"]
        rows.append(Row(f"{function}: init (import the handler)", "ms", ours["init_ms"], base["init_ms"]))
        rows.append(
            Row(
                f"{function}: init + first event",
                "ms",
                ours["cold_total_ms"],
                base["cold_total_ms"],
                note=f"process wall time {ours['process_wall_ms']:.0f} vs {base['process_wall_ms']:.0f} ms",
            )
        )
        rows.append(Row(f"{function}: openai imported", "", ours["openai_imported"], base["openai_imported"]))
        if function in WITHOUT_OPENAI:
            checks.append(
                {"check": f"{function} never imports openai", "passed": not ours["openai_imported"]}
            )

    # over_floor (the headline): init's imports plus the first event's, over the floor; init_over_floor: the
    # handler's import alone, a detail (it hides what the first event then pays)
    over_floor, eager_over_floor, init_over_floor, source_over_built = {}, {}, {}, {}
    spread: dict[str, str] = {}
    for function in FUNCTIONS:
        ours_ms, floor_ms = median(imports[function]["ours"]), median(imports[function]["floor"])
        eager_ms = median(imports[function]["eager"])
        # the median of each pair's ratio: a pair ran side by side, so the machine's load cancels out
        init_over_floor[function] = round(median(imports[function]["ratio"]), 3)
        over_floor[function] = round(median(imports[function]["first_event_ratio"]), 3)
        eager_over_floor[function] = round(eager_ms / floor_ms, 3)
        source_over_built[function] = round(median(imports[function]["source_over_built"]), 3)
        # how far one pair's ratio strays from the next: on 2 shared cores the median of a dozen pairs moves
        # by a tenth from one run to the next of the same code, more than most changes to the imports
        quartiles = statistics.quantiles(imports[function]["first_event_ratio"], n=4)
        spread[function] = f"{quartiles[0]:.2f}-{quartiles[2]:.2f}"
        per_function[function]["import_vs_floor"] = {
            "ours_ms": ours_ms,
            "floor_ms": floor_ms,
            "eager_ms": eager_ms,
            "ours_plus_first_event_imports_ms": median(imports[function]["first_event"]),
            "ratio_per_pair": [round(r, 3) for r in imports[function]["ratio"]],
            "first_event_ratio_per_pair": [round(r, 3) for r in imports[function]["first_event_ratio"]],
            "samples": len(imports[function]["ours"]),
            "layer_without_bytecode_ms": median(imports[function]["source_first_event"]),
            "layer_without_bytecode_over_built_per_pair": [
                round(r, 3) for r in imports[function]["source_over_built"]
            ],
        }
        what = "boto3 + Logger + openai" if function == "generate" else "boto3 + Logger"
        rows.append(
            Row(
                f"{function}: import + first event's imports over its floor",
                "ms",
                per_function[function]["import_vs_floor"]["ours_plus_first_event_imports_ms"],
                floor_ms,
                note=(
                    f"median ratio per pair {over_floor[function]:.2f} (pairs' quartiles {spread[function]}), "
                    "limit 1.5x; floor: a bare handler "
                    f"importing {what}; the first event imports {', '.join(FIRST_EVENT_MODULES[function])}"
                ),
            )
        )
        rows.append(
            Row(
                f"{function}: init's import alone over its floor",
                "ms",
                ours_ms,
                floor_ms,
                note=f"median ratio per pair {init_over_floor[function]:.2f}: what init pays, not the cold start",
            )
        )
        rows.append(
            Row(
                f"{function}: import + first event's imports, layer without .pyc / as built",
                "ms",
                per_function[function]["import_vs_floor"]["layer_without_bytecode_ms"],
                per_function[function]["import_vs_floor"]["ours_plus_first_event_imports_ms"],
                note=(
                    f"median ratio per pair {source_over_built[function]:.2f}: what compiling the layer (plugin "
                    "and requirements) at each cold start cost before its build shipped bytecode"
                ),
            )
        )
        checks.append(
            {
                "check": f"{function} imports (init + first event) within 1.5x its floor",
                "passed": over_floor[function] <= 1.5,
            }
        )
        rows.append(
            Row(
                f"{function}: peak resident memory after the first event",
                "MB",
                per_function[function]["lazy"]["peak_rss_mb"],
                per_function[function]["eager"]["peak_rss_mb"],
                note=f"MemorySize {bench.specs[FUNCTIONS[function]].memory_mb} MB",
            )
        )
    heaviest = {f: per_function[f]["lazy"]["imports_by_package_ms"] for f in FUNCTIONS}
    xray = median(heaviest[f].get("aws_xray_sdk", 0.0) for f in FUNCTIONS)
    findings = [
        (
            f"The import path keeps openai out of {', '.join(WITHOUT_OPENAI)}; generate loads it on its first "
            "event (wiring.generate_deps), not at init."
        ),
        "Import plus the first event's imports over the floor (median of the ratios of pairs of fresh "
        "processes run side by side): "
        + ", ".join(f"{f} {ratio:.2f}x" for f, ratio in over_floor.items())
        + ". Each handler imports only Powertools' Logger at init and loads the domain, pydantic, botocore and "
        "(api) its routes on its first event; FIRST_EVENT_MODULES and FIRST_EVENT_MODELS name what a real first "
        "event (each function's events/ file served as in the first table) loads and builds, compared module "
        "by module and model by model (only the standard library's idna codec, which a connection loads, is "
        "left out). Init's import alone over the floor: "
        + ", ".join(f"{f} {ratio:.2f}x" for f, ratio in init_over_floor.items())
        + ". The X-Ray SDK is gone from the layer (tracing is Lambda's own active tracing), and with it the "
        f"layer's own botocore; aws_xray_sdk's import now costs {xray:.0f} ms. The AWS clients come from "
        "botocore's own session (wiring.aws_client): boto3, which the floor imports, is never loaded.",
    ]
    findings.append(
        "Bytecode: the layer (the plugin and its requirements) and generate's openai are compiled once by "
        "their builds (layers/shared/Makefile, functions/generate/Makefile); Lambda's /opt and /var/task are "
        "read-only, so shipped as sources they were compiled again at every cold start. The same imports "
        "from the layer without .pyc take "
        + ", ".join(f"{f} {ratio:.2f}x" for f, ratio in source_over_built.items())
        + " as long (median per pair). The price is a larger layer zip (the package size section)."
    )
    findings.append(
        "What a cold start still pays above its floor, beside the handler's own modules: pydantic itself "
        "(loaded by the step contracts and the run record; counted in instructions under callgrind, its import "
        "with a first model is about 0.45 of the floor, and botocore with the Logger about 0.88, which leaves a "
        "step function about 0.17 of its floor for the plugin's own modules and models within 1.5x: they take "
        "about 0.15, of which the run record's models about 0.06), the run record's models and the settings "
        "each function loads (built on the first event; models "
        "only another function uses are built on first use, pydantic's defer_build, and counted here when this "
        "function's first event builds them; the run record builds every model it nests, so deferring those "
        "saves nothing). Creating a pydantic class costs about half a percent of the floor even with its build "
        "deferred, so each function creates only its own settings (one module each under dalle_plugin.settings) "
        "and step contracts (domain/step_io/, one module per function); the ports' Protocol classes are for the "
        "type checker only (imported under TYPE_CHECKING), and the values that cross a port (port_records.py), "
        "the limiter's state and the other records a cold start creates are NamedTuples (a frozen dataclass "
        "compiles six generated methods at import, about 0.6% of a floor), and the "
        "run's list fields default to [] (a builtin default_factory makes pydantic parse its signature, "
        "compiling the tokenizer's regex). The API serves its routes through a router of its own "
        "(dalle_plugin.http_router) instead of Powertools' event handler, whose package imported every resolver "
        "(AppSync's with asyncio among them) and its OpenAPI validation: under callgrind the API's import and "
        "first event's imports went from 2.38 to 1.68 times the floor's instructions. Its first request read "
        "the plugin Secret through Powertools Parameters, which imports boto3 (CachedSecrets now calls "
        "Secrets Manager itself), and loaded the batch starter's module and the hub client, which a run's POST "
        "does not use (loaded by a large batch and the first hub call). A run's POST now loads only its own "
        "route's domain (paging and cancelling sessions, and telling the hub of a refused payload, load when "
        "asked; difflib only for a refusal's hint, a thread pool only for a batch), the model catalogue and "
        "the run options it derives are NamedTuples (the plugin's own static table, never input: its six "
        "pydantic schemas were built at every API cold start), the Secrets reader takes the API's own "
        "settings instead of building CommonSettings, the modules whose records and models a cold start "
        "creates evaluate their annotations as objects (a string annotation of a NamedTuple or a model is "
        "compiled one by one: about 200 of them on the API's path), the ports' dataclass compiles only its "
        "__init__ and the router compiles a route's pattern when a request of its method first meets it: "
        "under callgrind the API went from 1.671 to 1.600 times the floor's instructions, Extract, Attach and "
        "Record Failure from 1.522-1.538 to 1.515-1.527, Generate from 1.080 to 1.076 (instructions, "
        "deterministic: three full runs of that same code gave the API's wall-clock ratio 1.54, 1.51 and "
        "1.68, a spread larger than the change, so the pairs' quartiles now stand beside each median). Then, "
        "measured as the bench runs (its environment: PYDANTIC_DISABLE_PLUGINS set, which the figures above "
        "lacked; callgrind per statement of each module to rank): a field_validator method costs about 0.07% "
        "of a floor to create (pydantic inspects it), three times a validator in the annotation, so "
        "PluginConfig's eleven per-field checks run from one before-validator in the fields' order and the "
        "payload's and settings' checks sit in their annotations; the run's models take their camelCase "
        "aliases from string methods (to_camel ran four regular expressions per name; a test holds the "
        "aliases equal); ExtractedPrompt has a module of its own (only Extract, Generate and Attach create "
        "it); a POST no longer creates the authorizer's model (MIN_SECRET_CHARS is in domain.errors), the "
        "session routes' models (a route may name its model through a function) or builds Prompt (built on "
        "Extract's first prompt); dataclasses on the path have a docstring (without one, dataclass computes "
        "the signature as the doc); and PYTHONTZPATH gives zoneinfo, which pydantic imports, CPython's "
        "default path, which it otherwise reads through sysconfig by computing every build variable "
        "(about 0.7% of a floor): under callgrind the API went from 1.561 to 1.533 times its floor, Extract "
        "and Attach from 1.477 to 1.465, Record Failure from 1.489 to 1.474, Generate 1.076 to 1.075. What the "
        "API still pays beyond a step function is the request validation only it does (HubPayload about "
        "1.4% of a floor, PluginConfig 0.6%; the catalogue's checks), its settings and the shared key's "
        "queue's (CommonSettings, RateLimitSettings, ApiSettings, LimiterSettings: about 2.9%) and the router; the "
        "answers' models and the OpenAPI document load only for `make openapi`. Generate's floor includes "
        "openai, which brings pydantic with it."
    )
    openai_ms = heaviest["generate"].get("openai")
    if openai_ms:
        findings.append(
            f"Importing openai (with httpx and its other dependencies) costs generate about {openai_ms:.0f} "
            "ms of its first event: the price the other four functions do not pay."
        )
    for check in checks:
        if not check["passed"]:
            findings.insert(0, f"CHECK FAILED: {check['check']}")
    doc = document(
        NAME,
        "Cold start per function",
        method=(
            f"Median of {trials} fresh Python processes per function and variant (the import beside its "
            f"floor: median ratio of {trials * IMPORT_ROUNDS} pairs run side by side): the function's code "
            "directory and the layer on sys.path as on Lambda, handler module imported, then one event "
            "served against the running local stack (events/*.json, with a fresh session). 'init' is the "
            "import of the handler module; the first event includes the clients and settings the handler "
            "builds lazily. The layer is imported as the build ships it, with its bytecode "
            "(layers/shared/Makefile compiles it); a function's own app.py compiles at each start (no .pyc "
            "written, as on Lambda's read-only /var/task)."
        ),
        baseline="The same process after importing every dependency (openai, boto3, pydantic, Powertools, "
        "every plugin module) and creating the AWS and OpenAI clients before serving (an eager "
        "module).",
        rows=rows,
        quick=args.quick,
        findings=findings,
        started=started,
        details={
            "per_function": per_function,
            "checks": checks,
            "import_and_first_event_imports_over_floor": over_floor,
            "init_import_over_floor": init_over_floor,
            "layer_without_bytecode_over_built": source_over_built,
            "eager_import_over_floor": eager_over_floor,
            "first_event_against": "local stack",
            "trials": trials,
        },
    )
    doc["checks"] = checks
    path = write_result(doc)
    update_summary(
        {
            f"cold_start_import_over_floor_{f}": over_floor[f]
            for f in ("api", "extract", "generate", "attach")
        },
        baselines={
            f"cold_start_import_over_floor_{f}": eager_over_floor[f]
            for f in ("api", "extract", "generate", "attach")
        },
        quick=args.quick,
    )
    print_rows(doc["title"], rows)
    for function, packages in heaviest.items():
        say(f"  {function} import by package (ms): {packages}")
    say(f"wrote {path}")
    return 0 if all(check["passed"] for check in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
