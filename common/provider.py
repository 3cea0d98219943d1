"""The provider interface every adapter implements, and the errors it raises.

An adapter is the thin transport around a sans-I/O codec (``common/codecs/``). It does
not reconnect, retry or count: the worker's ``ProviderSession`` does that once for all
providers, driven by the exceptions below.
"""

from __future__ import annotations

import abc
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from common.model import ConnectionStatus, DataType, ProviderStatus, RawMarketData, iso_ns

if TYPE_CHECKING:
    from common.fleet_budget import FleetBudget
    from common.recording import FrameTap

T = TypeVar("T")


class ProviderError(Exception):
    """Base of every provider failure; the worker decides what to do by subclass."""


class ProviderAuthError(ProviderError):
    """Credentials refused. Retried slowly: an operator has to fix the key."""


class ProviderRateLimited(ProviderError):
    """The provider's own rate-limit answer. ``retry_after_s`` when the provider says."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ProviderProtocolError(ProviderError):
    """The peer broke the protocol (not one bad frame: those become decode errors)."""


class ProviderDisconnected(ProviderError):
    """The connection is gone; reconnect with backoff."""


class ProviderConfigError(ProviderError):
    """The provider row or the environment cannot work (missing key, missing library).

    Not retried until the configuration changes.
    """


@dataclass(frozen=True, slots=True)
class Instrument:
    """One subscribed symbol and the kinds of data wanted for it."""

    symbol: str
    data_types: frozenset[DataType] = frozenset({DataType.TRADE, DataType.QUOTE})


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """A row of the ``providers`` table."""

    id: str
    name: str
    provider_type: str
    enabled: bool = True
    priority: int = 100
    connection_config: dict[str, Any] = field(default_factory=dict)
    rate_limits: dict[str, Any] = field(default_factory=dict)

    def number(self, key: str, default: float) -> float:
        """``connection_config[key]`` as a float; a value that is not one is a config error
        (the worker then reports the row as ERROR instead of crashing the session)."""
        return self._converted(key, default, float, "a number")

    def optional_number(self, key: str, default: float | None = None) -> float | None:
        """As ``number``, but null (or no key and no default) means "not set": None."""
        if self.connection_config.get(key, default) is None:
            return None
        return self._converted(key, default, float, "a number")

    def integer(self, key: str, default: int) -> int:
        """``connection_config[key]`` as an int; see ``number``."""
        return self._converted(key, default, int, "an integer")

    def _converted(self, key: str, default: Any, kind: Callable[[Any], T], noun: str) -> T:
        try:
            return kind(self.connection_config.get(key, default))
        except (TypeError, ValueError):
            raise ProviderConfigError(f"connection_config.{key} must be {noun}") from None

    def secret(self, key: str) -> str:
        """Read the secret whose environment variable the config names under ``key``.

        Secrets never sit in the database: ``{"api_key_env": "POLYGON_API_KEY"}``.
        """
        env_name = self.connection_config.get(key)
        if not env_name:
            raise ProviderConfigError(f"connection_config.{key} is not set for {self.name}")
        value = os.environ.get(str(env_name))
        if not value:
            raise ProviderConfigError(
                f"environment variable {env_name} (connection_config.{key}) is not set"
            )
        return value


class ProviderAdapter(abc.ABC):
    """The seed's provider interface.

    ``stream_batches`` yields the records of one network read at a time; it is what the
    pipeline consumes, so the per-record cost of an async generator is paid per frame.
    ``stream`` is the seed's per-record view of the same data.
    """

    provider_type: ClassVar[str]
    # True where the codec itself knows which jumps in its sequence numbers lose data and
    # sets ``sequence_contiguous`` accordingly (FIX recovers by resend, IEX numbers every
    # message): the worker then does not treat the first jump after a reconnect as a gap.
    codec_tracks_gaps: ClassVar[bool] = False

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config
        self.connection_status = ConnectionStatus.DISCONNECTED
        self.last_error: str | None = None
        # Frames or messages that could not be decoded; the worker exports the count.
        self.decode_errors = 0
        # Bytes read from the provider (ingestion_metrics.bytes_ingested); an adapter whose
        # library hides the wire (blpapi) leaves it at 0.
        self.bytes_received = 0
        # The provider's request budget shared with its other instances (set by the worker
        # when the row has rate_limits.requests_per_minute); a polling adapter draws on it
        # before each request. None: only this process's own limiter applies.
        self.budget: FleetBudget | None = None
        self.subscribed: dict[str, Instrument] = {}
        # Symbols the provider refused, closed or suspended, with its reason (Refinitiv
        # Status Closed/Suspect, FIX MarketDataRequestReject, Bloomberg SubscriptionFailure):
        # the worker reports them so the coordinator can fail just those over.
        self.unavailable: dict[str, str] = {}
        # Set by `feedfleet record`: each frame read goes to it as well (common/recording.py).
        self.tap: FrameTap | None = None

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open the connection and authenticate. Raises a ``ProviderError``."""

    @abc.abstractmethod
    async def subscribe(self, instruments: Sequence[Instrument]) -> None: ...

    @abc.abstractmethod
    async def unsubscribe(self, instruments: Sequence[Instrument]) -> None: ...

    @abc.abstractmethod
    def stream_batches(self) -> AsyncIterator[list[RawMarketData]]:
        """Records as they arrive, one list per read. Ends by raising a ``ProviderError``."""

    @abc.abstractmethod
    async def disconnect(self) -> None: ...

    async def stream(self) -> AsyncIterator[RawMarketData]:
        async for batch in self.stream_batches():
            for record in batch:
                yield record

    def use_state_dir(self, directory: Path) -> None:  # noqa: B027 - most adapters keep none
        """A directory that outlives the process (the worker's journal directory), for an
        adapter whose protocol state must survive a restart (FIX sequence numbers)."""

    def take_queued(self) -> list[RawMarketData]:
        """After ``disconnect``: the records in what was received but still queued, so they
        reach the pipeline instead of vanishing with the connection (an adapter that queues
        nothing of its own returns none)."""
        return []

    def queue_depth(self) -> int:
        """Frames or datagrams received and not yet handed to the pipeline, for an adapter
        that queues them itself (0 where the socket's own buffer is the queue)."""
        return 0

    def requests_sent(self) -> int:
        """Requests made to a request-based provider so far (0 for streaming ones).

        The worker mirrors the per-minute count to Redis ``ratelimit:{provider}:{minute}``.
        """
        return 0

    def status(self) -> ProviderStatus:
        return ProviderStatus(
            provider_id=self.config.id,
            provider_name=self.config.name,
            status=self.connection_status,
            last_update=iso_ns(time.time_ns()),
            subscribed_symbols=len(self.subscribed),
            last_error=self.last_error,
        )
