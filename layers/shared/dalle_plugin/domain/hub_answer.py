"""The hub's two spellings of a task's annotations.

``GET /v2/task/{id}?includeAnswer=true`` returns the answer in *read* format, ``{"tools": [...],
"classifications": [...], "relations": [...]}``; ``/v2/annotate`` and a plugin's reply take the *write*
format, which names the same list ``objects``. The plugin hands the hub the task's answer back unchanged,
so this conversion must lose nothing.
"""

from __future__ import annotations

import copy
from typing import Any


def answer_to_write_format(read_answer: dict[str, Any] | None) -> dict[str, Any]:
    """``tools`` -> ``objects``; ``classifications`` and ``relations`` kept; missing lists become ``[]``.

    An answer that already says ``objects`` (some hub paths return it that way) is taken as is. The result
    is a deep copy: nothing the caller keeps is shared with what gets sent.
    """
    answer = read_answer or {}
    objects = answer.get("tools")
    if objects is None:
        objects = answer.get("objects")
    return {
        "objects": copy.deepcopy(list(objects or [])),
        "classifications": copy.deepcopy(list(answer.get("classifications") or [])),
        "relations": copy.deepcopy(list(answer.get("relations") or [])),
    }
