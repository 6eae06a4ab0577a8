"""The canary at the API: requests the API refuses while they carry a user's OpenAI key and Ango apiKey
(in the right field, in the wrong field, mangled) answer without them, and leave no trace of them anywhere
the stack keeps anything. Runs that succeed, fail and crash with canary keys are scanned by the fault suite
(tests/faults/test_fault_suite.py), where every row also reports its canary hits."""

from __future__ import annotations

import json
import logging

import pytest

from tests.security import canary as canaries

pytestmark = pytest.mark.stack


def test_refused_requests_never_echo_or_keep_the_users_keys(stack, api, sample_payload, caplog, capsys):
    caplog.set_level(logging.DEBUG, logger="dalle_plugin")
    caplog.set_level(logging.INFO)
    canary = canaries.Canary.new()
    stack.hub.add_api_key(canary.ango_key)
    key = canary.openai_key
    configs = [
        {"openai_api_key": key, "model_name": 5},
        {"openai_key": key},
        {key: "default"},
        {"openai_api_key": key, "model_name": key},
        {"openai_api_key": f"Bearer {key}"},
        {"openai_api_key": key + "\u00e9"},
        {"openai_api_key": key, "get_prompt_from": key},
        {"openai_api_key": key, "image_size": key},
        {"openai_api_key": key, "quality": [key]},
    ]
    bodies = [
        sample_payload("task-lighthouse", apiKey=canary.ango_key, configJSON=json.dumps(c)) for c in configs
    ]
    bodies += [
        sample_payload(
            "task-lighthouse", apiKey=canary.ango_key, configJSON=json.dumps(configs[0]), taskId=None
        ),
        sample_payload(
            "task-lighthouse", apiKey=canary.ango_key + "\n", configJSON=json.dumps({"openai_api_key": key})
        ),
        sample_payload(
            "task-lighthouse",
            apiKey=canary.ango_key,
            categorySchema=None,
            configJSON=json.dumps({"openai_api_key": key, "get_prompt_from": "text-annotation"}),
        ),
        sample_payload(
            "task-lighthouse", apiKey=canary.ango_key, configJSON=f"{{'openai_api_key': '{key}'}}"
        ),
        sample_payload("task-lighthouse", apiKey=canary.ango_key, configJSON=key),
    ]
    answers = []
    for body in bodies:
        answer = api._session.post(f"{api.base_url}/plugin", data=json.dumps(body), timeout=30)
        assert answer.status_code in (400, 422), answer.text
        answers.append(answer.text)

    captured = capsys.readouterr()
    extra = [
        ("api-answers", answers),
        ("stdout", captured.out),
        ("stderr", captured.err),
        ("python-logging", "\n".join(f"{r.name} {r.getMessage()} {r.__dict__}" for r in caplog.records)),
    ]
    corpus = canaries.collect(stack, extra)
    assert corpus.hits(canary.openai_key) == []
    assert corpus.hits(canary.ango_key) == []
    assert any(canary.openai_key[-4:] in text for text in answers), (
        "the masked form (sk-...abcd) is what is shown"
    )
