"""``make openapi``: writes docs/openapi.yaml from the API function's routes (``python -m tools.openapi``).

``--print`` writes it as JSON to stdout; ``--check`` exits 1 when the committed document differs from what the code generates (as parsed documents,
so formatting does not count)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
API_APP = ROOT / "functions" / "api" / "app.py"
DOC = ROOT / "docs" / "openapi.yaml"
HEADER = "# Generated from functions/api/app.py by `make openapi`: change the code, not this file.\n"


def _from_the_code() -> dict[str, Any]:
    spec = importlib.util.spec_from_file_location("api_function_app", API_APP)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {API_APP}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.openapi_document()


def generated() -> dict[str, Any]:
    """The document the API function's code describes, built in a process of its own: importing the
    function builds its Powertools Logger and Metrics from the environment, which must not happen inside a
    test process that later runs handlers with the local stack's environment."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "layers" / "shared"), str(ROOT)])}
    out = subprocess.run(
        [sys.executable, "-m", "tools.openapi", "--print"], cwd=ROOT, env=env, capture_output=True, check=True
    ).stdout
    return json.loads(out)


def committed() -> dict[str, Any]:
    return yaml.safe_load(DOC.read_text(encoding="utf-8"))


def write() -> None:
    text = yaml.safe_dump(_from_the_code(), sort_keys=False, allow_unicode=True, width=110)
    DOC.write_text(HEADER + text, encoding="utf-8")


def main(argv: list[str]) -> int:
    if "--print" in argv:
        print(json.dumps(_from_the_code()))
        return 0
    if "--check" in argv:
        if committed() != generated():
            print(f"{DOC.relative_to(ROOT)} is not current: run `make openapi`", file=sys.stderr)
            return 1
        return 0
    write()
    print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
