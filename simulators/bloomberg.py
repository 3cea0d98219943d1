"""A stand-in for Bloomberg's ``blpapi`` package, and the server it talks to.

blpapi is not on PyPI and its wire protocol is proprietary, so nothing here speaks
Bloomberg's protocol. This module has two halves:

- module-level ``Session``, ``SessionOptions``, ``AuthOptions``, ``SubscriptionList``,
  ``CorrelationId``, ``Event``, ``Message``, ``Element``, ``Name`` and ``Names``: the part
  of blpapi's documented Python API that ``workers/bloomberg.py`` uses, with the same
  names and signatures. The adapter loads it instead of ``blpapi`` when its
  ``connection_config`` says ``"blpapi_module": "simulators.bloomberg"``. Like the real
  library it is thread-based: a reader thread per session fills an event queue that
  ``Session.nextEvent`` drains.
- ``BloombergSimulator``: an asyncio TCP server the stand-in session connects to. It
  answers session start, ``openService`` and subscriptions, and streams
  ``MarketDataEvents`` from a ``PriceWalk``. Between the two halves travel JSON lines of
  message snapshots (``common.codecs.bloomberg``), our own format.

Only synchronous sessions (``nextEvent``) are implemented; no keep-alive pings, TLS,
request/response services or schema introspection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import queue
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from common.codecs import bloomberg as codec
from common.codecs.base import CodecError, DecodeError
from simulators.market import (
    Faults,
    Pacer,
    PriceWalk,
    SentFile,
    SentLog,
    harness_args,
    run_simulator,
    serve_until_stopped,
    simulator_arg_parser,
    symbols_from_args,
)

# ====================================================================== the library half


class BlpapiError(Exception):
    """Base of the stand-in's errors (``blpapi.Exception`` in the real package)."""


class NotFoundException(BlpapiError):
    pass


class InvalidConversionException(BlpapiError):
    pass


class InvalidStateException(BlpapiError):
    pass


class InvalidArgumentException(BlpapiError):
    pass


class DuplicateCorrelationIdException(BlpapiError):
    pass


class UnsupportedOperationException(BlpapiError):
    pass


class Name:
    """An interned string in blpapi; here a plain wrapper that compares equal to ``str``."""

    __slots__ = ("_text",)

    def __init__(self, nameString: str) -> None:
        self._text = str(nameString)

    def __str__(self) -> str:
        return self._text

    def __repr__(self) -> str:
        return f"Name({self._text!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Name):
            return self._text == other._text
        if isinstance(other, str):
            return self._text == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._text)


class Names:
    SLOW_CONSUMER_WARNING = Name(codec.SLOW_CONSUMER_WARNING)
    SLOW_CONSUMER_WARNING_CLEARED = Name(codec.SLOW_CONSUMER_WARNING_CLEARED)
    DATA_LOSS = Name(codec.DATA_LOSS)
    SUBSCRIPTION_TERMINATED = Name(codec.SUBSCRIPTION_TERMINATED)
    SUBSCRIPTION_STARTED = Name(codec.SUBSCRIPTION_STARTED)
    SUBSCRIPTION_FAILURE = Name(codec.SUBSCRIPTION_FAILURE)
    SESSION_STARTED = Name(codec.SESSION_STARTED)
    SESSION_TERMINATED = Name(codec.SESSION_TERMINATED)
    SESSION_STARTUP_FAILURE = Name(codec.SESSION_STARTUP_FAILURE)
    SESSION_CONNECTION_UP = Name(codec.SESSION_CONNECTION_UP)
    SESSION_CONNECTION_DOWN = Name(codec.SESSION_CONNECTION_DOWN)
    SERVICE_OPENED = Name(codec.SERVICE_OPENED)
    SERVICE_OPEN_FAILURE = Name(codec.SERVICE_OPEN_FAILURE)


class CorrelationId:
    """``CorrelationId()``, ``CorrelationId(42)`` or ``CorrelationId(obj)``.

    As in blpapi, integer ids compare by value and object ids by identity of the object.
    """

    UNSET_TYPE = 0
    INT_TYPE = 1
    OBJECT_TYPE = 2
    AUTOGEN_TYPE = 3
    _autogen = itertools.count(1)

    def __init__(self, *args: Any) -> None:
        if not args:
            self._type, self._value = self.UNSET_TYPE, None
        elif isinstance(args[0], int) and not isinstance(args[0], bool):
            self._type, self._value = self.INT_TYPE, args[0]
        else:
            self._type, self._value = self.OBJECT_TYPE, args[0]
        self._class_id = args[1] if len(args) > 1 and isinstance(args[1], int) else 0

    @classmethod
    def _generated(cls) -> CorrelationId:
        cid = cls(next(cls._autogen))
        cid._type = cls.AUTOGEN_TYPE
        return cid

    def type(self) -> int:
        return self._type

    def classId(self) -> int:
        return self._class_id

    def value(self) -> Any:
        return self._value

    def _key(self) -> tuple[int, int, Any]:
        value = id(self._value) if self._type == self.OBJECT_TYPE else self._value
        return (self._type, self._class_id, value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CorrelationId):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"CorrelationId({self._value!r})"


