"""The contract: the plugin's AngoHubClient sends the hub the same requests as the official SDK (imerit_ango).

Both are driven against one HubEmulator and the requests it recorded are compared: method, path, query
parameters, the headers that matter (``apikey``; ``Content-Type`` where there is a body) and JSON bodies.
Where the SDK only reaches a call from inside its plugin runtime (socket connection, FastAPI app,
scheduler threads), the test calls the lowest SDK function that builds the request, with the same
arguments the runtime passes; each such place says so.

Known, deliberate differences (normalized or asserted explicitly below):
- ``SDK.get_task(include_answer=True)`` sends Python's ``includeAnswer=True``; the client sends ``true``
  (the spelling the SDK's own ``get_tasks`` uses). Boolean query values are compared case-insensitively.
- ``SDK.make_request`` sends ``Content-Type: application/json`` even on GETs without a body; the client
  sends it only with a body. Content-Type is compared for requests that carry a body.
- The SDK PUTs uploads without a Content-Type (S3 then stores ``binary/octet-stream``); the client sends
  the image's type so the hub serves it as an image.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from dalle_plugin.adapters.hub_http import AngoHubClient
from dalle_plugin.domain.hub_answer import answer_to_write_format

from local_stack.hub_emulator import HubEmulator

PROJECT = "proj-dalle-demo"
API_KEY = "ango-local-key"
PLUGIN_ID, ORG_ID, RUN_BY = "plugin-dalle", "org-1", "user-1"
PNG_BYTES = b"\x89PNG\r\n\x1a\n" + bytes(range(120))


@pytest.fixture(scope="module")
def sdk_plugins():
    """``imerit_ango.plugins``, imported without letting its import-time ``logging.basicConfig`` stay."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    from imerit_ango import plugins

    root.handlers[:] = handlers
    root.setLevel(level)
    return plugins


@pytest.fixture
def hub():
    with HubEmulator() as emulator:
        emulator.load_samples()
        yield emulator


@pytest.fixture
def sdk(hub):
    from imerit_ango.sdk import SDK

    return SDK(api_key=API_KEY, host=hub.base_url)


@pytest.fixture
def client(hub):
    return AngoHubClient(hub.base_url, API_KEY, plugin_id=PLUGIN_ID, org_id=ORG_ID, run_by=RUN_BY, retries=0)


def normalized(request: dict[str, Any]) -> dict[str, Any]:
    query = {
        key: value.lower() if value in ("True", "False") else value for key, value in request["query"].items()
    }
    headers = {"apikey": request["headers"].get("apikey")}
    if request["body"] is not None:
        headers["content-type"] = request["headers"].get("content-type", "").split(";")[0]
    return {
        "method": request["method"],
        "path": request["path"],
        "query": query,
        "headers": headers,
        "body": request["body"],
    }


def sent_by(hub: HubEmulator, action: Callable[[], Any]) -> tuple[Any, list[dict[str, Any]]]:
    """What ``action`` returned, and the requests it made (normalized)."""
    before = len(hub.requests)
    result = action()
    return result, [normalized(r) for r in hub.requests[before:]]


def test_get_task_with_answer(hub, sdk, client):
    sdk_result, sdk_sent = sent_by(hub, lambda: sdk.get_task("task-cafe", include_answer=True))
    our_result, our_sent = sent_by(hub, lambda: client.get_task("task-cafe"))
    assert our_sent == sdk_sent and len(our_sent) == 1
    assert sdk_sent[0]["headers"]["apikey"]  # present (as a fingerprint)
    assert our_result == sdk_result["data"]["task"] and "answer" in our_result


def test_get_asset_by_id(hub, sdk, client):
    sdk_result, sdk_sent = sent_by(hub, lambda: sdk.get_assets(PROJECT, filters={"_id": "asset-fox"}))
    our_result, our_sent = sent_by(hub, lambda: client.get_asset(PROJECT, "asset-fox"))
    assert our_sent == sdk_sent
    [asset] = sdk_result["data"]["assets"]
    assert (our_result.external_id, our_result.data_url) == (asset["externalId"], asset["data"])


def test_list_tasks_of_batches(hub, sdk, client):
    for index in range(3):
        hub.add_asset(PROJECT, f"asset-b{index}", f"b{index}.txt", f"b{index}.txt", b"x", batches=["batch-1"])
        hub.add_task(PROJECT, f"task-b{index}", f"asset-b{index}")
    sdk_result, sdk_sent = sent_by(
        hub,
        lambda: sdk.get_tasks(
            PROJECT, page=1, limit=1000, batches=["batch-1"], include_answer=False
        ),  # the form the SDK still sends
    )
    our_result, our_sent = sent_by(hub, lambda: client.list_batch_tasks(PROJECT, ["batch-1"], 10_000))
    assert our_sent == sdk_sent
    listed = [(t["_id"], t["asset"]) for t in sdk_result["data"]["tasks"]]
    assert [(t.task_id, t.asset_id) for t in our_result] == listed and len(listed) == 3


