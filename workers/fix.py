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
  ``session_store_dir``      directory of the session store (else the environment variable
                             ``FEEDFLEET_FIX_STORE_DIR``; else the worker's journal
                             directory, which the worker hands every adapter)
  ``session_store_interval_s``  at most one write of the incoming numbers per this many
                             seconds (default 0.05; 0: after every read). See below
  ``reset_on_logon``         ResetSeqNumFlag 141=Y on each Logon (default: false with a session
                             store, true without). False keeps the sequence numbers across
                             reconnects (in memory) and, with a store, across restarts, so
                             the venue resends what was sent while we were away
  ``market_depth``           MarketDepth (264) requested (default 1, top of book)
  ``logon_timeout_s``        how long to wait for the Logon reply (default 10)

Session store (QuickFIX's FileStore is the prior art): one small JSON file per
(SenderCompID, TargetCompID) holding ``codec.FixSession.checkpoint``: the next MsgSeqNum
each way, the stream name, the record-sequence state and the admin numbers read beyond the
checkpoint, replaced atomically (temporary file + ``os.replace``). The outgoing number is
written before bytes that use it leave, so a restart never reuses one. The incoming side
stops at the last read whose records were handed to the consumer (the worker has journaled
them when it asks for the next batch): a restart asks again for what was read but not
handed over (at least once: the worker sees those again, with the same sequence numbers and
event ids) and never skips any. The admin messages among them (heartbeats, the venue's
Logout answering ours, which ``disconnect`` waits for) are noted, so the venue's gap-fill
of them is no gap. No fsync: like the journal's per-read write it survives a process kill,
and a power cut can only leave it behind.

Cost, measured here: a temporary file + ``os.replace`` takes about 40 us on tmpfs but 0.5 to
1.8 ms on this ext4 mounted with ``discard`` (freeing the replaced file's blocks is a
synchronous discard); written after every read, it cut the adapter's top rate by a third
to a half. So the incoming side is written at most every ``session_store_interval_s``
(20 writes/s, within the noise) and at disconnect; the outgoing number whenever it changed.
Lagging costs only a larger resend after a kill, with one caveat: admin messages read after
the last write are unknown to the next process, and as a gap-fill cannot tell them from
market data the venue will not resend, the first record after such a restart is flagged
``gap`` though nothing was lost (never the reverse).

A venue whose numbers went back (restarted without its store) and did not reset with
ResetSeqNumFlag is logged out as FIX requires ("MsgSeqNum too low"); the next connect logs
on with a reset and the warning ``sequence_reset_by_venue`` names what is lost. A Logon
answered with a reset we did not ask for is logged the same way.

Venue replies: a Logout answering our Logon is a refused login (ProviderAuthError); a
MarketDataRequestReject with MDReqRejReason 2 (insufficient bandwidth, the closest FIX 4.4
has to "rate limited") is ProviderRateLimited; any other reject is a per-symbol error kept in
``symbol_errors`` while the other symbols go on streaming.

Venue messages that fail validation (a garbled field, a wrong NumInGroup count, an entry
missing a required tag or starting with the wrong one, an unknown MDUpdateAction) get a
session-level Reject (35=3) with RefSeqNum, RefTagID, RefMsgType and SessionRejectReason, as
FIX 4.4 requires; they count as decode errors, and the entries that do decode are kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import NoReturn
from urllib.parse import quote

import orjson
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
from common.recording import FrameKind

log = structlog.get_logger("feedfleet.fix")

READ_SIZE = 1 << 16
STORE_DIR_ENV = "FEEDFLEET_FIX_STORE_DIR"
STORE_INTERVAL_S = 0.05
LOGOUT_WAIT_S = 1.0
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


class SessionStore:
    """One session's ``codec.SessionState`` in ``<dir>/<sender>+<target>.fixsession.json``."""

    def __init__(self, directory: Path, sender_comp_id: str, target_comp_id: str) -> None:
        # quote() encodes "+" and "/", so any pair of CompIDs maps to its own file name.
        name = f"{quote(sender_comp_id, safe='')}+{quote(target_comp_id, safe='')}"
        self.path = directory / f"{name}.fixsession.json"
        self._tmp = directory / f".{name}.fixsession.tmp"
        self.comp_ids = {"sender_comp_id": sender_comp_id, "target_comp_id": target_comp_id}
        self.saved: codec.SessionState | None = None
        self.writes = 0
        self.errors = 0

    def load(self) -> codec.SessionState | None:
        """The stored state, or None when there is none yet. A damaged file is a config
        error: starting over silently would hide what the venue sent meanwhile."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ProviderConfigError(f"session store {self.path}: {exc}") from exc
        try:
            data = orjson.loads(raw)
            if not isinstance(data, dict) or any(data.get(k) != v for k, v in
                                                 self.comp_ids.items()):  # fmt: skip
                raise ValueError("CompIDs do not match")
            state = codec.SessionState.from_json(data)
        except ValueError as exc:
            raise ProviderConfigError(
                f"session store {self.path} is unreadable ({exc}); remove it to start the "
                "session over with a sequence reset"
            ) from exc
        self.saved = state
        return state

    def save(self, state: codec.SessionState) -> None:
        if state == self.saved:
            return
        data = orjson.dumps({**self.comp_ids, **state.to_json()})
        try:
            fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            os.replace(self._tmp, self.path)
        except OSError as exc:
            # Not fatal: the session goes on, and a restart resumes from the last state
            # written (a resend of more than needed).
            self.errors += 1
            if self.errors <= 3:
                log.warning("session_store_write_failed", path=str(self.path), error=str(exc))
            return
        self.saved = state
        self.writes += 1


class FixAdapter(ProviderAdapter):
    provider_type = "fix"
    codec_tracks_gaps = True

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        cc = config.connection_config
        self.host = str(cc.get("host", ""))
        self.port = config.integer("port", 0)
        self.sender_comp_id = str(cc.get("sender_comp_id", ""))
        self.target_comp_id = str(cc.get("target_comp_id", ""))
        self.heartbeat_interval = config.integer("heartbeat_interval", 30)
        self.username: str | None = cc.get("username")
        store_dir = cc.get("session_store_dir") or os.environ.get(STORE_DIR_ENV) or None
        self.session_store_dir = Path(store_dir) if isinstance(store_dir, str) else None
        self._store_dir_raw = store_dir
        self.reset_on_logon = cc.get("reset_on_logon", self.session_store_dir is None)
        self._reset_configured = "reset_on_logon" in cc
        self.store_interval_s = config.number("session_store_interval_s", STORE_INTERVAL_S)
        self._store: SessionStore | None = None
        # The session state as of the last read whose records the consumer took.
        self._committed: codec.SessionState | None = None
        self._store_due = 0.0  # monotonic time before which the incoming side is not written
        self._store_dirty = False  # committed since the last write
        # The venue's numbers went back at the last Logon: the next one resets them.
        self._reset_next_logon = False
        self.market_depth = config.integer("market_depth", 1)
        self.logon_timeout_s = config.number("logon_timeout_s", 10.0)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._session: codec.FixSession | None = None
        self._req_ids: dict[str, str] = {}
        self._req_counter = itertools.count(1)
        # Records that arrived in the same read as the Logon reply.
        self._pending: list[RawMarketData] = []
        self.symbol_errors = self.unavailable  # refused symbols, reported for failover
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
        if self.store_interval_s < 0:
            raise ProviderConfigError("connection_config.session_store_interval_s must be >= 0")
        if not isinstance(self.reset_on_logon, bool):
            raise ProviderConfigError("connection_config.reset_on_logon must be true or false")
        if self._store_dir_raw is not None and self.session_store_dir is None:
            raise ProviderConfigError("connection_config.session_store_dir must be a path")
        if self.session_store_dir is not None and self._store is None:
            self._store = SessionStore(
                self.session_store_dir, self.sender_comp_id, self.target_comp_id
            )

    def use_state_dir(self, directory: Path) -> None:
        """Keep the session store beside the worker's journal unless the row names one:
        sequence numbers then survive a restart and the venue resends what we missed."""
        if self.session_store_dir is None and self._store_dir_raw is None:
            self.session_store_dir = directory / "fix-session"
            if not self._reset_configured:
                self.reset_on_logon = False

    async def connect(self) -> None:
        self._check_config()
        cc = self.config.connection_config
        password = self.config.secret("password_env") if cc.get("password_env") else None
        session = self._session = self._session_for_connect()
        session.new_connection()
        self.connection_status = ConnectionStatus.CONNECTING
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
                time.time_ns(), reset_seq_num=self.reset_on_logon or self._reset_next_logon,
                username=self.username, password=password,
            ))  # fmt: skip
            await self._await_logon(session)
            self._reset_next_logon = False
            if not self._pending:
                self._commit()
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

    def _session_for_connect(self) -> codec.FixSession:
        old, store = self._session, self._store
        if old is not None and not self.reset_on_logon and store is None:
            return old  # numbers kept in memory across reconnects
        state = None
        if store is not None and not self.reset_on_logon:
            if old is not None and self._committed is not None:
                # Resume from what the consumer took, not from what was read: records read
                # but never handed over are asked for again, as after a restart.
                state = old.checkpoint(self._committed)
            else:
                state = store.load()
        session = codec.FixSession(
            self.sender_comp_id, self.target_comp_id, heartbeat_interval=self.heartbeat_interval,
            provider=self.config.name, state=state,
        )  # fmt: skip
        if old is not None and state is not None:
            session.market_data = old.market_data  # top of book: same sequence space
        self._committed = session.state
        return session

    def _commit(self) -> None:
        """The consumer has what was read so far: the incoming numbers may be stored."""
        session = self._session
        if self._store is not None and session is not None:
            self._committed = session.state
            self._store_dirty = True
            self._flush_store()

    def _flush_store(self, *, force: bool = False) -> None:
        store, session, committed = self._store, self._session, self._committed
        if store is None or session is None or committed is None:
            return
        now = time.monotonic()
        if force or (self._store_dirty and now >= self._store_due):
            store.save(session.checkpoint(committed))
            self._store_dirty = False
            self._store_due = now + self.store_interval_s

    def _store_wait(self) -> float | None:
        """Seconds until a committed state not yet written is due, for the read timeout."""
        if self._store is None or not self._store_dirty:
            return None
        return max(0.0, self._store_due - time.monotonic())

    def _save_outgoing(self) -> None:
        """Store the next outgoing number before bytes that used the ones below it leave."""
        store, session = self._store, self._session
        saved = store.saved if store is not None else None
        if session is not None and (saved is None or saved.next_sender_seq != session.next_out_seq):
            self._flush_store(force=True)

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
            if self.tap is not None:  # the Logon reply too: a replay's session starts there
                self.tap.record(FrameKind.TCP, data, time.time_ns())
            result = session.receive(data, time.time_ns())
            self._count_errors(result)
            await self._write(result.outgoing)
            self._on_events([e for e in result.events if not isinstance(e, codec.SessionClosed)])
            for event in result.events:
                if isinstance(event, codec.SessionClosed):
                    refused = next(
                        (e.text for e in result.events if isinstance(e, codec.LogoutReceived)),
                        None,
                    )
                    if refused is not None:
                        raise ProviderAuthError(f"logon refused: {refused or 'no reason given'}")
                    if any(isinstance(e, codec.PeerReset) for e in result.events):
                        # The venue lost its numbers (a restart without its store) and did
                        # not say so with a reset; staying down would not bring them back.
                        self._reset_next_logon = True
                        raise ProviderDisconnected(
                            f"{event.reason}: the venue's sequence numbers went back; the "
                            "next Logon resets them"
                        )
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
            self._commit()
        while True:
            timeout = session.seconds_until_tick(time.time_ns())
            due = self._store_wait()
            if due is not None:
                timeout = min(timeout, due)
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
                self.bytes_received += len(data)
                if self.tap is not None:
                    self.tap.record(FrameKind.TCP, data, now)
                result = session.receive(data, now)
                self._count_errors(result)
                await self._write(result.outgoing)
                self.skipped_entries += result.skipped
                # Records first: those of a read that also ends the session are not lost.
                if result.records:
                    yield result.records
                self._commit()
                if result.events:
                    self._on_events(result.events)
            else:
                self._flush_store()
            tick = session.tick(now)
            await self._write(tick.outgoing)
            if tick.timed_out:
                self._lost(
                    f"no data or TestRequest answer for {codec.TIMEOUT_FACTOR:g} x "
                    f"HeartBtInt ({self.heartbeat_interval}s)"
                )

    def _lost(self, reason: str) -> NoReturn:
        if self._session is not None:
            # No Logout into a dead connection: it would use up a MsgSeqNum for nothing.
            self._session.logged_on = False
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
            elif isinstance(event, codec.PeerReset):
                self.sequence_gaps += 1
                log.warning("sequence_reset_by_venue", provider=name, lost_from=event.lost_from,
                            old_stream=event.old_stream)  # fmt: skip
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
        self._save_outgoing()
        try:
            writer.write(data)
            await writer.drain()
        except (OSError, RuntimeError) as exc:
            self._lost(f"write failed: {exc}")

    async def disconnect(self) -> None:
        session, writer = self._session, self._writer
        if session is not None and writer is not None and session.logged_on and not session.closed:
            logout = session.logout(time.time_ns())
            self._save_outgoing()
            with contextlib.suppress(OSError, RuntimeError):
                writer.write(logout)
                await asyncio.wait_for(writer.drain(), 1.0)
            if self._store is not None:
                await self._await_logout(session)
        if session is not None:
            session.logged_on = False
        self._flush_store(force=True)
        await self._close_transport()
        self._pending = []
        self.connection_status = ConnectionStatus.DISCONNECTED

    async def _await_logout(self, session: codec.FixSession) -> None:
        """Read until the venue's Logout answers ours, so the store knows its number was
        admin: left unknown, the venue's gap-fill of it at the next Logon would read as lost
        data. Records read meanwhile never reach the consumer; the store leaves them to be
        resent (``checkpoint``)."""
        reader = self._reader
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(LOGOUT_WAIT_S):
                while reader is not None and not session.closed:
                    data = await reader.read(READ_SIZE)
                    if not data:
                        break
                    session.receive(data, time.time_ns())

    async def _close_transport(self) -> None:
        writer = self._writer
        self._reader = self._writer = None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError, RuntimeError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