class Element:
    """A node of a message: a sequence (dict), an array (list) or a scalar."""

    def __init__(self, name: Name, value: Any) -> None:
        self._name = name
        self._value = value

    def name(self) -> Name:
        return self._name

    def isComplexType(self) -> bool:
        return isinstance(self._value, dict)

    def isArray(self) -> bool:
        return isinstance(self._value, list)

    def isNull(self) -> bool:
        return self._value is None

    def numValues(self) -> int:
        if isinstance(self._value, list):
            return len(self._value)
        return 0 if self._value is None or isinstance(self._value, dict) else 1

    def numElements(self) -> int:
        return len(self._value) if isinstance(self._value, dict) else 0

    def elements(self) -> Iterator[Element]:
        if not isinstance(self._value, dict):
            raise UnsupportedOperationException(f"{self._name} is not a sequence")
        return (Element(Name(k), v) for k, v in self._value.items())

    def hasElement(self, name: Name | str, excludeNullElements: bool = False) -> bool:
        if not isinstance(self._value, dict) or str(name) not in self._value:
            return False
        return not (excludeNullElements and self._value[str(name)] is None)

    def getElement(self, name: Name | str) -> Element:
        if not isinstance(self._value, dict) or str(name) not in self._value:
            raise NotFoundException(f"{self._name} has no element {name}")
        return Element(Name(str(name)), self._value[str(name)])

    def getValue(self, index: int = 0) -> Any:
        if isinstance(self._value, list):
            try:
                item = self._value[index]
            except IndexError as exc:
                raise NotFoundException(f"{self._name} has no value {index}") from exc
            return Element(self._name, item) if isinstance(item, dict) else item
        if index != 0 or self._value is None or isinstance(self._value, dict):
            raise NotFoundException(f"{self._name} has no value {index}")
        return self._value

    def getValueAsFloat(self, index: int = 0) -> float:
        v = self.getValue(index)
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise InvalidConversionException(f"{self._name}: {v!r} is not a number")
        return float(v)

    def getValueAsInteger(self, index: int = 0) -> int:
        v = self.getValue(index)
        if isinstance(v, bool) or not isinstance(v, int):
            raise InvalidConversionException(f"{self._name}: {v!r} is not an integer")
        return v

    def getValueAsBool(self, index: int = 0) -> bool:
        v = self.getValue(index)
        if not isinstance(v, bool):
            raise InvalidConversionException(f"{self._name}: {v!r} is not a bool")
        return v

    def getValueAsString(self, index: int = 0) -> str:
        v = self.getValue(index)
        if isinstance(v, Element):
            raise InvalidConversionException(f"{self._name} is a sequence")
        return v.isoformat() if isinstance(v, dt.date | dt.time) else str(v)

    def getValueAsDatetime(self, index: int = 0) -> dt.datetime | dt.date | dt.time:
        v = self.getValue(index)
        if not isinstance(v, dt.date | dt.time):
            raise InvalidConversionException(f"{self._name}: {v!r} is not a datetime")
        return v

    def getValueAsElement(self, index: int = 0) -> Element:
        v = self.getValue(index)
        if not isinstance(v, Element):
            raise InvalidConversionException(f"{self._name}: value {index} is not a sequence")
        return v

    def getElementAsFloat(self, name: Name | str) -> float:
        return self.getElement(name).getValueAsFloat()

    def getElementAsInteger(self, name: Name | str) -> int:
        return self.getElement(name).getValueAsInteger()

    def getElementAsBool(self, name: Name | str) -> bool:
        return self.getElement(name).getValueAsBool()

    def getElementAsString(self, name: Name | str) -> str:
        return self.getElement(name).getValueAsString()

    def getElementAsDatetime(self, name: Name | str) -> dt.datetime | dt.date | dt.time:
        return self.getElement(name).getValueAsDatetime()

    def toPy(self) -> Any:
        return _copy(self._value)

    def __str__(self) -> str:
        return f"{self._name} = {self._value!r}"


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


class Message:
    RECAPTYPE_NONE = 0
    RECAPTYPE_SOLICITED = 1
    RECAPTYPE_UNSOLICITED = 2

    def __init__(
        self, messageType: Name, correlationIds: list[CorrelationId], content: Any,
        recapType: int = 0, topic: str = "",
    ) -> None:  # fmt: skip
        self._type = messageType
        self._cids = correlationIds
        self._content = Element(messageType, content)
        self._recap = recapType
        self._topic = topic

    def messageType(self) -> Name:
        return self._type

    def correlationIds(self) -> list[CorrelationId]:
        return list(self._cids)

    def correlationId(self) -> CorrelationId | None:
        return self._cids[0] if self._cids else None

    def recapType(self) -> int:
        return self._recap

    def topicName(self) -> str:
        return self._topic

    def asElement(self) -> Element:
        return self._content

    def hasElement(self, name: Name | str, excludeNullElements: bool = False) -> bool:
        return self._content.hasElement(name, excludeNullElements)

    def numElements(self) -> int:
        return self._content.numElements()

    def getElement(self, name: Name | str) -> Element:
        return self._content.getElement(name)

    def getElementAsFloat(self, name: Name | str) -> float:
        return self._content.getElementAsFloat(name)

    def getElementAsInteger(self, name: Name | str) -> int:
        return self._content.getElementAsInteger(name)

    def getElementAsBool(self, name: Name | str) -> bool:
        return self._content.getElementAsBool(name)

    def getElementAsString(self, name: Name | str) -> str:
        return self._content.getElementAsString(name)

    def getElementAsDatetime(self, name: Name | str) -> dt.datetime | dt.date | dt.time:
        return self._content.getElementAsDatetime(name)

    def toPy(self) -> Any:
        return self._content.toPy()

    def __str__(self) -> str:
        return f"{self._type} {self._content.toPy()!r}"


