"""One cold start in a fresh interpreter: ``python bench/_cold_child.py <spec.json>``.

Started by bench/cold_start.py. Like the Lambda runtime, it puts the function's code directory and then the
layer on the import path, imports the handler module and serves one event; it writes what it measured to
the spec's ``out`` file. With ``eager`` it first imports every dependency and creates the AWS clients
(the shape the plugin avoids), so the two variants differ only in what happens before the first event.
Nothing is imported at the top beyond the standard library, so the timings start clean.
"""

import contextlib
import importlib
import json
import sys
import time

STARTED = time.perf_counter()
EAGER_MODULES = (
    "openai",
    "boto3",
    "pydantic",
    "aws_lambda_powertools",
    "aws_lambda_powertools.logging",
    "aws_lambda_powertools.metrics",
    "aws_lambda_powertools.tracing",
)
AWS_SERVICES = ("dynamodb", "kms", "s3", "secretsmanager", "stepfunctions")


class Context:
    def __init__(self, name: str, memory_mb: int):
        self.function_name = name
        self.function_version = "$LATEST"
        self.invoked_function_arn = f"arn:aws:lambda:us-east-1:123456789012:function:{name}"
        self.memory_limit_in_mb = memory_mb
        self.aws_request_id = "00000000-0000-4000-8000-000000000001"
        self.log_group_name = f"/aws/lambda/{name}"
        self.log_stream_name = "bench/cold-start"
        self._deadline = time.monotonic() + 30

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def peak_rss_mb() -> float:
    """This process's peak resident memory, what the function's MemorySize must hold: VmHWM, which starts
    afresh at exec (getrusage's ru_maxrss would carry over the parent's)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def load_everything() -> None:
    """What an eager module would do at import: every library, every plugin module, every client."""
    import pkgutil

    for name in EAGER_MODULES:
        with contextlib.suppress(ImportError):  # the tracer's X-Ray SDK is no longer in the layer
            importlib.import_module(name)
    import dalle_plugin

    for info in pkgutil.walk_packages(dalle_plugin.__path__, "dalle_plugin."):
        importlib.import_module(info.name)
    from dalle_plugin import wiring

    for service in AWS_SERVICES:
        wiring.aws_client(service)
    import openai

    openai.OpenAI(api_key="sk-eager-client-at-import", max_retries=0)


def import_only(spec: dict) -> None:
    """The import a function pays at its cold start, and nothing else (mode ``ours``), or the floor: a bare
    handler importing only what the function cannot avoid (mode ``floor``): boto3 and Powertools' Logger,
    and for a function that generates images also openai. Mode ``eager`` is the baseline: every dependency,
    every plugin module and every client at import."""
    started = time.perf_counter()
    if spec["mode"] == "eager":  # the baseline: what an eager module imports at init
        load_everything()
    elif spec["mode"] == "floor":
        import boto3  # noqa: F401
        from aws_lambda_powertools import Logger

        Logger(service="floor")
        if spec["needs_openai"]:
            import openai  # noqa: F401
    else:
        importlib.import_module(spec["module"])
    imported = time.perf_counter()
    # What the handler imports on its first event rather than at init (mode ``ours`` only): timed apart, so
    # the figure of the import is not flattered by work the first invocation then pays.
    for name in spec.get("first_event_modules") or ():
        importlib.import_module(name)
    for name in spec.get("first_event_models") or ():  # built on first use (defer_build): built here too
        module, model = name.split(":")
        getattr(importlib.import_module(module), model).model_rebuild()
    with open(spec["out"], "w") as handle:
        json.dump(
            {
                "import_ms": (imported - started) * 1000,
                "first_event_import_ms": (time.perf_counter() - imported) * 1000,
                "modules_loaded": len(sys.modules),
                "error": None,
                "status_code": None,
            },
            handle,
        )


def main() -> None:
    with open(sys.argv[1]) as handle:
        spec = json.load(handle)
    # Lambda's import path: the function's code (/var/task), then the layer (/opt/python).
    sys.path[0:1] = [spec["code_dir"], spec["layer_dir"]]
    if spec.get("mode"):
        import_only(spec)
        return
    before_import = time.perf_counter()
    if spec["eager"]:
        load_everything()
    eager_done = time.perf_counter()
    module = importlib.import_module(spec["module"])
    imported = time.perf_counter()
    handler = getattr(module, spec["handler"])
    error = None
    try:
        result = handler(spec["event"], Context(spec["function_name"], spec["memory_mb"]))
    except Exception as exc:  # noqa: BLE001 - reported, not hidden: the parent fails the figure
        result, error = None, f"{type(exc).__name__}: {exc}"
    served = time.perf_counter()
    status = result.get("statusCode") if isinstance(result, dict) else None
    measured = {
        "interpreter_to_main_ms": (before_import - STARTED) * 1000,
        "eager_ms": (eager_done - before_import) * 1000,
        "import_ms": (imported - eager_done) * 1000,
        "init_ms": (imported - before_import) * 1000,
        "first_event_ms": (served - imported) * 1000,
        "openai_imported": "openai" in sys.modules,
        "modules_loaded": len(sys.modules),
        "peak_rss_mb": peak_rss_mb(),
        "status_code": status,
        "error": error,
        # what the state machine hands to the next step (the bench feeds it to that step's cold start)
        "result": result if isinstance(result, dict) else None,
    }
    with open(spec["out"], "w") as handle:
        json.dump(measured, handle)


if __name__ == "__main__":
    main()
