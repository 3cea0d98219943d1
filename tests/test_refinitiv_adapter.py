"""RefinitivAdapter against the in-process RefinitivSimulator over loopback WebSockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from common.model import ConnectionStatus, DataType, QualityFlag, RawMarketData
from common.provider import (
    Instrument,
    ProviderAuthError,
    ProviderConfig,
    ProviderConfigError,
    ProviderDisconnected,
    ProviderRateLimited,
)
from common.quality import QualityChecker
from simulators.market import Faults
from simulators.refinitiv import SEQ_STEP, RefinitivSimConfig, RefinitivSimulator
from tests.running import until
from workers.refinitiv import RefinitivAdapter

RICS = ["TRI.N", "IBM.N", "T.N"]


@contextlib.asynccontextmanager
async def running(
    faults: str = "", **sim_kwargs: Any
) -> AsyncIterator[tuple[RefinitivSimulator, str]]:
    sim_kwargs.setdefault("rate", 2000.0)
    sim = RefinitivSimulator(RefinitivSimConfig(RICS, faults=Faults.parse(faults), **sim_kwargs))
    port = await sim.start("127.0.0.1", 0)
    try:
        yield sim, f"ws://127.0.0.1:{port}/WebSocket"
    finally:
        await sim.stop()


def make_adapter(url: str, **extra: Any) -> RefinitivAdapter:
    cc = {"url": url, "user": "feedfleet", "position": "10.0.0.5", **extra}
    return RefinitivAdapter(
        ProviderConfig("p1", "refinitiv-test", "refinitiv", connection_config=cc)
    )


async def collect(
    adapter: RefinitivAdapter,
    until: Callable[[list[RawMarketData]], bool],
    timeout: float = 20.0,
) -> list[RawMarketData]:
    out: list[RawMarketData] = []
    async with asyncio.timeout(timeout):
        gen = adapter.stream_batches()
        try:
            async for batch in gen:
                out.extend(batch)
                if until(out):
                    break
        finally:
            await gen.aclose()  # type: ignore[attr-defined]
    return out


def instruments(*names: str) -> list[Instrument]:
    return [Instrument(n) for n in names]


async def test_happy_path_login_batch_view_and_typed_records() -> None:
    before = time.time_ns()
    async with running() as (sim, url):
        adapter = make_adapter(url)
        await adapter.connect()
        assert adapter.connection_status is ConnectionStatus.CONNECTED
        assert adapter.ping_timeout_s == 30.0  # from the Login Refresh
        await adapter.subscribe(instruments(*RICS))

        def complete(records: list[RawMarketData]) -> bool:
            kinds = {(r.symbol, r.data_type) for r in records}
            return len(kinds) == 6 and len(records) >= 60

        records = await collect(adapter, complete)
        after = time.time_ns()
        await adapter.disconnect()
        assert adapter.connection_status is ConnectionStatus.DISCONNECTED

    login, batch = sim.requests[0], sim.requests[1]
    assert (login.domain, login.ids, login.names) == ("Login", [1], ["feedfleet"])
    assert login.elements == {"ApplicationId": "256", "Position": "10.0.0.5"}
    assert (batch.ids, batch.names, batch.batch) == ([2], RICS, True)
    assert batch.view is not None and {"BID", "ASK", "TRDPRC_1", "QUOTIM_MS"} <= set(batch.view)
    assert {r.symbol for r in records} == set(RICS)
    for r in records:
        assert r.provider == "refinitiv-test"
        # The simulator's clock, in whole milliseconds (QUOTIM_MS), then ours.
        assert before - 1_000_000 <= r.timestamp_ns <= r.receive_ns + 5_000_000
        assert r.receive_ns <= after
        assert isinstance(r.provider_sequence, int) and r.provider_sequence % SEQ_STEP == 0
        assert r.sequence_contiguous is False
        if r.data_type is DataType.TRADE:
            assert r.price is not None and r.price > 0 and r.volume is not None
            assert r.stream == "T." + r.symbol and r.provider_specific["Type"] == "Update"
        else:
            assert r.data_type is DataType.QUOTE
            assert r.bid is not None and r.ask is not None and 0 < r.bid < r.ask
            assert r.provider_specific["BIDSIZE"] >= 1 and r.stream == "Q." + r.symbol
    # The first record of each item is its Refresh image (a quote).
    assert {r.provider_specific["Type"] for r in records[:3]} == {"Refresh"}
    QualityChecker(stale_after_s=None).check(records)
    assert not [r for r in records if r.quality_flags]


async def test_unsubscribe_closes_the_item_stream() -> None:
    async with running() as (sim, url):
        adapter = make_adapter(url)
        await adapter.connect()
        await adapter.subscribe(instruments("TRI.N", "IBM.N"))
        await collect(adapter, lambda rs: {r.symbol for r in rs} == {"TRI.N", "IBM.N"})
        await adapter.unsubscribe(instruments("IBM.N"))
        await until(lambda: sim.open_items() == ["TRI.N"], 10, "the simulator to close IBM.N")
        assert list(adapter.subscribed) == ["TRI.N"]
        # One connection sends in order: every TRI.N update numbered past this was sent after
        # the Close, and so was everything behind it. What was in flight comes before it.
        closed_at = sim.walk.states["TRI.N"].sequence * SEQ_STEP

        def sent_after_close(rs: list[RawMarketData]) -> list[RawMarketData]:
            later = (i for i, r in enumerate(rs) if r.symbol == "TRI.N"
                     and (r.provider_sequence or 0) > closed_at)  # fmt: skip
            return rs[next(later, len(rs)) :]

        records = await collect(adapter, lambda rs: len(sent_after_close(rs)) >= 100)
        assert {r.symbol for r in sent_after_close(records)} == {"TRI.N"}
        closes = [r for r in sim.requests if r.kind == "Close"]
        # Batch ID 2 streamed TRI.N on ID 3 and IBM.N on ID 4.
        assert [c.ids for c in closes] == [[4]]
        await adapter.disconnect()


async def test_ping_is_answered_with_pong_and_the_connection_stays_up() -> None:
    async with running(ping_interval_s=0.1, ping_timeout_s=0.5) as (sim, url):
        adapter = make_adapter(url, heartbeat_timeout_s=5)
        await adapter.connect()
        task = asyncio.create_task(collect(adapter, lambda rs: False, timeout=60))
        try:
            # The simulator drops the connection when a Ping has no Pong within 0.5 s.
            await until(lambda: sim.pongs_received >= 3 or task.done(), 20, "three Pongs")
            assert not task.done(), f"the stream ended: {task.exception()!r}"
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert adapter.pings_answered >= 3
        assert len(sim.connections) == 1  # not dropped for a missing Pong
        assert not sim.connections[0].ws.closed
        await adapter.disconnect()


async def test_refuse_auth_raises_auth_error_with_status_error() -> None:
    async with running("refuse_auth") as (_sim, url):
        adapter = make_adapter(url)
        with pytest.raises(ProviderAuthError, match="UserUnknownToPermSys"):
            await adapter.connect()
        assert adapter.connection_status is ConnectionStatus.ERROR
        assert adapter.last_error is not None and "Closed/Suspect" in adapter.last_error


async def test_wrong_user_is_refused() -> None:
    async with running(user="alice") as (_sim, url):
        with pytest.raises(ProviderAuthError):
            await make_adapter(url).connect()


async def test_token_login_reads_the_named_environment_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FF_TEST_RDP_TOKEN", "tok-123")
    async with running(token="tok-123") as (sim, url):
        adapter = make_adapter(url, user=None, token_env="FF_TEST_RDP_TOKEN")
        await adapter.connect()
        assert adapter.connection_status is ConnectionStatus.CONNECTED
        login = sim.requests[0]
        assert login.name_type == "AuthnToken"
        assert login.elements["AuthenticationToken"] == "tok-123"
        await adapter.disconnect()


async def test_missing_user_is_a_config_error() -> None:
    adapter = make_adapter("ws://127.0.0.1:1/WebSocket", user=None)
    with pytest.raises(ProviderConfigError):
        await adapter.connect()


async def test_unreachable_server_is_a_disconnect() -> None:
    async with running() as (_sim, url):
        pass  # stopped: nothing listens on the port any more
    adapter = make_adapter(url)
    with pytest.raises(ProviderDisconnected):
        await adapter.connect()
    assert adapter.connection_status is ConnectionStatus.DISCONNECTED


async def test_rate_limit_status_raises_rate_limited() -> None:
    async with running("rate_limit") as (_sim, url):
        adapter = make_adapter(url)
        await adapter.connect()
        await adapter.subscribe(instruments("TRI.N", "IBM.N"))
        with pytest.raises(ProviderRateLimited, match="TooManyItems"):
            await collect(adapter, lambda rs: False)
        assert adapter.connection_status is ConnectionStatus.RATE_LIMITED
        await adapter.disconnect()


async def test_drop_then_reconnect_restores_subscriptions() -> None:
    async with running("drop_after=40") as (sim, url):
        adapter = make_adapter(url)
        await adapter.connect()
        await adapter.subscribe(instruments("TRI.N", "T.N"))
        before_drop: list[RawMarketData] = []

        def keep(records: list[RawMarketData]) -> bool:
            before_drop[:] = records
            return False

        with pytest.raises(ProviderDisconnected):
            await collect(adapter, keep)
        assert len(before_drop) >= 30
        assert adapter.connection_status is ConnectionStatus.DISCONNECTED
        # What the worker does: disconnect, connect again; the adapter re-subscribes.
        await adapter.disconnect()
        await adapter.connect()
        assert adapter.connection_status is ConnectionStatus.CONNECTED
        records = await collect(adapter, lambda rs: {r.symbol for r in rs} == {"TRI.N", "T.N"})
        assert sim.open_items() == ["T.N", "TRI.N"]
        rerequest = [r for r in sim.requests if r.kind == "Request" and r.domain != "Login"]
        assert [r.names for r in rerequest] == [["TRI.N", "T.N"], ["TRI.N", "T.N"]]
        assert all(r.provider_specific["Type"] in ("Refresh", "Update") for r in records)
        await adapter.disconnect()


async def test_silent_server_is_detected_within_the_heartbeat_timeout() -> None:
    async with running("silent_after=30") as (_sim, url):
        adapter = make_adapter(url, heartbeat_timeout_s=0.6)
        await adapter.connect()
        await adapter.subscribe(instruments("TRI.N"))
        seen: list[RawMarketData] = []

        def keep(records: list[RawMarketData]) -> bool:
            seen[:] = records
            return False

        # Below the 30 s PingTimeout of the Login Refresh: only heartbeat_timeout_s ends it.
        assert adapter.ping_timeout_s == 30.0
        with pytest.raises(ProviderDisconnected, match="heartbeat timeout") as info:
            await collect(adapter, keep, timeout=20)
        idle = re.fullmatch(r"no traffic for (\d+\.\d)s \(heartbeat timeout\)", str(info.value))
        assert idle is not None and float(idle[1]) >= 0.6  # it waited the whole timeout
        assert len(seen) >= 30  # data flowed before the server went quiet
        assert adapter.connection_status is ConnectionStatus.DISCONNECTED
        await adapter.disconnect()


async def test_malformed_frames_are_counted_and_the_stream_continues() -> None:
    async with running("malformed_every=3") as (_sim, url):
        adapter = make_adapter(url)
        await adapter.connect()
        await adapter.subscribe(instruments("TRI.N", "IBM.N"))
        records = await collect(adapter, lambda rs: adapter.decode_errors >= 3 and len(rs) >= 80)
        assert adapter.decode_errors >= 3
        assert adapter.connection_status is ConnectionStatus.CONNECTED
        assert {r.symbol for r in records} == {"TRI.N", "IBM.N"}
        await adapter.disconnect()


async def test_skip_seq_jumps_are_visible_but_not_gaps() -> None:
    # Refinitiv's SeqNumber is not contiguous (the real capture steps by 16), so a jump
    # cannot be called a gap: the records say sequence_contiguous=False and the checker
    # leaves them unflagged. The jump itself is visible in provider_sequence.
    async with running("skip_seq_every=5") as (_sim, url):
        adapter = make_adapter(url)
        await adapter.connect()
        await adapter.subscribe(instruments("TRI.N"))
        records = await collect(adapter, lambda rs: len(rs) >= 100)
        await adapter.disconnect()
    updates = [r for r in records if r.provider_specific["Type"] == "Update"]
    steps = {r.provider_sequence // SEQ_STEP for r in updates}  # type: ignore[operator]
    assert steps and not [s for s in steps if s % 5 == 0]  # every 5th number was skipped
    QualityChecker(stale_after_s=None).check(records)
    flagged = [r for r in records if QualityFlag.GAP in r.quality_flags]
    assert flagged == [] and all(r.sequence_contiguous is False for r in records)
    assert not [r for r in records if r.quality_flags]


async def test_unknown_ric_is_logged_and_the_others_keep_streaming() -> None:
    async with running() as (_sim, url):
        adapter = make_adapter(url)
        await adapter.connect()
        await adapter.subscribe(instruments("TRI.N", "NOPE.N"))
        records = await collect(adapter, lambda rs: len(rs) >= 40)
        assert {r.symbol for r in records} == {"TRI.N"}
        assert adapter.last_error is not None and "NOPE.N: NotFound" in adapter.last_error
        assert adapter.connection_status is ConnectionStatus.CONNECTED
        assert "NOPE.N" not in adapter.consumer.ids_by_name
        assert "NOPE.N" in adapter.subscribed  # kept: a reconnect asks for it again
        await adapter.disconnect()


async def test_quote_only_instrument_gets_a_quote_view() -> None:
    async with running() as (sim, url):
        adapter = make_adapter(url)
        await adapter.connect()
        await adapter.subscribe([Instrument("IBM.N", frozenset({DataType.QUOTE}))])
        records = await collect(adapter, lambda rs: len(rs) >= 30)
        await adapter.disconnect()
    [request] = [r for r in sim.requests if r.domain == "MarketPrice"]
    assert (request.names, request.batch) == (["IBM.N"], False)
    assert request.view is not None and "TRDPRC_1" not in request.view
    assert {r.data_type for r in records} == {DataType.QUOTE}


# ---------------------------------------------------------------- token lifecycle (RTO)


def token_adapter(url: str, grant: str = "password") -> RefinitivAdapter:
    os.environ["FEEDFLEET_TEST_RDP_PASSWORD"] = "rdp-pass"
    os.environ["FEEDFLEET_TEST_RDP_SECRET"] = "rdp-secret"
    base = url.replace("ws://", "http://").removesuffix("/WebSocket")
    version = "v1" if grant == "password" else "v2"
    return make_adapter(
        url, user=None, token_url=f"{base}/auth/oauth2/{version}/token", grant_type=grant,
        username="rdp-user", password_env="FEEDFLEET_TEST_RDP_PASSWORD", client_id="app-key",
        client_secret_env="FEEDFLEET_TEST_RDP_SECRET",
    )  # fmt: skip


async def stream_through_renewals(
    sim: RefinitivSimulator, adapter: RefinitivAdapter, renewals: int
) -> list[RawMarketData]:
    """Read until the adapter has renewed its token ``renewals`` times and data came after
    the last one; the connection must be the first all along."""
    await adapter.connect()
    await adapter.subscribe(instruments("TRI.N", "IBM.N"))
    ws = adapter._ws
    seen_at_renewal: list[int] = []

    def done(records: list[RawMarketData]) -> bool:
        if adapter.token_renewals > len(seen_at_renewal):
            seen_at_renewal.append(len(records))
        return len(seen_at_renewal) >= renewals and len(records) > seen_at_renewal[-1] + 50

    records = await collect(adapter, done, timeout=30)
    assert adapter._ws is ws and not ws.closed  # never reconnected
    assert sim.open_items() == ["IBM.N", "TRI.N"]  # the item streams survived every Login
    return records


async def test_password_grant_tokens_are_refreshed_and_re_sent_on_the_open_login() -> None:
    async with running(token_lifetime_s=1.0, ping_interval_s=0.4, rate=500.0) as (sim, url):
        adapter = token_adapter(url)
        try:
            await stream_through_renewals(sim, adapter, renewals=3)
        finally:
            await adapter.disconnect()
    assert sim.grants["password"] == 1 and sim.grants["refresh_token"] >= 3
    # Each Login (the first and every reissue) carried a token the service had just issued.
    assert len(sim.logins) == 1 + adapter.token_renewals and len(set(sim.logins)) == len(sim.logins)
    assert all(t in sim.access_tokens for t in sim.logins)


async def test_client_credentials_tokens_are_renewed_the_same_way() -> None:
    async with running(token_lifetime_s=1.0, ping_interval_s=0.4, rate=500.0) as (sim, url):
        adapter = token_adapter(url, grant="client_credentials")
        try:
            await stream_through_renewals(sim, adapter, renewals=2)
        finally:
            await adapter.disconnect()
    assert sim.grants["client_credentials"] >= 3 and sim.grants["password"] == 0


async def test_a_refused_refresh_is_answered_by_authenticating_again() -> None:
    async with running(token_lifetime_s=1.0, ping_interval_s=0.4, rate=500.0,
                       refuse_refresh=True) as (sim, url):  # fmt: skip
        adapter = token_adapter(url)
        try:
            await stream_through_renewals(sim, adapter, renewals=2)
        finally:
            await adapter.disconnect()
    assert sim.grants["refresh_token refused"] >= 2
    assert sim.grants["password"] == 1 + adapter.token_renewals


async def test_bad_credentials_and_an_unrenewed_token() -> None:
    async with running(token_lifetime_s=1.0, ping_interval_s=0.4, password="right") as (_sim, url):
        adapter = token_adapter(url)  # its password is "rdp-pass"
        with pytest.raises(ProviderAuthError, match="HTTP 400 access_denied"):
            await adapter.connect()
        assert adapter.connection_status is ConnectionStatus.ERROR
        # A client that never renews: the server closes its login when the token expires.
        adapter = token_adapter(url)
        os.environ["FEEDFLEET_TEST_RDP_PASSWORD"] = "right"
        await adapter.connect()
        adapter._renew_at = None  # as a client that ignores expires_in
        await adapter.subscribe(instruments("TRI.N"))
        with pytest.raises(ProviderAuthError, match="AuthenticationToken expired"):
            await collect(adapter, lambda _: False, timeout=20)
        await adapter.disconnect()
