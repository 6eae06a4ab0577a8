"""The hub emulator speaks the hub's REST calls (driven here with plain urllib, not the plugin's client)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from local_stack.hub_emulator import (
    DEFAULT_API_KEY,
    SAMPLES_DIR,
    HubEmulator,
    HubEmulatorProcess,
    api_key_fingerprint,
    load_sample_runs,
)

PROJECT = "proj-dalle-demo"
PNG_BYTES = b"\x89PNG\r\n\x1a\n" + bytes(range(64))


@pytest.fixture
def hub():
    with HubEmulator() as emulator:
        emulator.load_samples()
        yield emulator


def call(
    hub: HubEmulator | HubEmulatorProcess,
    method: str,
    path: str,
    body: Any = None,
    *,
    api_key: str | None = DEFAULT_API_KEY,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
):
    """(status, parsed JSON or raw bytes, content type) of one request."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(
        hub.base_url + path if path.startswith("/") else path, data=data, method=method
    )
    if api_key is not None:
        request.add_header("apikey", api_key)
    if body is not None:
        request.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, payload, ctype = (
                response.status,
                response.read(),
                response.headers.get("Content-Type", ""),
            )
    except urllib.error.HTTPError as error:
        status, payload, ctype = error.code, error.read(), error.headers.get("Content-Type", "")
    if ctype.startswith("application/json"):
        return status, json.loads(payload), ctype
    return status, payload, ctype


def upload(hub: HubEmulator | HubEmulatorProcess, name: str, body: bytes, content_type: str) -> str:
    status, document, _ = call(hub, "GET", f"/v2/getUploadUrl?name={name}&project={PROJECT}&type=assets")
    assert status == 200
    upload_url = document["data"]["uploadUrl"]
    status, _, _ = call(
        hub, "PUT", upload_url, raw=body, api_key=None, headers={"Content-Type": content_type}
    )
    assert status == 200
    return upload_url.split("?")[0]


# ---- auth and errors -------------------------------------------------------------------------------


def test_a_missing_or_unknown_api_key_gets_401_with_the_hubs_error_body(hub):
    for api_key in (None, "not-a-key"):
        status, document, _ = call(hub, "GET", "/v2/task/task-fox", api_key=api_key)
        assert status == 401
        assert document["status"] == "fail" and document["message"].startswith("Unauthorized")


def test_the_accepted_keys_are_configurable(hub):
    hub.api_keys = {"other-key"}
    assert call(hub, "GET", "/v2/task/task-fox")[0] == 401
    assert call(hub, "GET", "/v2/task/task-fox", api_key="other-key")[0] == 200


@pytest.mark.parametrize(
    "path",
    [
        "/v2/task/nope",
        "/v2/project/nope",
        "/v2/project/nope/assets",
        "/v2/getUploadUrl?name=a.png&project=nope&type=assets",
        "/v2/unknown",
    ],
)
def test_unknown_ids_and_routes_are_404_with_the_hubs_error_body(hub, path):
    status, document, _ = call(hub, "GET", path)
    assert status == 404
    assert document["status"] == "fail" and document["message"]


# ---- reads -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["true", "True"])  # the SDK sends both spellings in different calls
def test_get_task_includes_the_answer_only_when_asked(hub, flag):
    status, document, _ = call(hub, "GET", f"/v2/task/task-fox?includeAnswer={flag}")
    assert status == 200 and document["status"] == "success"
    task = document["data"]["task"]
    assert task["_id"] == "task-fox" and task["project"] == PROJECT and task["asset"] == "asset-fox"
    assert {"tools", "classifications", "relations"} <= set(task["answer"])
    assert task["answer"]["tools"][0]["ner"]["selection"].startswith("A red fox")

    status, document, _ = call(hub, "GET", "/v2/task/task-fox")
    assert status == 200 and "answer" not in document["data"]["task"]
    assert "answer" not in call(hub, "GET", "/v2/task/task-fox?includeAnswer=false")[1]["data"]["task"]


