"""``ProviderSession``: one provider connection kept up, its records fed to the pipeline.

Connect, subscribe what is assigned, stream, and on any failure reconnect with backoff
behind a circuit breaker; each ``ProviderError`` subclass maps to a status and a delay in
one place (``_failure``). A changed provider row (``reconfigure``) ends the stream and
the next round builds a fresh adapter, subscribed from ``wanted`` after it connects, so
no adapter ever starts from another's state.

``wanted`` holds canonical symbols; the adapter sees only the provider's own names
(``common/symbols.py``), and records get their canonical symbol back before the pipeline.
``changed`` is set on every status change, so the worker can push it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog

from common.circuit import CircuitBreaker
from common.model import ConnectionStatus
from common.pipeline import Pipeline
from common.provider import (
    Instrument,
    ProviderAdapter,
    ProviderAuthError,
    ProviderConfig,
    ProviderConfigError,
    ProviderError,
    ProviderRateLimited,
)
from common.retry import Backoff
from common.symbols import SymbolMap

log = structlog.get_logger("feedfleet.session")


class ProviderSession:
    def __init__(
        self, provider: ProviderConfig, pipeline: Pipeline, circuit: CircuitBreaker,
        new_adapter: Callable[[ProviderConfig], ProviderAdapter],
    ) -> None:  # fmt: skip
        self.provider = provider
        self.pipeline = pipeline
        self.circuit = circuit
        self._new_adapter = new_adapter
        self.adapter: ProviderAdapter | None = None
        self.wanted: dict[str, Instrument] = {}  # what the coordinator assigned us
        self.status = ConnectionStatus.DISCONNECTED
        self.last_error: str | None = None
        self.error_count = 0
        self.symbols = SymbolMap({})
        self.changed = asyncio.Event()
        self._reconnect = asyncio.Event()

    # ------------------------------------------------------------ driven from outside

    async def reconfigure(self, provider: ProviderConfig) -> None:
        """A new provider row: the next round connects a fresh adapter built from it."""
        log.info("provider_config_changed", provider=provider.name, enabled=provider.enabled)
        self.provider = provider
        self.circuit.record_success()
        self._reconnect.set()
        if self.adapter is not None:
            # Ends a quiet stream at once.
            with contextlib.suppress(Exception):
                await self.adapter.disconnect()

    async def follow(self, wanted: dict[str, Instrument]) -> None:
        """Subscribe and unsubscribe so the adapter holds exactly ``wanted``."""
        self.wanted = dict(wanted)
        adapter = self.adapter
        if adapter is None:
            return
        await self._converge(adapter)

    async def _converge(self, adapter: ProviderAdapter) -> None:
        current = adapter.subscribed
        wanted = self.symbols.instruments(self.wanted.values())
        added = [i for s, i in wanted.items() if current.get(s) != i]
        removed = [i for s, i in current.items() if s not in wanted]
        if removed:
            await adapter.unsubscribe(removed)
            for inst in removed:
                adapter.unavailable.pop(inst.symbol, None)
            gone = (self.symbols.to_canonical(i.symbol) or i.symbol for i in removed)
            self.pipeline.quality.forget(gone)
        if added:
            await adapter.subscribe(added)
        if added or removed:
            log.info("assignments_changed", added=len(added), removed=len(removed),
                     total=len(adapter.subscribed))  # fmt: skip

    @property
    def subscribed(self) -> int:
        return len(self.adapter.subscribed) if self.adapter is not None else 0

    def unavailable(self) -> dict[str, str]:
        """Wanted canonical symbols the provider refused or closed, with its reason."""
        adapter = self.adapter
        if adapter is None or not adapter.unavailable:
            return {}
        out = {}
        for name, reason in adapter.unavailable.items():
            canonical = self.symbols.to_canonical(name)
            if canonical is not None and canonical in self.wanted:
                out[canonical] = reason
        return out

    # ------------------------------------------------------------ the loop

    async def run(self) -> None:
        backoff = Backoff(base_s=0.5, max_s=30.0)
        while True:
            provider = self.provider
            if not provider.enabled:
                self._set_status(ConnectionStatus.DISCONNECTED, "provider disabled")
                await self._wait_reconnect(5.0)
                continue
            wait = self.circuit.wait_s()
            if wait > 0:
                await self._wait_reconnect(wait)
                continue
            delay = backoff.next_delay()
            try:
                if self.adapter is None or self.adapter.config is not provider:
                    self.symbols = SymbolMap.from_config(provider)
                    self.adapter = self._new_adapter(provider)
                adapter = self.adapter
                self._set_status(ConnectionStatus.CONNECTING, None)
                self._reconnect.clear()
                await adapter.connect()
                # What was in flight when the last connection died is missing: the first
                # record of each stream is checked for a jump.
                if not adapter.codec_tracks_gaps:
                    self.pipeline.quality.resume()
                await self._converge(adapter)
                self.circuit.record_success()
                backoff.reset()
                self._set_status(adapter.connection_status, None)
                await self._stream(adapter)
            except ProviderError as exc:
                # Ended on purpose by reconfigure: not a failure.
                delay = 0.0 if self._reconnect.is_set() else self._failure(exc, delay)
            except Exception as exc:
                log.exception("session_crashed", provider=provider.name)
                self._fail(ConnectionStatus.ERROR, exc)
            finally:
                if self.adapter is not None:
                    await self._disconnect(self.adapter)
            await self._wait_reconnect(delay)

    async def _stream(self, adapter: ProviderAdapter) -> None:
        pipeline = self.pipeline
        rename = self.symbols.rename
        async for batch in adapter.stream_batches():
            rename(batch)
            pipeline.process(batch)
            if adapter.connection_status is not self.status:
                self._set_status(adapter.connection_status, adapter.last_error)
            if pipeline.backpressure:
                # Stop reading: the provider side (TCP window, or the UDP adapter's own
                # bounded queue) holds the rest until the journal has room. The status
                # says so before anything else runs, so no reader sees a full journal
                # behind a healthy status.
                before = self.status
                # A journal it cannot write (a full disk) is an error; a sink far behind
                # is only reported.
                status = ConnectionStatus.ERROR if pipeline.journal_error else before
                self._set_status(status, pipeline.backpressure_reason)
                await pipeline.wait_for_room()
                self._set_status(before, None)
            else:
                # A socket with data buffered returns reads without yielding; let the
                # sinks, status and assignment tasks run between reads.
                await asyncio.sleep(0)
            if self._reconnect.is_set():
                return

    def _failure(self, exc: ProviderError, delay: float) -> float:
        """The status and the delay before the next attempt, by kind of failure."""
        if isinstance(exc, ProviderConfigError):
            self._fail(ConnectionStatus.ERROR, exc)
            return 30.0  # an operator has to change the row or the environment
        if isinstance(exc, ProviderAuthError):
            self._fail(ConnectionStatus.ERROR, exc)
            return max(delay, 10.0)
        if isinstance(exc, ProviderRateLimited):
            self._fail(ConnectionStatus.RATE_LIMITED, exc)
            return exc.retry_after_s or max(delay, 5.0)
        self._fail(ConnectionStatus.DISCONNECTED, exc)
        return delay

    def _fail(self, status: ConnectionStatus, exc: BaseException) -> None:
        self.error_count += 1
        self.circuit.record_failure()
        message = f"{type(exc).__name__}: {exc}"
        log.warning("provider_session_failed", provider=self.provider.name, error=message)
        self._set_status(status, message)

    def _set_status(self, status: ConnectionStatus, error: str | None) -> None:
        if status is not self.status:
            self.changed.set()
        self.status = status
        self.last_error = error

    async def _wait_reconnect(self, seconds: float) -> None:
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reconnect.wait(), timeout=seconds)
        self._reconnect.clear()

    async def _disconnect(self, adapter: ProviderAdapter) -> None:
        """Disconnect, bounded (a provider that does not answer must not hold up a stop),
        then hand the pipeline what the adapter had received and not yet yielded."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5.0):
                await adapter.disconnect()
        leftover = adapter.take_queued()
        if leftover:
            self.symbols.rename(leftover)
            self.pipeline.process(leftover)
            log.info("queued_records_taken", provider=self.provider.name, records=len(leftover))

    async def close(self) -> None:
        # what the last status report says, so the page and /health tell a stop from a fault
        self._set_status(ConnectionStatus.DISCONNECTED, "worker stopped")
        if self.adapter is not None:
            await self._disconnect(self.adapter)
