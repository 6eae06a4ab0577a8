"""The run payload exactly as Ango Hub's REST connector sends it to ``POST /plugin``."""

import json
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
)

from dalle_plugin.domain.errors import InvalidRequest
from dalle_plugin.domain.prompt import prompt_class_ids

ID = Field(min_length=1, max_length=256)


class CategoryMapping(BaseModel):
    model_config = ConfigDict(extra="allow")
    schema_id: str = Field(alias="schemaId", min_length=1, max_length=256)
    model_class: str = Field(alias="modelClass", max_length=256)


class BatchTask(BaseModel):
    """One task of a batch request: the ids the hub gives, with the asset when it knows it."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    task_id: str = Field(alias="taskId", min_length=1, max_length=256)
    asset_id: str | None = Field(default=None, alias="assetId", max_length=256)
    data_url: str | None = Field(default=None, alias="dataURL", max_length=4096)


#: tasks one request may run (docs/batches.md: what it costs in AWS calls and executions)
MAX_BATCH_TASKS = 10_000


# The two checks below are validators in the fields' annotations, not ``field_validator`` methods: each of
# those costs the API's cold start about three times as much to create (pydantic inspects the method).
def _key_not_blank(value: SecretStr) -> SecretStr:
    key = value.get_secret_value()
    if not key.strip():
        raise ValueError("must not be empty")
    if len(key) > 512:
        raise ValueError("is longer than 512 characters")
    # It travels as an HTTP header: a control character would make the HTTP library raise an error that
    # quotes the header's value, so such a key is refused here, never echoed.
    if not key.isascii() or not key.isprintable() or any(ch.isspace() for ch in key):
        raise ValueError("must be printable ASCII without spaces (an Ango API key)")
    return value


def _config_size(value: Any) -> Any:
    if isinstance(value, str) and len(value) > 16_384:
        raise ValueError("is longer than 16384 characters")
    return value


class HubPayload(BaseModel):
    """Keys as the hub sends them; ``classMapping`` and ``sessionId`` are accepted as aliases because no
    real hub has confirmed the spelling (see docs)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    project_id: str = Field(alias="projectId", min_length=1, max_length=256)
    task_id: str | None = Field(default=None, alias="taskId", min_length=1, max_length=256)
    # A batch: a Re-Run of a Plugin stage or a batch plugin run, many tasks in one session.
    tasks: list[BatchTask] | None = Field(default=None, max_length=MAX_BATCH_TASKS)
    task_ids: list[Annotated[str, StringConstraints(min_length=1, max_length=256)]] | None = Field(
        default=None, alias="taskIds", max_length=MAX_BATCH_TASKS
    )
    session: str = Field(validation_alias=AliasChoices("session", "sessionId"), min_length=1, max_length=256)
    api_key: Annotated[SecretStr, AfterValidator(_key_not_blank)] = Field(alias="apiKey")
    asset_id: str | None = Field(default=None, alias="assetId", max_length=256)
    data_url: str | None = Field(default=None, alias="dataURL", max_length=4096)
    category_schema: list[CategoryMapping] | None = Field(
        default=None, validation_alias=AliasChoices("categorySchema", "classMapping"), max_length=500
    )
    config_json: Annotated[str | dict[str, Any] | None, AfterValidator(_config_size)] = Field(
        default=None, alias="configJSON"
    )
    org_id: str | None = Field(default=None, alias="orgId", max_length=256)
    run_by: str | None = Field(default=None, alias="runBy", max_length=256)
    plugin_id: str | None = Field(default=None, alias="pluginId", max_length=256)
    workflow: bool | str | int | None = None
    overwrite: bool | None = None
    batches: list[str] | None = Field(default=None, max_length=1000)

    def batch_tasks(self, listed: Sequence[BatchTask] = ()) -> list[BatchTask]:
        """Every task the request names, then those ``listed`` for its ``batches``, once each, in order."""
        named = list(self.tasks or [])
        named += [BatchTask(task_id=task_id) for task_id in self.task_ids or []]
        if self.task_id:
            named.insert(0, BatchTask(task_id=self.task_id, asset_id=self.asset_id, data_url=self.data_url))
        named += listed
        unique: dict[str, BatchTask] = {}
        for task in named:
            unique.setdefault(task.task_id, task)
        if not unique:
            raise InvalidRequest(
                "Payload field 'taskId' is required (or 'tasks' / 'taskIds' / 'batches' with tasks in them "
                "for a batch).",
                field="taskId",
            )
        if len(unique) > MAX_BATCH_TASKS:
            raise InvalidRequest(
                f"The request names {len(unique)} tasks; one run takes at most {MAX_BATCH_TASKS}.",
                field="tasks",
            )
        return list(unique.values())

    @property
    def is_workflow_run(self) -> bool:
        """Truthy when a workflow Plugin stage sent the task; absent for an editor run."""
        if isinstance(self.workflow, str):
            return self.workflow.strip().lower() not in ("", "false", "0", "no", "null")
        return bool(self.workflow)

    @property
    def prompt_class_ids(self) -> list[str]:
        return prompt_class_ids(self.category_schema)


def parse_payload(body: str | bytes | dict[str, Any] | None) -> HubPayload:
    """Parse the request body, turning every problem into one sentence that names the field."""
    if body is None or body == "" or body == b"":
        raise InvalidRequest("The request body is empty: expected the hub's run payload as a JSON object.")
    if isinstance(body, (str, bytes)):
        try:
            body = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"The request body is not valid JSON ({exc}).") from None
        except RecursionError:
            raise InvalidRequest("The request body is JSON nested too deeply to be a run payload.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object with the hub's run payload.")
    try:
        return HubPayload.model_validate(body)
    except ValidationError as exc:
        raise field_refusal(exc.errors()[0]) from None


def field_refusal(error: Mapping[str, Any], what: str = "Payload field") -> InvalidRequest:
    """One validation error (pydantic's shape, ``loc`` inside the body) as one sentence naming the field."""
    field = ".".join(str(part) for part in error["loc"]) or "body"
    reason = "is required" if error["type"] == "missing" else str(error["msg"]).removeprefix("Value error, ")
    return InvalidRequest(f"{what} '{field}' {reason.lower()}.", field=field)
