"""Bound: the sandboxes an admin client can switch request inspection on for
(tunneld/inspect.py ``MAX_INSPECTED_SANDBOXES``).

``PUT /v1/sandboxes/{id}/inspect`` takes any valid sandbox id, connected or not, and keeps a ring
for it until it is switched off. Records are bounded by ``inspect_max_bytes``, but the rings were
not: one client with the admin token could make the edge keep one for every id it can spell, at
the admin API's rate. Past the cap a PUT for a sandbox without a ring is 409 ``TOO_MANY_INSPECTED``;
the sandboxes already inspected keep working, and switching one off makes room again.

The cap is 10,000 in production; the test lowers it on the in-process edge so that it can go past
it with real HTTP requests in a moment.
"""

from __future__ import annotations

import asyncio

import pytest

import tunneld.inspect

from .conftest import Stack

pytestmark = pytest.mark.anyio

CAP = 40


async def test_inspection_for_more_sandboxes_than_the_cap_is_refused_409(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tunneld.inspect, "MAX_INSPECTED_SANDBOXES", CAP)
    admin = stack.admin
    assert admin is not None and stack.edge is not None
    ids = [f"hostile{i}" for i in range(CAP + 20)]
    answers = []
    for start in range(0, len(ids), 10):
        answers += await asyncio.gather(
            *(admin.put(f"/v1/sandboxes/{i}/inspect") for i in ids[start : start + 10])
        )
    statuses = [r.status_code for r in answers]
    assert statuses[:CAP] == [200] * CAP, statuses
    assert statuses[CAP:] == [409] * 20, statuses
    refusal = answers[-1].json()
    assert refusal["code"] == "TOO_MANY_INSPECTED", refusal
    assert len(stack.edge.inspector.rings) == CAP

    # The sandboxes already inspected still answer, and a PUT for one of them is not refused.
    again = await admin.put(f"/v1/sandboxes/{ids[0]}/inspect")
    assert again.status_code == 200 and again.json()["inspect"] is True
    # Switching one off makes room for another.
    off = await admin.delete(f"/v1/sandboxes/{ids[1]}/inspect")
    assert off.status_code == 200
    late = await admin.put(f"/v1/sandboxes/{ids[-1]}/inspect")
    assert late.status_code == 200, late.text
    assert len(stack.edge.inspector.rings) == CAP