def test_get_project(hub, sdk, client):
    sdk_result, sdk_sent = sent_by(hub, lambda: sdk.get_project(PROJECT))
    our_result, our_sent = sent_by(hub, lambda: client.get_project(PROJECT))
    assert our_sent == sdk_sent and our_result == sdk_result["data"]["project"]


def test_upload_url_request(hub, sdk, client):
    from imerit_ango.models.enums import StorageFileTypes

    # the SDK's own uploads (upload_files, brush masks) all go through _get_upload_url
    _, sdk_sent = sent_by(
        hub, lambda: sdk._get_upload_url("fox.png", project=PROJECT, file_type=StorageFileTypes.ASSET)
    )
    _, our_sent = sent_by(hub, lambda: client.upload_file(PROJECT, "fox.png", PNG_BYTES, "image/png"))
    assert our_sent[0] == sdk_sent[0] and len(sdk_sent) == 1


def test_upload_put_matches_the_sdks_upload_files(hub, sdk, client, tmp_path):
    image = tmp_path / "fox.png"
    image.write_bytes(PNG_BYTES)
    # upload_files also registers the asset (POST /v2/project/{id}/cloud, not emulated: the plugin never
    # creates assets); what matters here is its getUploadUrl + PUT pair
    _, sdk_sent = sent_by(hub, lambda: sdk.upload_files(PROJECT, [str(image)]))
    url, our_sent = sent_by(hub, lambda: client.upload_file(PROJECT, "fox.png", PNG_BYTES, "image/png"))
    [sdk_put] = [r for r in sdk_sent if r["method"] == "PUT"]
    [our_put] = [r for r in our_sent if r["method"] == "PUT"]
    storage_path = re.compile(rf"/storage/{PROJECT}/[0-9a-f]{{32}}-[^/]+\.png")
    for put in (sdk_put, our_put):
        assert storage_path.fullmatch(put["path"]) and "X-Amz-Signature" in put["query"]
        assert put["headers"]["apikey"] is None  # presigned: neither sends the hub key to storage
        assert put["body"] == {"bytes": len(PNG_BYTES)}
    assert [f["content_type"] for f in hub.stored_files()] == ["binary/octet-stream", "image/png"]
    assert url == hub.stored_files()[1]["url"]
    [sdk_get_url] = [r for r in sdk_sent if r["path"] == "/v2/getUploadUrl"]
    assert sdk_get_url["query"]["type"] == our_sent[0]["query"]["type"] == "assets"


def test_signed_url_request(hub, sdk, client):
    from imerit_ango.models.enums import StorageFileTypes

    stored = client.upload_file(PROJECT, "fox.png", PNG_BYTES, "image/png")
    sdk_result, sdk_sent = sent_by(
        hub, lambda: sdk._get_signed_url(stored, project=PROJECT, file_type=StorageFileTypes.ASSET)
    )
    our_result, our_sent = sent_by(hub, lambda: client.signed_url(PROJECT, stored))
    assert our_sent == sdk_sent
    assert sdk_result.split("?")[0] == our_result.split("?")[0] == stored


def test_attachments(hub, sdk, client):
    url = client.upload_file(PROJECT, "fox.png", PNG_BYTES, "image/png")
    _, sdk_sent = sent_by(
        hub,
        lambda: sdk.create_attachment(
            PROJECT, [{"externalId": "fox-in-snow.txt", "attachments": [{"type": "IMAGE", "value": url}]}]
        ),
    )
    _, our_sent = sent_by(hub, lambda: client.attach_image(PROJECT, "fox-in-snow.txt", url))
    assert our_sent == sdk_sent
    assert sdk_sent[0]["headers"]["content-type"] == "application/json"
    assert len(hub.attachments("fox-in-snow.txt")) == 2


