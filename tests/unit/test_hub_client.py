"""AngoHubClient against a running hub emulator: each call, retries, errors, timeouts, size cap, secrecy."""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

import pytest
from dalle_plugin.adapters.hub_http import AngoHubClient
from dalle_plugin.domain.errors import AssetUnreadable, HubRequestRejected, HubUnavailable
from dalle_plugin.domain.hub_answer import answer_to_write_format
from dalle_plugin.ports import HubAsset, HubClient

from local_stack.hub_emulator import HubEmulator, api_key_fingerprint
from local_stack.ports import free_port

PROJECT = "proj-dalle-demo"
SECRET_KEY = "ango-user-key-DO-NOT-LEAK-7f3a"
PNG_BYTES = b"\x89PNG\r\n\x1a\n" + bytes(range(200))


@pytest.fixture
def hub():
    with HubEmulator(api_keys={SECRET_KEY}) as emulator:
        emulator.load_samples()
        yield emulator


class SleepRecorder:
    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def make_client(hub: HubEmulator, **overrides: Any) -> AngoHubClient:
    options: dict[str, Any] = {
        "plugin_id": "plugin-dalle",
        "org_id": "org-1",
        "run_by": "user-1",
        "timeout_s": 2.0,
        "retries": 3,
        "backoff_s": 0.01,
        "sleep": SleepRecorder(),
    }
    options.update(overrides)
    return AngoHubClient(hub.base_url, options.pop("api_key", SECRET_KEY), **options)


def hub_requests(hub: HubEmulator, prefix: str = "/") -> list[dict[str, Any]]:
    return [r for r in hub.requests if r["path"].startswith(prefix)]


def test_it_implements_the_port(hub):
    client: HubClient = make_client(hub)  # a type checker verifies the signatures; this checks the names
    for name in (
        "get_task",
        "get_asset",
        "fetch_text",
        "upload_file",
        "attach_image",
        "annotate",
        "plugin_response",
        "plugin_log",
    ):
        assert callable(getattr(client, name))


# ---- each call -----------------------------------------------------------------------------------


def test_get_task_returns_the_task_with_its_answer(hub):
    task = make_client(hub).get_task("task-lighthouse")
    assert task["_id"] == "task-lighthouse" and task["answer"] == hub.task("task-lighthouse")["answer"]
    [request] = hub.requests
    assert request["query"] == {"includeAnswer": "true"}
    assert request["headers"]["apikey"] == api_key_fingerprint(SECRET_KEY)


def test_get_asset_filters_by_id(hub):
    asset = make_client(hub).get_asset(PROJECT, "asset-cafe")
    assert asset == HubAsset("asset-cafe", "cafe-lyon.txt", f"{hub.base_url}/files/{PROJECT}/cafe-lyon.txt")
    assert hub.requests[0]["query"] == {"page": "1", "limit": "10", "filters": '{"_id": "asset-cafe"}'}


def test_get_asset_that_does_not_exist_is_rejected(hub):
    with pytest.raises(HubRequestRejected, match="asset-gone"):
        make_client(hub).get_asset(PROJECT, "asset-gone")


def test_fetch_text_returns_raw_bytes_without_sending_the_api_key(hub):
    body = "Crème brûlée".encode("cp1252")
    asset = hub.add_asset(PROJECT, "asset-cp", "cp.txt", "cp.txt", body)
    assert make_client(hub).fetch_text(asset["data"]) == body
    [request] = hub.requests
    assert "apikey" not in request["headers"]  # asset files live on another host in production


def test_upload_file_puts_the_bytes_and_returns_the_url_without_query(hub):
    url = make_client(hub).upload_file(PROJECT, "fox.png", PNG_BYTES, "image/png")
    [stored] = hub.stored_files()
    assert url == stored["url"] and "?" not in url and url.endswith("-fox.png")
    assert (stored["body"], stored["content_type"]) == (PNG_BYTES, "image/png")
    get_url, put = hub.requests
    assert get_url["query"] == {"name": "fox.png", "project": PROJECT, "type": "assets"}
    assert put["method"] == "PUT" and "apikey" not in put["headers"] and "X-Amz-Signature" in put["query"]


def test_attach_image_posts_the_attachment_body(hub):
    client = make_client(hub)
    url = client.upload_file(PROJECT, "fox.png", PNG_BYTES, "image/png")
    client.attach_image(PROJECT, "fox-in-snow.txt", url)
    assert hub.attachments("fox-in-snow.txt")[0]["value"] == url
    assert hub.requests[-1]["body"] == {
        "project": PROJECT,
        "attachments": [{"externalId": "fox-in-snow.txt", "attachments": [{"type": "IMAGE", "value": url}]}],
    }


def test_annotate_sends_the_answer_and_moves_the_task_on(hub):
    read_answer = hub.task("task-fox")["answer"]
    make_client(hub).annotate("task-fox", answer_to_write_format(read_answer))
    [request] = hub.requests
    assert request["path"] == "/v2/annotate/task-fox" and request["query"] == {
        "nextStage": "true",
        "isPlugin": "true",
    }
    assert request["body"] == {
        "answer": answer_to_write_format(read_answer),
        "brushDataUrl": None,
        "medicalBrushDataUrl": None,
        "duration": 0,
    }
    task = hub.task("task-fox")
    assert task["answer"] == read_answer and task["stage"] == "Complete"


