"""The workload client and verifier against an in-test fake of the guest's line protocol."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coloft.lab import workload
from coloft.lab.workload import RunConfig, WorkloadError, percentile, value_for

pytestmark = pytest.mark.timeout(60)


class FakeKV:
    """The guest's key/value service, in memory, on 127.0.0.1 (a protocol-adapter fake).

    ``stall_request``: the n-th request (1-based, over all connections) is never answered;
    that connection is held open and silent for ``stall_s`` seconds, then closed.
    """

    def __init__(self, *, stall_request: int | None = None, stall_s: float = 2.0) -> None:
        self.store: dict[str, str] = {}
        self.requests = 0
        self.connections = 0
        self.stall_request = stall_request
        self.stall_s = stall_s
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> FakeKV:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def answer(self, line: str) -> str:
        parts = line.split(" ")
        if parts[0] == "PUT" and len(parts) == 3:
            self.store[parts[1]] = parts[2]
            return f"OK {parts[1]}"
        if parts[0] == "GET" and len(parts) == 2:
            if parts[1] in self.store:
                return f"VAL {parts[1]} {self.store[parts[1]]}"
            return f"NONE {parts[1]}"
        if parts == ["PING"]:
            return "PONG"
        return "ERR bad request"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while raw := await reader.readline():
                self.requests += 1
                if self.requests == self.stall_request:
                    await asyncio.sleep(self.stall_s)
                    return
                writer.write((self.answer(raw.decode().strip()) + "\n").encode())
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


def _cfg(tmp_path: Path, target: str, **kw: object) -> RunConfig:
    base: dict[str, object] = {
        "target": target,
        "duration": 1.0,
        "out_dir": tmp_path / "out",
        "run_id": "t1",
        "connections": 1,
        "rate": 0.0,
        "timeout": 1.0,
    }
    base.update(kw)
    return RunConfig(**base)  # type: ignore[arg-type]


def _acked_lines(out_dir: Path) -> list[dict[str, object]]:
    text = (out_dir / workload.ACKED_FILE).read_text()
    return [json.loads(line) for line in text.splitlines()]


# --------------------------------------------------------------------------------------------
# percentile


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(100, 0, -1)]  # 100..1, unsorted on purpose
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile(values, 0) == 1.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0  # rank ceil(0.5*4) = 2
    assert percentile([1.0, 2.0, 3.0, 4.0], 51) == 3.0
    assert percentile([7.5], 99) == 7.5
    assert percentile([], 50) is None


def test_percentile_rejects_bad_pct() -> None:
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    with pytest.raises(ValueError):
        percentile([1.0], -1)


def test_parse_target() -> None:
    assert workload.parse_target("192.0.2.10:7000") == ("192.0.2.10", 7000)
    for bad in ("192.0.2.10", "host:", ":7000", "h:99999", "h:x"):
        with pytest.raises(WorkloadError):
            workload.parse_target(bad)


# --------------------------------------------------------------------------------------------
# run + verify, in process


def test_run_counts_and_acked_file(tmp_path: Path) -> None:
    async def scenario() -> tuple[dict[str, object], FakeKV]:
        fake = await FakeKV().start()
        try:
            result = await workload.run_workload(_cfg(tmp_path, fake.target, connections=2))
        finally:
            await fake.stop()
        return result, fake

    result, fake = asyncio.run(scenario())
    out = tmp_path / "out"
    assert result == json.loads((out / workload.RESULT_FILE).read_text())
    ok, failed = result["requests_ok"], result["requests_failed"]
    assert isinstance(ok, int) and ok > 20
    assert failed == 0 and result["errors"] == [] and result["wrong_values"] == 0
    assert result["reconnects"] == 0
    assert result["puts_ok"] == result["acked_writes"]
    gets = result["gets_ok"]
    assert isinstance(gets, int) and gets > 0
    assert ok == result["puts_ok"] + gets  # type: ignore[operator]
    assert abs(gets * 4 - ok) <= 8  # every 4th request is a GET (per connection)
    lat50, lat99, latmax = (
        result[k] for k in ("latency_ms_p50", "latency_ms_p99", "latency_ms_max")
    )
    assert isinstance(lat50, float) and isinstance(lat99, float) and isinstance(latmax, float)
    assert 0 < lat50 <= lat99 <= latmax
    assert 0.9 < result["duration_s"] < 3  # type: ignore[operator]

    acked = _acked_lines(out)
    assert len(acked) == result["acked_writes"]
    keys = [str(e["key"]) for e in acked]
    assert len(set(keys)) == len(keys)
    assert {k.split("-")[1] for k in keys} == {"0", "1"}  # t1-<conn>-<seq>
    for entry in acked:
        assert entry["value"] == value_for(str(entry["key"]))
        assert fake.store[str(entry["key"])] == entry["value"]

    live = workload.read_live(out)
    assert live is not None and live["done"] is True
    assert live["requests_ok"] == ok and live["connections"] == 2
    assert workload.read_result(out)["acked_writes"] == len(acked)


def test_verify_finds_dropped_and_wrong(tmp_path: Path) -> None:
    async def scenario() -> tuple[dict[str, object], list[str]]:
        fake = await FakeKV().start()
        try:
            await workload.run_workload(_cfg(tmp_path, fake.target, duration=0.5))
            keys = [str(e["key"]) for e in _acked_lines(tmp_path / "out")]
            del fake.store[keys[3]]  # a "lost" acknowledged write
            fake.store[keys[5]] = "v.garbage"
            report = await workload.verify_acked(
                fake.target, tmp_path / "out" / workload.ACKED_FILE, connections=3
            )
        finally:
            await fake.stop()
        return report, keys

    report, keys = asyncio.run(scenario())
    assert report["checked"] == len(keys)
    assert report["lost_acked_writes"] == 1
    assert report["missing"] == [keys[3]]
    assert report["wrong_values"] == 1
    assert report["wrong"] == [{"key": keys[5], "acked": value_for(keys[5]), "read": "v.garbage"}]


def test_verify_all_present_and_torn_last_line(tmp_path: Path) -> None:
    acked = tmp_path / "acked.jsonl"
    lines = [json.dumps({"key": f"k{i}", "value": value_for(f"k{i}")}) for i in range(30)]
    acked.write_text("\n".join(lines) + '\n{"key": "k3')  # a client killed mid-line

    async def scenario() -> dict[str, object]:
        fake = await FakeKV().start()
        fake.store.update({f"k{i}": value_for(f"k{i}") for i in range(30)})
        try:
            return await workload.verify_acked(fake.target, acked)
        finally:
            await fake.stop()

    report = asyncio.run(scenario())
    assert report["checked"] == 30
    assert report["lost_acked_writes"] == 0 and report["wrong_values"] == 0
    assert report["missing"] == [] and report["unreadable_lines"] == 1


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_verify_unreachable_is_an_error(tmp_path: Path) -> None:
    acked = tmp_path / "acked.jsonl"
    acked.write_text(json.dumps({"key": "k", "value": "v"}) + "\n")
    with pytest.raises(WorkloadError, match="unreachable"):
        asyncio.run(workload.verify_acked(f"127.0.0.1:{_closed_port()}", acked, attempts=2))
    rc = workload.main(
        ["verify", "--target", f"127.0.0.1:{_closed_port()}", "--acked", str(acked),
         "--out", str(tmp_path / "v.json")]
    )  # fmt: skip
    assert rc == 2 and not (tmp_path / "v.json").exists()


def test_stall_past_timeout_is_a_failure_then_reconnect(tmp_path: Path) -> None:
    async def scenario() -> tuple[dict[str, object], FakeKV]:
        fake = await FakeKV(stall_request=5, stall_s=3.0).start()
        try:
            result = await workload.run_workload(
                _cfg(tmp_path, fake.target, duration=2.0, timeout=0.5)
            )
        finally:
            await fake.stop()
        return result, fake

    result, fake = asyncio.run(scenario())
    assert result["requests_failed"] == 1
    assert result["reconnects"] == 1
    assert fake.connections == 2
    errors = result["errors"]
    assert isinstance(errors, list) and len(errors) == 1
    assert "timeout after 0.5 s" in errors[0] and "c0" in errors[0]
    assert result["requests_ok"] > 10  # type: ignore[operator]  # went on after reconnecting
    gap = result["max_reply_gap_ms"]
    assert isinstance(gap, float) and gap >= 500  # the stall is visible as a reply gap
    # the timed-out PUT was not acknowledged, so it is not in acked.jsonl
    assert len(_acked_lines(tmp_path / "out")) == result["acked_writes"]


def test_unreachable_service_counts_failures(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, f"127.0.0.1:{_closed_port()}", duration=0.5, timeout=0.2)
    result = asyncio.run(workload.run_workload(cfg))
    assert result["requests_ok"] == 0 and result["acked_writes"] == 0
    failed = result["requests_failed"]
    assert isinstance(failed, int) and failed >= 2
    assert result["connect_failures"] == failed
    assert result["latency_ms_p50"] is None


def test_rate_limit(tmp_path: Path) -> None:
    async def scenario() -> dict[str, object]:
        fake = await FakeKV().start()
        try:
            return await workload.run_workload(
                _cfg(tmp_path, fake.target, duration=1.0, rate=20.0, connections=2)
            )
        finally:
            await fake.stop()

    result = asyncio.run(scenario())
    ok = result["requests_ok"]
    assert isinstance(ok, int) and 25 <= ok <= 44  # ~20/s per connection for 1 s


def test_stop_event_ends_run_early(tmp_path: Path) -> None:
    async def scenario() -> dict[str, object]:
        fake = await FakeKV().start()
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.3, stop.set)
        try:
            return await workload.run_workload(_cfg(tmp_path, fake.target, duration=30), stop)
        finally:
            await fake.stop()

    t0 = time.monotonic()
    result = asyncio.run(scenario())
    assert time.monotonic() - t0 < 3
    assert result["duration_s"] < 2  # type: ignore[operator]


def test_bad_run_id_rejected(tmp_path: Path) -> None:
    with pytest.raises(WorkloadError):
        asyncio.run(workload.run_workload(_cfg(tmp_path, "127.0.0.1:1", run_id="bad id")))


# --------------------------------------------------------------------------------------------
# The subprocess API (no namespace): start, SIGTERM, result, verify


@pytest.fixture
def threaded_fake() -> Iterator[FakeKV]:
    loop = asyncio.new_event_loop()
    fake = FakeKV()
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(fake.start())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(fake.stop())
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield fake
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_subprocess_sigterm_writes_result_and_verify(tmp_path: Path, threaded_fake: FakeKV) -> None:
    out = tmp_path / "run"
    proc = workload.start_workload(None, threaded_fake.target, out, duration=60, run_id="sub")
    try:
        deadline = time.monotonic() + 20
        live = None
        while time.monotonic() < deadline:
            live = workload.read_live(out)
            if live is not None and live["acked_writes"] >= 10:
                break
            time.sleep(0.1)
        assert live is not None and live["acked_writes"] >= 10, (out / "client.log").read_text()
        assert live["connected"] is True and live["reqs_per_s"] > 0
        result = workload.stop_workload(proc, out)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert result["requests_failed"] == 0
    assert result["acked_writes"] == len(_acked_lines(out))
    assert result["duration_s"] < 30

    report = workload.verify(None, threaded_fake.target, out / workload.ACKED_FILE)
    assert report["checked"] == result["acked_writes"]
    assert report["lost_acked_writes"] == 0
    assert (out / "verify.json").exists()


def test_subprocess_verify_unreachable_raises(tmp_path: Path) -> None:
    acked = tmp_path / "acked.jsonl"
    acked.write_text(json.dumps({"key": "k", "value": "v"}) + "\n")
    with pytest.raises(WorkloadError, match="unreachable"):
        workload.verify(None, f"127.0.0.1:{_closed_port()}", acked, timeout=0.5)


def test_reference_server(tmp_path: Path) -> None:
    store: dict[str, str] = {}
    assert workload.reference_answer(store, "PUT k1 v1") == "OK k1"
    assert workload.reference_answer(store, "GET k1") == "VAL k1 v1"
    assert workload.reference_answer(store, "GET k2") == "NONE k2"
    assert workload.reference_answer(store, "PING") == "PONG"
    assert workload.reference_answer(store, "PUT k/1 v").startswith("ERR ")
    assert workload.reference_answer(store, "DEL k1").startswith("ERR ")

    async def scenario() -> tuple[dict[str, object], dict[str, object]]:
        port = _closed_port()
        stop = asyncio.Event()
        server = asyncio.create_task(workload.serve(f"127.0.0.1:{port}", stop))
        await asyncio.sleep(0.1)
        try:
            result = await workload.run_workload(_cfg(tmp_path, f"127.0.0.1:{port}", duration=0.5))
            report = await workload.verify_acked(
                f"127.0.0.1:{port}", tmp_path / "out" / workload.ACKED_FILE
            )
        finally:
            stop.set()
            await server
        return result, report

    result, report = asyncio.run(scenario())
    assert result["requests_failed"] == 0 and result["wrong_values"] == 0
    assert report["checked"] == result["acked_writes"] and report["lost_acked_writes"] == 0
