"""Validate the agent API's answers against its OpenAPI document (schema-driven)."""

from __future__ import annotations

import http.client
import json
import socket
from importlib import resources
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator


def document() -> dict[str, Any]:
    text = resources.files("coloft.agent").joinpath("openapi.json").read_text()
    doc: dict[str, Any] = json.loads(text)
    return doc


def _pointer(*parts: str) -> str:
    return "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def check(path: str, method: str, status: int, body: Any) -> None:
    """Raise if `body` is not what the document promises for this answer."""
    doc = document()
    op = doc["paths"][path][method.lower()]
    content = op["responses"][str(status)]["content"]
    kind = next(iter(content))
    ref = _pointer(
        "paths", path, method.lower(), "responses", str(status), "content", kind, "schema"
    )
    Draft202012Validator({**doc, "$ref": ref}).validate(body)


def request(sock: Path, method: str, target: str, body: bytes = b"") -> tuple[int, Any]:
    """One raw request to an agent: its status code and its parsed body."""
    conn = http.client.HTTPConnection("localhost", timeout=5)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(sock))
    conn.sock = s
    try:
        conn.request(method, target, body=body or None)
        resp = conn.getresponse()
        data = resp.read()
        kind = resp.getheader("Content-Type") or ""
        return resp.status, data.decode() if kind.startswith("text/plain") else json.loads(data)
    finally:
        conn.close()


def exercise(sock: Path) -> dict[str, int]:
    """Every operation of the document against one running agent, each answer
    checked against its schema; the status codes it gave, by operation."""
    calls = {
        ("/status", "GET"): ("/status", b""),
        ("/protected", "GET"): ("/protected", b""),
        ("/metrics", "GET"): ("/metrics", b""),
        ("/events", "GET"): ("/events?since=0", b""),
        ("/failover", "POST"): ("/failover", b'{"force": "yes"}'),  # refused: bad body
        ("/protection", "POST"): ("/protection", b'{"on": true}'),
    }
    seen = {}
    for (path, method), (target, body) in calls.items():
        status, answer = request(sock, method, target, body)
        check(path, method, status, answer)
        seen[f"{method} {path}"] = status
    return seen
