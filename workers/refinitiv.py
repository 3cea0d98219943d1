"""LSEG / Refinitiv Real-Time adapter: aiohttp WebSocket (``tr_json2``) around
``common.codecs.refinitiv``.

connection_config keys:
  ``url``                  ``ws://host:15000/WebSocket`` (default ``ws://127.0.0.1:15000/WebSocket``)
  ``user``                 DACS user name of the Login request (required unless ``token_env``)
  ``app_id``               ApplicationId (default ``"256"``)
  ``position``             Position, the client's IP address (default ``"127.0.0.1"``)
  ``token_env``            optional: environment variable holding an AuthenticationToken (RTO);
                           the login then uses NameType AuthnToken instead of ``user``
  ``token_url``            optional: the RDP token endpoint (``.../auth/oauth2/v1/token`` for the
                           password grant, ``.../v2/token`` for client credentials). The adapter
                           then gets its own access tokens and keeps them fresh, see below
  ``grant_type``           ``password`` (default: ``username`` + ``password_env``, with a refresh
                           token) or ``client_credentials`` (``client_id`` + ``client_secret_env``)
  ``username``, ``password_env``, ``client_id``, ``client_secret_env``, ``scope``
                           the grant's parameters (``scope`` default
                           ``trapi.streaming.pricing.read``); secrets are read from the
                           environment variables named
  ``service``              optional Key.Service of item requests (name or number)
  ``view``                 optional list of field names; default: the quote and/or trade fields
                           plus their time/date fields, per instrument; ``[]`` asks for all fields
  ``heartbeat_timeout_s``  silence (no frame at all, Pings included) that counts as a dead
                           connection (default: the server's PingTimeout, else 30); the
                           adapter sends its own Ping after a third of it
  ``login_timeout_s``      how long to wait for the Login Refresh (default 10)

Token lifecycle (LSEG Real-Time Optimized): with ``token_url`` the adapter obtains an
access token before connecting and logs in with it. Before it expires (5% of
``expires_in`` ahead, or 300 s for tokens of 10 minutes or more, as LSEG's examples do) it
gets a new one (the refresh-token grant, or client credentials again) and re-sends the Login
(ID 1) with it on the open WebSocket: the item streams stay as they are. A refused refresh
is answered by a full authentication; only when that fails too does the session end
(``ProviderAuthError``).

The server's Ping is answered with a Pong at once. Item Status codes TooManyItems,
MaxLoginsReached and ExceededMaxMountsPerUser raise ``ProviderRateLimited``; any other closed
Login stream raises ``ProviderAuthError``; other closed item streams (NotFound, NotEntitled)
are logged and the rest keep streaming.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence

import aiohttp
import structlog

from common.codecs import refinitiv as codec
from common.model import ConnectionStatus, DataType, RawMarketData
from common.provider import (
    Instrument,
    ProviderAdapter,
    ProviderAuthError,
    ProviderConfig,
    ProviderConfigError,
    ProviderDisconnected,
    ProviderError,
    ProviderProtocolError,
    ProviderRateLimited,
)
from common.recording import FrameKind

log = structlog.get_logger("feedfleet.refinitiv")

_READABLE = (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY)


class RefinitivAdapter(ProviderAdapter):
    provider_type = "refinitiv"

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        cc = config.connection_config
        self.url = str(cc.get("url", "ws://127.0.0.1:15000/WebSocket"))
        self.user = cc.get("user")
        self.app_id = str(cc.get("app_id", codec.DEFAULT_APP_ID))
        self.position = str(cc.get("position", "127.0.0.1"))
        self.service = cc.get("service")
        view = cc.get("view")
        if view is not None and not (
            isinstance(view, list) and all(isinstance(v, str) for v in view)
        ):
            raise ProviderConfigError("connection_config.view must be a list of field names")
        self.view: list[str] | None = view
        self.heartbeat_timeout_s = config.optional_number("heartbeat_timeout_s")
        self.login_timeout_s = config.number("login_timeout_s", 10.0)
        self.consumer = codec.ConsumerProtocol(config.name)
        self.ping_timeout_s = codec.DEFAULT_PING_TIMEOUT_S
        self.skipped_messages = 0
        self.pings_answered = 0
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self.token_url = cc.get("token_url")
        self.grant_type = str(cc.get("grant_type", "password"))
        if self.grant_type not in ("password", "client_credentials"):
            raise ProviderConfigError("connection_config.grant_type must be password or "
                                      "client_credentials")  # fmt: skip
        self._token: str | None = None
        self._refresh_token: str | None = None
        self._renew_at: float | None = None  # loop time at which to get the next token
        self.token_renewals = 0  # tokens obtained after the first, re-sent on the Login

    # ------------------------------------------------------------ tokens

    async def _obtain_token(self, *, refresh: bool) -> None:
        """A new access token from ``token_url``: the refresh-token grant when asked and a
        refresh token is held, else the configured grant. Raises ProviderAuthError when the
        service refuses, ProviderDisconnected when it cannot be reached."""
        cc = self.config.connection_config
        if refresh and self._refresh_token is not None:
            form = {"grant_type": "refresh_token", "refresh_token": self._refresh_token}
            if cc.get("client_id"):
                form["client_id"] = str(cc["client_id"])
        elif self.grant_type == "password":
            form = {
                "grant_type": "password", "username": str(cc.get("username", "")),
                "password": self.config.secret("password_env"),
                "scope": str(cc.get("scope", "trapi.streaming.pricing.read")),
                "takeExchangeRefreshToken": "true",
            }  # fmt: skip
            if cc.get("client_id"):
                form["client_id"] = str(cc["client_id"])
        else:
            form = {
                "grant_type": "client_credentials", "client_id": str(cc.get("client_id", "")),
                "client_secret": self.config.secret("client_secret_env"),
                "scope": str(cc.get("scope", "trapi.streaming.pricing.read")),
            }  # fmt: skip
        try:
            timeout = aiohttp.ClientTimeout(total=10)
            async with (
                aiohttp.ClientSession(timeout=timeout) as http,
                http.post(str(self.token_url), data=form) as resp,
            ):
                status = resp.status
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            raise ProviderDisconnected(f"token service {self.token_url}: {exc}") from exc
        token = body.get("access_token") if isinstance(body, dict) else None
        if status != 200 or not isinstance(token, str) or not token:
            error = body.get("error") if isinstance(body, dict) else None
            raise ProviderAuthError(f"token service refused {form['grant_type']}: "
                                    f"HTTP {status} {error or ''}".strip())  # fmt: skip
        try:
            expires_in = float(body.get("expires_in", 300))
        except (TypeError, ValueError):
            expires_in = 300.0
        margin = 300.0 if expires_in >= 600 else expires_in * 0.05
        self._token = token
        self._refresh_token = body.get("refresh_token") or None
        self._renew_at = asyncio.get_running_loop().time() + max(0.0, expires_in - margin)

    async def _renew_token(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """A fresh token, re-sent on the Login of the open connection."""
        try:
            await self._obtain_token(refresh=True)
        except ProviderAuthError as exc:
            if self._refresh_token is None:
                raise
            log.warning("token_refresh_refused", provider=self.config.name, error=str(exc))
            self._refresh_token = None
            await self._obtain_token(refresh=False)  # authenticate again from scratch
        self.token_renewals += 1
        log.info("token_renewed", provider=self.config.name)
        await self._send_or_disconnect(ws, self._login_request())

    # ------------------------------------------------------------ connection

    def _login_request(self) -> str:
        token = self._token or (
            self.config.secret("token_env")
            if self.config.connection_config.get("token_env")
            else None
        )
        if token is None and not self.user:
            raise ProviderConfigError(
                f"connection_config.user (or token_env) is not set for {self.config.name}"
            )
        return codec.encode_login(
            None if token else str(self.user),
            app_id=self.app_id,
            position=self.position,
            token=token,
        )

    async def connect(self) -> None:
        self.connection_status = ConnectionStatus.CONNECTING
        if self.token_url:
            try:
                await self._obtain_token(refresh=False)
            except ProviderError as exc:
                self.last_error = str(exc)
                refused = isinstance(exc, ProviderAuthError | ProviderConfigError)
                self.connection_status = (
                    ConnectionStatus.ERROR if refused else ConnectionStatus.DISCONNECTED
                )
                raise
        login = self._login_request()
        self.consumer.reset()
        self._http = aiohttp.ClientSession()
        try:
            try:
                self._ws = await self._http.ws_connect(
                    self.url, protocols=(codec.SUBPROTOCOL,), autoping=True,
                    max_msg_size=16 * 1024 * 1024, timeout=aiohttp.ClientWSTimeout(ws_close=2.0),
                )  # fmt: skip
            except (aiohttp.ClientError, OSError) as exc:
                raise ProviderDisconnected(f"cannot connect to {self.url}: {exc}") from exc
            if self._ws.protocol != codec.SUBPROTOCOL:
                raise ProviderProtocolError(
                    f"server did not accept subprotocol {codec.SUBPROTOCOL}"
                )
            await self._ws.send_str(login)
            await self._await_login()
        except ProviderError as exc:
            await self._close_transport()
            self.last_error = str(exc)
            if isinstance(exc, ProviderRateLimited):
                self.connection_status = ConnectionStatus.RATE_LIMITED
            elif isinstance(exc, ProviderAuthError | ProviderProtocolError):
                self.connection_status = ConnectionStatus.ERROR
            else:
                self.connection_status = ConnectionStatus.DISCONNECTED
            raise
        except BaseException:
            await self.disconnect()
            raise
        self.connection_status = ConnectionStatus.CONNECTED
        # A reconnect must restore what was subscribed before the drop.
        if self.subscribed:
            await self._send_requests(list(self.subscribed.values()))

    async def _await_login(self) -> None:
        ws = self._ws
        assert ws is not None
        deadline = asyncio.get_running_loop().time() + self.login_timeout_s
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise ProviderDisconnected("no Login Refresh from server")
            try:
                msg = await ws.receive(timeout=remaining)
            except TimeoutError as exc:
                raise ProviderDisconnected("no Login Refresh from server") from exc
            if msg.type not in _READABLE:
                raise ProviderDisconnected(f"connection closed during login ({msg.type.name})")
            frame = self.consumer.decode(msg.data, time.time_ns())
            if frame.errors:
                raise ProviderProtocolError(f"bad login frame: {frame.errors[0].reason}")
            if frame.pings:
                await ws.send_str(codec.encode_pong())
            for login in frame.logins:
                if login.closed:
                    raise _login_refused(login)
                if login.accepted:
                    if login.ping_timeout_s:
                        self.ping_timeout_s = login.ping_timeout_s
                    log.info("login_accepted", provider=self.config.name, text=login.state.text,
                             ping_timeout_s=self.ping_timeout_s)  # fmt: skip
                    return

    async def _close_transport(self) -> None:
        ws, http = self._ws, self._http
        self._ws = self._http = None
        if ws is not None:
            await ws.close()
        if http is not None:
            await http.close()

    async def disconnect(self) -> None:
        ws = self._ws
        if ws is not None and not ws.closed:
            # Already gone: closing below is all that is left.
            with contextlib.suppress(aiohttp.ClientError, OSError, RuntimeError):
                await ws.send_str(codec.encode_login_close())
        await self._close_transport()
        self.connection_status = ConnectionStatus.DISCONNECTED

    # ------------------------------------------------------------ subscriptions

    async def subscribe(self, instruments: Sequence[Instrument]) -> None:
        for inst in instruments:
            self.subscribed[inst.symbol] = inst
        if self._ws is not None and not self._ws.closed:
            await self._send_requests(instruments)

    async def unsubscribe(self, instruments: Sequence[Instrument]) -> None:
        for inst in instruments:
            self.subscribed.pop(inst.symbol, None)
        closes = self.consumer.close_requests(i.symbol for i in instruments)
        if self._ws is not None and not self._ws.closed:
            for frame in closes:
                await self._ws.send_str(frame)

    def view_for(self, data_types: frozenset[DataType]) -> list[str] | None:
        if self.view is not None:
            return self.view or None
        fields: list[str] = []
        if DataType.QUOTE in data_types:
            fields.extend(codec.QUOTE_VIEW)
        if DataType.TRADE in data_types:
            fields.extend(codec.TRADE_VIEW)
        return fields or None

    async def _send_requests(self, instruments: Sequence[Instrument]) -> None:
        assert self._ws is not None
        # One batch request per distinct View.
        by_view: dict[tuple[str, ...], list[str]] = {}
        for inst in instruments:
            view = self.view_for(inst.data_types)
            by_view.setdefault(tuple(view or ()), []).append(inst.symbol)
        for view_key, names in by_view.items():
            for frame in self.consumer.item_requests(
                names, view=list(view_key) or None, service=self.service
            ):
                await self._ws.send_str(frame)

    # ------------------------------------------------------------ streaming

    async def stream_batches(self) -> AsyncIterator[list[RawMarketData]]:
        ws = self._ws
        if ws is None:
            raise ProviderDisconnected("not connected")
        name = self.config.name
        loop = asyncio.get_running_loop()
        timeout = self.heartbeat_timeout_s or self.ping_timeout_s
        ping_after = timeout / 3
        last_traffic = loop.time()
        pinged = False
        while True:
            idle = loop.time() - last_traffic
            if idle >= timeout:
                self.connection_status = ConnectionStatus.DISCONNECTED
                raise ProviderDisconnected(f"no traffic for {idle:.1f}s (heartbeat timeout)")
            wait = ping_after - idle if not pinged and idle < ping_after else timeout - idle
            if self._renew_at is not None:
                renew_in = self._renew_at - loop.time()
                if renew_in <= 0:
                    self._renew_at = None
                    await self._renew_token(ws)
                    continue
                wait = min(wait, renew_in)
            try:
                msg = await ws.receive(timeout=wait)
            except TimeoutError:
                if not pinged and loop.time() - last_traffic >= ping_after:
                    pinged = True
                    await self._send_or_disconnect(ws, codec.encode_ping())
                continue
            receive_ns = time.time_ns()
            if msg.type not in _READABLE:
                self.connection_status = ConnectionStatus.DISCONNECTED
                raise ProviderDisconnected(f"websocket {msg.type.name.lower()}: {msg.extra!r}")
            self.bytes_received += len(msg.data)
            last_traffic = loop.time()
            pinged = False
            if self.tap is not None:
                self.tap.record(FrameKind.WEBSOCKET, msg.data, receive_ns)
            frame = self.consumer.decode(msg.data, receive_ns)
            if frame.errors:
                self.decode_errors += len(frame.errors)
                for err in frame.errors[:3]:
                    log.warning("decode_error", provider=name, reason=err.reason, raw=err.raw)
            if frame.pings:
                self.pings_answered += frame.pings
                await self._send_or_disconnect(ws, codec.encode_pong())
            self.skipped_messages += frame.skipped
            if frame.records:
                yield frame.records
            for server_error in frame.server_errors:
                self.last_error = server_error.text
                log.warning("server_error", provider=name, stream_id=server_error.stream_id,
                            text=server_error.text)  # fmt: skip
            for login in frame.logins:
                self._on_login(login)
            for status in frame.statuses:
                self._on_status(status)

    async def _send_or_disconnect(self, ws: aiohttp.ClientWebSocketResponse, data: str) -> None:
        try:
            await ws.send_str(data)
        except (aiohttp.ClientError, OSError, RuntimeError) as exc:
            self.connection_status = ConnectionStatus.DISCONNECTED
            raise ProviderDisconnected(f"send failed: {exc}") from exc

    def _on_login(self, login: codec.LoginEvent) -> None:
        if login.closed:
            error = _login_refused(login)
            self.last_error = str(error)
            self.connection_status = (
                ConnectionStatus.RATE_LIMITED
                if isinstance(error, ProviderRateLimited)
                else ConnectionStatus.ERROR
            )
            raise error
        log.info("login_state", provider=self.config.name, stream=login.state.stream,
                 data=login.state.data, text=login.state.text)  # fmt: skip

    def _on_status(self, status: codec.ItemStatus) -> None:
        state = status.state
        if state.code in codec.RATE_LIMIT_CODES:
            self.last_error = f"{status.name}: {state.code} {state.text}"
            self.connection_status = ConnectionStatus.RATE_LIMITED
            raise ProviderRateLimited(self.last_error)
        if status.name is None:
            # The summary a batch request gets on its own ID ("Processed 3 total items...").
            log.info("batch_status", provider=self.config.name, stream_id=status.stream_id,
                     text=state.text)  # fmt: skip
            return
        if state.open and state.data != "Suspect":
            self.unavailable.pop(status.name, None)
            return
        if not state.open:
            self.last_error = f"{status.name}: {state.code} {state.text}"
        self.unavailable[status.name] = f"{state.stream}/{state.data} {state.code}: {state.text}"
        log.warning(
            "item_status", provider=self.config.name, symbol=status.name,
            stream=state.stream, data=state.data, code=state.code, text=state.text,
        )  # fmt: skip


def _login_refused(login: codec.LoginEvent) -> ProviderError:
    state = login.state
    text = f"login {state.stream}/{state.data} {state.code}: {state.text}".strip()
    if state.code in codec.RATE_LIMIT_CODES:
        return ProviderRateLimited(text)
    return ProviderAuthError(text)