def test_get_assets_filters_by_id_and_external_id_and_pages(hub):
    filters = quote(json.dumps({"_id": "asset-cafe"}))
    status, document, _ = call(hub, "GET", f"/v2/project/{PROJECT}/assets?page=1&limit=10&filters={filters}")
    assert status == 200
    [asset] = document["data"]["assets"]
    assert asset["_id"] == "asset-cafe" and asset["externalId"] == "cafe-lyon.txt"
    assert asset["data"] == f"{hub.base_url}/files/{PROJECT}/cafe-lyon.txt"

    filters = quote(json.dumps({"externalId": "market-kyoto.txt"}))
    [asset] = call(hub, "GET", f"/v2/project/{PROJECT}/assets?filters={filters}")[1]["data"]["assets"]
    assert asset["_id"] == "asset-market"

    page_two = call(hub, "GET", f"/v2/project/{PROJECT}/assets?page=2&limit=3")[1]["data"]
    assert page_two["total"] == 4 and len(page_two["assets"]) == 1

    status, document, _ = call(
        hub, "GET", f"/v2/project/{PROJECT}/assets?filters={quote(json.dumps({'id': 'x'}))}"
    )
    assert status == 400 and "id" in document["message"]


def test_asset_files_are_served_as_the_raw_bytes_they_were_seeded_with(hub):
    body = "Crème brûlée au café".encode("cp1252")
    asset = hub.add_asset(
        PROJECT, "asset-cp1252", "dessert.txt", "dessert.txt", body, "text/plain; charset=windows-1252"
    )
    status, served, ctype = call(hub, "GET", asset["data"], api_key=None)
    assert status == 200 and served == body and ctype == "text/plain; charset=windows-1252"
    assert call(hub, "GET", f"/files/{PROJECT}/missing.txt", api_key=None)[0] == 404


def test_get_project_returns_the_ontology(hub):
    status, document, _ = call(hub, "GET", f"/v2/project/{PROJECT}")
    schema = document["data"]["project"]["categorySchema"]
    assert status == 200
    assert {(t["schemaId"], t["tool"], t["title"]) for t in schema["tools"]} == {
        ("ent-prompt", "ner", "Prompt text"),
        ("ent-other", "ner", "Other"),
    }
    assert schema["classifications"][0] == {
        **schema["classifications"][0],
        "schemaId": "cls-desc",
        "tool": "text",
    }


# ---- storage -------------------------------------------------------------------------------------


def test_storage_round_trip_keeps_bytes_and_content_type(hub):
    status, document, _ = call(hub, "GET", f"/v2/getUploadUrl?name=image.png&project={PROJECT}&type=assets")
    upload_url = document["data"]["uploadUrl"]
    assert status == 200 and "X-Amz-Signature=" in upload_url
    assert upload_url.startswith(f"{hub.base_url}/storage/{PROJECT}/") and upload_url.split("?")[0].endswith(
        "-image.png"
    )

    status, _, _ = call(
        hub, "PUT", upload_url, raw=PNG_BYTES, api_key=None, headers={"Content-Type": "image/png"}
    )
    assert status == 200
    permanent = upload_url.split("?")[0]
    status, served, ctype = call(hub, "GET", permanent, api_key=None)
    assert (status, served, ctype) == (200, PNG_BYTES, "image/png")
    [stored] = hub.stored_files()
    assert stored == {
        "url": permanent,
        "content_type": "image/png",
        "size": len(PNG_BYTES),
        "body": PNG_BYTES,
    }