class Event:
    # The values of blpapi's BLPAPI_EVENTTYPE_* constants.
    ADMIN = 1
    SESSION_STATUS = 2
    SUBSCRIPTION_STATUS = 3
    REQUEST_STATUS = 4
    RESPONSE = 5
    PARTIAL_RESPONSE = 6
    SUBSCRIPTION_DATA = 8
    SERVICE_STATUS = 9
    TIMEOUT = 10
    AUTHORIZATION_STATUS = 11
    RESOLUTION_STATUS = 12
    TOPIC_STATUS = 13
    TOKEN_STATUS = 14
    REQUEST = 15
    UNKNOWN = -1

    def __init__(self, eventType: int, messages: list[Message]) -> None:
        self._type = eventType
        self._messages = messages

    def eventType(self) -> int:
        return self._type

    def __iter__(self) -> Iterator[Message]:
        return iter(self._messages)


def _event_type_value(name: str) -> int:
    value = getattr(Event, name, Event.UNKNOWN)
    return value if isinstance(value, int) else Event.UNKNOWN


class AuthOptions:
    """Only application mode (``createWithApp``) and token mode are modelled."""

    def __init__(self, appName: str | None = None, token: str | None = None) -> None:
        self._app = appName
        self._token = token

    @classmethod
    def createWithApp(cls, appName: str) -> AuthOptions:
        return cls(appName=appName)

    @classmethod
    def createWithToken(cls, token: str) -> AuthOptions:
        return cls(token=token)


class SessionOptions:
    def __init__(self) -> None:
        self._host = "127.0.0.1"
        self._port = 8194
        self._connect_timeout_ms = 5000
        self._auth: AuthOptions | None = None
        self._auto_restart = False
        self._num_start_attempts = 1
        self._keepalive_inactivity_ms = 20_000
        self._keepalive_response_ms = 5_000
        self._max_event_queue_size = 10_000
        self._slow_hi = 0.75  # fractions of the queue size, blpapi's defaults
        self._slow_lo = 0.5
        self._service = codec.SERVICE

    def setServerHost(self, serverHost: str) -> None:
        self._host = serverHost

    def setServerPort(self, serverPort: int) -> None:
        if not 1 <= int(serverPort) <= 65535:
            raise InvalidArgumentException(f"bad port {serverPort}")
        self._port = int(serverPort)

    def serverHost(self) -> str:
        return self._host

    def serverPort(self) -> int:
        return self._port

    def setConnectTimeout(self, timeoutMilliSeconds: int) -> None:
        self._connect_timeout_ms = int(timeoutMilliSeconds)

    def connectTimeout(self) -> int:
        return self._connect_timeout_ms

    def setSessionIdentityOptions(
        self, authOptions: AuthOptions | None, correlationId: CorrelationId | None = None
    ) -> CorrelationId:
        self._auth = authOptions
        return correlationId or CorrelationId._generated()

    def setAutoRestartOnDisconnection(self, autoRestart: bool) -> None:
        self._auto_restart = bool(autoRestart)  # recorded only: the stand-in never restarts

    def setNumStartAttempts(self, numStartAttempts: int) -> None:
        self._num_start_attempts = int(numStartAttempts)

    def setDefaultKeepAliveInactivityTime(self, inactivityMsecs: int) -> None:
        self._keepalive_inactivity_ms = int(inactivityMsecs)  # recorded only

    def setDefaultKeepAliveResponseTimeout(self, timeoutMsecs: int) -> None:
        self._keepalive_response_ms = int(timeoutMsecs)  # recorded only

    def setMaxEventQueueSize(self, eventQueueSize: int) -> None:
        if int(eventQueueSize) < 1:
            raise InvalidArgumentException(f"bad event queue size {eventQueueSize}")
        self._max_event_queue_size = int(eventQueueSize)

    def maxEventQueueSize(self) -> int:
        return self._max_event_queue_size

    def setSlowConsumerWarningHiWaterMark(self, hiWaterMark: float) -> None:
        if not self._slow_lo < float(hiWaterMark) <= 1.0:
            raise InvalidArgumentException(f"bad high water mark {hiWaterMark}")
        self._slow_hi = float(hiWaterMark)

    def setSlowConsumerWarningLoWaterMark(self, loWaterMark: float) -> None:
        if not 0.0 <= float(loWaterMark) < self._slow_hi:
            raise InvalidArgumentException(f"bad low water mark {loWaterMark}")
        self._slow_lo = float(loWaterMark)

    def slowConsumerWarningHiWaterMark(self) -> float:
        return self._slow_hi

    def slowConsumerWarningLoWaterMark(self) -> float:
        return self._slow_lo

    def setDefaultSubscriptionService(self, defaultSubscriptionService: str) -> None:
        self._service = defaultSubscriptionService


