"""The one shape of the local stack's emulators: an HTTP server on 127.0.0.1, served from threads of the
process that runs it, and, for the stack, run in a child process of its own and driven over HTTP.

* ``LocalServer`` is the in-process lifecycle (a free port, ``start``/``stop``, a context manager) that
  the hub and OpenAI emulators share; tests of an emulator's request handling use it directly.
* ``ServerProcess`` runs a ``LocalServer`` in a child Python process, so what the emulator measures (the
  OpenAI emulator's arrival times above all) does not depend on what the stack's own process is doing.
  The child binds a free port and reports it on its stdout; the parent then polls ``GET /_emulator/health``
  until the server answers. The child stops when its stdin closes, which also happens when the parent dies
  however it dies (Ctrl-C, ``kill -9``), so no emulator outlives the stack. It ignores SIGINT: Ctrl-C in a
  terminal reaches the whole process group, and the parent decides when its emulators stop.
* ``ControlChannel`` is the parent's side of the control API (JSON under ``/_emulator/``) that each
  emulator's thin client (``HubEmulatorProcess``, ``OpenAIEmulatorProcess``) is built on.

``python -m local_stack.http_server <module>:<class> '<json options>'`` is what the child runs.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar, Self
from urllib.parse import urlencode

import urllib3

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONTROL_PREFIX = "/_emulator"
#: how long a child may take to import and bind (a cold start on a busy 2-core machine takes seconds)
READY_TIMEOUT_S = 60.0
#: how long a stopping child may take to finish before it is killed
STOP_TIMEOUT_S = 10.0
_READY_LINE = "listening on port "


class LocalHTTPServer(ThreadingHTTPServer):
    """A threaded server on 127.0.0.1 that can cut its kept-alive connections when it stops."""

    daemon_threads = True
    request_queue_size = 128  # a burst of runs calls an emulator at once (the default backlog is 5)

    def __init__(self, app: LocalServer, port: int, handler_class: type[BaseHTTPRequestHandler]):
        self.app = app
        self._open_connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", port), handler_class)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._open_connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._open_connections.discard(request)
        super().shutdown_request(request)

    def close_open_connections(self) -> None:
        """Kept-alive connections would otherwise go on being served after stop()."""
        with self._connections_lock:
            connections = list(self._open_connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class LocalServer:
    """An HTTP server on ``127.0.0.1:<port>`` (0 picks a free port) served from a thread of this process.

    A subclass names its ``handler_class`` (which reaches the server object as ``self.server.app``) and may
    extend ``_on_stop`` to wake requests that are waiting (scripted latency, hangs).
    """

    handler_class: ClassVar[type[BaseHTTPRequestHandler]]
    display_name: ClassVar[str] = "local server"

    def __init__(self, port: int = 0):
        self._requested_port = port
        self._server: LocalHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()  # set while stopped: ends every wait a request is in

    def start(self) -> Self:
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = LocalHTTPServer(self, self._requested_port, self.handler_class)
        # a short poll interval keeps stop() (server.shutdown) fast: tests start and stop many servers
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{self.display_name} {self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        self._on_stop()
        server.shutdown()
        server.close_open_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._thread = None

    def _on_stop(self) -> None:
        """Called as the server stops, before it waits for its threads."""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError(f"the {self.display_name} is not running: call start() first")
        return self._server.server_address[1]

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def health(self) -> dict[str, Any]:
        """``GET /_emulator/health``: which process serves (the parent checks it is its child) and where."""
        return {"pid": os.getpid(), "port": self.port}


class ControlRequestRefused(ValueError):
    """An emulator refused a control request (bad arguments, an unknown task...): its message says why."""


class ControlChannel:
    """JSON requests to a server's ``/_emulator/...`` control API, safe to use from many threads."""

    def __init__(self, port: int, timeout_s: float = 60.0):
        self._pool = urllib3.HTTPConnectionPool(
            "127.0.0.1",
            port,
            maxsize=32,
            block=False,
            retries=False,
            timeout=urllib3.Timeout(connect=10.0, read=timeout_s),
        )

    def call(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None) -> Any:
        shown = {k: v for k, v in (query or {}).items() if v is not None}
        url = f"{CONTROL_PREFIX}/{path}" + (f"?{urlencode(shown)}" if shown else "")
        answer = self._pool.request(
            method,
            url,
            body=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"} if body is not None else None,
        )
        try:
            document = json.loads(answer.data) if answer.data else None
        except ValueError:
            document = answer.data.decode(errors="replace")
        if answer.status >= 400:
            raise ControlRequestRefused(f"{method} {url} answered HTTP {answer.status}: {_message(document)}")
        return document

    def close(self) -> None:
        self._pool.close()


