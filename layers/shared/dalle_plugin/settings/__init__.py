"""Deployment settings: one pydantic model per function, read once from the environment at cold start.

Domain code never reads ``os.environ``; handlers build these through ``load_settings`` and hand values on.
A missing or malformed variable fails the cold start with a message naming it. Here: what every function
shares; each function's own class lives in a module of its own (``settings.extract``, ``.attach``,
``.rate_limit``, ``.api``, ``.start_batch``, ``.authorizer``, ``.generate``), so that no function creates
another's classes at its cold start (each costs about half a percent of a floor to create, built or not).
"""

# No ``from __future__ import annotations`` here: pydantic reads the settings' annotations as objects
# instead of evaluating each as a string when it collects their fields, on every function's first event.

import os
from collections.abc import Iterable
from functools import cache
from typing import Annotated, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError


def _parse_host_list(value: object) -> object:
    if isinstance(value, str):
        entries: list[object] = [e.strip() for e in value.split(",")]
    elif isinstance(value, Iterable):
        entries = list(value)
    elif value is None:
        entries = []
    else:
        raise ValueError("must be comma-separated host:port pairs or a list of them")
    for entry in entries:
        host, _, port = str(entry).rpartition(":")
        if entry and (not host or not port.isdigit()):
            raise ValueError(f"each entry must be an exact host:port pair, got {entry!r}")
    return frozenset(str(entry) for entry in entries if entry)


#: a validator in the annotation, not a ``field_validator`` method: pydantic inspects each of those when it
#: creates the class, about three times the cost, at every function's cold start
HostPorts = Annotated[frozenset[str], BeforeValidator(_parse_host_list)]


class CommonSettings(BaseModel):
    # Built when a function first loads its settings, not at import: each function loads one of these
    # classes, and building the others would be paid by every cold start for nothing.
    model_config = ConfigDict(extra="ignore", frozen=True, defer_build=True)

    sessions_table: str = Field(alias="SESSIONS_TABLE", min_length=3)
    images_bucket: str = Field(alias="IMAGES_BUCKET", min_length=3)
    kms_key_id: str = Field(alias="KMS_KEY_ID", min_length=1)
    hub_api_url: str = Field(alias="HUB_API_URL", min_length=1)
    hub_timeout_s: float = Field(default=10.0, alias="HUB_TIMEOUT_S", gt=0)
    hub_retries: int = Field(default=3, alias="HUB_RETRIES", ge=0)
    run_ttl_days: int = Field(default=30, alias="RUN_TTL_DAYS", ge=1)
    # How long a warm environment keeps a secret it read (the plugin Secret, the shared OpenAI key) before
    # reading it again: a rotation reaches every warm Lambda within this.
    secret_max_age_s: int = Field(default=120, alias="SECRET_MAX_AGE_S", gt=0)
    # Exact "host:port" pairs the URL guard lets through although private, over http too: the local stack
    # lists the emulators it starts on 127.0.0.1. Deployed it stays empty: every URL must be public https.
    allowed_private_hosts: HostPorts = Field(default=frozenset(), alias="ALLOWED_PRIVATE_HOSTS")


SettingsT = TypeVar("SettingsT", bound=CommonSettings)


class SettingsError(RuntimeError):
    pass


def read_settings(model: type[SettingsT], environ: dict[str, str] | None = None) -> SettingsT:
    env = dict(os.environ if environ is None else environ)
    blank = [name for name, value in env.items() if value == ""]
    for name in blank:  # an empty variable means "not set", so the default applies
        del env[name]
    try:
        return model.model_validate(env)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise SettingsError(f"{model.__name__} is misconfigured: {problems}") from None


@cache
def load_settings(model: type[SettingsT]) -> SettingsT:
    """Read once per cold start."""
    return read_settings(model)
