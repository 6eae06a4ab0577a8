"""The first page of a session of thousands of runs costs a few DynamoDB calls, counted against a sessions
table that pages Queries as AWS does: by the size of the items read (1 MB a call), where an index's item
is only its keys and projected attributes plus 100 bytes.

Not DynamoDB Local: it sizes an index's pages by the table's whole items (measured: 372 runs a page from
a KEYS_ONLY index and 335 from the table; its IndexSizeBytes equals TableSizeBytes), so it cannot show
what the index saves. tests/integration/test_session_tallies.py runs the same reads there for exactness."""

from __future__ import annotations

from typing import Any

import pytest
from dalle_plugin.adapters.dynamo_runs import TALLY_ATTRIBUTES, TALLY_INDEX, DynamoRunStore
from dalle_plugin.domain.sessions import session_page

from bench.session_page import SESSION, seeded_run

MB = 1024 * 1024


def _size(value: dict[str, Any]) -> int:
    """An attribute value's size as DynamoDB counts it (numbers about half their digits)."""
    kind, inner = next(iter(value.items()))
    if kind == "S":
        return len(inner.encode())
    if kind == "B":
        return len(inner)
    if kind == "N":
        return len(inner) // 2 + 2
    if kind == "L":
        return 3 + sum(1 + _size(element) for element in inner)
    raise AssertionError(f"unexpected attribute type {kind}")


def item_size(item: dict[str, dict[str, Any]]) -> int:
    return sum(len(name.encode()) + _size(value) for name, value in item.items())


class AwsSizedTable:
    """The sessions table and its ``RunTallies`` index for ``query`` only, paged as AWS pages them."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = sorted(items, key=lambda item: item["sk"]["S"])
        self.calls = 0
        self.bytes_read = 0
        self.index_attributes = {"pk", "sk", "createdAtMs", *TALLY_ATTRIBUTES}

    def query(self, **kwargs: Any) -> dict[str, Any]:
        self.calls += 1
        pk = kwargs["ExpressionAttributeValues"][":pk"]["S"]
        if kwargs.get("IndexName") == TALLY_INDEX:
            assert "ConsistentRead" not in kwargs  # an index refuses it
            rows = [
                {name: value for name, value in item.items() if name in self.index_attributes}
                for item in self.items
                if item["pk"]["S"] == pk and "createdAtMs" in item
            ]
            rows.sort(key=lambda row: (row["createdAtMs"]["S"], row["sk"]["S"]))
            sizes = [item_size(row) + 100 for row in rows]
            key_names = ("pk", "sk", "createdAtMs")
        else:
            assert "IndexName" not in kwargs
            rows = [item for item in self.items if item["pk"]["S"] == pk]
            sizes = [item_size(row) for row in rows]  # a projection does not shrink what is read
            key_names = ("pk", "sk")
        start = kwargs.get("ExclusiveStartKey")
        position = 0
        if start is not None:
            keys = [{name: row[name] for name in key_names} for row in rows]
            position = keys.index({name: start[name] for name in key_names}) + 1
        taken, read = [], 0
        for row, size in zip(rows[position:], sizes[position:], strict=True):
            if len(taken) == kwargs.get("Limit", len(rows)) or read >= MB:
                break
            taken.append(row)
            read += size
        self.bytes_read += read
        answer: dict[str, Any] = {"Items": taken}
        if position + len(taken) < len(rows):
            answer["LastEvaluatedKey"] = {name: taken[-1][name] for name in key_names}
        return answer


@pytest.mark.parametrize(("runs", "prompt_chars", "most_calls"), [(4000, 4000, 3), (10_000, 60, 6)])
def test_a_session_of_thousands_answers_its_first_page_in_a_few_calls(runs, prompt_chars, most_calls):
    table = AwsSizedTable([DynamoRunStore._to_item(seeded_run(n, runs, prompt_chars)) for n in range(runs)])
    view = session_page(SESSION, DynamoRunStore(table, "sessions"))
    assert view is not None and view["progress"]["total"] == runs and len(view["runs"]) == 100
    assert view["counts"]["SUCCEEDED"] == len(range(0, runs, 3))
    assert table.calls <= most_calls, (table.calls, table.bytes_read)
    # what the summary read from the table instead: every record whole, ten times the calls and more
    whole = AwsSizedTable(table.items)
    kwargs = {"ExpressionAttributeValues": {":pk": {"S": f"SESSION#{SESSION}"}}}
    while "LastEvaluatedKey" in (answer := whole.query(**kwargs)):
        kwargs["ExclusiveStartKey"] = answer["LastEvaluatedKey"]
    assert whole.calls >= 3 * table.calls, (whole.calls, table.calls)
