"""Ango Hub's REST API over urllib3 (already in the Lambda runtime through botocore): the ``HubClient`` port.

Every call has a timeout; 5xx answers, timeouts and connection errors are retried with exponential backoff
and jitter, then raised as ``HubUnavailable`` (the state machine retries that by name). A 4xx is never
retried: it raises ``HubRequestRejected`` with the hub's own ``message``. A 429 is the exception: it is
transient by nature, so it raises ``HubUnavailable`` at once and leaves the waiting to the state machine.

Two calls change the hub in a way that must not happen twice (``POST /v2/attachments`` adds one more
attachment each time; ``POST /v2/annotate`` moves the task on a stage each time), and the hub offers no way
to ask whether an earlier attempt landed. Those are resent only when the hub surely did not act on them
(the connection was never made, or the hub answered 500/503); when the request may have arrived (a read
timeout, a dropped connection, a gateway's 502/504) they raise ``HubDeliveryUnknown`` instead.

Downloads (asset files) go only to URLs the URL guard allows, on every redirect hop, and connect to the very
address the guard vetted, so a DNS answer that changes between the check and the connection cannot send
the request to a private address.

The user's Ango ``apiKey`` is sent only to the hub's API host, in the ``apikey`` header, and is kept out of
every log line, exception message and ``repr``. Asset downloads and storage uploads go to other hosts
(S3) and never carry it.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import quote, urlencode, urljoin, urlsplit

import urllib3

from dalle_plugin.domain.errors import AssetUnreadable, HubDeliveryUnknown, HubRequestRejected, HubUnavailable
from dalle_plugin.domain.hub_answer import answer_to_write_format
from dalle_plugin.port_records import HubAsset, HubTaskRef

logger = logging.getLogger(__name__)

USER_AGENT = "dalle-model-plugin (urllib3)"
MAX_BACKOFF_S = 8.0
MAX_MESSAGE_CHARS = 300
BODY_DEADLINE_FACTOR = 3  # a whole answer may take this many times the per-read timeout
#: an attempt with less time than this left is not begun: it could not finish, and the time is the caller's
MIN_ATTEMPT_S = 0.5
#: a progress line is best effort: one attempt, never more than this, whatever the hub does
LOG_BUDGET_S = 3.0
_CHUNK_BYTES = 64 * 1024

MAX_REDIRECTS = 3
#: tasks asked for per page of a batch listing: 10,000 tasks are 10 pages
TASKS_PER_PAGE = 1000
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
#: answers after which the hub surely did not apply a request (a gateway's 502/504 may hide one that it did)
_NOT_APPLIED_STATUSES = frozenset({500, 503})

#: Decides whether the plugin may download a URL: raises (``AssetUnreadable``) to refuse it, or returns the
#: vetted IP address to connect to (None: connect by name, as ``allow_any_url`` lets tests do).
UrlGuard = Callable[[str], "str | None"]


def allow_any_url(url: str) -> None:
    """The guard for tests that exercise other things: everything is allowed, connections go by name.
    Deployed code uses ``adapters.url_guard.UrlGuard`` (wired in ``wiring``)."""


class _Answer(NamedTuple):
    status: int
    body: bytes
    content_type: str
    location: str | None = None


class _Retryable(Exception):
    """A failure worth another attempt: timeout, connection error, 5xx. ``maybe_applied`` tells whether the
    hub may have acted on the request all the same."""

    def __init__(self, message: str, maybe_applied: bool):
        super().__init__(message)
        self.maybe_applied = maybe_applied


class _TooLarge(Exception):
    pass


class AngoHubClient:
    """``HubClient`` for one run, authenticated as the hub user who ran the plugin."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        plugin_id: str = "",
        org_id: str = "",
        run_by: str = "",
        timeout_s: float = 10.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        max_text_bytes: int = 1_000_000,
        http: urllib3.PoolManager | None = None,
        url_guard: UrlGuard = allow_any_url,
        sleep: Callable[[float], None] = time.sleep,
        deadline_at: float | None = None,
    ):
        """``deadline_at`` (``time.monotonic()`` seconds) is when every call, retries included, must have
        ended: the calling Lambda's end less the time it needs to record what happened."""
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.__api_key = api_key  # name-mangled: not shown by repr, kept out of casual attribute dumps
        self.plugin_id = plugin_id
        self.org_id = org_id
        self.run_by = run_by
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_text_bytes = max_text_bytes
        self._http = http if http is not None else urllib3.PoolManager(num_pools=4, maxsize=4, retries=False)
        self._url_guard = url_guard
        self._sleep = sleep
        self.deadline_at = deadline_at

    def _time_left(self, budget_s: float | None = None) -> float | None:
        """Seconds until this call must end (None: only the per-attempt limits hold)."""
        ends = [at for at in (self.deadline_at,) if at is not None]
        if budget_s is not None:
            ends.append(time.monotonic() + budget_s)
        return min(ends) - time.monotonic() if ends else None

    def __repr__(self) -> str:
        return (
            f"AngoHubClient(base_url={self.base_url!r}, api_key='***', plugin_id={self.plugin_id!r}, "
            f"org_id={self.org_id!r}, run_by={self.run_by!r})"
        )

    # ---- HubClient ----------------------------------------------------------------------------------

    def get_task(self, task_id: str) -> dict[str, Any]:
        document = self._hub("GET", f"/v2/task/{_segment(task_id)}", query={"includeAnswer": "true"})
        task = _dig(document, "data", "task")
        if not isinstance(task, dict):
            raise HubRequestRejected(f"Ango Hub's answer to GET /v2/task/{task_id} has no data.task.")
        return task

    def list_batch_tasks(self, project_id: str, batches: list[str], at_most: int) -> list[HubTaskRef]:
        """The SDK's ``get_tasks(project_id, page, limit, batches=[...])`` query, a page at a time, until the
        hub has no more or ``at_most`` are listed."""
        found: list[HubTaskRef] = []
        for page in range(1, at_most // TASKS_PER_PAGE + 2):
            document = self._hub(
                "GET",
                f"/v2/project/{_segment(project_id)}/tasks",
                query={
                    "page": str(page),
                    "limit": str(TASKS_PER_PAGE),
                    "includeAnswer": "false",
                    "batches": json.dumps(batches),
                },
            )
            tasks = _dig(document, "data", "tasks")
            if not isinstance(tasks, list):
                raise HubRequestRejected(
                    f"Ango Hub's answer to GET /v2/project/{project_id}/tasks has no data.tasks."
                )
            for task in tasks:
                asset = task.get("asset") if isinstance(task, dict) else None
                asset_id = asset.get("_id") if isinstance(asset, dict) else asset
                if isinstance(task, dict) and isinstance(task.get("_id"), str):
                    found.append(HubTaskRef(task["_id"], asset_id if isinstance(asset_id, str) else None))
            total = _dig(document, "data", "total")
            if len(tasks) < TASKS_PER_PAGE or (isinstance(total, int) and page * TASKS_PER_PAGE >= total):
                break
        return found[:at_most]

    def get_asset(self, project_id: str, asset_id: str) -> HubAsset:
        # the SDK's get_assets(project_id, filters={"_id": asset_id}) query, json.dumps spacing included
        document = self._hub(
            "GET",
            f"/v2/project/{_segment(project_id)}/assets",
            query={"page": "1", "limit": "10", "filters": json.dumps({"_id": asset_id})},
        )
        assets = _dig(document, "data", "assets")
        found = next((a for a in assets or [] if isinstance(a, dict) and a.get("_id") == asset_id), None)
        if found is None:
            raise HubRequestRejected(
                f"Asset {asset_id} was not found in project {project_id} on Ango Hub: "
                "it may have been deleted, or the user who ran the plugin cannot see it."
            )
        data_url = found.get("data")
        if not isinstance(data_url, str) or not data_url:
            raise HubRequestRejected(f"Asset {asset_id} on Ango Hub has no file URL (data).")
        return HubAsset(asset_id=asset_id, external_id=str(found.get("externalId") or ""), data_url=data_url)

    def fetch_text(self, url: str) -> bytes:
        shown = _without_query(url)
        for _hop in range(MAX_REDIRECTS + 1):
            address = self._url_guard(url)  # every hop: a public https URL may redirect anywhere
            shown = _without_query(url)
            try:
                answer = self._with_retries(
                    "GET",
                    url,
                    shown,
                    headers={"User-Agent": USER_AGENT},
                    body_cap=self.max_text_bytes,
                    address=address,
                )
            except _TooLarge:
                raise AssetUnreadable(
                    f"The asset file {shown} is larger than the {self.max_text_bytes:,}-byte limit "
                    "for text assets; "
                    "use a shorter text or a text annotation as the prompt."
                ) from None
            if answer.status not in _REDIRECT_STATUSES or not answer.location:
                break
            url = urljoin(url, answer.location)
        else:
            raise AssetUnreadable(
                f"The asset file {shown} redirects more than {MAX_REDIRECTS} times; give its final URL."
            )
        if answer.status >= 300:
            raise AssetUnreadable(
                f"The asset file {shown} could not be downloaded (HTTP {answer.status}"
                f"{_message_suffix(answer, self.__api_key)})."
            )
        return answer.body

    def upload_file(self, project_id: str, name: str, body: bytes, content_type: str) -> str:
        document = self._hub(
            "GET", "/v2/getUploadUrl", query={"name": name, "project": project_id, "type": "assets"}
        )
        upload_url = _dig(document, "data", "uploadUrl")
        if not isinstance(upload_url, str) or not upload_url:
            raise HubRequestRejected("Ango Hub's answer to GET /v2/getUploadUrl has no data.uploadUrl.")
        permanent_url = _without_query(upload_url)
        # The URL comes from the hub's answer: it passes the same guard as a download before any byte goes.
        address = self._url_guard(upload_url)
        # a presigned storage URL: no apikey header (it is another host), the query string is the credential
        answer = self._with_retries(
            "PUT",
            upload_url,
            f"hub storage {urlsplit(permanent_url).path}",
            headers={"Content-Type": content_type, "User-Agent": USER_AGENT},
            body=body,
            address=address,
        )
        if answer.status >= 300:
            raise HubRequestRejected(
                f"Ango Hub storage refused the upload of {name} (HTTP {answer.status}"
                f"{_message_suffix(answer, self.__api_key)})."
            )
        return permanent_url

    def attach_image(self, project_id: str, external_id: str, image_url: str) -> None:
        self._hub(
            "POST",
            "/v2/attachments",
            at_most_once=True,  # each POST adds an attachment: never resent once it may have landed
            json_body={
                "project": project_id,
                "attachments": [
                    {"externalId": external_id, "attachments": [{"type": "IMAGE", "value": image_url}]}
                ],
            },
        )

    def annotate(self, task_id: str, answer: dict[str, Any]) -> None:
        # the body AnnotationPayload.toDict() builds in the SDK; tolerant of a read-format answer
        self._hub(
            "POST",
            f"/v2/annotate/{_segment(task_id)}",
            query={"nextStage": "true", "isPlugin": "true"},
            at_most_once=True,  # each submission moves the task on a stage
            json_body={
                "answer": answer_to_write_format(answer),
                "brushDataUrl": None,
                "medicalBrushDataUrl": None,
                "duration": 0,
            },
        )

    def plugin_response(self, session: str, response: Any = None, error: bool = False) -> None:
        body = {"error": True, "session": session} if error else {"response": response, "session": session}
        self._hub("POST", "/v2/pluginResponse", json_body=body)

    def plugin_log(self, session: str, message: str, level: str = "INFO", **extra: Any) -> None:
        # PluginLogger's body: the extras, then the fixed keys (which win over an extra of the same name)
        body = {
            **extra,
            "level": level.upper(),
            "organization": self.org_id,
            "pluginId": self.plugin_id,
            "runBy": self.run_by,
            "session": session,
            "msg": message,
        }
        self._hub("POST", "/v2/pluginLog", json_body=body, best_effort=True)

    # ---- beyond the port: used by the local tools and available to the domain if it needs them --------

    def get_project(self, project_id: str) -> dict[str, Any]:
        """``GET /v2/project/{id}`` -> ``data.project`` (its ``categorySchema`` is the ontology)."""
        project = _dig(self._hub("GET", f"/v2/project/{_segment(project_id)}"), "data", "project")
        if not isinstance(project, dict):
            raise HubRequestRejected(
                f"Ango Hub's answer to GET /v2/project/{project_id} has no data.project."
            )
        return project

    def signed_url(self, project_id: str, url: str, file_type: str = "assets") -> str:
        """``GET /v2/getSignedUrl`` -> a time-limited download URL for a file in private hub storage."""
        document = self._hub(
            "GET", "/v2/getSignedUrl", query={"name": url, "project": project_id, "type": file_type}
        )
        signed = _dig(document, "data", "signedUrl")
        if not isinstance(signed, str) or not signed:
            raise HubRequestRejected("Ango Hub's answer to GET /v2/getSignedUrl has no data.signedUrl.")
        return signed

    # ---- transport ----------------------------------------------------------------------------------

    def _hub(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        json_body: Any = None,
        at_most_once: bool = False,
        best_effort: bool = False,
    ) -> Any:
        """One ``/v2`` call: JSON in, JSON out, the hub's error body turned into a named exception."""
        url = self.base_url + path + ("?" + urlencode(query, quote_via=quote) if query else "")
        headers = {"apikey": self.__api_key, "Accept": "application/json", "User-Agent": USER_AGENT}
        body = None
        if json_body is not None:
            headers["Content-Type"] = "application/json"
            body = json.dumps(json_body, allow_nan=False).encode()
        answer = self._with_retries(
            method, url, path, headers=headers, body=body, at_most_once=at_most_once, best_effort=best_effort
        )
        if answer.status == 429:
            raise HubUnavailable(
                f"Ango Hub is rate limiting {method} {path} (HTTP 429"
                f"{_message_suffix(answer, self.__api_key)}); it will be tried again later."
            )
        if answer.status >= 300:
            raise HubRequestRejected(
                f"Ango Hub rejected {method} {path} "
                f"(HTTP {answer.status}{_message_suffix(answer, self.__api_key)})."
                f"{_hint(answer.status)}"
            )
        try:
            document = json.loads(answer.body) if answer.body else {}
        except ValueError:
            raise HubUnavailable(f"Ango Hub answered {method} {path} with a body that is not JSON.") from None
        if isinstance(document, dict) and document.get("status") in ("fail", "error"):
            raise HubRequestRejected(
                f"Ango Hub rejected {method} {path}{_message_suffix(answer, self.__api_key, ': ')}."
            )
        return document

    def _with_retries(
        self,
        method: str,
        url: str,
        shown: str,
        *,
        headers: dict[str, str],
        body: bytes | None = None,
        body_cap: int | None = None,
        at_most_once: bool = False,
        address: str | None = None,
        best_effort: bool = False,
    ) -> _Answer:
        """Send until an answer below 500 arrives or the attempts run out. ``shown`` names the call in
        messages and logs (never the full URL: a presigned query string is a credential). ``at_most_once``
        stops at the first failure after which the hub may have acted (``HubDeliveryUnknown``);
        ``address`` is the vetted IP to connect to instead of resolving the host again."""
        attempts = 1 if best_effort else self.retries + 1
        budget = self._time_left(LOG_BUDGET_S if best_effort else None)
        ends_at = None if budget is None else time.monotonic() + budget
        problem = ""
        for attempt in range(1, attempts + 1):
            left = None if ends_at is None else ends_at - time.monotonic()
            if left is not None and left < MIN_ATTEMPT_S:
                raise HubUnavailable(
                    f"Ango Hub did not answer {method} {shown} within the time this step had "
                    f"left{f' ({problem})' if problem else ''}."
                )
            try:
                return self._send_once(method, url, headers, body, body_cap, address, left)
            except _Retryable as failure:
                problem = str(failure)
                if at_most_once and failure.maybe_applied:
                    raise HubDeliveryUnknown(
                        f"Ango Hub did not confirm {method} {shown} ({problem}); it may have been applied, "
                        "so it is not sent again."
                    ) from None
            if attempt < attempts:
                delay = self._backoff(attempt)
                if ends_at is not None and time.monotonic() + delay + MIN_ATTEMPT_S > ends_at:
                    break  # no time for another attempt: say so now, while the step can still record it
                logger.warning(
                    "Ango Hub %s %s failed (%s); attempt %d of %d, next in %.2f s",
                    method,
                    shown,
                    problem,
                    attempt,
                    attempts,
                    delay,
                )
                self._sleep(delay)
        raise HubUnavailable(
            f"Ango Hub did not answer {method} {shown} after {attempts} attempt(s): {problem}."
        )

    def _send_once(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes | None,
        body_cap: int | None,
        address: str | None = None,
        left_s: float | None = None,
    ) -> _Answer:
        # per-read timeouts alone would let a server that drips bytes hold the call forever
        total_s = self.timeout_s * BODY_DEADLINE_FACTOR
        if left_s is not None:
            total_s = min(total_s, left_s)
        deadline = time.monotonic() + total_s
        per_read_s = min(self.timeout_s, total_s)
        options: dict[str, Any] = {  # urllib3's keyword arguments, the same for both pools
            "body": body,
            "retries": False,
            "redirect": False,
            "preload_content": False,
            "timeout": urllib3.Timeout(connect=per_read_s, read=per_read_s),
        }
        pinned: urllib3.HTTPConnectionPool | None = None
        # http.client refuses a header value with a line break or a character outside Latin-1 with an error
        # that quotes the value; the Ango API key is a header, so such a value never gets that far.
        if not all(_sendable_header(value) for value in headers.values()):
            raise _unsendable_header()
        response: urllib3.BaseHTTPResponse | None = None
        try:
            if address is None:
                response = self._http.urlopen(method, url, headers=headers, **options)
            else:
                pinned, target, host = _pinned_pool(url, address)
                response = pinned.urlopen(
                    method, target, headers={**headers, "Host": host}, assert_same_host=False, **options
                )
        except (ValueError, UnicodeError) as exc:
            if isinstance(exc, urllib3.exceptions.HTTPError):
                raise _Retryable(f"connection failed ({type(exc).__name__})", maybe_applied=False) from None
            # raised below (response is None), outside this block, so the error quoting the value is not chained
        # NewConnectionError first: urllib3 derives it from its TimeoutError, but it means "refused"
        except urllib3.exceptions.NewConnectionError as exc:
            raise _Retryable(f"connection failed ({type(exc).__name__})", maybe_applied=False) from None
        except urllib3.exceptions.ConnectTimeoutError:
            raise _Retryable(f"could not connect within {self.timeout_s:g} s", maybe_applied=False) from None
        except urllib3.exceptions.TimeoutError:
            raise _Retryable(f"timed out after {self.timeout_s:g} s", maybe_applied=True) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _Retryable(f"connection failed ({type(exc).__name__})", maybe_applied=True) from None
        if response is None:
            raise _unsendable_header()
        complete = False
        try:
            declared = response.headers.get("Content-Length")
            if (
                body_cap is not None
                and declared
                and declared.isdigit()
                and int(declared) > body_cap
                and response.status < 300
            ):
                raise _TooLarge()
            chunks: list[bytes] = []
            size = 0
            # read1: whatever has arrived, so the deadline is checked as bytes drip in (read(n) waits for n)
            while chunk := response.read1(_CHUNK_BYTES):
                size += len(chunk)
                if body_cap is not None and size > body_cap and response.status < 300:
                    raise _TooLarge()
                if time.monotonic() > deadline:
                    raise _Retryable(
                        f"the answer took longer than {total_s:.3g} s to arrive",
                        maybe_applied=True,
                    )
                chunks.append(chunk)
            complete = True
        except urllib3.exceptions.TimeoutError:
            raise _Retryable(f"timed out after {self.timeout_s:g} s", maybe_applied=True) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _Retryable(
                f"connection failed while reading ({type(exc).__name__})", maybe_applied=True
            ) from None
        finally:
            if not complete:
                response.close()  # an unread remainder must not go back into the pool
            response.release_conn()
            if pinned is not None:
                pinned.close()
        answer = _Answer(
            response.status,
            b"".join(chunks),
            response.headers.get("Content-Type", ""),
            response.headers.get("Location"),
        )
        if answer.status >= 500:
            raise _Retryable(
                f"HTTP {answer.status}{_message_suffix(answer, self.__api_key)}",
                maybe_applied=answer.status not in _NOT_APPLIED_STATUSES,
            )
        return answer

    def _backoff(self, attempt: int) -> float:
        ceiling = min(MAX_BACKOFF_S, self.backoff_s * 2.0 ** (attempt - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)  # jitter spreads retries of parallel runs


# ---- helpers -----------------------------------------------------------------------------------------


def _pinned_pool(url: str, address: str) -> tuple[urllib3.HTTPConnectionPool, str, str]:
    """A one-off connection pool to ``address`` for ``url``'s host: the Host header and, for https, the
    TLS server name and certificate check still use the host name. Returns (pool, path and query, Host)."""
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if parts.scheme == "https":
        pool: urllib3.HTTPConnectionPool = urllib3.HTTPSConnectionPool(
            address,
            parts.port or 443,
            maxsize=1,
            retries=False,
            server_hostname=parts.hostname,
            assert_hostname=parts.hostname,
        )
    else:
        pool = urllib3.HTTPConnectionPool(address, parts.port or 80, maxsize=1, retries=False)
    return pool, target, parts.netloc.rsplit("@", 1)[-1]


def _sendable_header(value: str) -> bool:
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return not any(ch in value for ch in "\r\n\x00")


def _unsendable_header() -> HubRequestRejected:
    return HubRequestRejected(
        "Ango Hub could not be called: the request carries a header HTTP cannot send (check that the Ango API "
        "key is a single line of plain characters)."
    )


def _segment(value: str) -> str:
    return quote(value, safe="")


def _without_query(url: str) -> str:
    return url.split("?", 1)[0]


def _dig(document: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(document, dict):
            return None
        document = document.get(key)
    return document


def _message_suffix(answer: _Answer, api_key: str, prefix: str = ": ") -> str:
    """The hub's own error ``message`` (or the start of a non-JSON body), scrubbed of the API key."""
    message = ""
    try:
        document = json.loads(answer.body)
        if isinstance(document, dict):
            message = str(document.get("message") or document.get("error") or "")
    except ValueError:
        message = answer.body[:MAX_MESSAGE_CHARS].decode("utf-8", errors="replace").strip()
    if not message:
        return ""
    if api_key:
        message = message.replace(api_key, "***")
    return prefix + message[:MAX_MESSAGE_CHARS]


def _hint(status: int) -> str:
    if status in (401, 403):
        return (
            " Check that the Ango API key of the user who ran the plugin is valid and can open this project."
        )
    if status == 404:
        return " The id may be wrong, or the item was deleted."
    return ""