def test_annotate_given_a_read_format_answer_still_sends_objects(hub):
    read_answer = hub.task("task-cafe")["answer"]
    make_client(hub).annotate("task-cafe", read_answer)
    assert hub.requests[0]["body"]["answer"]["objects"] == read_answer["tools"]
    assert hub.task("task-cafe")["answer"] == read_answer


def test_plugin_response_bodies(hub):
    client = make_client(hub)
    client.plugin_response("sess-1", {"objects": [], "classifications": [], "relations": []})
    client.plugin_response("sess-2", error=True)
    assert hub.plugin_responses() == [
        {"response": {"objects": [], "classifications": [], "relations": []}, "session": "sess-1"},
        {"error": True, "session": "sess-2"},
    ]


def test_plugin_log_body_is_the_plugin_loggers(hub):
    make_client(hub).plugin_log("sess-1", "Image generated", level="info", step="generate", seconds=12.5)
    assert hub.plugin_logs("sess-1") == [
        {
            "step": "generate",
            "seconds": 12.5,
            "level": "INFO",
            "organization": "org-1",
            "pluginId": "plugin-dalle",
            "runBy": "user-1",
            "session": "sess-1",
            "msg": "Image generated",
        }
    ]


def test_get_project_and_signed_url(hub):
    client = make_client(hub)
    assert client.get_project(PROJECT)["categorySchema"]["classifications"][0]["schemaId"] == "cls-desc"
    url = client.upload_file(PROJECT, "a.png", PNG_BYTES, "image/png")
    signed = client.signed_url(PROJECT, url)
    assert signed.startswith(url + "?") and client.fetch_text(signed) == PNG_BYTES


# ---- retries and errors --------------------------------------------------------------------------


def test_5xx_is_retried_with_growing_backoff_then_succeeds(hub):
    sleeps = SleepRecorder()
    hub.fail_next("/v2/task/", status=503, times=2)
    task = make_client(hub, sleep=sleeps, backoff_s=0.1).get_task("task-fox")
    assert task["_id"] == "task-fox"
    assert [r.get("fault") for r in hub.requests] == [503, 503, None]
    first, second = sleeps.delays
    assert 0.05 <= first <= 0.1 and 0.1 <= second <= 0.2  # exponential ceilings, equal jitter below them


def test_gives_up_with_hub_unavailable_after_the_retries(hub):
    hub.fail_next("/v2/pluginResponse", status=502, times=10)
    with pytest.raises(HubUnavailable) as caught:
        make_client(hub, retries=2).plugin_response("s", response={})
    assert len(hub.requests) == 3
    message = str(caught.value)
    assert (
        "POST /v2/pluginResponse" in message
        and "3 attempt" in message
        and "Injected fault: HTTP 502" in message
    )


def test_a_progress_line_is_tried_once(hub):
    hub.fail_next("/v2/pluginLog", status=502, times=10)
    with pytest.raises(HubUnavailable):
        make_client(hub, retries=2).plugin_log("s", "m")
    assert len(hub.requests) == 1


def test_4xx_is_not_retried_and_carries_the_hubs_message(hub):
    with pytest.raises(HubRequestRejected) as caught:
        make_client(hub).get_task("no-such-task")
    assert len(hub.requests) == 1
    assert "GET /v2/task/no-such-task" in str(caught.value) and "Task no-such-task not found" in str(
        caught.value
    )


def test_a_refused_api_key_is_rejected_with_a_hint(hub):
    with pytest.raises(HubRequestRejected, match=r"HTTP 401.*Unauthorized.*Ango API key"):
        make_client(hub, api_key="revoked-key").get_task("task-fox")


def test_429_is_transient_but_not_retried_in_process(hub):
    hub.fail_next("/v2/attachments", status=429)
    with pytest.raises(HubUnavailable, match="429"):
        make_client(hub).attach_image(PROJECT, "fox-in-snow.txt", "https://example.invalid/a.png")
    assert len(hub.requests) == 1


def test_a_slow_hub_times_out_and_the_retry_succeeds(hub):
    hub.fail_next("/v2/task/", status=None, latency_s=1.0)
    started = time.monotonic()
    task = make_client(hub, timeout_s=0.2, retries=1).get_task("task-fox")
    assert task["_id"] == "task-fox" and time.monotonic() - started < 0.9
    assert len(hub.requests) == 2


def test_a_hub_that_stays_slow_ends_in_hub_unavailable(hub):
    hub.fail_next("/v2/task/", status=None, latency_s=1.0, times=2)
    started = time.monotonic()
    with pytest.raises(HubUnavailable, match=r"timed out after 0\.2 s"):
        make_client(hub, timeout_s=0.2, retries=1).get_task("task-fox")
    assert time.monotonic() - started < 0.9


