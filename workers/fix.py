"""FIX 4.4 market-data adapter: an asyncio TCP initiator around ``common.codecs.fix``.

The session rules (sequence numbers, resend, heartbeats) live in the codec's
``FixSession``; this module opens the socket, moves bytes, and turns session events into
``ProviderError``s and connection status.

connection_config keys:
  ``host``, ``port``         the acceptor (the simulator: ``127.0.0.1``, ``9878``)
  ``sender_comp_id``         our CompID (49 on what we send)
  ``target_comp_id``         the venue's CompID (56 on what we send)
  ``heartbeat_interval``     HeartBtInt (108) in whole seconds (default 30). No data for
                             1.2 x this sends a TestRequest; 2.4 x with no answer disconnects
  ``password_env``           optional: environment variable holding Password (554)
  ``username``               optional: Username (553)
  ``reset_on_logon``         ResetSeqNumFlag 141=Y on each Logon (default true: a market-data
                             session starts afresh; false keeps sequence numbers in memory
                             across reconnects of this worker, so the venue can resend)
  ``market_depth``           MarketDepth (264) requested (default 1, top of book)
  ``logon_timeout_s``        how long to wait for the Logon reply (default 10)

Venue replies: a Logout answering our Logon is a refused login (ProviderAuthError); a
MarketDataRequestReject with MDReqRejReason 2 (insufficient bandwidth, the closest FIX 4.4
has to "rate limited") is ProviderRateLimited; any other reject is a per-symbol error kept in
``symbol_errors`` while the other symbols go on streaming.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Sequence
from typing import NoReturn

import structlog

from common.codecs import fix as codec
from common.model import ConnectionStatus, RawMarketData
from common.provider import (
    Instrument,
    ProviderAdapter,
    ProviderAuthError,
    ProviderConfig,
    ProviderConfigError,
    ProviderDisconnected,
    ProviderRateLimited,
)

log = structlog.get_logger("feedfleet.fix")

READ_SIZE = 1 << 16
REJECT_REASONS = {
    "0": "unknown symbol",
    "1": "duplicate MDReqID",
    "2": "insufficient bandwidth",
    "3": "insufficient permissions",
    "4": "unsupported SubscriptionRequestType",
    "5": "unsupported MarketDepth",
    "6": "unsupported MDUpdateType",
    "8": "unsupported MDEntryType",
}


class FixAdapter(ProviderAdapter):
    provider_type = "fix"

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        cc = config.connection_config
        self.host = str(cc.get("host", ""))
        self.port = config.integer("port", 0)
        self.sender_comp_id = str(cc.get("sender_comp_id", ""))
        self.target_comp_id = str(cc.get("target_comp_id", ""))
        self.heartbeat_interval = config.integer("heartbeat_interval", 30)
        self.username: str | None = cc.get("username")
        self.reset_on_logon = bool(cc.get("reset_on_logon", True))
        self.market_depth = config.integer("market_depth", 1)
        self.logon_timeout_s = config.number("logon_timeout_s", 10.0)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._session: codec.FixSession | None = None
        self._req_ids: dict[str, str] = {}
        self._req_counter = itertools.count(1)
        # Records that arrived in the same read as the Logon reply.
        self._pending: list[RawMarketData] = []
        self.symbol_errors: dict[str, str] = {}
        self.sequence_gaps = 0
        self.session_rejects = 0
        self.skipped_entries = 0

    def _check_config(self) -> None:
        missing = [
            k for k, v in (("host", self.host), ("port", self.port),
                           ("sender_comp_id", self.sender_comp_id),
                           ("target_comp_id", self.target_comp_id)) if not v
        ]  # fmt: skip
        if missing:
            raise ProviderConfigError(f"connection_config lacks {', '.join(missing)}")
        if self.heartbeat_interval <= 0:
            raise ProviderConfigError("connection_config.heartbeat_interval must be > 0")

    async def connect(self) -> None:
        self._check_config()
        cc = self.config.connection_config
        password = self.config.secret("password_env") if cc.get("password_env") else None
        self.connection_status = ConnectionStatus.CONNECTING
        if self._session is None or self.reset_on_logon:
            self._session = codec.FixSession(
                self.sender_comp_id, self.target_comp_id,
                heartbeat_interval=self.heartbeat_interval, provider=self.config.name,
            )  # fmt: skip
        session = self._session
        session.new_connection()
        try:
            try:
                self._reader, self._writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), self.logon_timeout_s
                )
            except (OSError, TimeoutError) as exc:
                raise ProviderDisconnected(
                    f"cannot connect to {self.host}:{self.port}: {exc}"
                ) from exc
            await self._write(session.logon(
                time.time_ns(), reset_seq_num=self.reset_on_logon, username=self.username,
                password=password,
            ))  # fmt: skip
            await self._await_logon(session)
        except BaseException as exc:
            await self._close_transport()
            self.last_error = str(exc)
            self.connection_status = (
                ConnectionStatus.ERROR
                if isinstance(exc, ProviderAuthError)
                else ConnectionStatus.DISCONNECTED
            )
            raise
        self.connection_status = ConnectionStatus.CONNECTED
        log.info("fix_logged_on", provider=self.config.name, stream=session.stream)
        # A reconnect must restore what was subscribed before the drop.
        self._req_ids.clear()
        for inst in list(self.subscribed.values()):
            await self._request(inst, subscribe=True)

    async def _await_logon(self, session: codec.FixSession) -> None:
        reader = self._reader
        assert reader is not None
        deadline = time.monotonic() + self.logon_timeout_s
        while not session.logged_on:
            remaining = deadline - time.monotonic()
            try:
                data = await asyncio.wait_for(reader.read(READ_SIZE), max(0.0, remaining))
            except TimeoutError as exc:
                raise ProviderDisconnected("no Logon reply from the acceptor") from exc
            except OSError as exc:
                raise ProviderDisconnected(f"connection failed during logon: {exc}") from exc
            if not data:
                raise ProviderDisconnected("connection closed during logon")
            result = session.receive(data, time.time_ns())
            self._count_errors(result)
            await self._write(result.outgoing)
            for event in result.events:
                if isinstance(event, codec.SessionClosed):
                    refused = next(
                        (e.text for e in result.events if isinstance(e, codec.LogoutReceived)),
                        None,
                    )
                    if refused is not None:
                        raise ProviderAuthError(f"logon refused: {refused or 'no reason given'}")
                    raise ProviderDisconnected(event.reason)
            self._pending.extend(result.records)

    async def subscribe(self, instruments: Sequence[Instrument]) -> None:
        for inst in instruments:
            self.subscribed[inst.symbol] = inst
            self.symbol_errors.pop(inst.symbol, None)
        if self._connected():
            for inst in instruments:
                await self._request(inst, subscribe=True)

    async def unsubscribe(self, instruments: Sequence[Instrument]) -> None:
        for inst in instruments:
            self.subscribed.pop(inst.symbol, None)
            self.symbol_errors.pop(inst.symbol, None)
        if self._connected():
            for inst in instruments:
                await self._request(inst, subscribe=False)
        if self._session is not None:
            for inst in instruments:
                self._session.market_data.forget(inst.symbol)

    def _connected(self) -> bool:
        return (
            self._writer is not None
            and self._session is not None
            and self._session.logged_on
            and not self._session.closed
        )

    async def _request(self, inst: Instrument, *, subscribe: bool) -> None:
        session = self._session
        assert session is not None
        entry_types = [
            t for dt in sorted(inst.data_types) for t in codec.ENTRY_TYPES_FOR.get(dt, ())
        ]
        if not entry_types:
            return
        if subscribe:
            md_req_id = f"{inst.symbol}:{next(self._req_counter)}"
            self._req_ids[inst.symbol] = md_req_id
            data = session.market_data_request(
                time.time_ns(), md_req_id, [inst.symbol], entry_types,
                market_depth=self.market_depth,
            )  # fmt: skip
        else:
            md_req_id = self._req_ids.pop(inst.symbol, "")
            if not md_req_id:
                return
            # 263=2 disables the earlier request with the same MDReqID.
            data = session.market_data_request(
                time.time_ns(), md_req_id, [inst.symbol], entry_types,
                subscription_type=codec.DISABLE_PREVIOUS, market_depth=self.market_depth,
                update_type=None,
            )  # fmt: skip
        await self._write(data)

    async def stream_batches(self) -> AsyncIterator[list[RawMarketData]]:
        session, reader = self._session, self._reader
        if session is None or reader is None or not session.logged_on:
            raise ProviderDisconnected("not connected")
        if self._pending:
            batch, self._pending = self._pending, []
            yield batch
        while True:
            timeout = session.seconds_until_tick(time.time_ns())
            try:
                data: bytes | None = await asyncio.wait_for(reader.read(READ_SIZE), timeout)
            except TimeoutError:
                data = None
            except OSError as exc:
                self._lost(f"read failed: {exc}")
            now = time.time_ns()
            if data is not None:
                if not data:
                    self._lost("connection closed by the acceptor")
                result = session.receive(data, now)
                self._count_errors(result)
                await self._write(result.outgoing)
                self.skipped_entries += result.skipped
                if result.events:
                    self._on_events(result.events)
                if result.records:
                    yield result.records
            tick = session.tick(now)
            await self._write(tick.outgoing)
            if tick.timed_out:
                self._lost(
                    f"no data or TestRequest answer for {codec.TIMEOUT_FACTOR:g} x "
                    f"HeartBtInt ({self.heartbeat_interval}s)"
                )

    def _lost(self, reason: str) -> NoReturn:
        self.connection_status = ConnectionStatus.DISCONNECTED
        self.last_error = reason
        raise ProviderDisconnected(reason)

    def _count_errors(self, result: codec.FixReceived) -> None:
        if result.errors:
            self.decode_errors += len(result.errors)
            for err in result.errors[:3]:
                log.warning("decode_error", provider=self.config.name, reason=err.reason,
                            raw=err.raw)  # fmt: skip

    def _on_events(self, events: list[codec.SessionEvent]) -> None:
        name = self.config.name
        for event in events:
            if isinstance(event, codec.MarketDataRejected):
                reason = REJECT_REASONS.get(event.reason or "", event.reason or "unspecified")
                text = f"{reason}: {event.text}" if event.text else reason
                if event.reason == codec.RATE_LIMIT_REASON:
                    self.connection_status = ConnectionStatus.RATE_LIMITED
                    self.last_error = text
                    raise ProviderRateLimited(f"market data request rejected: {text}")
                for symbol in event.symbols or [event.md_req_id]:
                    self.symbol_errors[symbol] = text
                    if self._req_ids.get(symbol) == event.md_req_id:
                        del self._req_ids[symbol]
                self.last_error = f"{','.join(event.symbols)}: {text}"
                log.warning("md_request_rejected", provider=name, symbols=event.symbols,
                            md_req_id=event.md_req_id, reason=text)  # fmt: skip
            elif isinstance(event, codec.SequenceGap):
                self.sequence_gaps += 1
                log.info("sequence_gap", provider=name, expected=event.expected,
                         received=event.received)  # fmt: skip
            elif isinstance(event, codec.SessionRejectReceived):
                self.session_rejects += 1
                log.warning("session_reject", provider=name, ref_seq=event.ref_seq_num,
                            reason=event.reason, text=event.text)  # fmt: skip
            elif isinstance(event, codec.SessionClosed):
                self._lost(f"session ended: {event.reason}")

    async def _write(self, data: bytes) -> None:
        writer = self._writer
        if not data or writer is None:
            return
        try:
            writer.write(data)
            await writer.drain()
        except (OSError, RuntimeError) as exc:
            self._lost(f"write failed: {exc}")

    async def disconnect(self) -> None:
        session, writer = self._session, self._writer
        if session is not None and writer is not None and session.logged_on and not session.closed:
            with contextlib.suppress(OSError, RuntimeError):
                writer.write(session.logout(time.time_ns()))
                await asyncio.wait_for(writer.drain(), 1.0)
        if session is not None:
            session.logged_on = False
        await self._close_transport()
        self._pending = []
        self.connection_status = ConnectionStatus.DISCONNECTED

    async def _close_transport(self) -> None:
        writer = self._writer
        self._reader = self._writer = None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError, RuntimeError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
