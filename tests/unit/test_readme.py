"""The README's deploy walk-through names only outputs and parameters the template has."""

from __future__ import annotations

import re

from local_stack.template import PROJECT_ROOT, load_template

README = (PROJECT_ROOT / "README.md").read_text()


def _deploy_section() -> str:
    start = README.index("## Deploy to AWS")
    return README[start : README.index("\n## ", start + 1)]


def test_every_output_and_parameter_the_deploy_walk_through_names_exists():
    template = load_template()
    outputs, parameters = set(template["Outputs"]), set(template["Parameters"])
    section = _deploy_section()
    read_outputs = set(re.findall(r"(?<![-\w])output ([A-Z]\w+)", section))
    assert read_outputs >= {"ApiUrl", "PluginSecretArn", "DefaultOpenAIKeySecretArn", "AlarmTopicArn"}
    assert read_outputs <= outputs, read_outputs - outputs
    named = set(re.findall(r"`([A-Z][a-z]+(?:[A-Z][a-z0-9]*)+)`", section))
    assert named <= outputs | parameters, named - outputs - parameters


def test_the_secret_is_printed_as_text_not_as_json():
    commands = _deploy_section().replace("\\\n", " ")  # a command continued on the next line is one line
    reads = [line for line in commands.splitlines() if "get-secret-value" in line]
    assert reads and all("--query SecretString --output text" in line for line in reads)


def test_the_curl_runs_a_live_model():
    assert '\\"model_name\\": \\"gpt-image-2\\"' in README