def test_storage_put_needs_the_signature_it_was_issued(hub):
    upload_url = call(hub, "GET", f"/v2/getUploadUrl?name=a.png&project={PROJECT}&type=assets")[1]["data"][
        "uploadUrl"
    ]
    permanent = upload_url.split("?")[0]
    assert call(hub, "PUT", permanent, raw=PNG_BYTES, api_key=None)[0] == 403
    assert call(hub, "PUT", permanent + "?X-Amz-Signature=forged", raw=PNG_BYTES, api_key=None)[0] == 403
    assert (
        call(
            hub,
            "PUT",
            f"{hub.base_url}/storage/{PROJECT}/never-issued.png?X-Amz-Signature=x",
            raw=PNG_BYTES,
            api_key=None,
        )[0]
        == 403
    )
    assert hub.stored_files() == []
    # without a Content-Type the file is stored the way S3 stores it (http.client: urllib would add one)
    connection = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=5)
    connection.request("PUT", upload_url.removeprefix(hub.base_url), body=PNG_BYTES)
    assert connection.getresponse().status == 200
    connection.close()
    assert hub.stored_files()[0]["content_type"] == "binary/octet-stream"


def test_upload_url_requires_a_known_file_type(hub):
    status, document, _ = call(hub, "GET", f"/v2/getUploadUrl?name=a.png&project={PROJECT}&type=pictures")
    assert status == 400 and "assets" in document["message"]


def test_signed_url_adds_a_signature_to_the_given_url(hub):
    permanent = upload(hub, "a.png", PNG_BYTES, "image/png")
    document = call(
        hub, "GET", f"/v2/getSignedUrl?name={quote(permanent, safe='')}&project={PROJECT}&type=assets"
    )[1]
    signed = document["data"]["signedUrl"]
    assert signed.startswith(permanent + "?") and "X-Amz-Signature=" in signed
    assert call(hub, "GET", signed, api_key=None)[1] == PNG_BYTES


# ---- writes --------------------------------------------------------------------------------------


def attachments_body(external_id: str, value: str, kind: str = "IMAGE") -> dict[str, Any]:
    return {
        "project": PROJECT,
        "attachments": [{"externalId": external_id, "attachments": [{"type": kind, "value": value}]}],
    }


def test_attachments_accept_a_stored_png_and_are_recorded_per_external_id(hub):
    permanent = upload(hub, "fox.png", PNG_BYTES, "image/png")
    status, document, _ = call(hub, "POST", "/v2/attachments", attachments_body("fox-in-snow.txt", permanent))
    assert status == 200 and document["status"] == "success"
    assert hub.attachments("fox-in-snow.txt") == [
        {
            "project": PROJECT,
            "externalId": "fox-in-snow.txt",
            "asset_ids": ["asset-fox"],
            "type": "IMAGE",
            "value": permanent,
        }
    ]
    assert hub.attachments("cafe-lyon.txt") == []


@pytest.mark.parametrize("case", ["bad type", "not uploaded", "not an image", "unknown asset", "text link"])
def test_attachments_are_validated(hub, case):
    stored_png = upload(hub, "fox.png", PNG_BYTES, "image/png")
    stored_text = upload(hub, "notes.txt", b"hello", "text/plain")
    body, expected = {
        "bad type": (attachments_body("fox-in-snow.txt", stored_png, kind="PICTURE"), 400),
        "not uploaded": (
            attachments_body("fox-in-snow.txt", f"{hub.base_url}/storage/{PROJECT}/ghost.png"),
            400,
        ),
        "not an image": (attachments_body("fox-in-snow.txt", stored_text), 400),
        "unknown asset": (attachments_body("no-such.txt", stored_png), 404),
        "text link": (attachments_body("fox-in-snow.txt", "https://example.invalid/notes.txt"), 400),
    }[case]
    status, document, _ = call(hub, "POST", "/v2/attachments", body)
    assert status == expected and document["status"] == "fail"
    assert hub.attachments() == []


