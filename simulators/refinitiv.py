"""LSEG / Refinitiv Real-Time WebSocket simulator: the server side of ``common.codecs.refinitiv``.

Serves ``ws://HOST:PORT/WebSocket`` with subprotocol ``tr_json2`` like a deployed ADS: the
Login request (ID 1) must come first and is answered by a Login Refresh carrying
``PingTimeout``; MarketPrice requests (single or batch, with or without a View) get a
Refresh each and then Updates (Quote, Trade and QuotesTrade) at the configured rate,
several messages per frame. The server pings when the client has been quiet for
``ping_interval_s`` and drops a client that stays quiet ``ping_timeout_s`` after a Ping.

Faults: ``refuse_auth`` answers the login with a Status (Stream Closed, Data Suspect, Code
UserUnknownToPermSys) and closes; ``rate_limit`` answers every item request with a Status
(Stream Closed, Data Suspect, Code TooManyItems), the spec's nearest thing to a rate-limit
reply; ``silent_after`` stops all output, pings and pongs included.

Tokens, as LSEG's RDP auth service issues them for Real-Time Optimized: ``POST
/auth/oauth2/v1/token`` (``grant_type=password`` with ``takeExchangeRefreshToken``, then
``grant_type=refresh_token``) and ``POST /auth/oauth2/v2/token``
(``grant_type=client_credentials``) answer ``access_token``, ``expires_in`` and (v1) a
``refresh_token``, with ``token_lifetime_s`` short enough for a test to see several
renewals. A Login with an issued token is accepted only while it is valid; a client that
does not re-send its Login with a new token before the old one expires has its login
stream closed ("token expired") and the connection dropped. ``refuse_refresh`` answers every
refresh grant with ``400 invalid_grant``, so the client must authenticate again.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web

from common.codecs import refinitiv as codec
from simulators.market import (
    Faults,
    Pacer,
    PriceWalk,
    SentFile,
    SentLog,
    WebSocketSimulator,
    abort_websocket,
    harness_args,
    run_simulator,
    serve_until_stopped,
    simulator_arg_parser,
    symbol_universe,
)

# The real capture's SeqNumber steps by 16 between consecutive updates of one item.
SEQ_STEP = 16
_UPDATE_CYCLE = ("Quote", "Quote", "Trade", "Quote", "QuotesTrade")


@dataclass
class RefinitivSimConfig:
    symbols: list[str]
    rate: float = 1000.0  # update messages per second per connection
    batch: int = 10  # messages per frame
    user: str | None = None  # None: any non-empty user name is accepted
    token: str | None = None  # None: any non-empty AuthnToken is accepted
    faults: Faults = field(default_factory=Faults)
    ping_interval_s: float = 10.0
    ping_timeout_s: float = 30.0
    service: str = "ELEKTRON_DD"
    token_lifetime_s: float = 300.0  # expires_in of issued access tokens
    username: str | None = None  # None: any non-empty user name and password are accepted
    password: str | None = None
    client_id: str | None = None  # None: any non-empty client id (and secret)
    client_secret: str | None = None
    refuse_refresh: bool = False
    sent_log_dir: str | None = None  # every frame sent, one file per connection (SentLog)


@dataclass(slots=True)
class _Item:
    stream_id: int
    name: str
    view: frozenset[str] | None


class _Connection:
    def __init__(self, ws: web.WebSocketResponse, log: SentFile | None = None) -> None:
        self.ws = ws
        self.log = log
        self.logged_in = False
        self.items: dict[int, _Item] = {}
        self.sent = 0
        self.frames = 0
        self.silent = False
        self.last_client_traffic = time.monotonic()
        self.ping_sent_at: float | None = None
        self.pongs_received = 0
        self.token_expires_at: float | None = None  # the login's issued token, monotonic

    async def send(self, messages: list[dict[str, Any]]) -> None:
        if not self.silent and not self.ws.closed:
            frame = codec.encode_messages(messages)
            await self.ws.send_str(frame)
            if self.log is not None:
                self.log.write(frame)


class RefinitivSimulator(WebSocketSimulator):
    def __init__(self, config: RefinitivSimConfig) -> None:
        super().__init__()
        self.config = config
        self.known = set(config.symbols)
        self.walk = PriceWalk(config.symbols)
        self.volume: dict[str, int] = dict.fromkeys(config.symbols, 0)
        self.connections: list[_Connection] = []
        self.events_sent = 0
        self.pongs_received = 0
        self.requests: list[codec.ClientRequest] = []
        self.sent_log = SentLog(config.sent_log_dir)
        # Issued tokens: access token -> expiry (monotonic); refresh tokens still usable.
        self.access_tokens: dict[str, float] = {}
        self.refresh_tokens: set[str] = set()
        self.grants: collections.Counter[str] = collections.Counter()  # by grant_type
        self.logins: list[str] = []  # the token (or user) of each Login, reissues included
        self._token_serial = itertools.count(1)

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_post("/auth/oauth2/v1/token", self._token_v1)
        app.router.add_post("/auth/oauth2/v2/token", self._token_v2)
        return app

    def _issue(self, refresh: bool) -> dict[str, Any]:
        serial = next(self._token_serial)
        access = f"access-{serial}-{secrets.token_hex(8)}"
        self.access_tokens[access] = time.monotonic() + self.config.token_lifetime_s
        reply: dict[str, Any] = {
            "access_token": access, "token_type": "Bearer",
            "expires_in": str(round(self.config.token_lifetime_s)),
            "scope": "trapi.streaming.pricing.read",
        }  # fmt: skip
        if refresh:
            reply["refresh_token"] = f"refresh-{serial}-{secrets.token_hex(8)}"
            self.refresh_tokens.add(reply["refresh_token"])
        return reply

    @staticmethod
    def _oauth_error(error: str, description: str, status: int = 400) -> web.Response:
        return web.json_response({"error": error, "error_description": description}, status=status)

    async def _token_v1(self, request: web.Request) -> web.Response:
        """The password grant and its refresh (RDP ``/auth/oauth2/v1/token``)."""
        form = await request.post()
        grant = str(form.get("grant_type", ""))
        cfg = self.config
        if grant == "password":
            user, password = str(form.get("username", "")), str(form.get("password", ""))
            if not (_accepts(cfg.username, user) and _accepts(cfg.password, password)):
                return self._oauth_error("access_denied", "Invalid username or password.")
        elif grant == "refresh_token":
            token = str(form.get("refresh_token", ""))
            if cfg.refuse_refresh or token not in self.refresh_tokens:
                self.grants["refresh_token refused"] += 1
                return self._oauth_error("invalid_grant", "refresh token is invalid or expired")
            self.refresh_tokens.discard(token)  # each refresh token is used once
        else:
            return self._oauth_error("unsupported_grant_type", f"grant_type {grant!r}")
        self.grants[grant] += 1
        return web.json_response(self._issue(refresh=True))

    async def _token_v2(self, request: web.Request) -> web.Response:
        """The client-credentials grant (RDP ``/auth/oauth2/v2/token``): no refresh token."""
        form = await request.post()
        grant = str(form.get("grant_type", ""))
        if grant != "client_credentials":
            return self._oauth_error("unsupported_grant_type", f"grant_type {grant!r}")
        cid, secret = str(form.get("client_id", "")), str(form.get("client_secret", ""))
        cfg = self.config
        if not (_accepts(cfg.client_id, cid) and _accepts(cfg.client_secret, secret)):
            return self._oauth_error("invalid_client", "Invalid client credentials.", 401)
        self.grants[grant] += 1
        return web.json_response(self._issue(refresh=False))

    def open_items(self) -> list[str]:
        """Names streaming on every live connection (tests check re-subscription with it)."""
        return sorted(item.name for conn in self.connections for item in conn.items.values())

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(
            protocols=(codec.SUBPROTOCOL,), autoping=True, max_msg_size=4 * 1024 * 1024
        )
        if not ws.can_prepare(request).ok:
            return web.Response(status=400, text="WebSocket upgrade required")
        await ws.prepare(request)
        if ws.ws_protocol != codec.SUBPROTOCOL:
            await ws.close(code=1002, message=b"subprotocol tr_json2 required")
            return ws
        conn = _Connection(ws, self.sent_log.open())
        self.connections.append(conn)
        tasks: list[asyncio.Task[None]] = [asyncio.create_task(self._heartbeat_loop(conn))]
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                conn.last_client_traffic = time.monotonic()
                conn.ping_sent_at = None
                try:
                    requests = codec.decode_requests(msg.data)
                except codec.CodecError as exc:
                    await conn.send([codec.error_message(f"JSON Converter error: {exc}")])
                    continue
                for req in requests:
                    self.requests.append(req)
                    if not await self._on_request(conn, req):
                        await ws.close()
                        break
                    if conn.logged_in and len(tasks) == 1:
                        tasks.append(asyncio.create_task(self._send_loop(conn)))
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self.connections.remove(conn)
            if conn.log is not None:
                conn.log.close()
        return ws

    async def _on_request(self, conn: _Connection, req: codec.ClientRequest) -> bool:
        """Answer one request; False closes the connection."""
        if req.kind == "Ping":
            await conn.send([codec.pong_message()])
            return True
        if req.kind == "Pong":
            conn.pongs_received += 1
            self.pongs_received += 1
            return True
        if req.domain == "Login":
            if req.kind == "Close":
                return False
            return await self._on_login(conn, req)
        if req.kind == "Close":
            for stream_id in req.ids:
                conn.items.pop(stream_id, None)
            if len(req.ids) > 1:
                text = f"Processed {len(req.ids)} total stream ids from Batch Close Request."
                await conn.send(
                    [codec.item_status(req.ids[0], None, "Closed", "Ok", "None",
                                       f"{text} {len(req.ids)} Ok.")]
                )  # fmt: skip
            return True
        stream_id = req.ids[0]
        if not conn.logged_in:
            await conn.send(
                [codec.item_status(stream_id, None, "Closed", "Suspect", "UsageError",
                                   "Login stream is not open")]
            )  # fmt: skip
            return True
        if req.domain != "MarketPrice":
            await conn.send(
                [codec.item_status(stream_id, None, "Closed", "Suspect", "UsageError",
                                   f"Domain {req.domain} is not served")]
            )  # fmt: skip
            return True
        view = frozenset(req.view) if req.view else None
        replies: list[dict[str, Any]] = []
        if req.batch:
            ok = sum(1 for n in req.names if n in self.known) if not self.faults.rate_limit else 0
            replies.append(codec.batch_status(stream_id, len(req.names), ok))
            targets = [(stream_id + i, n) for i, n in enumerate(req.names, 1)]
        else:
            targets = [(stream_id, req.names[0])]
        for item_id, name in targets:
            replies.append(self._open_item(conn, item_id, name, view))
        await conn.send(replies)
        return True

    @property
    def faults(self) -> Faults:
        return self.config.faults

    async def _on_login(self, conn: _Connection, req: codec.ClientRequest) -> bool:
        cfg = self.config
        elements = req.elements
        conn.token_expires_at = None
        if req.name_type == "AuthnToken":
            token = elements.get("AuthenticationToken")
            good = isinstance(token, str) and bool(token) and cfg.token in (None, token)
            if isinstance(token, str) and token in self.access_tokens:
                # One this service issued: good only until it expires.
                conn.token_expires_at = self.access_tokens[token]
                good = time.monotonic() < conn.token_expires_at
            user = "token"
            self.logins.append(str(token))
        else:
            user = req.names[0] if req.names else ""
            good = bool(user) and cfg.user in (None, user)
        if self.faults.refuse_auth or not good:
            text = f"User '{user}' is not known to the permission system."
            await conn.send([codec.login_status("Closed", "Suspect", "UserUnknownToPermSys", text)])
            return False
        conn.logged_in = True
        await conn.send(
            [codec.login_refresh(user, str(elements.get("ApplicationId", "256")),
                                 str(elements.get("Position", "")),
                                 ping_timeout_s=max(1, round(cfg.ping_timeout_s)))]
        )  # fmt: skip
        return True

    def _open_item(
        self, conn: _Connection, stream_id: int, name: str, view: frozenset[str] | None
    ) -> dict[str, Any]:
        if self.faults.rate_limit:
            return codec.item_status(stream_id, name, "Closed", "Suspect", "TooManyItems",
                                     "Request rejected: too many items open.")  # fmt: skip
        if name not in self.known:
            return codec.item_status(stream_id, name, "Closed", "Suspect", "NotFound",
                                     "**The record could not be found")  # fmt: skip
        item = _Item(stream_id, name, view)
        conn.items[stream_id] = item
        return codec.item_refresh(
            stream_id, name, _filtered(self._image(name), view),
            self.walk.states[name].sequence * SEQ_STEP, service=self.config.service,
        )  # fmt: skip

    def _image(self, name: str) -> dict[str, Any]:
        """A Refresh's field list: current quote and last trade, dated."""
        now = datetime.now(UTC)
        st, bid, ask, bid_size, ask_size = self.walk.quote(name)
        tod, ms = _time_fields(now)
        day = now.date().isoformat()
        return {
            "BID": bid, "ASK": ask, "BIDSIZE": bid_size, "ASKSIZE": ask_size,
            "QUOTIM": tod, "QUOTIM_MS": ms, "QUOTE_DATE": day, "SEQNUM_QT": st.sequence,
            "TRDPRC_1": st.price, "TRDVOL_1": 100, "TRDTIM_1": tod, "TRDTIM_MS": ms,
            "SALTIM": tod, "SALTIM_MS": ms, "TRADE_DATE": day, "SEQNUM": st.trade_id,
            "ACVOL_1": self.volume[name], "CURRENCY": "USD", "RDN_EXCHID": "NYS",
            "DSPLY_NAME": name.partition(".")[0],
        }  # fmt: skip

    def _update(self, item: _Item, kind: str) -> dict[str, Any] | None:
        name = item.name
        now = datetime.now(UTC)
        tod, ms = _time_fields(now)
        fields: dict[str, Any] = {}
        if kind in ("Trade", "QuotesTrade"):
            st, price, size = self.walk.trade(name)
            self.volume[name] += size
            fields.update({
                "TRDPRC_1": price, "TRDVOL_1": size, "TRDTIM_1": tod, "TRDTIM_MS": ms,
                "SALTIM": tod, "SALTIM_MS": ms, "ACVOL_1": self.volume[name],
                "SEQNUM": st.trade_id,
            })  # fmt: skip
        if kind in ("Quote", "QuotesTrade"):
            st, bid, ask, bid_size, ask_size = self.walk.quote(name)
            fields.update({
                "BID": bid, "ASK": ask, "BIDSIZE": bid_size, "ASKSIZE": ask_size,
                "QUOTIM": tod, "QUOTIM_MS": ms, "SEQNUM_QT": st.sequence,
            })  # fmt: skip
        every = self.faults.skip_seq_every
        if every and st.sequence % every == 0:
            st.sequence += 1  # the next update's SeqNumber jumps one step further
        fields = _filtered(fields, item.view)
        if not fields:
            return None
        return codec.item_update(item.stream_id, name, fields, kind, st.sequence * SEQ_STEP,
                                 service=self.config.service)  # fmt: skip

    async def _send_loop(self, conn: _Connection) -> None:
        cfg = self.config
        faults = cfg.faults
        pacer = Pacer(cfg.rate)
        rr = 0
        while not conn.ws.closed:
            items = sorted(conn.items.values(), key=lambda i: i.stream_id)
            if not items or conn.silent:
                await asyncio.sleep(0.01)
                continue
            if faults.silent_after and conn.sent >= faults.silent_after:
                conn.silent = True
                continue
            messages: list[dict[str, Any]] = []
            for _ in range(cfg.batch):
                item = items[rr % len(items)]
                message = self._update(item, _UPDATE_CYCLE[(rr // len(items)) % 5])
                rr += 1
                if message is not None:
                    messages.append(message)
            if not messages:
                await asyncio.sleep(0.01)
                continue
            conn.frames += 1
            if faults.malformed_every and conn.frames % faults.malformed_every == 0:
                await conn.ws.send_str('[{"ID":2,"Type":"Update","Fields":{"BID":')
            await conn.send(messages)
            conn.sent += len(messages)
            self.events_sent += len(messages)
            if faults.drop_after and conn.sent >= faults.drop_after:
                abort_websocket(conn.ws)
                return
            await pacer.wait_for(len(messages))

    async def _heartbeat_loop(self, conn: _Connection) -> None:
        cfg = self.config
        tick = min(cfg.ping_interval_s, cfg.ping_timeout_s) / 4
        while not conn.ws.closed:
            await asyncio.sleep(tick)
            if conn.silent:
                continue
            now = time.monotonic()
            if conn.token_expires_at is not None and now >= conn.token_expires_at:
                await conn.send([codec.login_status(
                    "Closed", "Suspect", "NotEntitled", "AuthenticationToken expired"
                )])  # fmt: skip
                await conn.ws.close(code=1000, message=b"token expired")
                return
            if conn.ping_sent_at is not None:
                if now - conn.ping_sent_at >= cfg.ping_timeout_s:
                    await conn.ws.close(code=1000, message=b"no Pong within PingTimeout")
                    return
            elif now - conn.last_client_traffic >= cfg.ping_interval_s:
                conn.ping_sent_at = now
                await conn.send([codec.ping_message()])


def _accepts(expected: str | None, given: str) -> bool:
    """A credential is given, and it is the configured one where one is configured."""
    return bool(given) and expected in (None, given)


def _filtered(fields: dict[str, Any], view: frozenset[str] | None) -> dict[str, Any]:
    return fields if view is None else {k: v for k, v in fields.items() if k in view}


def _time_fields(now: datetime) -> tuple[str, int]:
    """``("19:01:58", 68518777)``: the string and ms-since-midnight forms, UTC."""
    ms = ((now.hour * 60 + now.minute) * 60 + now.second) * 1000 + now.microsecond // 1000
    return now.strftime("%H:%M:%S"), ms


def build_arg_parser() -> argparse.ArgumentParser:
    p = simulator_arg_parser(
        "refinitiv", __doc__, port=15000, num_symbols=500, rate=1000.0,
        rate_help="update messages/s per connection", batch=10, batch_help="messages per frame",
    )  # fmt: skip
    p.add_argument("--user", default=None, help="the only user accepted (default: any)")
    p.add_argument("--token", default=None, help="the only AuthnToken accepted (default: any)")
    p.add_argument("--ping-interval", type=float, default=10.0)
    p.add_argument("--ping-timeout", type=float, default=30.0)
    harness_args(p)
    return p


async def serve(args: argparse.Namespace) -> None:
    symbols = [s for s in args.symbols.split(",") if s] or [
        f"{s}.N" for s in symbol_universe(args.num_symbols)
    ]
    sim = RefinitivSimulator(
        RefinitivSimConfig(
            symbols=symbols, rate=args.rate, batch=args.batch, user=args.user,
            token=args.token, faults=Faults.parse(args.faults),
            ping_interval_s=args.ping_interval, ping_timeout_s=args.ping_timeout,
            sent_log_dir=args.sent_log,
        )
    )  # fmt: skip
    await serve_until_stopped(
        sim, args.host, args.port, "refinitiv simulator on ws://{host}:{port}/WebSocket",
        faults=sim.config.faults, faults_file=args.faults_file,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    run_simulator(serve, build_arg_parser(), argv)
