"""Polygon.io (Massive) stocks adapter: aiohttp WebSocket around ``common.codecs.polygon``.

connection_config keys:
  ``url``          e.g. ``wss://socket.massive.com/stocks`` (the simulator: ``ws://127.0.0.1:8765/stocks``)
  ``api_key_env``  name of the environment variable holding the API key
  ``heartbeat_s``  WebSocket ping interval; a missing pong closes the socket (default 10)
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence

import aiohttp
import structlog

from common.codecs import polygon as codec
from common.model import ConnectionStatus, RawMarketData
from common.provider import (
    Instrument,
    ProviderAdapter,
    ProviderAuthError,
    ProviderConfig,
    ProviderDisconnected,
    ProviderProtocolError,
    ProviderRateLimited,
)

log = structlog.get_logger("feedfleet.polygon")

HANDSHAKE_TIMEOUT_S = 10.0


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
        # A reconnect must restore what was subscribed before the drop.
        if self.subscribed:
            await self._send_channels("subscribe", list(self.subscribed.values()))

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
        if self._ws is not None and not self._ws.closed:
            await self._send_channels("unsubscribe", instruments)

    async def _send_channels(self, action: str, instruments: Sequence[Instrument]) -> None:
        assert self._ws is not None
        channels = [c for i in instruments for c in codec.channels_for(i.symbol, i.data_types)]
        encode = codec.encode_subscribe if action == "subscribe" else codec.encode_unsubscribe
        # Keep each request well under any frame limit the server may have.
        for start in range(0, len(channels), 500):
            await self._ws.send_str(encode(channels[start : start + 500]))

    async def stream_batches(self) -> AsyncIterator[list[RawMarketData]]:
        ws = self._ws
        if ws is None:
            raise ProviderDisconnected("not connected")
        name = self.config.name
        while True:
            msg = await ws.receive()
            receive_ns = time.time_ns()
            if msg.data is not None:
                self.bytes_received += len(msg.data)  # characters of ASCII JSON: its bytes
            if msg.type is aiohttp.WSMsgType.TEXT or msg.type is aiohttp.WSMsgType.BINARY:
                frame = codec.decode_frame(msg.data, receive_ns, name)
            else:
                self.connection_status = ConnectionStatus.DISCONNECTED
                raise ProviderDisconnected(f"websocket {msg.type.name.lower()}: {msg.extra!r}")
            if frame.errors:
                self.decode_errors += len(frame.errors)
                for err in frame.errors[:3]:
                    log.warning("decode_error", provider=name, reason=err.reason, raw=err.raw)
            if frame.statuses:
                self._on_statuses(frame.statuses)
            self.skipped_events += frame.skipped
            if frame.records:
                yield frame.records

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