def test_annotate_stores_the_answer_in_read_format_and_moves_the_stage(hub):
    before = hub.task("task-fox")
    write_answer = {
        "objects": before["answer"]["tools"],
        "classifications": before["answer"]["classifications"],
        "relations": [],
    }
    body = {"answer": write_answer, "brushDataUrl": None, "medicalBrushDataUrl": None, "duration": 0}
    status, _, _ = call(hub, "POST", "/v2/annotate/task-fox?nextStage=true&isPlugin=true", body)
    assert status == 200
    after = hub.task("task-fox")
    assert after["answer"] == before["answer"] and (before["stage"], after["stage"]) == ("Plugin", "Complete")
    [record] = hub.annotations("task-fox")
    assert record["next_stage"] and record["is_plugin"] and record["answer"] == write_answer

    call(
        hub,
        "POST",
        "/v2/annotate/task-cafe?nextStage=false&isPlugin=false",
        {**body, "answer": {"objects": []}},
    )
    assert hub.task("task-cafe")["stage"] == "Plugin" and hub.task("task-cafe")["answer"]["tools"] == []


def test_annotate_rejects_a_body_without_an_answer_and_unknown_tasks(hub):
    assert call(hub, "POST", "/v2/annotate/task-fox?nextStage=true", {"duration": 0})[0] == 400
    assert call(hub, "POST", "/v2/annotate/task-fox", {"answer": {"objects": {}}})[0] == 400
    assert call(hub, "POST", "/v2/annotate/nope", {"answer": {"objects": []}})[0] == 404
    assert hub.annotations() == []


def test_plugin_responses_and_logs_are_recorded_per_session(hub):
    assert call(hub, "POST", "/v2/pluginResponse", {"response": {"objects": []}, "session": "s1"})[0] == 200
    assert call(hub, "POST", "/v2/pluginResponse", {"error": True, "session": "s2"})[0] == 200
    assert (
        call(hub, "POST", "/v2/pluginLog", {"level": "INFO", "session": "s1", "msg": "hi", "pluginId": "p"})[
            0
        ]
        == 200
    )
    assert call(hub, "POST", "/v2/pluginResponse", {"response": 1})[0] == 400
    assert call(hub, "POST", "/v2/pluginLog", {"session": "s1"})[0] == 400
    assert hub.plugin_responses("s2") == [{"error": True, "session": "s2"}]
    assert len(hub.plugin_responses()) == 2
    assert [log["msg"] for log in hub.plugin_logs("s1")] == ["hi"] and hub.plugin_logs("s2") == []


def test_requests_are_recorded_with_the_api_key_as_a_fingerprint_only(hub):
    before = time.time()
    call(hub, "POST", "/v2/pluginLog?x=1&x=2", {"session": "s", "msg": "m"})
    [record] = hub.requests
    assert before <= record.pop("received_at") <= time.time()
    assert record == {
        "method": "POST",
        "path": "/v2/pluginLog",
        "query": {"x": ["1", "2"]},
        "headers": {"content-type": "application/json", "apikey": api_key_fingerprint(DEFAULT_API_KEY)},
        "body": {"session": "s", "msg": "m"},
    }
    assert DEFAULT_API_KEY not in json.dumps(call(hub, "GET", "/_emulator/state", api_key=None)[1])


# ---- faults, state, reset -------------------------------------------------------------------------


def test_fail_next_answers_the_status_for_the_next_matching_requests_only(hub):
    hub.fail_next("/v2/task/", status=503, times=2)
    first, second = (call(hub, "GET", "/v2/task/task-fox") for _ in range(2))
    assert first[0] == second[0] == 503 and first[1] == {
        "status": "error",
        "message": "Injected fault: HTTP 503",
    }
    assert call(hub, "GET", f"/v2/project/{PROJECT}")[0] == 200  # not matching: untouched
    assert call(hub, "GET", "/v2/task/task-fox")[0] == 200
    assert [r.get("fault") for r in hub.requests] == [503, 503, None, None]


def test_a_fault_can_be_limited_to_a_method(hub):
    hub.fail_next("/v2/", status=500, method="POST")
    assert call(hub, "GET", "/v2/task/task-fox")[0] == 200
    assert call(hub, "POST", "/v2/pluginLog", {"session": "s", "msg": "m"})[0] == 500