class SubscriptionList:
    def __init__(self) -> None:
        self._entries: list[tuple[str, CorrelationId]] = []

    def add(
        self,
        topic: str | None,
        fields: str | list[str] | None = None,
        options: str | list[str] | dict[str, Any] | None = None,
        correlationId: CorrelationId | None = None,
    ) -> int:
        # Builds the same "topic?fields=a,b&interval=2" string as blpapi's add().
        text = topic or ""
        field_text = fields if isinstance(fields, str) else ",".join(fields or [])
        if field_text:
            text += "?fields=" + field_text
        if isinstance(options, dict):
            option_text = "&".join(k if v is None else f"{k}={v}" for k, v in options.items())
        elif isinstance(options, list):
            option_text = "&".join(options)
        else:
            option_text = options or ""
        if option_text:
            text += ("&" if field_text else "?") + option_text
        self._entries.append((text, correlationId or CorrelationId()))
        return 0

    def size(self) -> int:
        return len(self._entries)

    def correlationIdAt(self, index: int) -> CorrelationId:
        return self._entries[index][1]

    def topicStringAt(self, index: int) -> str:
        return self._entries[index][0]

    def clear(self) -> int:
        self._entries.clear()
        return 0


class Session:
    """A synchronous consumer session over the stand-in's TCP line protocol.

    Its event queue is bounded as blpapi's is (``maxEventQueueSize``): at the high water
    mark an ADMIN ``SlowConsumerWarning`` is queued; when the queue is full, data events are
    dropped and counted per subscription; the first data event with room again is preceded
    by one ADMIN ``DataLoss`` per subscription that lost messages (``numMessagesDropped``);
    once the application has drained the queue to the low water mark,
    ``SlowConsumerWarningCleared`` says how many events were dropped (``eventsDropped``).
    Status events are never dropped.
    """

    def __init__(
        self,
        options: SessionOptions | None = None,
        eventHandler: Any = None,
        eventDispatcher: Any = None,
    ) -> None:
        if eventHandler is not None or eventDispatcher is not None:
            raise UnsupportedOperationException("the stand-in implements nextEvent() only")
        self._options = options or SessionOptions()
        self._events: queue.Queue[Event] = queue.Queue()
        opts = self._options
        self._queue_max = opts.maxEventQueueSize()
        self._queue_hi = max(1, int(self._queue_max * opts.slowConsumerWarningHiWaterMark()))
        self._queue_lo = int(self._queue_max * opts.slowConsumerWarningLoWaterMark())
        self._queue_lock = threading.Lock()
        self._slow = False  # SlowConsumerWarning sent, not yet cleared
        self._events_dropped = 0  # since the last SlowConsumerWarningCleared
        # Messages dropped per subscription, not yet reported by a DataLoss.
        self._lost: dict[CorrelationId, tuple[str, int]] = {}
        self._sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._send_lock = threading.Lock()
        self._state = "new"  # new -> starting -> started -> stopped
        self._started = threading.Event()
        self._start_ok = False
        self._wire_ids = itertools.count(1)
        # wire id -> the application's CorrelationId (subscriptions and service requests)
        self._cids: dict[int, CorrelationId] = {}
        self._waiters: dict[int, tuple[threading.Event, list[bool]]] = {}
        self._lock = threading.Lock()

    # -- lifecycle

    def start(self) -> bool:
        if self._state != "new":
            raise InvalidStateException("a session can be started only once")
        self._state = "starting"
        opts = self._options
        address = f"{opts.serverHost()}:{opts.serverPort()}"
        try:
            sock = socket.create_connection(
                (opts.serverHost(), opts.serverPort()), timeout=opts.connectTimeout() / 1000
            )
        except OSError as exc:
            self._state = "stopped"
            self._post_failure("IO_ERROR", f"failed to connect to {address}: {exc}")
            return False
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._push_status(
            "SESSION_STATUS",
            codec.SESSION_CONNECTION_UP,
            {"server": address, "serverId": "stand-in", "encryptionStatus": "Clear",
             "compressionStatus": "Uncompressed"},
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read_loop, name="blpapi-standin", daemon=True)
        self._reader.start()
        auth = opts._auth
        if not self._send("start", app=auth._app if auth else None):
            return False
        if not self._started.wait(opts.connectTimeout() / 1000):
            self._post_failure("TIMEOUT", "no answer from the server during session start")
            self._close_socket()
            self._state = "stopped"
            return False
        if not self._start_ok:
            self._close_socket()
        return self._start_ok

    def stop(self) -> bool:
        was_started = self._state == "started"
        self._state = "stopped"
        self._close_socket()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(5)
        if was_started:
            self._push_status(
                "SESSION_STATUS",
                codec.SESSION_TERMINATED,
                {"reason": codec.reason_dict("CANCELED", "Session stopped by application")},
            )
        return True

    def stopAsync(self) -> bool:
        return self.stop()

    # -- events

    def nextEvent(self, timeout: int = 0) -> Event:
        try:
            event = self._events.get(timeout=timeout / 1000 if timeout > 0 else None)
        except queue.Empty:
            return Event(Event.TIMEOUT, [])
        self._taken()
        return event

    def tryNextEvent(self) -> Event | None:
        try:
            event = self._events.get_nowait()
        except queue.Empty:
            return None
        self._taken()
        return event

    # -- services and subscriptions

    def openService(self, serviceName: str) -> bool:
        if self._state != "started":
            raise InvalidStateException("session is not started")
        wire = next(self._wire_ids)
        done, result = threading.Event(), [False]
        with self._lock:
            self._cids[wire] = CorrelationId._generated()
            self._waiters[wire] = (done, result)
        if not self._send("openService", service=serviceName, id=wire):
            return False
        done.wait(self._options.connectTimeout() / 1000)
        with self._lock:
            self._waiters.pop(wire, None)
        return result[0]

    def subscribe(
        self,
        subscriptionList: SubscriptionList,
        identity: Any = None,
        requestLabel: str | None = None,
        mode: Any = None,
    ) -> None:
        if self._state != "started":
            raise InvalidStateException("session is not started")
        subs = []
        with self._lock:
            active = set(self._cids.values())
            for i in range(subscriptionList.size()):
                cid = subscriptionList.correlationIdAt(i)
                if cid.type() == CorrelationId.UNSET_TYPE:
                    cid = CorrelationId._generated()
                    subscriptionList._entries[i] = (subscriptionList.topicStringAt(i), cid)
                elif cid in active:
                    raise DuplicateCorrelationIdException(f"{cid!r} is already in use")
                wire = next(self._wire_ids)
                self._cids[wire] = cid
                active.add(cid)
                subs.append({"id": wire, "string": subscriptionList.topicStringAt(i)})
        self._send("subscribe", subscriptions=subs)

    def unsubscribe(self, subscriptionList: SubscriptionList) -> None:
        wanted = {subscriptionList.correlationIdAt(i) for i in range(subscriptionList.size())}
        with self._lock:
            wires = [w for w, cid in self._cids.items() if cid in wanted]
            for w in wires:
                del self._cids[w]
        if wires and self._state == "started":
            self._send("unsubscribe", ids=wires)

    # -- internals

    def _send(self, op: str, **args: Any) -> bool:
        sock = self._sock
        if sock is None:
            return False
        try:
            with self._send_lock:
                sock.sendall(codec.encode_request_line(op, **args))
        except OSError:
            return False
        return True

    def _close_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _push_status(self, event_type: str, message_type: str, content: dict[str, Any]) -> None:
        msg = Message(Name(message_type), [], content)
        self._events.put(Event(_event_type_value(event_type), [msg]))

    def _post_failure(self, category: str, description: str) -> None:
        self._push_status(
            "SESSION_STATUS",
            codec.SESSION_STARTUP_FAILURE,
            {"reason": codec.reason_dict(category, description, source="stand-in library")},
        )
        self._started.set()

    def _read_loop(self) -> None:
        sock = self._sock
        if sock is None:
            return
        reader = sock.makefile("rb")
        try:
            for line in reader:
                wire = codec.decode_event_line(line)
                if isinstance(wire, DecodeError):
                    continue  # the real library never hands undecodable bytes to the app
                event = self._to_event(wire)
                if event is not None:
                    self._queue_event(event)
        except (OSError, ValueError):
            pass
        finally:
            with contextlib.suppress(OSError):
                reader.close()
            self._close_socket()
        if self._state == "stopped":
            return
        if self._state == "starting":
            # The server went away before answering start.
            self._state = "stopped"
            self._post_failure("IO_ERROR", "connection closed during session start")
            return
        self._state = "stopped"
        opts = self._options
        address = f"{opts.serverHost()}:{opts.serverPort()}"
        self._push_status(
            "SESSION_STATUS",
            codec.SESSION_CONNECTION_DOWN,
            {"server": address, "serverId": "stand-in"},
        )
        self._push_status(
            "SESSION_STATUS",
            codec.SESSION_TERMINATED,
            {"reason": codec.reason_dict("IO_ERROR", f"connection to {address} lost")},
        )

    def _queue_event(self, event: Event) -> None:
        """Queue an event read from the server, as blpapi's bounded queue does."""
        if event.eventType() != Event.SUBSCRIPTION_DATA:
            self._events.put(event)
            return
        with self._queue_lock:
            size = self._events.qsize()
            if size >= self._queue_max:
                self._events_dropped += 1
                for msg in event:
                    for cid in msg.correlationIds():
                        topic, count = self._lost.get(cid, (msg.topicName(), 0))
                        self._lost[cid] = (topic, count + 1)
                return
            self._report_losses()
            if not self._slow and size + 1 >= self._queue_hi:
                self._slow = True
                warning = Message(Name(codec.SLOW_CONSUMER_WARNING), [], {})
                self._events.put(Event(Event.ADMIN, [warning]))
            self._events.put(event)

    def _report_losses(self) -> None:
        """One DataLoss per subscription that lost messages (the caller holds the lock)."""
        if self._lost:
            losses = [
                Message(Name(codec.DATA_LOSS), [cid],
                        {"id": str(cid.value()), "source": topic, "numMessagesDropped": n})
                for cid, (topic, n) in self._lost.items()
            ]  # fmt: skip
            self._lost = {}
            self._events.put(Event(Event.ADMIN, losses))

    def _taken(self) -> None:
        """The application took an event: once the queue has drained to the low water
        mark, report what was lost (if no data event did so) and clear the warning."""
        if not self._slow or self._events.qsize() > self._queue_lo:
            return
        with self._queue_lock:
            if not self._slow:
                return
            self._slow = False
            self._report_losses()
            dropped, self._events_dropped = self._events_dropped, 0
            cleared = Message(
                Name(codec.SLOW_CONSUMER_WARNING_CLEARED), [], {"eventsDropped": dropped}
            )
            self._events.put(Event(Event.ADMIN, [cleared]))

    def _to_event(self, wire: codec.WireEvent) -> Event | None:
        messages: list[Message] = []
        for snap in wire.messages:
            cids: list[CorrelationId] = []
            with self._lock:
                for wid in snap.correlation_ids:
                    cid = self._cids.get(wid) if isinstance(wid, int) else None
                    if cid is not None:
                        cids.append(cid)
            if snap.correlation_ids and not cids and wire.event_type == "SUBSCRIPTION_DATA":
                continue  # data for a subscription the application has cancelled
            self._on_control(snap, [w for w in snap.correlation_ids if isinstance(w, int)])
            messages.append(
                Message(Name(snap.message_type), cids, snap.elements, snap.recap_type, snap.topic)
            )
        if not messages:
            return None
        return Event(_event_type_value(wire.event_type), messages)

    def _on_control(self, snap: codec.MessageSnapshot, wire_ids: list[int]) -> None:
        if snap.message_type == codec.SESSION_STARTED:
            self._state = "started"
            self._start_ok = True
            self._started.set()
        elif snap.message_type == codec.SESSION_STARTUP_FAILURE:
            self._state = "stopped"  # terminal: no ConnectionDown/Terminated after it
            self._start_ok = False
            self._started.set()
        elif snap.message_type in (codec.SERVICE_OPENED, codec.SERVICE_OPEN_FAILURE):
            with self._lock:
                for wid in wire_ids:
                    waiter = self._waiters.get(wid)
                    if waiter is not None:
                        waiter[1][0] = snap.message_type == codec.SERVICE_OPENED
                        waiter[0].set()


