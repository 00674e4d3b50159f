"""The OpenAPI document of the agent API: well-formed, and in step with the router."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from jsonschema import ValidationError

from coloft.agent import api
from tests.openapi_check import check, document
from tests.unit.test_agent_io import StandIn


def test_every_documented_operation_is_routed_and_every_route_documented() -> None:
    doc = document()
    assert doc["openapi"].startswith("3.1")
    agent = StandIn()

    async def answer(method: str, path: str) -> int:
        body = b'{"on": true}' if path == "/protection" else b"{}"
        try:
            status, _ = await api._route(agent, method, path, body)
        except api.BadRequest as e:
            status = e.status
        return status

    for path, ops in doc["paths"].items():
        for method in ops:
            assert asyncio.run(answer(method.upper(), path)) != 404, (method, path)
    assert asyncio.run(answer("GET", "/undocumented")) == 404


def test_answers_are_checked_against_the_document() -> None:
    check("/protected", "GET", 503, {"protected": False, "phase": "x", "reason": "y", "code": ""})
    check("/protection", "POST", 409, {"error": "b does not lead this pair"})
    with pytest.raises(ValidationError):
        check("/protected", "GET", 200, {"protected": "yes"})
    status: dict[str, Any] = {"vm": "demo"}
    with pytest.raises(ValidationError, match="'node' is a required property"):
        check("/status", "GET", 200, status)