def test_latency_fault_delays_the_answer(hub):
    hub.fail_next("/v2/task/", status=None, latency_s=0.3)
    started = time.monotonic()
    assert call(hub, "GET", "/v2/task/task-fox")[0] == 200
    assert time.monotonic() - started >= 0.3


def test_faults_can_be_set_and_cleared_over_http(hub):
    status, document, _ = call(
        hub,
        "POST",
        "/_emulator/faults",
        [{"path_prefix": "/v2/pluginLog", "status": 502, "times": 3}],
        api_key=None,
    )
    assert status == 200 and document["faults"][0]["remaining"] == 3
    assert call(hub, "POST", "/v2/pluginLog", {"session": "s", "msg": "m"})[0] == 502
    assert call(hub, "DELETE", "/_emulator/faults", api_key=None)[0] == 200
    assert call(hub, "POST", "/v2/pluginLog", {"session": "s", "msg": "m"})[0] == 200
    assert call(hub, "POST", "/_emulator/faults", {"status": 500}, api_key=None)[0] == 400


def test_state_and_reset_over_http(hub):
    permanent = upload(hub, "a.png", PNG_BYTES, "image/png")
    call(hub, "POST", "/v2/attachments", attachments_body("fox-in-snow.txt", permanent))
    call(hub, "POST", "/v2/annotate/task-fox?nextStage=true&isPlugin=true", {"answer": {"objects": []}})
    hub.fail_next("/v2/task/", times=5)
    state = call(hub, "GET", "/_emulator/state", api_key=None)[1]
    assert len(state["attachments"]) == 1 and len(state["annotations"]) == 1 and len(state["faults"]) == 1
    assert state["stored_files"][0]["url"] == permanent and "body" not in state["stored_files"][0]

    assert call(hub, "POST", "/_emulator/reset", api_key=None)[0] == 200
    state = call(hub, "GET", "/_emulator/state", api_key=None)[1]
    assert all(not state[key] for key in ("requests", "attachments", "annotations", "stored_files", "faults"))
    fox = hub.task("task-fox")
    assert fox["stage"] == "Plugin" and len(fox["answer"]["tools"]) == 2


def test_stop_does_not_wait_for_a_stalled_request():
    emulator = HubEmulator().start()
    emulator.fail_next("/v2/", status=None, latency_s=30)
    stalled = threading.Thread(
        target=call, args=(emulator, "GET", "/v2/task/x"), kwargs={"timeout": 30}, daemon=True
    )
    stalled.start()
    time.sleep(0.1)
    started = time.monotonic()
    emulator.stop()
    assert time.monotonic() - started < 5


# ---- in a process of its own (as the local stack runs it) -------------------------------------------


@pytest.fixture(scope="module")
def hub_process():
    with HubEmulatorProcess() as running:
        yield running


@pytest.fixture
def remote_hub(hub_process):
    hub_process.reset()
    yield hub_process
    hub_process.clear_faults()


def test_the_process_client_runs_the_hub_in_another_process(remote_hub):
    assert remote_hub.pid != os.getpid()
    assert remote_hub.health() == {"pid": remote_hub.pid, "port": remote_hub.port}
    assert remote_hub.base_url == f"http://127.0.0.1:{remote_hub.port}"


