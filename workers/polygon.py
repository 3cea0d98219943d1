"""Polygon.io (Massive) stocks adapter: aiohttp WebSocket around ``common.codecs.polygon``.

connection_config keys:
  ``url``          e.g. ``wss://socket.massive.com/stocks`` (the simulator: ``ws://127.0.0.1:8765/stocks``)
  ``api_key_env``  name of the environment variable holding the API key
  ``heartbeat_s``  WebSocket ping interval; a missing pong closes the socket (default 10)
  ``rest_url``     REST base for backfill (default ``https://api.massive.com``; the simulator
                   serves it on its WebSocket port: ``http://127.0.0.1:8765``)
  ``backfill``     fetch the trades missed while disconnected (default true)
  ``backfill_page_size``  ``limit`` of each ``/v3/trades`` request (default 50000, its maximum)
  ``backfill_max_pages``  pages per symbol at most, so a long outage cannot stall the stream
                   (default 20; what is left is logged)

Backfill: after a reconnect, the trades of every subscribed symbol from its last trade
received to the moment the connection was back are fetched from ``GET /v3/trades/{ticker}``
(``timestamp.gte``/``timestamp.lt``, cursor pagination through ``next_url``, the row's
``rate_limits`` and the provider's shared budget honoured) and handed over before the live
data, flagged ``backfill``. They are decoded to exactly the records the WebSocket would have
given (SIP time in ms, same stream and sequence), so their event ids are those of the live
trades and nothing is doubled; the trades already received are left out by sequence.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from urllib.parse import urlencode

import aiohttp
import structlog

from common import stage_cpu
from common.codecs import polygon as codec
from common.model import ConnectionStatus, DataType, RawMarketData
from common.provider import (
    Instrument,
    ProviderAdapter,
    ProviderAuthError,
    ProviderConfig,
    ProviderDisconnected,
    ProviderError,
    ProviderProtocolError,
    ProviderRateLimited,
)
from common.ratelimit import RateLimiter
from common.recording import FrameKind

log = structlog.get_logger("feedfleet.polygon")

HANDSHAKE_TIMEOUT_S = 10.0
# How long a reconnect waits for the server to confirm its subscriptions before backfilling.
SUBSCRIBE_ACK_TIMEOUT_S = 2.0


class PolygonAdapter(ProviderAdapter):
    provider_type = "polygon"

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        cc = config.connection_config
        self.url = str(cc.get("url", "wss://socket.massive.com/stocks"))
        self.heartbeat_s = config.number("heartbeat_s", 10.0)
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self.skipped_events = 0
        self.rest_url = str(cc.get("rest_url", "https://api.massive.com")).rstrip("/")
        self.backfill = bool(cc.get("backfill", True))
        self.backfill_page_size = config.integer("backfill_page_size", 50_000)
        self.backfill_max_pages = config.integer("backfill_max_pages", 20)
        # Per symbol, the last trade handed over: (SIP time ns, sequence). Where a backfill
        # starts after a reconnect.
        self._last_trade: dict[str, tuple[int, int | None]] = {}
        self._backfill_due = False  # set by a reconnect
        # Subscription confirmations still awaited after a reconnect (one per channel).
        self._acks_awaited = 0
        # Symbols whose live trades may repeat backfilled ones: checked by sequence until a
        # live trade is past the last one handed over.
        self._overlap: set[str] = set()
        self._limiter: RateLimiter | None = None
        self.backfilled = 0

    async def connect(self) -> None:
        api_key = self.config.secret("api_key_env")
        self.connection_status = ConnectionStatus.CONNECTING
        self._http = aiohttp.ClientSession()
        try:
            self._ws = await self._http.ws_connect(
                self.url, heartbeat=self.heartbeat_s, max_msg_size=16 * 1024 * 1024
            )
            first = await self._read_statuses()
            if not any(s.status == "connected" for s in first):
                raise ProviderProtocolError(f"expected 'connected' status, got {first!r}")
            await self._ws.send_str(codec.encode_auth(api_key))
            for status in await self._read_statuses():
                if status.status == "auth_success":
                    break
                if status.status == "auth_failed":
                    raise ProviderAuthError(status.message or "authentication failed")
                if status.status == "max_connections":
                    raise ProviderRateLimited(status.message)
                raise ProviderProtocolError(f"unexpected status after auth: {status!r}")
        except BaseException:
            await self.disconnect()
            raise
        self.connection_status = ConnectionStatus.CONNECTED
        # Back after a disconnect: what traded meanwhile is fetched before live data.
        self._backfill_due = self.backfill and bool(self._last_trade)
        self._acks_awaited = 0
        # A reconnect must restore what was subscribed before the drop.
        if self.subscribed:
            sent = await self._send_channels("subscribe", list(self.subscribed.values()))
            self._acks_awaited = sent if self._backfill_due else 0

    async def _read_statuses(self) -> list[codec.StatusMessage]:
        assert self._ws is not None
        try:
            msg = await self._ws.receive(timeout=HANDSHAKE_TIMEOUT_S)
        except TimeoutError as exc:
            raise ProviderDisconnected("no answer from server during handshake") from exc
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise ProviderDisconnected(f"connection closed during handshake ({msg.type.name})")
        frame = codec.decode_frame(msg.data, time.time_ns(), self.config.name)
        if frame.errors:
            raise ProviderProtocolError(f"bad handshake frame: {frame.errors[0].reason}")
        return frame.statuses

    async def subscribe(self, instruments: Sequence[Instrument]) -> None:
        for inst in instruments:
            self.subscribed[inst.symbol] = inst
        if self._ws is not None and not self._ws.closed:
            await self._send_channels("subscribe", instruments)

    async def unsubscribe(self, instruments: Sequence[Instrument]) -> None:
        for inst in instruments:
            self.subscribed.pop(inst.symbol, None)
            self._overlap.discard(inst.symbol)
        if self._ws is not None and not self._ws.closed:
            await self._send_channels("unsubscribe", instruments)

    async def _send_channels(self, action: str, instruments: Sequence[Instrument]) -> int:
        """Send the channels of ``instruments``; how many were sent."""
        assert self._ws is not None
        channels = [c for i in instruments for c in codec.channels_for(i.symbol, i.data_types)]
        encode = codec.encode_subscribe if action == "subscribe" else codec.encode_unsubscribe
        # Keep each request well under any frame limit the server may have.
        for start in range(0, len(channels), 500):
            await self._ws.send_str(encode(channels[start : start + 500]))
        return len(channels)

    async def stream_batches(self) -> AsyncIterator[list[RawMarketData]]:
        ws = self._ws
        if ws is None:
            raise ProviderDisconnected("not connected")
        if self._backfill_due:
            self._backfill_due = False
            # The backfill ends when the server has confirmed the subscription, not when
            # it was asked for: a trade in between would be neither fetched nor sent live.
            # What arrives live until then is held, and handed over after the backfill
            # without the trades the backfill already gave.
            early: list[RawMarketData] = []
            lost: ProviderError | None = None
            try:
                await self._until_subscribed(ws, early)
            except ProviderError as exc:
                # Gone before the confirmations: the backfill (over REST) still runs, to now,
                # so what arrived meanwhile is handed over, and nothing before it is skipped.
                lost = exc
            until_ns = time.time_ns()
            for symbol, inst in list(self.subscribed.items()):
                if DataType.TRADE in inst.data_types and symbol in self._last_trade:
                    records = await self._backfill(symbol, until_ns)
                    if records:
                        self._note_trades(records)
                        self._overlap.add(symbol)
                        yield records
            early = self._not_handed_yet(early)
            if early:
                self._note_trades(early)
                yield early
            if lost is not None:
                raise lost
        while True:
            records = await self._read(ws)
            if records:
                if self.backfill:
                    if self._overlap:
                        records = self._not_handed_yet(records)
                    self._note_trades(records)
                if records:
                    yield records

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> list[RawMarketData]:
        """One frame's records (statuses acted on, errors counted)."""
        msg = await ws.receive()
        receive_ns = time.time_ns()
        if msg.type is aiohttp.WSMsgType.TEXT or msg.type is aiohttp.WSMsgType.BINARY:
            # characters of ASCII JSON: its bytes (a close message's data is its code)
            self.bytes_received += len(msg.data)
            if self.tap is not None:
                self.tap.record(FrameKind.WEBSOCKET, msg.data, receive_ns)
            clock = stage_cpu.CLOCK
            mark = clock.start()
            frame = codec.decode_frame(msg.data, receive_ns, self.config.name)
            clock.lap("decode", mark)
        else:
            self.connection_status = ConnectionStatus.DISCONNECTED
            raise ProviderDisconnected(f"websocket {msg.type.name.lower()}: {msg.extra!r}")
        if frame.errors:
            self.decode_errors += len(frame.errors)
            for err in frame.errors[:3]:
                log.warning("decode_error", provider=self.config.name, reason=err.reason,
                            raw=err.raw)  # fmt: skip
        if frame.statuses:
            self._on_statuses(frame.statuses)
            self._acks_awaited -= sum(
                s.status == "success" and s.message.startswith("subscribed to")
                for s in frame.statuses
            )
        self.skipped_events += frame.skipped
        return frame.records

    async def _until_subscribed(
        self, ws: aiohttp.ClientWebSocketResponse, held: list[RawMarketData]
    ) -> None:
        """Read the records that arrive until the server has confirmed every channel (or until
        ``SUBSCRIBE_ACK_TIMEOUT_S`` has passed, checked between frames: a receive is never
        cancelled, as aiohttp then marks the socket as abnormally closed). They are added
        to ``held`` as they come, so a connection lost meanwhile keeps what it brought."""
        deadline = time.monotonic() + SUBSCRIBE_ACK_TIMEOUT_S
        while self._acks_awaited > 0 and time.monotonic() < deadline:
            held += await self._read(ws)

    def _not_handed_yet(self, records: list[RawMarketData]) -> list[RawMarketData]:
        """Drop the trades of overlapping symbols at or before the last one handed over."""
        overlap, last = self._overlap, self._last_trade
        out = []
        for r in records:
            if r.data_type is DataType.TRADE and r.symbol in overlap:
                seq, handed = r.provider_sequence, last.get(r.symbol)
                if seq is not None and handed is not None and handed[1] is not None:
                    if seq <= handed[1]:
                        continue
                    overlap.discard(r.symbol)  # live is past the backfill now
            out.append(r)
        return out

    def _note_trades(self, records: list[RawMarketData]) -> None:
        last = self._last_trade
        for r in records:
            if r.data_type is DataType.TRADE:
                last[r.symbol] = (r.timestamp_ns, r.provider_sequence)

    async def _backfill(self, symbol: str, until_ns: int) -> list[RawMarketData]:
        """The trades of ``symbol`` after the last one handed over, before ``until_ns``."""
        since_ns, since_seq = self._last_trade[symbol]
        name = self.config.name
        query = urlencode({
            "timestamp.gte": since_ns, "timestamp.lt": until_ns, "order": "asc",
            "sort": "timestamp", "limit": self.backfill_page_size,
        })  # fmt: skip
        url: str | None = f"{self.rest_url}{codec.trades_path(symbol)}?{query}"
        out: list[RawMarketData] = []
        pages = 0
        while url is not None:
            if pages >= self.backfill_max_pages:
                log.warning("backfill_truncated", provider=name, symbol=symbol, pages=pages,
                            next_url=url)  # fmt: skip
                break
            body = await self._rest_get(url)
            if body is None:
                break
            pages += 1
            page = codec.decode_trades_page(body, symbol, time.time_ns(), name)
            if page.errors:
                self.decode_errors += len(page.errors)
                for err in page.errors[:3]:
                    log.warning("decode_error", provider=name, reason=err.reason, raw=err.raw)
            for r in page.records:
                # The live trades already handed over: by sequence where both have one.
                seq = r.provider_sequence
                if (seq is not None and since_seq is not None and seq <= since_seq) or (
                    r.timestamp_ns < since_ns
                ):
                    continue
                out.append(r)
            url = page.next_url
        self.backfilled += len(out)
        log.info("backfilled", provider=name, symbol=symbol, trades=len(out), pages=pages)
        return out

    async def _rest_get(self, url: str) -> bytes | None:
        """One REST request within the row's rate limits; None (logged) when it fails: a
        backfill that cannot be had must not stop the live stream."""
        if self._limiter is None:
            try:
                self._limiter = RateLimiter(self.config.rate_limits)
            except ValueError:
                self._limiter = RateLimiter({})
        await self._limiter.acquire()
        if self.budget is not None:
            await self.budget.acquire()
        headers = {"Authorization": f"Bearer {self.config.secret('api_key_env')}"}
        try:
            timeout = aiohttp.ClientTimeout(total=30)
            async with (
                aiohttp.ClientSession(timeout=timeout) as http,
                http.get(url, headers=headers) as resp,
            ):
                body = await resp.read()
                self.bytes_received += len(body)
                if resp.status == 200:
                    return body
                if resp.status == 429 and self.budget is not None:
                    await self.budget.hold(60.0)
                log.warning("backfill_refused", provider=self.config.name, status=resp.status,
                            body=body[:200].decode("utf-8", "replace"))  # fmt: skip
        except (aiohttp.ClientError, OSError, TimeoutError, ProviderError) as exc:
            log.warning("backfill_failed", provider=self.config.name, error=str(exc))
        return None

    def _on_statuses(self, statuses: list[codec.StatusMessage]) -> None:
        for status in statuses:
            if status.status == "max_connections":
                self.connection_status = ConnectionStatus.RATE_LIMITED
                raise ProviderRateLimited(status.message)
            if status.status in ("auth_failed", "auth_timeout"):
                raise ProviderAuthError(status.message)
            if status.status != "success":
                # Unknown statuses are informational (the official client does the same).
                log.info(
                    "provider_status",
                    provider=self.config.name,
                    status=status.status,
                    message=status.message,
                )

    async def disconnect(self) -> None:
        ws, http = self._ws, self._http
        self._ws = self._http = None
        if ws is not None:
            await ws.close()
        if http is not None:
            await http.close()
        self.connection_status = ConnectionStatus.DISCONNECTED
