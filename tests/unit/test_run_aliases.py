"""The run's models name their fields on the wire exactly as pydantic's ``to_camel`` would: the plugin's own
alias generator (cheaper at a cold start) must never rename a field of a stored record or a step contract."""

import importlib
import pkgutil

import dalle_plugin
import pytest
from dalle_plugin.domain.run import CamelModel, camel_alias
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel
from pydantic.alias_generators import to_camel


def _camel_models() -> list[type[BaseModel]]:
    for info in pkgutil.walk_packages(dalle_plugin.__path__, "dalle_plugin."):
        importlib.import_module(info.name)
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
