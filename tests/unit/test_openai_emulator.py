"""The OpenAI images emulator, driven by the official openai client exactly as the plugin drives OpenAI."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import threading
import time

import openai
import pytest
import requests
from PIL import Image

from local_stack.openai_emulator import (
    Behaviour,
    OpenAIEmulator,
    OpenAIEmulatorProcess,
    format_reset_duration,
    key_fingerprint,
)

API_KEY = "sk-test-0123456789abcdef0123456789"


@pytest.fixture(scope="module")
def running_emulator():
    with OpenAIEmulator() as running:
        yield running


@pytest.fixture(autouse=True)
def emulator(running_emulator):
    # one server for the module (building clients and servers costs more than the tests); reset() isolates
    running_emulator.reset()
    yield running_emulator
    running_emulator.reset()


@pytest.fixture(scope="module")
def client(running_emulator):
    return openai.OpenAI(api_key=API_KEY, base_url=running_emulator.base_url, max_retries=0, timeout=10)


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def generate(client, **overrides):
    params = {"model": "gpt-image-2", "prompt": "a lighthouse in fog", "size": "256x256"} | overrides
    return client.images.generate(**params)


# ---- success ------------------------------------------------------------------------------------


def test_generates_a_real_png_of_the_requested_size(client, emulator):
    result = generate(client, prompt="a red fox at dawn", size="512x512", quality="low")

    image = decode(result.data[0].b64_json)
    assert (image.format, image.size) == ("PNG", (512, 512))
    assert (result.size, result.quality, result.output_format) == ("512x512", "low", "png")
    assert result.background == "opaque"
    assert abs(result.created - time.time()) < 5
    usage = result.usage
    assert usage.input_tokens_details.text_tokens == usage.input_tokens > 0
    assert usage.input_tokens_details.image_tokens == 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    [record] = emulator.requests
    assert (record.model, record.prompt) == ("gpt-image-2", "a red fox at dawn")
    assert (record.size, record.quality) == ("512x512", "low")
    assert (record.status, record.outcome) == (200, "ok")
    assert record.started_at <= record.finished_at
    assert emulator.generation_starts() == [record.started_at]


def test_auto_size_draws_1024_square_and_non_square_sizes_keep_their_shape(client):
    auto = generate(client, model="gpt-image-1-mini", size="auto")
    assert auto.size == "1024x1024" and decode(auto.data[0].b64_json).size == (1024, 1024)
    assert decode(generate(client, size="768x256").data[0].b64_json).size == (768, 256)


def test_image_depends_on_the_prompt_and_n_gives_distinct_images(client):
    first = decode(generate(client, prompt="calm blue sea").data[0].b64_json).getpixel((0, 0))
    again = decode(generate(client, prompt="calm blue sea").data[0].b64_json).getpixel((0, 0))
    other = decode(generate(client, prompt="burning red desert").data[0].b64_json).getpixel((0, 0))
    assert first == again != other

    several = generate(client, n=3, size="128x128").data
    assert len(several) == 3
    assert len({item.b64_json for item in several}) == 3


@pytest.mark.parametrize(("output_format", "pillow_format"), [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_other_output_formats(client, output_format, pillow_format):
    result = generate(client, output_format=output_format, output_compression=60)
    assert result.output_format == output_format
    assert decode(result.data[0].b64_json).format == pillow_format


def test_a_transparent_webp_keeps_its_alpha(client):
    image = decode(generate(client, background="transparent", output_format="webp").data[0].b64_json)
    assert image.format == "WEBP" and image.mode == "RGBA"


def test_the_log_keeps_n_and_the_output_options_as_sent(client, emulator):
    generate(client, n=2, output_format="jpeg", output_compression=40, background="opaque")
    (recorded,) = [r for r in emulator.requests if r.is_generation]
    assert (recorded.n, recorded.output_format, recorded.output_compression, recorded.background) == (
        2,
        "jpeg",
        40,
        "opaque",
    )


def test_transparent_background_gives_an_image_with_alpha(client):
    result = generate(client, background="transparent")
    image = decode(result.data[0].b64_json)
    assert result.background == "transparent"
    assert image.mode == "RGBA" and image.getpixel((0, image.height - 1))[3] == 0


def test_headers_look_like_openais(client, emulator):
    raw = client.images.with_raw_response.generate(model="gpt-image-2", prompt="a kite", size="64x64")

    assert re.fullmatch(r"req_[0-9a-f]{32}", raw.headers["x-request-id"])
    assert raw.headers["x-request-id"] == emulator.requests[0].request_id
    assert int(raw.headers["openai-processing-ms"]) >= 1
    assert raw.headers["content-type"] == "application/json"
    assert raw.headers["x-ratelimit-limit-requests"].isdigit()
    limit = int(raw.headers["x-ratelimit-limit-requests"])
    assert int(raw.headers["x-ratelimit-remaining-requests"]) == limit - 1
    assert re.fullmatch(r"(\d+ms|[\dhm.]+s)", raw.headers["x-ratelimit-reset-requests"])
    assert decode(raw.parse().data[0].b64_json).size == (64, 64)


def test_requests_are_served_concurrently(client, emulator):
    emulator.set_default(Behaviour(latency_s=0.4))
    threads = [threading.Thread(target=generate, args=(client,)) for _ in range(4)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert time.monotonic() - started < 1.2
    assert [r.status for r in emulator.requests] == [200] * 4


# ---- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["dall-e-2", "dall-e-3", "gpt-image-1", "no-such-model"])
def test_retired_and_unknown_models_are_not_found(client, model):
    with pytest.raises(openai.NotFoundError) as caught:
        generate(client, model=model, size="1024x1024")
    assert caught.value.code == "model_not_found"
    assert caught.value.body == {
        "message": f"The model '{model}' does not exist or you do not have access to it.",
        "type": "invalid_request_error",
        "param": None,
        "code": "model_not_found",
    }


def test_a_request_without_model_falls_to_the_retired_server_default(emulator):
    response = requests.post(
        f"{emulator.base_url}/images/generations",
        json={"prompt": "a cat"},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=5,
    )
    assert response.status_code == 404
    assert "dall-e-2" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("overrides", "param", "code"),
    [
        ({"size": "500x512"}, "size", "invalid_value"),  # not divisible by 16
        ({"size": "1600x512"}, "size", "invalid_value"),  # wider than 3:1
        ({"size": "3840x2176"}, "size", "invalid_value"),  # short edge above 2160
        ({"size": "4096x2048"}, "size", "invalid_value"),  # long edge above 3840
        ({"size": "big"}, "size", "invalid_value"),
        ({"model": "gpt-image-1.5", "size": "512x512"}, "size", "invalid_value"),  # fixed sizes only
        ({"model": "gpt-image-1-mini", "size": "1792x1024"}, "size", "invalid_value"),
        ({"quality": "hd"}, "quality", "invalid_value"),
        ({"quality": "max"}, "quality", "invalid_value"),  # only the 2.5 variants have it
        ({"n": 0}, "n", "integer_below_min_value"),
        ({"n": 11}, "n", "integer_above_max_value"),
        ({"prompt": "x" * 32_001}, "prompt", "string_above_max_length"),
        ({"style": "vivid"}, "style", "unsupported_parameter"),
        ({"response_format": "url"}, "response_format", "unsupported_value"),
        ({"background": "transparent", "output_format": "jpeg"}, "background", "invalid_value"),
        ({"extra_body": {"seed": 4}}, "seed", "unknown_parameter"),
    ],
)
def test_invalid_parameters_answer_400_naming_the_param(client, emulator, overrides, param, code):
    emulator.enqueue("server_error")
    with pytest.raises(openai.BadRequestError) as caught:
        generate(client, **overrides)
    error = caught.value
    assert (error.param, error.code, error.type) == (param, code, "invalid_request_error")
    assert emulator.scripting_state()["queued"], "an invalid request must not consume a scripted behaviour"


@pytest.mark.parametrize(
    ("model", "size"),
    [
        ("gpt-image-2", "3840x2160"),
        ("gpt-image-2", "2160x3840"),
        ("gpt-image-2", "1536x512"),
        ("gpt-image-2-2026-04-21", "auto"),
        ("gpt-image-1.5", "1536x1024"),
    ],
)
def test_sizes_at_the_limits_are_accepted(emulator, model, size):
    # checked over raw HTTP with n=1 quality low; the big ones are drawn too, so keep this list short
    response = requests.post(
        f"{emulator.base_url}/images/generations",
        timeout=10,
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": model, "prompt": "edge", "size": size, "quality": "low"},
    )
    assert response.status_code == 200, response.text


def test_the_25_variants_accept_their_extra_qualities(client):
    assert generate(client, model="gpt-image-2.5-flare", quality="xhigh").quality == "xhigh"


def test_models_endpoint(client):
    model = client.models.retrieve("gpt-image-2")
    assert (model.id, model.object, model.owned_by) == ("gpt-image-2", "model", "system")
    assert client.models.retrieve("gpt-image-1.5").shutdown_date == "2026-12-01"
    assert "gpt-image-2.5-sunburst" in {m.id for m in client.models.list()}
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("dall-e-3")
    assert caught.value.code == "model_not_found"


def test_the_key_is_checked_before_the_body(emulator):
    response = requests.post(f"{emulator.base_url}/images/generations", data=b"{not json", timeout=5)
    assert response.status_code == 401


def test_unknown_route_and_bad_json(emulator):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    unknown = requests.post(f"{emulator.base_url}/images/variations", headers=headers, timeout=5)
    assert unknown.status_code == 404 and unknown.json()["error"]["message"].startswith("Invalid URL")
    bad = requests.post(
        f"{emulator.base_url}/images/generations", data=b"{not json", headers=headers, timeout=5
    )
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


# ---- authentication ---------------------------------------------------------------------------


def test_missing_key_is_401_with_openais_body(emulator):
    response = requests.post(
        f"{emulator.base_url}/images/generations",
        timeout=5,
        json={"model": "gpt-image-2", "prompt": "a cat", "size": "64x64"},
    )
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["message"].startswith("You didn't provide an API key.")
    assert (error["type"], error["code"]) == ("invalid_request_error", None)
    assert re.fullmatch(r"req_[0-9a-f]{32}", response.headers["x-request-id"])
    assert emulator.requests[0].key_fingerprint is None


@pytest.mark.parametrize("key", ["sk-invalid-4f9c2a7e1b3d5f60", "sk-revoked-by-test-123456789"])
def test_revoked_keys_are_401_invalid_api_key_and_masked(key):
    with OpenAIEmulator(revoked_keys={"sk-revoked-by-test-123456789"}) as emulator:
        client = openai.OpenAI(api_key=key, base_url=emulator.base_url, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as caught:
            generate(client)
    assert caught.value.code == "invalid_api_key"
    message = caught.value.body["message"]
    assert message.startswith(f"Incorrect API key provided: {key[:6]}***") and message.endswith("api-keys.")
    assert key not in message and key[-4:] in message


def test_the_raw_key_never_reaches_the_log(client, emulator):
    generate(client)
    emulator.enqueue("invalid_key")
    with pytest.raises(openai.AuthenticationError):
        generate(client)

    assert [r.key_fingerprint for r in emulator.requests] == [key_fingerprint(API_KEY)] * 2
    served_log = requests.get(f"{emulator.control_url}/requests", timeout=5).text
    for shown in (repr(emulator.requests), served_log):
        assert API_KEY not in shown and API_KEY[3:20] not in shown


# ---- scripted behaviours ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("behaviour", "exception", "status", "body"),
    [
        (
            Behaviour(kind="server_error"),
            openai.InternalServerError,
            500,
            {"type": "server_error", "code": None, "param": None},
        ),
        (
            Behaviour(kind="server_error", status=503),
            openai.InternalServerError,
            503,
            {"type": "server_error", "code": None},
        ),
        (
            Behaviour(kind="rate_limited"),
            openai.RateLimitError,
            429,
            {"type": "requests", "code": "rate_limit_exceeded", "param": None},
        ),
        (
            Behaviour(kind="insufficient_quota"),
            openai.RateLimitError,
            429,
            {"type": "insufficient_quota", "code": "insufficient_quota", "param": None},
        ),
        (
            Behaviour(kind="billing_hard_limit"),
            openai.BadRequestError,
            400,
            {"code": "billing_hard_limit_reached", "message": "Billing hard limit has been reached"},
        ),
        (
            Behaviour(kind="invalid_key"),
            openai.AuthenticationError,
            401,
            {"type": "invalid_request_error", "code": "invalid_api_key"},
        ),
        (
            Behaviour(kind="model_not_found"),
            openai.NotFoundError,
            404,
            {
                "code": "model_not_found",
                "message": "The model 'gpt-image-2' does not exist or you do not have access to it.",
            },
        ),
    ],
)
def test_scripted_behaviour_raises_its_openai_error(client, emulator, behaviour, exception, status, body):
    emulator.enqueue(behaviour)
    with pytest.raises(exception) as caught:
        generate(client)
    assert caught.value.status_code == status
    assert caught.value.body | body == caught.value.body
    assert caught.value.code == body["code"]
    assert caught.value.request_id == emulator.requests[0].request_id
    assert (emulator.requests[0].status, emulator.requests[0].outcome) == (status, behaviour.kind)


def test_moderation_block_has_openais_shape(client, emulator):
    emulator.enqueue(Behaviour(kind="moderation_blocked", moderation_stage="output", categories=("sexual",)))
    with pytest.raises(openai.BadRequestError) as caught:
        generate(client)
    body = caught.value.body
    assert caught.value.code == "moderation_blocked"
    assert body["type"] == "image_generation_user_error" and body["param"] is None
    assert body["message"].startswith("Your request was rejected by the safety system.")
    assert caught.value.request_id in body["message"]
    assert body["moderation_details"] == {"moderation_stage": "output", "categories": ["sexual"]}


def test_rate_limited_carries_retry_headers(client, emulator):
    emulator.enqueue(Behaviour(kind="rate_limited", retry_after_s=1.5))
    with pytest.raises(openai.RateLimitError) as caught:
        generate(client)
    headers = caught.value.response.headers
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("2", "1500")
    assert (headers["x-ratelimit-reset-requests"], headers["x-ratelimit-remaining-requests"]) == ("1.5s", "0")
    assert "Please try again in 1.5s." in caught.value.body["message"]


def test_queue_is_fifo_then_default_and_rules_match_every_time(client, emulator):
    emulator.set_default("insufficient_quota")
    emulator.enqueue("ok", Behaviour(kind="server_error", status=502))
    emulator.rule("forbidden", "moderation_blocked")

    with pytest.raises(openai.BadRequestError):
        generate(client, prompt="a forbidden thing")  # a matching rule wins and leaves the queue alone
    generate(client)
    with pytest.raises(openai.InternalServerError):
        generate(client)
    with pytest.raises(openai.RateLimitError):
        generate(client)
    with pytest.raises(openai.BadRequestError):
        generate(client, prompt="forbidden again")

    assert [r.outcome for r in emulator.requests] == [
        "moderation_blocked",
        "ok",
        "server_error",
        "insufficient_quota",
        "moderation_blocked",
    ]


def test_latency_applies_before_answering(client, emulator):
    emulator.enqueue(Behaviour(kind="server_error", latency_s=0.3))
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError):
        generate(client)
    assert time.monotonic() - started >= 0.3
    record = emulator.requests[0]
    assert record.finished_at - record.started_at >= 0.3


def test_timeout_hang_never_answers_until_reset(emulator):
    client = openai.OpenAI(api_key=API_KEY, base_url=emulator.base_url, max_retries=0, timeout=0.3)
    emulator.enqueue("timeout_hang")
    with pytest.raises(openai.APITimeoutError):
        generate(client)
    assert emulator.requests == []  # still hanging
    emulator.reset()
    deadline = time.monotonic() + 60
    while not emulator.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    [record] = emulator.requests
    assert (record.status, record.outcome) == (None, "timeout_hang")


# ---- the enforced rate cap ----------------------------------------------------------------------


def test_rate_cap_refuses_the_request_above_the_cap_with_the_exact_wait(client, emulator):
    window_s = 0.8
    emulator.set_rate_cap(2, window_s=window_s)
    first = client.images.with_raw_response.generate(model="gpt-image-2", prompt="one", size="64x64")
    second = client.images.with_raw_response.generate(model="gpt-image-2", prompt="two", size="64x64")
    remaining = [raw.headers["x-ratelimit-remaining-requests"] for raw in (first, second)]
    assert remaining == ["1", "0"]
    assert first.headers["x-ratelimit-limit-requests"] == "2"

    with pytest.raises(openai.RateLimitError) as caught:
        generate(client, prompt="three")
    headers = caught.value.response.headers
    assert caught.value.code == "rate_limit_exceeded"
    first_started, _, refused_started = emulator.generation_starts()
    expected_ms = (first_started + window_s - refused_started) * 1000
    retry_after_ms = int(headers["retry-after-ms"])
    assert abs(retry_after_ms - expected_ms) < 50
    assert headers["retry-after"] == "1"
    assert headers["x-ratelimit-reset-requests"] == format_reset_duration(retry_after_ms / 1000)
    assert headers["x-ratelimit-remaining-requests"] == "0"

    other_key = openai.OpenAI(
        api_key="sk-another-key-000000000000", base_url=emulator.base_url, max_retries=0
    )
    generate(other_key)  # the window is per key

    time.sleep(retry_after_ms / 1000)
    generate(client, prompt="three, again")  # exactly when the oldest request left the window
    assert [r.status for r in emulator.requests] == [200, 200, 429, 200, 200]


def test_lifting_the_cap(client, emulator):
    emulator.set_rate_cap(1, window_s=30)
    generate(client)
    with pytest.raises(openai.RateLimitError):
        generate(client)
    emulator.set_rate_cap(None)
    generate(client)


# ---- the HTTP control API ------------------------------------------------------------------------


def test_http_control_scripts_reads_and_resets(client, emulator):
    control = emulator.control_url
    answer = requests.post(
        f"{control}/behaviours",
        timeout=5,
        json={
            "enqueue": [{"kind": "rate_limited", "retry_after_s": 2}, "server_error"],
            "rule": {"prompt_contains": "nsfw", "behaviour": {"kind": "moderation_blocked"}},
            "default": {"kind": "ok", "latency_s": 0},
        },
    )
    assert answer.status_code == 200 and len(answer.json()["queued"]) == 2

    with pytest.raises(openai.RateLimitError) as caught:
        generate(client)
    assert caught.value.response.headers["retry-after"] == "2"
    with pytest.raises(openai.InternalServerError):
        generate(client)
    with pytest.raises(openai.BadRequestError):
        generate(client, prompt="nsfw please")
    generate(client)

    log = requests.get(f"{control}/requests", timeout=5).json()["data"]
    assert [entry["status"] for entry in log] == [429, 500, 400, 200]
    assert set(log[0]) >= {
        "started_at",
        "finished_at",
        "model",
        "prompt",
        "size",
        "quality",
        "key_fingerprint",
        "status",
        "outcome",
        "request_id",
    }

    assert requests.post(f"{control}/rate_cap", json={"requests_per_minute": 1}, timeout=5).status_code == 200
    assert requests.post(f"{control}/reset", timeout=5).status_code == 200
    assert requests.get(f"{control}/requests", timeout=5).json()["data"] == []
    assert emulator.scripting_state() == {
        "queued": [],
        "rules": [],
        "default": Behaviour().model_dump(mode="json"),
        "rate_cap": None,
    }


@pytest.mark.parametrize(
    "script",
    [
        {"enqueue": ["ok", {"kind": "explode"}]},
        {"enqueue": ["ok"], "rule": {"prompt_contains": "", "behaviour": "ok"}},
        {"enqueue": ["ok"], "rule": "server_error"},
        {"enqueue": ["ok"], "default": {"kind": "ok", "latency": 1}},
        {"enqueue": ["ok"], "surprise": 1},
        [],
    ],
)
def test_http_control_rejects_a_bad_script_without_applying_any_of_it(emulator, script):
    answer = requests.post(f"{emulator.control_url}/behaviours", json=script, timeout=5)
    assert answer.status_code == 400 and answer.json()["error"]["message"]
    assert emulator.scripting_state()["queued"] == []


def test_reset_clears_log_queue_rules_and_cap(client, emulator):
    emulator.enqueue("server_error")
    emulator.rule("x", "server_error")
    emulator.set_rate_cap(1)
    with pytest.raises(openai.InternalServerError):
        generate(client, prompt="plain")
    emulator.reset()
    assert emulator.requests == []
    generate(client, prompt="x marks the spot")
    generate(client, prompt="x again")
    assert [r.outcome for r in emulator.requests] == ["ok", "ok"]


# ---- in a process of its own (as the local stack runs it) -------------------------------------------


@pytest.fixture(scope="module")
def emulator_process():
    with OpenAIEmulatorProcess(revoked_keys={"sk-revoked-at-start-123456789"}) as running:
        yield running


@pytest.fixture
def remote(emulator_process):
    emulator_process.reset()
    yield emulator_process
    emulator_process.reset()


@pytest.fixture
def remote_client(emulator_process):
    return openai.OpenAI(api_key=API_KEY, base_url=emulator_process.base_url, max_retries=0, timeout=30)


def test_the_process_client_runs_the_emulator_in_another_process(remote):
    assert remote.pid != os.getpid()
    assert remote.health() == {"pid": remote.pid, "port": remote.port}
    assert remote.base_url == f"http://127.0.0.1:{remote.port}/v1"
    assert remote.control_url == f"http://127.0.0.1:{remote.port}/_emulator"


def test_arrival_times_are_taken_by_the_emulators_process_when_it_reads_the_request(remote):
    """The request is sent while the emulator's process is frozen: its recorded arrival is after the thaw,
    so the time is taken by that process when it gets to the request, not by whoever sent it."""
    body = json.dumps({"model": "gpt-image-2", "prompt": "frozen", "size": "256x256"}).encode()
    head = [
        "POST /v1/images/generations HTTP/1.1",
        "Host: 127.0.0.1",
        f"Authorization: Bearer {API_KEY}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    request = "".join(f"{line}\r\n" for line in head).encode() + b"\r\n" + body
    os.kill(remote.pid, signal.SIGSTOP)
    try:
        with socket.create_connection(("127.0.0.1", remote.port), timeout=30) as connection:
            sent_at = time.time()
            connection.sendall(request)  # accepted by the kernel into the listen backlog meanwhile
            thawed_at = time.time()
            os.kill(remote.pid, signal.SIGCONT)
            answer = b""
            while chunk := connection.recv(65536):
                answer += chunk
    finally:
        os.kill(remote.pid, signal.SIGCONT)
    assert answer.startswith(b"HTTP/1.1 200")
    [recorded] = remote.requests
    assert sent_at <= thawed_at <= recorded.started_at <= recorded.finished_at
    assert remote.generation_starts() == [recorded.started_at]


def test_the_process_client_scripts_like_the_emulator(remote, remote_client):
    remote.rule("twice", "server_error", times=2)
    remote.enqueue(Behaviour(kind="rate_limited", retry_after_s=3), "ok")
    remote.set_default({"kind": "moderation_blocked"})
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            generate(remote_client, prompt="twice")
    with pytest.raises(openai.RateLimitError) as limited:
        generate(remote_client, prompt="twice")  # the rule served its two: the queue is next
    assert limited.value.response.headers["retry-after"] == "3"
    generate(remote_client)
    with pytest.raises(openai.BadRequestError):
        generate(remote_client)
    state = remote.scripting_state()
    assert state["queued"] == [] and state["rules"] == [] and state["default"]["kind"] == "moderation_blocked"
    assert [r.status for r in remote.requests] == [500, 500, 429, 200, 400]
    assert all(r.is_generation and r.key_fingerprint == key_fingerprint(API_KEY) for r in remote.requests)

    remote.reset()
    remote.set_rate_cap(1, window_s=600)
    generate(remote_client)
    with pytest.raises(openai.RateLimitError):
        generate(remote_client)
    for key in ("sk-revoked-at-start-123456789", "sk-revoked-by-client-123456789"):
        keyed = openai.OpenAI(api_key=key, base_url=remote.base_url, max_retries=0, timeout=30)
        if key.endswith("by-client-123456789"):
            generate(keyed)
            remote.revoke_key(key)  # stays revoked for the module: a key no other test uses
        with pytest.raises(openai.AuthenticationError):
            generate(keyed)
    with pytest.raises(ValueError, match="kind"):
        remote.enqueue("explode")  # refused before anything is sent
    with pytest.raises(ValueError, match="requests_per_minute"):
        remote.set_rate_cap(0)


# ---- lifecycle and helpers -----------------------------------------------------------------------


def test_lifecycle_binds_loopback_and_stops_serving():
    emulator = OpenAIEmulator()
    with pytest.raises(RuntimeError):
        _ = emulator.base_url  # nothing listens before start()
    with emulator:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", emulator.base_url)
        url = emulator.base_url
        session = requests.Session()  # a kept-alive connection must not outlive stop()
        assert session.get(f"{url}/models/gpt-image-2", headers={"Authorization": "Bearer k"}, timeout=5).ok
    with pytest.raises(requests.ConnectionError):
        session.get(f"{url}/models/gpt-image-2", headers={"Authorization": "Bearer k"}, timeout=2)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.25, "250ms"),
        (0.0004, "1ms"),
        (1.5, "1.5s"),
        (12, "12s"),
        (60, "1m0s"),
        (359.9994, "6m0s"),
        (3723.5, "1h2m3.5s"),
    ],
)
def test_reset_duration_format(seconds, text):
    assert format_reset_duration(seconds) == text


def test_behaviour_accepts_kind_names_and_rejects_nonsense():
    assert Behaviour.model_validate(json.loads('{"kind": "timeout_hang", "latency_s": 1}')).latency_s == 1
    with pytest.raises(ValueError, match="status"):
        Behaviour(kind="server_error", status=418)
    with pytest.raises(ValueError, match="kind"):
        OpenAIEmulator().enqueue("explode")
