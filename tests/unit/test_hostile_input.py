"""Hostile and broken input, generated: the spec parser and the agent API either
accept it or name the problem; they never fail any other way."""

from __future__ import annotations

import asyncio
import json
import tomllib
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from coloft.agent import api
from coloft.config.load import load_spec, parse_spec
from coloft.errors import ConfigError
from coloft.model.spec import PairSpec
from tests.unit.test_agent_io import StandIn
from tests.unit.test_config import GOOD

SOURCE = Path("/etc/coloft/fuzz.toml")
OPENAPI = json.loads((Path(api.__file__).parent / "openapi.json").read_text())
BASE = tomllib.loads(GOOD)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=40),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=8,
)
KEYS = {
    "vm": ["name", "memory_mib", "vcpus", "disk", "mac", "nic_model", "accel", "service", "append"],
    "nodes": ["replication_address", "bridge", "port_base", "netns", "disk", "lan_address"],
    "tuning": ["checkpoint_interval_ms", "compare_timeout_ms", "max_queue_size", "migration_mib_s"],
    "arbiter": ["endpoints", "embedded", "ttl_s", "renew_every_s", "fence_margin_s"],
    "security": ["replication", "certs"],
    "reprotect": ["auto", "backoff_s", "backoff_max_s", "disk_mib_s"],
    "policy": ["mirror", "compare-in", "probe"],
    "heartbeat": ["interval_ms", "misses"],
    "metrics": ["port"],
    "other": ["surprise"],
}


def _mutated(table: str, key: str, value: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(json.dumps(BASE))
    if table == "nodes":
        doc["nodes"]["x"][key] = value
    elif table == "other":
        doc[key] = value
    else:
        doc.setdefault(table, {})[key] = value
    return doc


def _parses_or_names_the_problem(doc: Any) -> None:
    try:
        spec = parse_spec(SOURCE, doc)
    except ConfigError as e:
        assert str(e).startswith(str(SOURCE)), e
    else:
        assert isinstance(spec, PairSpec)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(sorted(KEYS)).flatmap(
        lambda t: st.tuples(st.just(t), st.sampled_from(KEYS[t]))
    ),
    values,
)
def test_any_value_in_any_field_parses_or_names_the_problem(
    where: tuple[str, str], value: Any
) -> None:
    _parses_or_names_the_problem(_mutated(*where, value))


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.text(max_size=12), values, max_size=6))
def test_any_document_shape_parses_or_names_the_problem(doc: dict[str, Any]) -> None:
    _parses_or_names_the_problem(doc)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(max_size=300))
def test_any_file_bytes_load_or_name_the_problem(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "pair.toml"
    path.write_bytes(GOOD.encode() + raw)
    try:
        load_spec(path)
    except ConfigError as e:
        assert str(path) in str(e), e


def _answer(raw: bytes) -> tuple[int, Any]:
    """Feed one raw request to the API's handler and parse what it wrote."""
    agent = StandIn()

    async def go() -> bytes:
        reader = asyncio.StreamReader(limit=api.MAX_HEAD)
        reader.feed_data(raw)
        reader.feed_eof()
        written = bytearray()

        class Writer:
            def write(self, data: bytes) -> None:
                written.extend(data)

            async def drain(self) -> None:
                return None

            def close(self) -> None:
                return None

            def get_extra_info(self, name: str) -> None:
                return None

        await api._handler(agent, api._route)(reader, Writer())
        return bytes(written)

    reply = asyncio.run(go())
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    length = int(
        next(h.split(b":")[1] for h in head.split(b"\r\n") if h.startswith(b"Content-Length"))
    )
    assert length == len(body), reply
    return status, json.loads(body) if b"application/json" in head else body


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_get_an_http_answer(raw: bytes) -> None:
    status, body = _answer(raw)
    assert status in (200, 400, 404, 405, 408, 413, 431, 503), (status, body)


METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "get", "P\x00ST"])
TARGETS = st.one_of(
    st.sampled_from(["/status", "/protected", "/metrics", "/events", "/failover", "/protection"]),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=30),
).map(lambda t: t if t.startswith("/") else "/" + t)


@settings(max_examples=300, deadline=None)
@given(METHODS, TARGETS, values)
def test_any_request_with_a_json_body_is_answered_with_json(
    method: str, target: str, payload: Any
) -> None:
    body = json.dumps(payload).encode()
    raw = f"{method} {target} HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    status, answer = _answer(raw)
    assert status in (200, 400, 404, 405, 409, 503), (status, answer)
    if status >= 400 and status != 503:
        assert isinstance(answer, dict) and answer["error"], answer


def _operations() -> list[tuple[str, str, dict[str, Any]]]:
    found = []
    for path, item in OPENAPI["paths"].items():
        for method, op in item.items():
            content = op.get("requestBody", {}).get("content", {}).get("application/json")
            if content:
                found.append((path, method.upper(), content["schema"]))
    return found


def _resolved(schema: dict[str, Any]) -> dict[str, Any]:
    # The request schemas refer to components; inline them for the generator.
    text = json.dumps(schema)
    for name, component in OPENAPI.get("components", {}).get("schemas", {}).items():
        text = text.replace(
            json.dumps({"$ref": f"#/components/schemas/{name}"}), json.dumps(component)
        )
    return dict(json.loads(text))


def test_the_api_document_has_request_bodies_to_generate_from() -> None:
    assert {(p, m) for p, m, _ in _operations()} == {("/failover", "POST"), ("/protection", "POST")}


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_every_body_the_document_allows_is_accepted(data: st.DataObject) -> None:
    for path, method, schema in _operations():
        body = json.dumps(data.draw(from_schema(_resolved(schema)))).encode()
        raw = f"{method} {path} HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        status, answer = _answer(raw)
        assert status == 200, (path, body, status, answer)
