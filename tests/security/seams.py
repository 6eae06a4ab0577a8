"""Counters around what the API may spend: a KMS seal, a run record, an execution, and every AWS call the
API function makes. The handlers run in execution environments of their own, so the counting happens there
(``tests.env_hooks``) and is read back from the stack's seam board."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tests.env_hooks import SPENDING, SPENDING_ACTIVE


@contextmanager
def spending(stack: Any) -> Iterator[Counter]:
    """Counts ``seal``, ``create`` and ``start`` (whoever calls them: only the API does) and, as
    ``aws:<Operation>``, every AWS call made by the API function; the counts are there when the block ends."""
    board = stack.seams
    board.disarm(SPENDING)
    active = board.root / SPENDING_ACTIVE
    active.touch()
    counts: Counter = Counter()
    try:
        yield counts
    finally:
        active.unlink(missing_ok=True)
        for name, values in board.records(SPENDING).items():
            counts[name] += len(values)
        board.disarm(SPENDING)