# ====================================================================== the server half

KNOWN_FIELDS = frozenset(
    codec.TRADE_FIELDS
    + codec.QUOTE_FIELDS
    + ("MKTDATA_EVENT_TYPE", "MKTDATA_EVENT_SUBTYPE", "EVENT_TIME", "TIME")
)
_ALWAYS_SENT = ("MKTDATA_EVENT_TYPE", "MKTDATA_EVENT_SUBTYPE")


@dataclass
class BloombergSimConfig:
    symbols: list[str]
    rate: float = 1000.0  # data messages per second per connection
    batch: int = 10  # messages per SUBSCRIPTION_DATA event
    app_name: str | None = None  # None: any application (or none) is accepted
    topic_suffix: str = codec.DEFAULT_TOPIC_SUFFIX
    faults: Faults = field(default_factory=Faults)
    # rate_limit: data messages between SlowConsumerWarning and SlowConsumerWarningCleared.
    slow_consumer_clear_after: int = 100
    sent_log_dir: str | None = None  # every event line sent, one file per connection (SentLog)


@dataclass
class _Subscription:
    wire_id: int
    topic: str
    symbol: str
    fields: list[str]
    kinds: tuple[str, ...]


class _Connection:
    def __init__(self, writer: asyncio.StreamWriter, log: SentFile | None = None) -> None:
        self.writer = writer
        self.log = log
        self.subs: dict[int, _Subscription] = {}
        self.generated = 0  # data messages made (sent or deliberately lost)
        self.sent = 0
        self.malformed = 0
        self.silent = False
        self.warned_at: int | None = None
        self.cleared = False
        self.sender: asyncio.Task[None] | None = None