def test_connection_refused_is_hub_unavailable():
    client = AngoHubClient(
        f"http://127.0.0.1:{free_port()}", SECRET_KEY, retries=1, backoff_s=0.01, sleep=SleepRecorder()
    )
    with pytest.raises(HubUnavailable, match="connection failed"):
        client.get_task("task-fox")


def test_upload_refused_by_storage_is_rejected(hub):
    hub.fail_next("/storage/", status=403)
    with pytest.raises(HubRequestRejected, match=r"storage refused the upload of fox\.png .HTTP 403"):
        make_client(hub).upload_file(PROJECT, "fox.png", PNG_BYTES, "image/png")


# ---- fetch_text: size cap, errors, guard ------------------------------------------------------------


def test_text_at_the_cap_is_read_and_past_it_is_refused_naming_the_cap(hub):
    exact = hub.add_asset(PROJECT, "a100", "a100.txt", "a100.txt", b"x" * 100)
    over = hub.add_asset(PROJECT, "a101", "a101.txt", "a101.txt", b"x" * 101)
    client = make_client(hub, max_text_bytes=100)
    assert client.fetch_text(exact["data"]) == b"x" * 100
    with pytest.raises(AssetUnreadable, match="100-byte limit"):
        client.fetch_text(over["data"])
    assert client.fetch_text(exact["data"]) == b"x" * 100  # the pool survived the refused download


class _StreamingResponse:
    """A body without Content-Length (chunked): the cap must hold while streaming."""

    status = 200
    headers: ClassVar[dict[str, str]] = {"Content-Type": "text/plain"}

    def __init__(self, chunks: list[bytes]):
        self._chunks = chunks
        self.closed = False

    def stream(self, amount: int):
        yield from self._chunks

    def read1(self, amount: int) -> bytes:
        return self._chunks.pop(0) if self._chunks else b""

    def close(self) -> None:
        self.closed = True

    def release_conn(self) -> None:
        pass


class _FakePool:
    def __init__(self, response: Any):
        self.response = response

    def urlopen(self, method: str, url: str, **kwargs: Any) -> Any:
        return self.response


def test_the_cap_holds_for_a_streamed_body_without_content_length():
    response = _StreamingResponse([b"a" * 60, b"b" * 60, b"c" * 60])
    client = AngoHubClient("http://hub.invalid", SECRET_KEY, max_text_bytes=100, http=_FakePool(response))
    with pytest.raises(AssetUnreadable, match="100-byte limit"):
        client.fetch_text("http://files.invalid/a.txt")
    assert response.closed


def test_a_missing_asset_file_is_unreadable(hub):
    with pytest.raises(AssetUnreadable, match="HTTP 404"):
        make_client(hub).fetch_text(f"{hub.base_url}/files/{PROJECT}/missing.txt")


def test_the_url_guard_sees_every_download_first(hub):
    seen: list[str] = []

    def refuse(url: str) -> None:
        seen.append(url)
        raise AssetUnreadable("refused by the guard")

    with pytest.raises(AssetUnreadable, match="refused by the guard"):
        make_client(hub, url_guard=refuse).fetch_text(f"{hub.base_url}/files/{PROJECT}/fox-in-snow.txt")
    assert seen == [f"{hub.base_url}/files/{PROJECT}/fox-in-snow.txt"] and hub.requests == []


# ---- the api key stays secret --------------------------------------------------------------------


def test_the_api_key_never_appears_in_repr_exceptions_or_logs(hub, caplog):
    caplog.set_level(logging.DEBUG)  # urllib3's own debug lines included
    client = make_client(hub, retries=1)
    failures: list[Exception] = []
    hub.fail_next("/v2/", status=503, times=2)
    for action in (
        lambda: client.get_task("task-fox"),  # 5xx until it gives up (logs a retry)
        lambda: client.get_task("no-such-task"),  # 4xx
        lambda: client.fetch_text(f"{hub.base_url}/files/x/y.txt"),
    ):
        with pytest.raises((HubUnavailable, HubRequestRejected, AssetUnreadable)) as caught:
            action()
        failures.append(caught.value)
    hub.fail_next("/v2/task/", status=None, latency_s=1.0, times=2)
    with pytest.raises(HubUnavailable) as caught:
        make_client(hub, retries=1, timeout_s=0.1).get_task("task-fox")
    failures.append(caught.value)

    assert "Ango Hub" in caplog.text  # the retry was logged
    for text in [repr(client), str(client), caplog.text, *map(str, failures), *map(repr, failures)]:
        assert SECRET_KEY not in text
    assert "***" in repr(client)


def test_a_hub_message_that_echoes_the_key_is_scrubbed():
    class _Rejection(_StreamingResponse):
        status = 403
        headers: ClassVar[dict[str, str]] = {"Content-Type": "application/json"}

    body = f'{{"status": "fail", "message": "key {SECRET_KEY} has no access"}}'.encode()
    client = AngoHubClient("http://hub.invalid", SECRET_KEY, http=_FakePool(_Rejection([body])))
    with pytest.raises(HubRequestRejected) as caught:
        client.get_task("t")
    assert SECRET_KEY not in str(caught.value) and "key *** has no access" in str(caught.value)
