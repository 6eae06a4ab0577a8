"""A function for tests of the local Lambda runtime itself: it reports its process, its module state and
its clock, and can be told to wait, to sleep past its timeout, to work the CPU, to leave a mark (on its start or its end) or to answer
too much."""

import os
import time
from pathlib import Path

INVOKES = 0  # module state: one per execution environment


def handler(event, context):
    global INVOKES  # noqa: PLW0603 - the module state is what this probe shows
    INVOKES += 1
    if event.get("mark"):
        Path(event["mark"]).write_text(str(os.getpid()))
    if event.get("hold_until_exists"):  # keeps the environment busy until the test lets it go
        deadline = time.monotonic() + 60
        while not Path(event["hold_until_exists"]).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    if event.get("sleep_s"):
        time.sleep(event["sleep_s"])
    if event.get("done_mark"):  # an effect of the invoke's end, left whatever became of its caller
        Path(event["done_mark"]).write_text(str(os.getpid()))
    if event.get("cpu_s"):  # work until the process has had this much CPU, however long the wall says
        until = time.process_time() + event["cpu_s"]
        while time.process_time() < until:
            pass
    answer = {
        "pid": os.getpid(),
        "invokes": INVOKES,
        "time": time.time(),
        "function": os.environ.get("AWS_LAMBDA_FUNCTION_NAME"),
        "remaining_ms": context.get_remaining_time_in_millis(),
    }
    if event.get("answer_bytes"):
        answer["padding"] = "x" * event["answer_bytes"]
    return answer
