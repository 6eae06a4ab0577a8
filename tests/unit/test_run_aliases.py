"""The run's models name their fields on the wire exactly as pydantic's ``to_camel`` would: the plugin's own
alias generator (cheaper at a cold start) must never rename a field of a stored record or a step contract."""

import importlib

import pytest
from dalle_plugin.domain.run import CamelModel, camel_alias
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel
from pydantic.alias_generators import to_camel

#: the modules that define the run's models (step contracts included); not every module of the plugin: some
#: (observability) must first be imported by their tests, with the environment those give them
CAMEL_MODULES = (
    "dalle_plugin.domain.run",
    "dalle_plugin.domain.step_io.api",
    "dalle_plugin.domain.step_io.attach",
    "dalle_plugin.domain.step_io.extract",
    "dalle_plugin.domain.step_io.extracted",
    "dalle_plugin.domain.step_io.failure",
    "dalle_plugin.domain.step_io.generate",
    "dalle_plugin.domain.steps.stopped",
)


def _camel_models() -> list[type[BaseModel]]:
    for name in CAMEL_MODULES:
        importlib.import_module(name)
    found, pending = [], [CamelModel]
    while pending:
        model = pending.pop()
        found.append(model)
        pending.extend(model.__subclasses__())
    return found


@pytest.mark.parametrize("model", _camel_models(), ids=lambda model: f"{model.__module__}.{model.__name__}")
def test_every_field_keeps_to_camels_alias(model: type[BaseModel]) -> None:
    for name, field in model.model_fields.items():
        if field.alias_priority == 1:  # the generator's (an alias given in Field() has priority 2)
            assert field.alias == to_camel(name), (model.__name__, name)


@given(st.from_regex(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", fullmatch=True))
def test_snake_case_names_match_to_camel(name: str) -> None:
    assert camel_alias(name) == to_camel(name)