class BloombergSimulator:
    def __init__(self, config: BloombergSimConfig) -> None:
        self.config = config
        self.known = set(config.symbols)
        self.walk = PriceWalk(config.symbols)
        self.volume: dict[str, int] = dict.fromkeys(config.symbols, 0)
        self._last_us: dict[str, int] = {}
        self.connections: list[_Connection] = []
        self.events_sent = 0
        self.port = 0
        self.host = "127.0.0.1"
        self._server: asyncio.Server | None = None
        self.sent_log = SentLog(config.sent_log_dir)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._handle, host, port)
        self.host = host
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        await self.drop_all()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def drop_all(self) -> None:
        """Cut every client connection, as a network failure would."""
        for conn in list(self.connections):
            conn.writer.transport.abort()

    # -- one client

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(writer, self.sent_log.open())
        self.connections.append(conn)
        try:
            while line := await reader.readline():
                try:
                    request = codec.decode_request_line(line)
                except CodecError:
                    continue
                if not await self._on_request(conn, request):
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if conn.sender is not None:
                conn.sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await conn.sender
            self.connections.remove(conn)
            writer.transport.abort()
            if conn.log is not None:
                conn.log.close()

    async def _write(self, conn: _Connection, event_type: str, msgs: list[Any]) -> None:
        line = codec.encode_event_line(event_type, msgs)
        conn.writer.write(line)
        await conn.writer.drain()
        if conn.log is not None:
            conn.log.write(line)

    async def _on_request(self, conn: _Connection, request: codec.StandInRequest) -> bool:
        """Answer one request; False closes the connection."""
        args = request.args
        if request.op == "start":
            expected = self.config.app_name
            app = args.get("app")
            if self.config.faults.refuse_auth or (expected is not None and app != expected):
                reason = codec.reason_dict(
                    "NO_AUTH", f"application authorization failed for app {app!r}",
                    source="apiauth",
                )  # fmt: skip
                msg = codec.status_message(
                    "SESSION_STATUS", codec.SESSION_STARTUP_FAILURE, {"reason": reason}
                )
                await self._write(conn, "SESSION_STATUS", [msg])
                return False
            endpoint = {"address": f"{self.host}:{self.port}"}
            msg = codec.status_message(
                "SESSION_STATUS", codec.SESSION_STARTED, {"initialEndpoints": [endpoint]}
            )
            await self._write(conn, "SESSION_STATUS", [msg])
            conn.sender = asyncio.create_task(self._send_loop(conn))
        elif request.op == "openService":
            service = str(args.get("service", ""))
            wire = args.get("id")
            if service == codec.SERVICE:
                msg = codec.status_message(
                    "SERVICE_STATUS", codec.SERVICE_OPENED, {"serviceName": service}, [wire]
                )
            else:
                reason = codec.reason_dict("NOT_FOUND", f"service {service} not found")
                msg = codec.status_message(
                    "SERVICE_STATUS", codec.SERVICE_OPEN_FAILURE, {"reason": reason}, [wire]
                )
            await self._write(conn, "SERVICE_STATUS", [msg])
        elif request.op == "subscribe":
            for item in args.get("subscriptions", []):
                if isinstance(item, dict) and isinstance(item.get("id"), int):
                    await self._subscribe(conn, item["id"], str(item.get("string", "")))
        elif request.op == "unsubscribe":
            for wire in args.get("ids", []):
                conn.subs.pop(wire, None)
        return True

    async def _subscribe(self, conn: _Connection, wire: int, text: str) -> None:
        topic, fields, _options = codec.parse_subscription_string(text)
        symbol = codec.symbol_for_topic(topic, self.config.topic_suffix)
        if symbol not in self.known or topic == symbol:
            reason = codec.reason_dict("BAD_SEC", f"Invalid security: {topic}")
            msg = codec.status_message(
                "SUBSCRIPTION_STATUS", codec.SUBSCRIPTION_FAILURE, {"reason": reason}, [wire]
            )
            msg.topic = topic
            await self._write(conn, "SUBSCRIPTION_STATUS", [msg])
            return
        bad = [f for f in fields if f not in KNOWN_FIELDS]
        good = [f for f in fields if f in KNOWN_FIELDS]
        kinds = tuple(
            k
            for k, names in (("T", codec.TRADE_FIELDS), ("Q", codec.QUOTE_FIELDS))
            if not good or any(f in names for f in good)
        )
        conn.subs[wire] = _Subscription(wire, topic, symbol, good, kinds)
        exceptions = [
            {"fieldId": f, "reason": codec.reason_dict("BAD_FLD", "Unknown Field")} for f in bad
        ]
        started = codec.status_message(
            "SUBSCRIPTION_STATUS",
            codec.SUBSCRIPTION_STARTED,
            {"exceptions": exceptions, "streamIds": [str(wire)],
             "receivedFrom": {"address": f"{self.host}:{self.port}"}},
            [wire],
        )  # fmt: skip
        started.topic = topic
        await self._write(conn, "SUBSCRIPTION_STATUS", [started])
        # The initial paint: last values, solicited recap.
        st = self.walk.states[symbol]
        half = max(0.01, round(st.price * 0.0002, 2))
        stamp = self._stamp(symbol)
        paint = {
            "MKTDATA_EVENT_TYPE": "SUMMARY", "MKTDATA_EVENT_SUBTYPE": "INITPAINT",
            "LAST_PRICE": st.price, "BID": round(st.price - half, 2),
            "ASK": round(st.price + half, 2), "BID_SIZE": 1, "ASK_SIZE": 1,
            "VOLUME": self.volume[symbol], "TRADE_UPDATE_STAMP_RT": stamp,
            "BID_UPDATE_STAMP_RT": stamp, "ASK_UPDATE_STAMP_RT": stamp,
        }  # fmt: skip
        msg = codec.market_data_message(
            wire, topic, self._only(paint, good), recap_type=Message.RECAPTYPE_SOLICITED
        )
        await self._write(conn, "SUBSCRIPTION_DATA", [msg])

    @staticmethod
    def _only(elements: dict[str, Any], fields: list[str]) -> dict[str, Any]:
        if not fields:
            return elements
        return {k: v for k, v in elements.items() if k in fields or k in _ALWAYS_SENT}

    def _stamp(self, symbol: str) -> dt.datetime:
        # Strictly increasing per symbol, so two ticks never share a timestamp.
        us = max(time.time_ns() // 1000, self._last_us.get(symbol, 0) + 1)
        self._last_us[symbol] = us
        return dt.datetime.fromtimestamp(us // 1_000_000, dt.UTC).replace(
            microsecond=us % 1_000_000
        )

    def _tick(self, sub: _Subscription, kind: str) -> codec.MessageSnapshot:
        sym = sub.symbol
        if kind == "T":
            _st, price, size = self.walk.trade(sym)
            self.volume[sym] += size
            elements = codec.trade_elements(price, size, self.volume[sym], self._stamp(sym))
        else:
            _st, bid, ask, bid_lots, ask_lots = self.walk.quote(sym)
            elements = codec.quote_elements(bid, bid_lots * 100, ask, ask_lots * 100,
                                            self._stamp(sym))  # fmt: skip
        return codec.market_data_message(sub.wire_id, sub.topic, self._only(elements, sub.fields))

    def _malformed(self, conn: _Connection, sub: _Subscription) -> codec.MessageSnapshot:
        conn.malformed += 1
        if conn.malformed % 2:
            # No correlation id: the application cannot tell whose data this is.
            return codec.MessageSnapshot(
                "SUBSCRIPTION_DATA", codec.MARKET_DATA_EVENTS, [], {"LAST_PRICE": "n/a"}
            )
        # Wrong types and a missing size.
        elements = {"MKTDATA_EVENT_TYPE": "TRADE", "LAST_PRICE": "n/a",
                    "TRADE_UPDATE_STAMP_RT": self._stamp(sub.symbol)}  # fmt: skip
        return codec.market_data_message(sub.wire_id, sub.topic, elements)

    async def _send_loop(self, conn: _Connection) -> None:
        cfg = self.config
        faults = cfg.faults
        pacer = Pacer(cfg.rate)
        rr = 0
        while not conn.writer.is_closing():
            targets = [(s, k) for s in conn.subs.values() for k in s.kinds]
            if not targets:
                await asyncio.sleep(0.01)
                continue
            if faults.silent_after and conn.sent >= faults.silent_after:
                conn.silent = True
                await asyncio.sleep(3600)
                continue
            msgs: list[codec.MessageSnapshot] = []
            lost: _Subscription | None = None
            for _ in range(cfg.batch):
                sub, kind = targets[rr % len(targets)]
                rr += 1
                conn.generated += 1
                if faults.skip_seq_every and conn.generated % faults.skip_seq_every == 0:
                    self._tick(sub, kind)  # made and lost: the price still moves
                    lost = sub
                    break
                if faults.malformed_every and conn.generated % faults.malformed_every == 0:
                    msgs.append(self._malformed(conn, sub))
                else:
                    msgs.append(self._tick(sub, kind))
            if msgs:
                await self._write(conn, "SUBSCRIPTION_DATA", msgs)
                conn.sent += len(msgs)
                self.events_sent += len(msgs)
            if lost is not None:
                # blpapi reports lost data as an ADMIN DataLoss message, not a sequence jump.
                loss = codec.status_message(
                    "ADMIN", codec.DATA_LOSS,
                    {"id": lost.wire_id, "source": lost.topic, "numMessagesDropped": 1},
                    [lost.wire_id],
                )  # fmt: skip
                await self._write(conn, "ADMIN", [loss])
            if faults.rate_limit:
                await self._slow_consumer(conn)
            if faults.drop_after and conn.sent >= faults.drop_after:
                conn.writer.transport.abort()
                return
            await pacer.wait_for(max(1, len(msgs)))

    async def _slow_consumer(self, conn: _Connection) -> None:
        # Really raised by the client library when its event queue fills; the stand-in
        # sends it from the server so a test can make it happen on demand.
        if conn.warned_at is None and conn.sent > 0:
            conn.warned_at = conn.sent
            msg = codec.status_message("ADMIN", codec.SLOW_CONSUMER_WARNING)
            await self._write(conn, "ADMIN", [msg])
        elif (
            conn.warned_at is not None
            and not conn.cleared
            and conn.sent - conn.warned_at >= self.config.slow_consumer_clear_after
        ):
            conn.cleared = True
            msg = codec.status_message(
                "ADMIN", codec.SLOW_CONSUMER_WARNING_CLEARED, {"eventsDropped": 0}
            )
            await self._write(conn, "ADMIN", [msg])


def build_arg_parser() -> argparse.ArgumentParser:
    p = simulator_arg_parser(
        "bloomberg", __doc__, port=8194, num_symbols=500, rate=1000.0,
        rate_help="data messages/s per connection", batch=10,
        batch_help="messages per SUBSCRIPTION_DATA event",
    )  # fmt: skip
    p.add_argument("--app-name", default=None, help="the only application name accepted")
    p.add_argument("--topic-suffix", default=codec.DEFAULT_TOPIC_SUFFIX)
    harness_args(p)
    return p


async def serve(args: argparse.Namespace) -> None:
    sim = BloombergSimulator(
        BloombergSimConfig(
            symbols=symbols_from_args(args), rate=args.rate, batch=args.batch,
            app_name=args.app_name, topic_suffix=args.topic_suffix,
            faults=Faults.parse(args.faults), sent_log_dir=args.sent_log,
        )
    )  # fmt: skip
    await serve_until_stopped(
        sim, args.host, args.port, "bloomberg stand-in server on {host}:{port}",
        faults=sim.config.faults, faults_file=args.faults_file,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    run_simulator(serve, build_arg_parser(), argv)