def test_annotate_and_send_to_next_stage(hub, sdk, client):
    from imerit_ango.models.annotate import AnnotationPayload, Answer

    read_answer = hub.task("task-lighthouse")["answer"]
    # ModelPlugin._run_workflow (a workflow run) builds this payload, sets project_id on it and calls
    # _annotate_task(taskId, payload, overwrite, send_to_next_stage=True, is_plugin=True); running that
    # method itself would need a socket connection or the FastAPI app, so the test makes the same call.
    payload = AnnotationPayload(
        answer=Answer(
            objects=read_answer["tools"],
            classifications=read_answer["classifications"],
            relations=read_answer["relations"],
        )
    )
    payload.project_id = PROJECT
    _, sdk_sent = sent_by(
        hub,
        lambda: sdk._annotate_task(
            "task-lighthouse", payload, overwrite=True, send_to_next_stage=True, is_plugin=True
        ),
    )
    _, our_sent = sent_by(
        hub, lambda: client.annotate("task-lighthouse", answer_to_write_format(read_answer))
    )
    assert our_sent == sdk_sent and len(our_sent) == 1
    assert our_sent[0]["query"] == {"nextStage": "true", "isPlugin": "true"}
    assert hub.task("task-lighthouse")["answer"] == read_answer


def _plugin_without_runtime(sdk_plugins, hub: HubEmulator, callback: Callable[[dict], Any]):
    """A ModelPlugin without its __init__ (which opens a scheduler thread and expects a socket): the
    methods under test only read these attributes."""
    plugin = object.__new__(sdk_plugins.ModelPlugin)
    plugin.id, plugin.secret, plugin.host, plugin.callback = PLUGIN_ID, "secret", hub.base_url, callback
    plugin.logger = logging.getLogger("contract-test-plugin")
    return plugin


def _run_payload(session: str) -> dict[str, Any]:
    return {
        "projectId": PROJECT,
        "taskId": "task-fox",
        "apiKey": API_KEY,
        "orgId": ORG_ID,
        "runBy": RUN_BY,
        "session": session,
        "overwrite": True,
        "configJSON": "{}",
    }


def test_plugin_response_with_an_answer(hub, sdk, client, sdk_plugins, monkeypatch):
    from imerit_ango.models.annotate import AnnotationPayload, Answer

    monkeypatch.setattr(
        sdk_plugins, "CONNECTOR", "REST"
    )  # on_plugin then returns the body instead of emitting it

    read_answer = hub.task("task-fox")["answer"]

    def callback(data: dict) -> AnnotationPayload:
        return AnnotationPayload(
            answer=Answer(objects=read_answer["tools"], classifications=read_answer["classifications"])
        )

    # ModelPlugin.on_plugin builds the response body of an editor run; the SDK hands it back on the socket
    # (or as the REST reply), while this plugin, answering later, posts the same body to /v2/pluginResponse
    # as the SDK's _plugin_response does
    response = _plugin_without_runtime(sdk_plugins, hub, callback).on_plugin(_run_payload("sess-ok"))
    _, sdk_sent = sent_by(hub, lambda: sdk._plugin_response(response))
    _, our_sent = sent_by(hub, lambda: client.plugin_response("sess-ok", answer_to_write_format(read_answer)))
    assert our_sent == sdk_sent and len(our_sent) == 1
    assert set(our_sent[0]["body"]) == {"response", "session"}


def test_plugin_response_reporting_an_error(hub, sdk, client, sdk_plugins, monkeypatch):
    def failing(data: dict) -> None:
        raise RuntimeError("callback failed")

    monkeypatch.setattr(sdk_plugins, "CONNECTOR", "REST")  # the REST connector reports through the API
    plugin = _plugin_without_runtime(sdk_plugins, hub, failing)
    _, sdk_sent = sent_by(hub, lambda: plugin._callback(_run_payload("sess-err"), sdk))
    _, our_sent = sent_by(hub, lambda: client.plugin_response("sess-err", error=True))
    assert our_sent == sdk_sent and our_sent[0]["body"] == {"error": True, "session": "sess-err"}


@pytest.mark.parametrize(("level", "extra"), [("INFO", {"step": "generate"}), ("WARNING", {"progress": 50})])
def test_plugin_log(hub, client, level, extra):
    from imerit_ango.plugin_logger import PluginLogger

    # the PluginLogger a run receives (data["logger"]) with the REST connector posts through SDK._plugin_log
    logger = PluginLogger(
        "logger",
        PLUGIN_ID,
        ORG_ID,
        API_KEY,
        RUN_BY,
        "sess-log",
        plugin=SimpleNamespace(host=hub.base_url),
        connector="REST",
    )
    log = getattr(logger, level.lower())
    if level == "INFO":
        _, sdk_sent = sent_by(hub, lambda: log("Generating image", extra=extra))
    else:
        _, sdk_sent = sent_by(hub, lambda: log("Generating image", **extra))
    _, our_sent = sent_by(
        hub, lambda: client.plugin_log("sess-log", "Generating image", level=level, **extra)
    )
    assert our_sent == sdk_sent and len(our_sent) == 1
    assert our_sent[0]["body"]["level"] == level and our_sent[0]["body"]["pluginId"] == PLUGIN_ID