def _message(document: Any) -> str:
    if isinstance(document, dict):
        error = document.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if "message" in document:
            return str(document["message"])
    return str(document)


class ServerProcess:
    """A ``LocalServer`` subclass (``"module:Class"``, built with ``options``) run in a child process.

    ``start`` returns once the child answers its health check; ``stop`` (or the parent's death) ends it.
    """

    def __init__(self, factory: str, options: dict[str, Any] | None = None):
        self._factory = factory
        self._options = options or {}
        self._process: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._control: ControlChannel | None = None

    def start(self) -> Self:
        if self._process is not None:
            return self
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PROJECT_ROOT), environment.get("PYTHONPATH")) if p
        )
        self._process = subprocess.Popen(
            [sys.executable, "-m", "local_stack.http_server", self._factory, json.dumps(self._options)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=PROJECT_ROOT,
            env=environment,
        )
        try:
            self._port = self._read_port(time.monotonic() + READY_TIMEOUT_S)
            self._control = ControlChannel(self._port)
            self._wait_until_healthy(time.monotonic() + READY_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if self._control is not None:
            self._control.close()
            self._control = None
        try:
            if process.stdin is not None:
                process.stdin.close()  # the child's cue to stop
        except OSError:
            pass
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except BaseException:  # too slow, or a second Ctrl-C while waiting: no orphan either way
            process.kill()
            process.wait()
            raise
        finally:
            if process.stdout is not None:
                process.stdout.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self._running().pid

    @property
    def port(self) -> int:
        self._running()
        assert self._port is not None
        return self._port

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def control(self) -> ControlChannel:
        self._running()
        assert self._control is not None
        return self._control

    def health(self) -> dict[str, Any]:
        return self.control.call("GET", "health")

    def _running(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise RuntimeError(f"{self._factory} is not running: call start() first")
        return self._process

    def _read_port(self, deadline: float) -> int:
        process = self._running()
        assert process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{self._factory} did not report its port in {READY_TIMEOUT_S:.0f} s")
                if selector.select(timeout=min(remaining, 0.5)):
                    line = process.stdout.readline().decode()
                    if line.startswith(_READY_LINE):
                        return int(line[len(_READY_LINE) :])
                    if not line:
                        raise RuntimeError(
                            f"{self._factory} exited before serving (exit code "
                            f"{process.wait()}; its error is on stderr above)"
                        )

    def _wait_until_healthy(self, deadline: float) -> None:
        while True:
            try:
                served_by = self.health()["pid"]
                if served_by != self.pid:
                    raise RuntimeError(
                        f"port {self._port} is served by pid {served_by}, not by the child {self.pid}"
                    )
                return
            except (urllib3.exceptions.HTTPError, ControlRequestRefused):
                if time.monotonic() > deadline or self._running().poll() is not None:
                    raise
            time.sleep(0.05)


def _load(factory: str) -> type[LocalServer]:
    module_name, _, class_name = factory.partition(":")
    server_class = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(server_class, type) and issubclass(server_class, LocalServer)):
        raise TypeError(f"{factory} is not a LocalServer")
    return server_class


def _serve_until_told_to_stop(server: LocalServer) -> None:
    told = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: told.set())

    def wait_for_stdin_to_close() -> None:
        sys.stdin.buffer.read()  # returns at EOF: the parent closed the pipe, or died
        told.set()

    threading.Thread(target=wait_for_stdin_to_close, name="parent watch", daemon=True).start()
    parent = os.getppid()
    # a grandchild forked by the parent could hold the pipe open: a new parent pid means ours is gone
    while not told.wait(0.5) and os.getppid() == parent:
        pass
    server.stop()


def main(argv: list[str] | None = None) -> None:
    """The child: ``<module>:<class> '<json options>'``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops its children; see the module docstring
    factory, options = (argv if argv is not None else sys.argv[1:])[:2]
    server = _load(factory)(**json.loads(options)).start()
    print(f"{_READY_LINE}{server.port}", flush=True)
    _serve_until_told_to_stop(server)


if __name__ == "__main__":
    # run the module proper: the emulators subclass its LocalServer, not this copy's (named __main__)
    from local_stack.http_server import main as serve

    serve()
