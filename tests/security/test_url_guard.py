"""``dataURL`` and every URL the plugin fetches: https only, never a private, loopback, link-local or
metadata address (after DNS resolution and on every redirect), the connection made to the very address that
was checked, a size cap and a timeout. The one exception, ``ALLOWED_PRIVATE_HOSTS``, is a list of exact
host:port pairs: the local stack lists the emulators it starts, and the guard holds for everything else."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from dalle_plugin.adapters.hub_http import MAX_REDIRECTS, AngoHubClient
from dalle_plugin.adapters.url_guard import UrlGuard
from dalle_plugin.domain.errors import AssetUnreadable, HubRequestRejected

PUBLIC = "93.184.216.34"


def guard_resolving(*addresses: str, allowed: tuple[str, ...] = ()) -> UrlGuard:
    return UrlGuard(allowed_private_hosts=allowed, resolver=lambda host, port: list(addresses))


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "::1",
        "fe80::1",
        "fd00:ec2::254",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "224.0.0.1",
        "198.18.0.1",
    ],
)
def test_a_host_resolving_to_a_non_public_address_is_refused(address):
    with pytest.raises(AssetUnreadable, match="private, loopback, link-local or metadata"):
        guard_resolving(address)("https://assets.example/a.txt")


def test_one_private_address_among_public_ones_is_enough_to_refuse():
    with pytest.raises(AssetUnreadable):
        guard_resolving(PUBLIC, "10.0.0.1")("https://assets.example/a.txt")


def test_a_public_https_url_is_allowed_and_the_vetted_address_returned():
    assert guard_resolving(PUBLIC)("https://assets.example/a.txt?X-Amz-Signature=1") == PUBLIC
    assert (
        guard_resolving("2606:2800:220:1::1", PUBLIC)("https://assets.example/a.txt") == PUBLIC
    )  # IPv4 first


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://assets.example/a.txt", "only https"),
        ("ftp://assets.example/a.txt", "only https"),
        ("file:///etc/passwd", "only https"),
        ("/relative/a.txt", "only https"),
        ("https:///a.txt", "without a host"),
        ("https://user:pw@assets.example/a.txt", "credentials"),
        ("https://assets.example:99999/a.txt", "malformed"),
        ("https://[::1/a.txt", "malformed"),
    ],
)
def test_urls_that_are_not_plain_public_https_are_refused(url, why):
    with pytest.raises(AssetUnreadable, match=why):
        guard_resolving(PUBLIC)(url)


def test_a_name_that_does_not_resolve_is_refused():
    def failing(host: str, port: int) -> list[str]:
        raise OSError("no such host")

    with pytest.raises(AssetUnreadable, match="Could not resolve"):
        UrlGuard(resolver=failing)("https://nowhere.example/a.txt")


EMULATOR = "127.0.0.1:41001"


def test_an_allow_listed_host_port_may_be_private_and_http_and_its_address_is_still_pinned():
    local = guard_resolving("127.0.0.1", allowed=(EMULATOR,))
    assert local(f"http://{EMULATOR}/files/a.txt") == "127.0.0.1"
    assert local(f"https://{EMULATOR}/files/a.txt") == "127.0.0.1"
    named = guard_resolving("::1", "127.0.0.1", allowed=("LocalHost:41001",))
    assert named("http://localhost:41001/a.txt") == "127.0.0.1"  # IPv4 first, case of the name ignored


@pytest.mark.parametrize(
    ("url", "resolves_to"),
    [
        ("http://169.254.169.254/latest/meta-data/iam/", "169.254.169.254"),
        (
            "http://169.254.169.254:41001/latest/meta-data/",
            "169.254.169.254",
        ),  # the emulator's port, elsewhere
        ("https://169.254.169.254/latest/", "169.254.169.254"),
        ("http://127.0.0.1:41002/files/a.txt", "127.0.0.1"),  # loopback, but not an emulator's port
        ("http://127.0.0.1/files/a.txt", "127.0.0.1"),
        ("https://127.0.0.1:443/files/a.txt", "127.0.0.1"),
        ("http://10.0.0.5:41001/a.txt", "10.0.0.5"),
        ("http://192.168.1.1:41001/a.txt", "192.168.1.1"),
        ("http://[::1]:41001/a.txt", "::1"),
        ("http://localhost:41001/a.txt", "127.0.0.1"),  # exact hosts: a name that resolves there is not one
        ("https://emulator.example/a.txt", "127.0.0.1"),
    ],
)
def test_everything_but_the_allow_listed_host_port_is_refused(url, resolves_to):
    with pytest.raises(AssetUnreadable):
        guard_resolving(resolves_to, allowed=(EMULATOR,))(url)


def test_an_allow_listed_host_port_is_refused_any_other_scheme():
    local = guard_resolving("127.0.0.1", allowed=(EMULATOR,))
    for url in ("file:///etc/passwd", f"ftp://{EMULATOR}/a.txt", "gopher://127.0.0.1:41001/"):
        with pytest.raises(AssetUnreadable, match="only https"):
            local(url)


def test_the_allow_list_setting_is_exact_host_port_pairs_and_empty_by_default():
    from dalle_plugin.settings import CommonSettings, read_settings

    base = {
        "SESSIONS_TABLE": "sessions",
        "IMAGES_BUCKET": "images",
        "KMS_KEY_ID": "k",
        "HUB_API_URL": "https://hub.example",
    }
    assert read_settings(CommonSettings, base).allowed_private_hosts == frozenset()
    listed = read_settings(
        CommonSettings, base | {"ALLOWED_PRIVATE_HOSTS": "127.0.0.1:41001, 127.0.0.1:41002"}
    )
    assert listed.allowed_private_hosts == {"127.0.0.1:41001", "127.0.0.1:41002"}
    for bad in ("127.0.0.1", "127.0.0.1:http", ":41001"):
        with pytest.raises(Exception, match="ALLOWED_PRIVATE_HOSTS"):
            read_settings(CommonSettings, base | {"ALLOWED_PRIVATE_HOSTS": bad})


def test_a_deployed_stack_sets_no_allow_list():
    from local_stack.template import load_template

    variables = load_template()["Globals"]["Function"]["Environment"]["Variables"]
    # declared empty only so `sam local invoke --env-vars` may set it; empty is unset
    assert variables.get("ALLOWED_PRIVATE_HOSTS", "") == ""
    assert "ALLOW_PRIVATE_URLS" not in variables


# ---- the hub client uses the guard on every hop, and connects where the guard looked -----------------


class _Server:
    """A tiny HTTP server whose answers a test scripts by path; it records every request it gets."""

    def __init__(self, routes: dict[str, tuple[int, dict[str, str], bytes]]):
        self.routes = routes
        self.seen: list[tuple[str, str]] = []  # (path, Host header)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.seen.append((self.path, self.headers.get("Host", "")))
                status, headers, body = server.routes.get(self.path, (404, {}, b"missing"))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value.replace("{port}", str(server.port)))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_PUT = do_GET

            def log_message(self, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def server():
    running = _Server(
        {
            "/ok.txt": (200, {"Content-Type": "text/plain"}, b"a lighthouse"),
            "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/iam/"}, b""),
            "/to-ok": (301, {"Location": "/ok.txt"}, b""),
            "/loop": (302, {"Location": "/loop"}, b""),
        }
    )
    yield running
    running.close()


class RecordingGuard:
    """Allows only the host ``assets.test`` and pins it to the test server (127.0.0.1), so a request that
    reached the server proves the client connected to the address the guard returned, not by DNS."""

    def __init__(self) -> None:
        self.checked: list[str] = []

    def __call__(self, url: str) -> str:
        self.checked.append(url)
        from urllib.parse import urlsplit

        if urlsplit(url).hostname != "assets.test":
            raise AssetUnreadable(f"Refusing to fetch {urlsplit(url).hostname}.")
        return "127.0.0.1"


def _client(guard, base_url: str = "http://127.0.0.1:9") -> AngoHubClient:
    return AngoHubClient(base_url, "ango-key", url_guard=guard, timeout_s=2, retries=0)


def test_the_download_connects_to_the_vetted_address_with_the_original_host(server):
    guard = RecordingGuard()
    assert _client(guard).fetch_text(f"http://assets.test:{server.port}/ok.txt") == b"a lighthouse"
    assert server.seen == [("/ok.txt", f"assets.test:{server.port}")]  # 'assets.test' has no DNS entry


def test_every_redirect_is_checked_before_it_is_followed(server):
    guard = RecordingGuard()
    assert _client(guard).fetch_text(f"http://assets.test:{server.port}/to-ok") == b"a lighthouse"
    assert guard.checked == [
        f"http://assets.test:{server.port}/to-ok",
        f"http://assets.test:{server.port}/ok.txt",
    ]

    with pytest.raises(AssetUnreadable, match=r"169\.254\.169\.254"):
        _client(guard).fetch_text(f"http://assets.test:{server.port}/to-metadata")
    assert [path for path, _ in server.seen].count("/to-metadata") == 1  # and nothing went further


def test_a_redirect_loop_ends_after_the_limit(server):
    with pytest.raises(AssetUnreadable, match=f"more than {MAX_REDIRECTS} times"):
        _client(RecordingGuard()).fetch_text(f"http://assets.test:{server.port}/loop")
    assert len(server.seen) == MAX_REDIRECTS + 1


def test_the_hubs_upload_url_passes_the_guard_before_any_byte_is_sent(stack):
    hub = stack.hub
    refused = []

    def refuse_storage(url: str) -> None:
        refused.append(url)
        raise AssetUnreadable("Refusing to send to that address.")

    client = AngoHubClient(hub.base_url, "ango-local-key", url_guard=refuse_storage, retries=0)
    before = len(hub.stored_files())
    with pytest.raises(AssetUnreadable):
        client.upload_file("proj-dalle-demo", "x.png", b"\x89PNG", "image/png")
    assert refused and len(hub.stored_files()) == before


def test_an_api_key_http_cannot_carry_never_reaches_an_error_message():
    client = AngoHubClient("http://127.0.0.1:9", "zq-secret\r\nX-Evil: 1", retries=0)
    with pytest.raises(HubRequestRejected) as refused:
        client.get_task("t")
    assert "zq-secret" not in str(refused.value) and "zq-secret" not in repr(refused.value.__context__ or "")


def test_deployed_settings_wire_the_strict_guard_into_the_hub_client():
    from dalle_plugin import wiring
    from dalle_plugin.settings import CommonSettings, read_settings

    settings = read_settings(
        CommonSettings,
        {
            "SESSIONS_TABLE": "sessions",
            "IMAGES_BUCKET": "images",
            "KMS_KEY_ID": "k",
            "HUB_API_URL": "https://hub.example",
        },
    )
    client = wiring._hub_factory(settings)(SimpleNamespace(plugin_id="", org_id="", run_by=""), "key")
    for url in ("http://127.0.0.1/files/a.txt", "https://127.0.0.1/a.txt", "https://169.254.169.254/latest/"):
        with pytest.raises(AssetUnreadable):
            client.fetch_text(url)


@pytest.mark.stack
def test_a_run_whose_data_url_is_not_allowed_fails_before_anything_is_fetched_or_paid(
    stack, api, sample_payload, openai_emulator
):
    payload = sample_payload(
        "task-market",
        dataURL="file:///etc/passwd",
        configJSON=json.dumps({"get_prompt_from": "full-text-asset"}),
    )
    assert api.run(payload).status_code == 202
    run = api.wait_finished(payload["session"], timeout_s=300)["runs"][0]
    assert run["status"] == "FAILED" and run["failure"]["reason"] == "asset_unreadable"
    assert "only https" in run["failure"]["message"]
    assert not [r for r in openai_emulator.requests if r.is_generation]


@pytest.mark.stack
@pytest.mark.parametrize(
    "data_url",
    [
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "https://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://127.0.0.1:{moto_port}/moto-api/",  # a live loopback server of the stack's own, not an emulator
        "https://127.0.0.1:{moto_port}/moto-api/",
        "http://10.0.0.5/files/a.txt",
    ],
)
def test_the_local_stack_lets_the_guard_refuse_every_private_url_but_its_emulators(
    stack, api, sample_payload, openai_emulator, data_url
):
    assert stack.hub.base_url.startswith("http://127.0.0.1:")  # which the pipeline tests fetch from
    payload = sample_payload(
        "task-market",
        dataURL=data_url.format(moto_port=stack.moto_port),
        configJSON=json.dumps({"get_prompt_from": "full-text-asset"}),
    )
    assert api.run(payload).status_code == 202
    run = api.wait_finished(payload["session"], timeout_s=300)["runs"][0]
    assert run["status"] == "FAILED" and run["failure"]["reason"] == "asset_unreadable"
    assert "only https" in run["failure"]["message"] or "private" in run["failure"]["message"]
    assert not [r for r in openai_emulator.requests if r.is_generation]
