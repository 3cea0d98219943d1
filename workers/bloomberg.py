"""Bloomberg ``//blp/mktdata`` adapter: a blpapi ``Session`` around ``common.codecs.bloomberg``.

What has been run, and against what:
  Nothing in this file has been run against Bloomberg's real ``blpapi`` package or a real
  Bloomberg server (Desktop API, Server API or B-PIPE). blpapi is not on PyPI and
  Bloomberg's own package index cannot be reached from where this was written.
  Everything was run only against the stand-in in ``simulators/bloomberg.py``: a small
  re-implementation of the blpapi Python calls used below (Session, SessionOptions,
  AuthOptions.createWithApp, SubscriptionList, CorrelationId, Event, Message, Element,
  Name), written from Bloomberg's published Python sources and examples, talking to a
  local server over our own JSON line format. The tests in
  ``tests/test_bloomberg_adapter.py`` exercise that pairing only.
  Not checked against the real library: the exact content of real MarketDataEvents
  messages (which fields arrive on which ticks, MKTDATA_EVENT_TYPE values, the timezone
  of *_UPDATE_STAMP_RT), the reason categories of real failures (``failure_kind``
  guesses from the category and description text), the fields of DataLoss messages,
  and how real ``Session.stop()`` interacts with a pending ``nextEvent`` call. B-PIPE
  TLS (``TlsOptions``) is not implemented. Treat the first real run as a test.

connection_config keys:
  ``blpapi_module``      module to load as blpapi (default ``blpapi``; ``simulators.bloomberg``
                         for the local stand-in)
  ``host``, ``port``     Server API / B-PIPE host and port (default ``localhost``, 8194)
  ``app_name``           B-PIPE application name; authorizes the session identity
                         (``AuthOptions.createWithApp``). Not a secret, so it sits here.
  ``service``            default ``//blp/mktdata``
  ``topic_suffix``       appended to bare tickers: ``AAPL`` -> ``AAPL US Equity``
  ``fields``             list (or comma string) of fields; default by data type
  ``interval_s``         ask for conflated updates every N seconds (``interval=N``)
  ``silence_timeout_s``  no event at all for this long -> ProviderDisconnected (default 60;
                         0 turns it off: a quiet instrument list can be legitimately silent)
  ``start_timeout_s``    session start + service open budget (default 15)
  ``poll_ms``            ``nextEvent`` timeout in the reader thread (default 200)
  ``max_pending_events`` events handed to asyncio and not yet decoded before the reader
                         thread stops taking more from blpapi (default 1000), so blpapi's
                         own queue limits and SlowConsumerWarning apply
  ``max_event_queue_size``  blpapi's ``maxEventQueueSize`` (default: the library's, 10000).
                         Past it blpapi drops data and says so: SlowConsumerWarning (status
                         RATE_LIMITED until SlowConsumerWarningCleared) and DataLoss (a
                         ``gap`` flag on each affected symbol's next record; the count in
                         ``messages_lost``)
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import itertools
import threading
import time
from collections.abc import AsyncIterator, Sequence
from types import ModuleType
from typing import Any

import structlog

from common.codecs import bloomberg as codec
from common.codecs.base import DecodeError
from common.model import ConnectionStatus, QualityFlag, RawMarketData
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

log = structlog.get_logger("feedfleet.bloomberg")

# Waiting events decoded into one batch (see stream_batches).
EVENTS_PER_BATCH = 64
INSTALL_HINT = (
    "blpapi is not on PyPI; install it from Bloomberg's own package index, e.g. "
    "`pip install --index-url=https://blpapi.bloomberg.com/repository/releases/python/simple/ "
    "blpapi` (see https://www.bloomberg.com/professional/support/api-library/), or set "
    'connection_config.blpapi_module to "simulators.bloomberg" to run against the local '
    "stand-in"
)

# One item handed from the reader thread to the event loop.
_Item = tuple[int, list[codec.MessageSnapshot], list[DecodeError]]


class BloombergAdapter(ProviderAdapter):
    provider_type = "bloomberg"

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        cc = config.connection_config
        self.module_name = str(cc.get("blpapi_module") or "blpapi")
        self.host = str(cc.get("host", "localhost"))
        self.port = config.integer("port", 8194)
        self.app_name = str(cc["app_name"]) if cc.get("app_name") else None
        self.service = str(cc.get("service", codec.SERVICE))
        self.topic_suffix = str(cc.get("topic_suffix", codec.DEFAULT_TOPIC_SUFFIX))
        fields = cc.get("fields")
        if isinstance(fields, str):
            fields = [f.strip() for f in fields.split(",") if f.strip()]
        self.fields: list[str] | None = list(fields) if fields else None
        self.interval_s = config.optional_number("interval_s") or None  # 0 or unset: no conflation
        self.silence_timeout_s = config.number("silence_timeout_s", 60.0)
        self.start_timeout_s = config.number("start_timeout_s", 15.0)
        self.poll_ms = config.integer("poll_ms", 200)
        self.max_pending_events = config.integer("max_pending_events", 1000)
        queue_size = config.connection_config.get("max_event_queue_size")
        self.max_event_queue_size = (
            None if queue_size is None else config.integer("max_event_queue_size", 0)
        )
        # Counters the worker can export.
        self.skipped_messages = 0
        self.slow_consumer_warnings = 0
        self.events_dropped = 0  # from SlowConsumerWarningCleared
        self.data_loss_messages = 0
        self.messages_lost = 0  # from DataLoss numMessagesDropped
        self.subscription_failures = 0
        self.field_errors = 0
        self.symbol_errors = self.unavailable  # failed subscriptions, reported for failover
        self._blpapi: ModuleType | None = None
        self._session: Any = None
        self._reader: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: asyncio.Queue[_Item] | None = None
        self._closed_queue: asyncio.Queue[_Item] | None = None
        self._slots: threading.BoundedSemaphore | None = None
        self._event_names: dict[int, str] = {}
        self._cids = itertools.count(1)
        self._cid_by_symbol: dict[str, int] = {}
        self._symbol_by_cid: dict[Any, str] = {}
        self._quotes = codec.QuoteCache()
        self._gap_pending: set[str] = set()

    # ------------------------------------------------------------ connect

    def _load_module(self) -> ModuleType:
        try:
            module = importlib.import_module(self.module_name)
        except ImportError as exc:
            if self.module_name == "blpapi":
                raise ProviderConfigError(
                    f"the blpapi package is not installed or cannot load ({exc}); {INSTALL_HINT}"
                ) from exc
            raise ProviderConfigError(
                f"cannot import blpapi_module {self.module_name!r}: {exc}"
            ) from exc
        for name in ("Session", "SessionOptions", "SubscriptionList", "CorrelationId", "Event"):
            if not hasattr(module, name):
                raise ProviderConfigError(f"{self.module_name} has no {name}; is it blpapi?")
        return module

    async def connect(self) -> None:
        mod = self._blpapi or self._load_module()
        self._blpapi = mod
        self._event_names = {
            value: name
            for name in codec.EVENT_TYPE_NAMES
            if isinstance(value := getattr(mod.Event, name, None), int)
        }
        self.connection_status = ConnectionStatus.CONNECTING
        opts = mod.SessionOptions()
        opts.setServerHost(self.host)
        opts.setServerPort(self.port)
        # The worker owns reconnecting; a library restart would hide drops from it.
        opts.setAutoRestartOnDisconnection(False)
        opts.setNumStartAttempts(1)
        if self.max_event_queue_size is not None:
            if self.max_event_queue_size < 1:
                self.connection_status = ConnectionStatus.ERROR
                raise ProviderConfigError("connection_config.max_event_queue_size must be >= 1")
            opts.setMaxEventQueueSize(self.max_event_queue_size)
        if self.app_name:
            opts.setSessionIdentityOptions(mod.AuthOptions.createWithApp(self.app_name))
        session = mod.Session(opts)
        self._session = session
        self._stop = threading.Event()
        try:
            await asyncio.wait_for(self._start(session), self.start_timeout_s)
        except TimeoutError:
            await self.disconnect()
            raise ProviderDisconnected(
                f"blpapi session to {self.host}:{self.port} did not start within "
                f"{self.start_timeout_s:g}s"
            ) from None
        except ProviderError as exc:
            await self.disconnect()
            self.last_error = str(exc)
            if isinstance(exc, ProviderAuthError | ProviderConfigError):
                self.connection_status = ConnectionStatus.ERROR
            elif isinstance(exc, ProviderRateLimited):
                self.connection_status = ConnectionStatus.RATE_LIMITED
            raise
        except BaseException:
            await self.disconnect()
            raise
        loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._slots = threading.BoundedSemaphore(self.max_pending_events)
        self._reader = threading.Thread(
            target=self._read_events,
            args=(session, loop, self._queue, self._slots, self._stop),
            name=f"blpapi-{self.config.name}",
            daemon=True,
        )
        self._reader.start()
        self.connection_status = ConnectionStatus.CONNECTED
        # A new session knows nothing: new correlation ids, restore what was subscribed.
        self._cid_by_symbol.clear()
        self._symbol_by_cid.clear()
        self._quotes = codec.QuoteCache()
        if self.subscribed:
            await self._subscribe_now(list(self.subscribed.values()))

    async def _start(self, session: Any) -> None:
        started = await asyncio.to_thread(session.start)
        if not started:
            raise self._startup_error(session, codec.SESSION_STARTUP_FAILURE)
        opened = await asyncio.to_thread(session.openService, self.service)
        if not opened:
            raise self._startup_error(session, codec.SERVICE_OPEN_FAILURE)

    def _startup_error(self, session: Any, failure_type: str) -> ProviderError:
        """Find the failure message blpapi queued and turn it into the right error."""
        reason: codec.Reason | None = None
        for _ in range(100):
            event = session.tryNextEvent()
            if event is None:
                break
            snaps, _errors = codec.snapshot_event(event, self._event_name(event))
            for status in codec.decode_messages(snaps, 0, {}, self.config.name).statuses:
                if status.message_type == failure_type and reason is None:
                    reason = status.reason
        what = "session start" if failure_type == codec.SESSION_STARTUP_FAILURE else "openService"
        text = f"blpapi {what} failed ({self.host}:{self.port}): {reason or 'no reason given'}"
        kind = codec.failure_kind(reason)
        log.warning("startup_failure", provider=self.config.name, reason=text, kind=kind)
        if kind == "auth":
            return ProviderAuthError(text)
        if kind == "limit":
            return ProviderRateLimited(text)
        if failure_type == codec.SERVICE_OPEN_FAILURE:
            return ProviderProtocolError(text)
        return ProviderDisconnected(text)

    def _event_name(self, event: Any) -> str:
        try:
            return self._event_names.get(event.eventType(), "UNKNOWN")
        except Exception:
            return "UNKNOWN"

    # ------------------------------------------------------------ the reader thread

    def _read_events(
        self,
        session: Any,
        loop: asyncio.AbstractEventLoop,
        out: asyncio.Queue[_Item],
        slots: threading.BoundedSemaphore,
        stop: threading.Event,
    ) -> None:
        """Pull events from blpapi (blocking) and hand copies to the event loop."""
        while not stop.is_set():
            try:
                event = session.nextEvent(self.poll_ms)
            except Exception as exc:  # the session is gone; say so and end
                error = DecodeError(f"nextEvent failed: {exc!r}", "")
                item: _Item = (time.time_ns(), [_terminated(str(exc))], [error])
                self._hand_over(loop, out, slots, stop, item)
                return
            name = self._event_name(event)
            if name == "TIMEOUT":
                continue
            receive_ns = time.time_ns()
            snaps, errors = codec.snapshot_event(event, name)
            if not self._hand_over(loop, out, slots, stop, (receive_ns, snaps, errors)):
                return
            if name == "SESSION_STATUS" and any(
                s.message_type == codec.SESSION_TERMINATED for s in snaps
            ):
                return

    @staticmethod
    def _hand_over(
        loop: asyncio.AbstractEventLoop,
        out: asyncio.Queue[_Item],
        slots: threading.BoundedSemaphore,
        stop: threading.Event,
        item: _Item,
    ) -> bool:
        # Wait for room instead of queueing without bound: while we wait, events pile up
        # inside blpapi, whose own limits and SlowConsumerWarning then apply.
        while not slots.acquire(timeout=0.2):
            if stop.is_set():
                return False
        try:
            loop.call_soon_threadsafe(out.put_nowait, item)
        except RuntimeError:  # the loop is closed
            return False
        return True

    # ------------------------------------------------------------ subscriptions

    async def subscribe(self, instruments: Sequence[Instrument]) -> None:
        for inst in instruments:
            self.subscribed[inst.symbol] = inst
        if self._session is not None and self._queue is not None:
            await self._subscribe_now(instruments)

    async def unsubscribe(self, instruments: Sequence[Instrument]) -> None:
        for inst in instruments:
            self.subscribed.pop(inst.symbol, None)
            self._gap_pending.discard(inst.symbol)
            self._quotes.sides.pop(inst.symbol, None)
        if self._session is not None and self._queue is not None:
            await self._cancel([i.symbol for i in instruments])

    async def _subscribe_now(self, instruments: Sequence[Instrument]) -> None:
        mod, session = self._blpapi, self._session
        assert mod is not None
        # A symbol subscribed again (other data types) replaces its old subscription.
        await self._cancel([i.symbol for i in instruments if i.symbol in self._cid_by_symbol])
        subs = mod.SubscriptionList()
        options = codec.subscription_options(self.interval_s)
        for inst in instruments:
            cid = next(self._cids)  # never reused within a process, as blpapi advises
            self._cid_by_symbol[inst.symbol] = cid
            self._symbol_by_cid[cid] = inst.symbol
            fields = self.fields or codec.fields_for(inst.data_types)
            topic = codec.topic_for(inst.symbol, self.topic_suffix)
            subs.add(topic, fields, options, mod.CorrelationId(cid))
        try:
            await asyncio.to_thread(session.subscribe, subs)
        except Exception as exc:
            raise ProviderProtocolError(f"blpapi subscribe failed: {exc!r}") from exc

    async def _cancel(self, symbols: list[str]) -> None:
        mod, session = self._blpapi, self._session
        assert mod is not None
        subs = mod.SubscriptionList()
        for symbol in symbols:
            cid = self._cid_by_symbol.pop(symbol, None)
            if cid is not None:
                # Kept in _symbol_by_cid: events already handed over may still name it.
                subs.add("", None, None, mod.CorrelationId(cid))
        if subs.size():
            try:
                await asyncio.to_thread(session.unsubscribe, subs)
            except Exception as exc:
                raise ProviderProtocolError(f"blpapi unsubscribe failed: {exc!r}") from exc

    # ------------------------------------------------------------ streaming

    async def stream_batches(self) -> AsyncIterator[list[RawMarketData]]:
        queue, slots = self._queue, self._slots
        if queue is None or slots is None:
            raise ProviderDisconnected("not connected")
        name = self.config.name
        silence = self.silence_timeout_s
        # An event with status messages taken while filling a batch: it starts the next
        # one, so the session sees the status each record arrived under.
        carried: tuple[codec.DecodedEvent, list[DecodeError]] | None = None
        while True:
            if carried is None:
                try:
                    if silence > 0:
                        item = await asyncio.wait_for(queue.get(), silence)
                    else:
                        item = await queue.get()
                except TimeoutError:
                    self.connection_status = ConnectionStatus.DISCONNECTED
                    self.last_error = f"no events from blpapi for {silence:g}s"
                    raise ProviderDisconnected(self.last_error) from None
                carried = self._decode(item, slots)
            records: list[RawMarketData] = []
            ended: ProviderError | None = None
            taken = 0
            while carried is not None:
                decoded, errors = carried
                carried = None
                if errors:
                    self.decode_errors += len(errors)
                    for err in errors[:3]:
                        log.warning("decode_error", provider=name, reason=err.reason, raw=err.raw)
                self.skipped_messages += decoded.skipped
                for status in decoded.statuses:
                    ended = self._on_status(status) or ended
                if self._gap_pending and decoded.records:
                    self._flag_gaps(decoded.records)
                records += decoded.records
                taken += 1
                # Events already waiting join this batch, so a reader that fell behind
                # pays the per-batch costs once for several and catches up.
                if ended is not None or taken == EVENTS_PER_BATCH or queue.empty():
                    break
                carried = self._decode(queue.get_nowait(), slots)
                if carried[0].statuses:
                    break
            if records:
                yield records
            if ended is not None:
                raise ended

    def _decode(
        self, item: _Item, slots: threading.BoundedSemaphore | None
    ) -> tuple[codec.DecodedEvent, list[DecodeError]]:
        receive_ns, snaps, errors = item
        if slots is not None:
            with contextlib.suppress(ValueError):  # disconnect()'s wake-up took no slot
                slots.release()
        if self.tap is not None and snaps:
            line = codec.encode_event_line(snaps[0].event_type, snaps)
            self.tap.record(FrameKind.BLPAPI_EVENT, line, receive_ns)
        decoded = codec.decode_messages(
            snaps, receive_ns, self._symbol_by_cid, self.config.name, self._quotes
        )
        return decoded, errors + decoded.errors

    def queue_depth(self) -> int:
        """blpapi events handed to the event loop and not yet decoded."""
        queue = self._queue or self._closed_queue
        return queue.qsize() if queue is not None else 0

    def take_queued(self) -> list[RawMarketData]:
        """The records in the events handed over before ``disconnect`` and not yet read
        (their status messages are of a session that is over, so not acted on)."""
        queue, self._closed_queue = self._closed_queue, None
        records: list[RawMarketData] = []
        while queue is not None and not queue.empty():
            decoded, errors = self._decode(queue.get_nowait(), None)
            self.decode_errors += len(errors)
            records += decoded.records
        if self._gap_pending and records:
            self._flag_gaps(records)
        return records

    def _flag_gaps(self, records: list[RawMarketData]) -> None:
        pending = self._gap_pending
        for record in records:
            if record.symbol in pending:
                record.quality_flags.append(QualityFlag.GAP)
                pending.discard(record.symbol)

    def _on_status(self, status: codec.StatusMessage) -> ProviderError | None:
        """Act on one status message; returns the error that ends the stream, if any."""
        name = self.config.name
        kind = status.message_type
        reason = str(status.reason) if status.reason else None
        if kind in (codec.SESSION_TERMINATED, codec.SESSION_STARTUP_FAILURE):
            self.connection_status = ConnectionStatus.DISCONNECTED
            self.last_error = f"blpapi {kind}: {reason or 'no reason given'}"
            log.warning("session_terminated", provider=name, message=kind, reason=reason)
            return ProviderDisconnected(self.last_error)
        if kind == codec.SESSION_CONNECTION_DOWN:
            # With auto-restart off, SessionTerminated follows; until then we are not live.
            self.connection_status = ConnectionStatus.CONNECTING
            log.warning("connection_down", provider=name, details=status.details)
        elif kind == codec.SESSION_CONNECTION_UP:
            if self.connection_status is ConnectionStatus.CONNECTING and self._queue is not None:
                self.connection_status = ConnectionStatus.CONNECTED
            log.info("connection_up", provider=name, details=status.details)
        elif kind in (codec.SUBSCRIPTION_FAILURE, codec.SUBSCRIPTION_TERMINATED):
            self.subscription_failures += 1
            for symbol in status.symbols or ["?"]:
                self.symbol_errors[symbol] = f"{kind}: {reason or 'no reason given'}"
            log.warning("subscription_failed", provider=name, message=kind,
                        symbols=status.symbols, reason=reason)  # fmt: skip
        elif kind == codec.SUBSCRIPTION_STARTED:
            for symbol in status.symbols:
                self.symbol_errors.pop(symbol, None)
            exceptions = status.details.get("exceptions") or []
            if exceptions:
                self.field_errors += len(exceptions)
                log.warning("field_exceptions", provider=name, symbols=status.symbols,
                            exceptions=exceptions)  # fmt: skip
        elif kind == codec.SLOW_CONSUMER_WARNING:
            self.slow_consumer_warnings += 1
            self.connection_status = ConnectionStatus.RATE_LIMITED
            self.last_error = "blpapi SlowConsumerWarning: events are queueing; data may be lost"
            log.warning("slow_consumer", provider=name)
        elif kind == codec.SLOW_CONSUMER_WARNING_CLEARED:
            dropped = status.details.get("eventsDropped")
            if type(dropped) is int:
                self.events_dropped += dropped
            if self.connection_status is ConnectionStatus.RATE_LIMITED:
                self.connection_status = ConnectionStatus.CONNECTED
            self.last_error = f"blpapi SlowConsumerWarningCleared (events dropped: {dropped})"
            log.info("slow_consumer_cleared", provider=name, events_dropped=dropped)
        elif kind == codec.DATA_LOSS:
            self.data_loss_messages += 1
            lost = status.details.get("numMessagesDropped")
            if type(lost) is int:
                self.messages_lost += lost
            # Without a subscription named, any subscribed symbol may have lost data.
            self._gap_pending.update(status.symbols or self._cid_by_symbol.keys())
            log.warning("data_loss", provider=name, symbols=status.symbols, dropped=lost)
        else:
            log.info("blpapi_status", provider=name, event_type=status.event_type, message=kind,
                     symbols=status.symbols, reason=reason)  # fmt: skip
        return None

    # ------------------------------------------------------------ disconnect

    async def disconnect(self) -> None:
        session, reader, queue = self._session, self._reader, self._queue
        self._session = self._reader = None
        self._queue = self._slots = None
        # Kept for take_queued: events already handed over are not dropped with the session.
        self._closed_queue = queue
        self._stop.set()
        if queue is not None:
            # Wake a stream_batches() still waiting on this connection.
            queue.put_nowait((time.time_ns(), [_terminated("disconnected by the worker")], []))
        if session is not None:
            try:
                await asyncio.to_thread(session.stop)
            except Exception as exc:
                log.warning("session_stop_failed", provider=self.config.name, error=repr(exc))
        if reader is not None:
            await asyncio.to_thread(reader.join, 5.0)
        self.connection_status = ConnectionStatus.DISCONNECTED


def _terminated(description: str) -> codec.MessageSnapshot:
    """A SessionTerminated of our own, for when blpapi itself fails under the reader."""
    return codec.status_message(
        "SESSION_STATUS",
        codec.SESSION_TERMINATED,
        {"reason": codec.reason_dict("IO_ERROR", description, source="adapter")},
    )