def test_the_process_client_seeds_scripts_and_reads_like_the_emulator(remote_hub):
    remote_hub.load_samples()
    text = "Caf\u00e9 au lait".encode("utf-16")
    remote_hub.add_project("proj-remote", {"classifications": [{"schemaId": "c1", "title": "Prompt"}]})
    asset = remote_hub.add_asset("proj-remote", "asset-r", "ext-r", "r.txt", text, "text/plain")
    task = remote_hub.add_task("proj-remote", "task-r", "asset-r", {"classifications": []}, stage="Plugin")
    assert asset["data"] == f"{remote_hub.base_url}/files/proj-remote/r.txt" and task["stage"] == "Plugin"
    assert call(remote_hub, "GET", asset["data"], api_key=None)[1] == text

    assert call(remote_hub, "GET", "/v2/task/task-r", api_key="key-r")[0] == 401
    remote_hub.add_api_key("key-r")
    assert call(remote_hub, "GET", "/v2/task/task-r", api_key="key-r")[0] == 200

    permanent = upload(remote_hub, "a.png", PNG_BYTES, "image/png")
    attached = call(remote_hub, "POST", "/v2/attachments", attachments_body("fox-in-snow.txt", permanent))
    assert attached[0] == 200
    call(remote_hub, "POST", "/v2/annotate/task-fox?nextStage=true", {"answer": {"objects": []}})
    call(remote_hub, "POST", "/v2/pluginResponse", {"session": "s1", "error": False})
    call(remote_hub, "POST", "/v2/pluginLog", {"session": "s1", "msg": "hi"})
    [stored] = remote_hub.stored_files()
    assert (stored["url"], stored["body"], stored["content_type"]) == (permanent, PNG_BYTES, "image/png")
    assert [a["value"] for a in remote_hub.attachments("fox-in-snow.txt")] == [permanent]
    assert remote_hub.attachments("elsewhere") == []
    assert len(remote_hub.annotations("task-fox")) == 1 and remote_hub.annotations("task-r") == []
    assert remote_hub.task("task-fox")["stage"] == "Complete"
    assert remote_hub.plugin_responses("s1") == [{"session": "s1", "error": False}]
    assert [line["msg"] for line in remote_hub.plugin_logs("s1")] == ["hi"]
    assert remote_hub.plugin_logs("s2") == []
    assert remote_hub.requests[0]["path"] == "/files/proj-remote/r.txt"
    assert [r["path"] for r in remote_hub.requests_since(len(remote_hub.requests) - 1)] == ["/v2/pluginLog"]
    assert len(remote_hub.state()["attachments"]) == 1

    remote_hub.fail_next("/v2/pluginLog", 502, times=5, body_contains="marker-a")
    remote_hub.fail_next("/v2/pluginLog", 503, times=5, body_contains="marker-b")
    remote_hub.clear_faults(path_prefix="/v2/pluginLog", body_contains="marker-a")
    assert call(remote_hub, "POST", "/v2/pluginLog", {"session": "marker-a", "msg": "m"})[0] == 200
    assert call(remote_hub, "POST", "/v2/pluginLog", {"session": "marker-b", "msg": "m"})[0] == 503
    with pytest.raises(ValueError, match="times must be at least 1"):
        remote_hub.fail_next("/v2/", times=0)
    with pytest.raises(ValueError, match="task-nowhere"):
        remote_hub.task("task-nowhere")

    remote_hub.reset()
    assert remote_hub.stored_files() == [] and remote_hub.requests == []
    assert remote_hub.task("task-fox")["stage"] == "Plugin"


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()  # a zombie nobody reaps has stopped running all the same
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _signal_state(pid: int) -> str:
    """The process's state and signal masks as /proc shows them (blocked, ignored, caught, pending)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except FileNotFoundError:
        return "gone"
    return "; ".join(line for line in lines if line.startswith(("State", "Sig", "ShdPnd")))


# A foreground job in a terminal, as Ctrl-C meets it: SIGINT handled (a run started in the background, as
# `cmd &` starts CI, ignores it, and a child inherits that across exec: the parent then never saw its Ctrl-C),
# and the wait in a short sleep, as `make serve` waits, not in a read of stdin (a signal that lands after
# Python last looked and before a blocking read begins is handled only when the read returns, and the test
# sends Ctrl-C the moment the pid is printed, right there: one try in 600 hung so on this machine).
_PARENT = """
import signal, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from local_stack.hub_emulator import HubEmulatorProcess
with HubEmulatorProcess() as hub:
    print(hub.pid, flush=True)
    while True:
        time.sleep(0.2)
