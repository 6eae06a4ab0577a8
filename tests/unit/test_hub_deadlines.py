"""Every hub call ends inside its step's time, retries included, whatever the hub does: a hub that never
answers, one that drips its answer a byte at a time, and a best-effort log line that gets one short try."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from dalle_plugin.adapters.hub_http import LOG_BUDGET_S, AngoHubClient
from dalle_plugin.domain.errors import HubUnavailable


@contextmanager
def _hub(mode: str) -> Iterator[str]:
    """A loopback server that answers every request badly: ``silent`` reads and never answers, ``drip``
    sends its headers and then one body byte every 0.2 s."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                if mode == "drip":
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
                    )
                    while not stop.is_set():
                        conn.sendall(b" ")
                        time.sleep(0.2)
                else:
                    stop.wait()
            except OSError:
                pass

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        listener.close()


@pytest.mark.parametrize("mode", ["silent", "drip"])
def test_a_call_with_retries_ends_by_the_deadline(mode):
    with _hub(mode) as url:
        client = AngoHubClient(
            url, "key", timeout_s=1.0, retries=3, backoff_s=0.1, deadline_at=time.monotonic() + 2.5
        )
        began = time.monotonic()
        with pytest.raises(HubUnavailable):
            client.get_task("task-1")
        # four attempts of 3 s each would take 12 s; the deadline (plus one read's timeout at most) holds
        assert time.monotonic() - began < 2.5 + 1.0 + 0.5


def test_a_dripping_answer_is_cut_at_the_body_deadline_without_a_step_deadline():
    with _hub("drip") as url:
        client = AngoHubClient(url, "key", timeout_s=0.5, retries=0)
        began = time.monotonic()
        with pytest.raises(HubUnavailable, match="took longer"):
            client.get_task("task-1")
        assert time.monotonic() - began < 0.5 * 3 + 0.5 + 0.5


def test_a_progress_line_gets_one_short_attempt():
    with _hub("silent") as url:
        client = AngoHubClient(url, "key", timeout_s=10.0, retries=3)
        began = time.monotonic()
        with pytest.raises(HubUnavailable):
            client.plugin_log("sess", "hello")
        assert time.monotonic() - began < LOG_BUDGET_S + 1.0