"""


@pytest.mark.parametrize("how", ["kill -9 the parent", "Ctrl-C"])
def test_the_emulator_process_does_not_outlive_its_parent(how):
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
        text=True,
    )
    try:
        child = int(parent.stdout.readline())
        assert _alive(child)
        if how == "Ctrl-C":
            os.killpg(parent.pid, signal.SIGINT)  # what a terminal does: the whole foreground group
        else:
            parent.kill()
        try:
            parent.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the parent did not end on {how}: {_signal_state(parent.pid)}")
        deadline = time.monotonic() + 60
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child)
    finally:
        parent.kill()
        parent.wait()


# ---- the bundled samples -------------------------------------------------------------------------


def test_sample_entity_offsets_match_the_served_text(hub):
    checked = 0
    for task_id in ("task-fox", "task-cafe", "task-lighthouse", "task-market"):
        task = call(hub, "GET", f"/v2/task/{task_id}?includeAnswer=true")[1]["data"]["task"]
        text = call(hub, "GET", task["data"], api_key=None)[1].decode("utf-8")
        for tool in task["answer"]["tools"]:
            ner = tool["ner"]
            assert tool["tool"] == "ner" and 0 <= ner["start"] < ner["end"] <= len(text)
            assert text[ner["start"] : ner["end"]] == ner["selection"]  # character offsets, end exclusive
            checked += 1
    assert checked >= 6


def test_samples_cover_the_shapes_the_plugin_must_handle(hub):
    seed = json.loads((SAMPLES_DIR / "hub_seed.json").read_text(encoding="utf-8"))
    [project] = seed["projects"]
    tasks = [hub.task(t["taskId"]) for t in project["tasks"]]
    tools = [tool for task in tasks for tool in task["answer"]["tools"]]
    texts = {a["assetId"]: a["text"] for a in project["assets"]}
    # non-ASCII text before an entity: character and byte offsets differ
    assert any(
        not texts[t["asset"]][: tool["ner"]["start"]].isascii()
        for t in tasks
        for tool in t["answer"]["tools"]
        if tool["schemaId"] == "ent-prompt"
    )
    assert {tool["schemaId"] for tool in tools} == {"ent-prompt", "ent-other"}
    assert any(
        c["schemaId"] == "cls-desc" and c["answer"] for t in tasks for c in t["answer"]["classifications"]
    )
    assert any(c["tool"] == "text" and c["answer"] for tool in tools for c in tool["classifications"])


def test_sample_runs_are_hub_payloads_for_the_seeded_tasks(hub):
    document = json.loads((SAMPLES_DIR / "runs.json").read_text(encoding="utf-8"))
    assert "_comment" in document
    runs = load_sample_runs(hub.base_url)
    assert len(runs) == len(document["runs"])
    sources = set()
    for run in runs:
        payload = run.payload
        assert run.title and "title" not in payload
        assert {
            "projectId",
            "taskId",
            "assetId",
            "dataURL",
            "categorySchema",
            "configJSON",
            "apiKey",
            "orgId",
            "runBy",
            "session",
            "overwrite",
        } <= set(payload)
        assert isinstance(payload["configJSON"], str)
        sources.add(json.loads(payload["configJSON"])["get_prompt_from"])
        task = hub.task(payload["taskId"])
        assert task["asset"] == payload["assetId"] and task["project"] == payload["projectId"]
        status, served, _ = call(hub, "GET", payload["dataURL"], api_key=None)
        assert status == 200 and served
        for mapping in payload["categorySchema"] or []:
            assert mapping["modelClass"] == "Prompt" and mapping["schemaId"]
    assert sources == {"full-text-asset", "entity-annotation", "text-annotation"}
    assert any("workflow" not in run.payload for run in runs)
    assert any(run.payload.get("workflow") is True for run in runs)
    assert len({run.payload["session"] for run in runs}) == len(runs)
