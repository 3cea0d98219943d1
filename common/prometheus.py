"""The Prometheus exposition of workers' status documents, built at scrape time.

A worker's status document (``StatusReporter.provider_status()`` plus ``"metrics":
StatusReporter.metrics()``, the JSON in Redis ``provider:{id}:status``) already holds every
counter, gauge and latency histogram a worker keeps. ``StatusCollector`` turns a list of
such documents into metric families when scraped, so the workers pay nothing per event
and nothing is counted twice: the API scrapes the documents of the whole fleet from
Redis (``GET /metrics/prometheus``), each worker its own on its metrics port
(``workers/metrics_endpoint.py``). Every series has the label ``provider``.

Latency is exported as **histograms with fixed buckets**, not summaries. Workers keep
HdrHistograms of every event since they started (``provider_to_receipt_hdr``,
``pulsar_round_trip_hdr``); a cumulative bucket count is exactly what Prometheus wants
from them, and buckets (unlike a summary's quantiles) can be summed over providers and
instances and turned into any quantile over any window with ``histogram_quantile``. A
value is counted in a bucket by its HdrHistogram bucket's lowest equivalent value (three
significant digits: within 0.1 % of what was recorded); ``_sum`` adds up those lowest
equivalent values, to the same precision.

Fields a document lacks (an older worker) are left out, never reported as 0; every
metric family is always declared, so a name exists whether or not a worker reports it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from hdrh.histogram import HdrHistogram
from prometheus_client import exposition
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.registry import Collector, CollectorRegistry

from common.metrics import new_latency_histogram
from common.model import ConnectionStatus, QualityFlag, seconds_since_iso

# Counters: metric name (without _total), the status document's "metrics" key, help.
COUNTERS = (
    ("feedfleet_events_received", "received", "Records received from the provider."),
    ("feedfleet_events_journaled", "journaled", "Events appended to the write-ahead journal."),
    ("feedfleet_events_published", "published", "Events acknowledged by Pulsar."),
    ("feedfleet_events_stored", "stored", "Events committed to PostgreSQL."),
    ("feedfleet_events_replayed", "replayed", "Events delivered by catch-up from the journal."),
    ("feedfleet_events_dead_lettered", "dead_lettered", "Records sent to the dead-letter."),
    ("feedfleet_events_dropped", "dropped", "Records dropped (never journaled)."),
    ("feedfleet_events_cached", "cached", "latest:{symbol} writes to Redis."),
    ("feedfleet_decode_errors", "decode_errors", "Provider data the codec could not decode."),
    ("feedfleet_bytes_received", "bytes_received", "Bytes read from the provider."),
    ("feedfleet_reconnects", "error_count", "Connection failures, each followed by a reconnect."),
)  # fmt: skip
# Gauges read straight from the "metrics" object: name, key, help.
GAUGES = (
    ("feedfleet_events_spooled", "spooled",
     "Events journaled and waiting for a sink that is catching up."),
    ("feedfleet_queue_depth", "queue_depth",
     "Records received by the adapter, not yet handed to the pipeline."),
    ("feedfleet_spool_depth", "spool_depth",
     "Events in the journal not yet delivered to every durable sink."),
    ("feedfleet_last_event_age_seconds", "last_event_age_s",
     "Seconds since the worker last received a record."),
)  # fmt: skip
# Latency histograms: name, the document's HdrHistogram key, help.
HISTOGRAMS = (
    ("feedfleet_provider_to_receipt_seconds", "provider_to_receipt_hdr",
     "Provider's event time (or receive time) to the Pulsar receipt, since the worker started."),
    ("feedfleet_pulsar_round_trip_seconds", "pulsar_round_trip_hdr",
     "Hand-over to the Pulsar client to its receipt, since the worker started."),
)  # fmt: skip
# Upper bounds in seconds: sub-millisecond hand-overs up to a stalled broker.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                     2.5, 5.0, 10.0, 30.0, 60.0)  # fmt: skip
CIRCUIT_STATES = ("closed", "open", "half_open")
# ConnectionStatus, and the API's UNKNOWN for a report it could not read.
CONNECTION_STATES = (*(s.value for s in ConnectionStatus), "UNKNOWN")
SINKS = ("pulsar", "postgres")

OPENMETRICS = "application/openmetrics-text"


def _number(value: Any) -> float | None:
    """A JSON number as a float (bools as 0/1); None for anything else."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return None


def latency_buckets(encoded: str | None) -> tuple[list[tuple[str, float]], float]:
    """Cumulative (le, count) buckets in seconds and the sum in seconds, from an encoded
    HdrHistogram in microseconds (an empty one for None or an undecodable string)."""
    histogram = new_latency_histogram()
    if encoded:
        try:
            histogram.decode_and_add(encoded)
        except Exception:  # hdrh raises assorted errors on bad input; it is only a report
            histogram = new_latency_histogram()
    counts = list(histogram.counts)
    buckets: list[tuple[str, float]] = []
    running = 0
    start = 0
    for bound_s in LATENCY_BUCKETS_S:
        # Every HdrHistogram bucket up to the one holding the bound starts at or below it.
        end = _index_of(histogram, int(bound_s * 1_000_000)) + 1
        running += sum(counts[start:end])
        start = end
        buckets.append((str(bound_s), float(running)))
    buckets.append(("+Inf", float(sum(counts))))
    # hdrh's own get_mean_value walks every bucket through its iterator: 0.3 s for a busy
    # worker's histogram, against a few ms for this.
    value_at = histogram.get_value_from_index
    total_us = sum(count * value_at(index) for index, count in enumerate(counts) if count)
    return buckets, total_us / 1_000_000


def _index_of(histogram: HdrHistogram, value_us: int) -> int:
    return min(int(histogram.get_counts_array_index(value_us)), histogram.counts_len - 1)


class StatusCollector(Collector):
    """Metric families for the status documents ``documents()`` returns when scraped.

    A document is a worker's (see the module docstring), optionally with ``"enabled"``
    (the provider row's flag). ``components`` (the API's view of PostgreSQL and Redis)
    adds ``feedfleet_component_up``.
    """

    def __init__(
        self,
        documents: Callable[[], Iterable[Mapping[str, Any]]],
        components: Mapping[str, bool] | None = None,
    ) -> None:
        self.documents = documents
        self.components = components

    def describe(self) -> Iterable[Metric]:
        return []  # names are not checked for clashes: each registry holds one collector

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        docs = [d for d in self.documents() if isinstance(d.get("provider_name"), str)]
        label = ["provider"]
        up = GaugeMetricFamily(
            "feedfleet_up", "1 when the provider's worker reports and is CONNECTED.", labels=label
        )
        enabled = GaugeMetricFamily(
            "feedfleet_provider_enabled", "1 when the provider row is enabled.", labels=label
        )
        status = GaugeMetricFamily(
            "feedfleet_connection_status", "1 for the provider's current connection status.",
            labels=["provider", "status"],
        )  # fmt: skip
        status_age = GaugeMetricFamily(
            "feedfleet_status_age_seconds", "Age of the worker's last status report.",
            labels=label,
        )  # fmt: skip
        subscribed = GaugeMetricFamily(
            "feedfleet_subscribed_symbols", "Symbols the worker is subscribed to.", labels=label
        )
        backpressure = GaugeMetricFamily(
            "feedfleet_backpressure",
            "1 while the worker holds back reading (journal near its cap or not writable).",
            labels=label,
        )
        for doc in docs:
            name = doc["provider_name"]
            current = doc.get("status")
            has_metrics = isinstance(doc.get("metrics"), dict)
            up.add_metric([name], float(has_metrics and current == "CONNECTED"))
            if isinstance(doc.get("enabled"), bool):
                enabled.add_metric([name], float(doc["enabled"]))
            for state in CONNECTION_STATES:
                status.add_metric([name, state], float(current == state))
            if not has_metrics:
                continue  # no worker reports: its other fields are the API's stand-ins
            for family, key in ((subscribed, "subscribed_symbols"), (backpressure, "backpressure")):
                value = _number(doc.get(key))
                if value is not None:
                    family.add_metric([name], value)
            age = seconds_since_iso(doc.get("last_update"), now)
            if age is not None:
                status_age.add_metric([name], age)
        yield from (up, enabled, status, status_age, subscribed, backpressure)
        reported = [
            (d["provider_name"], d["metrics"]) for d in docs if isinstance(d.get("metrics"), dict)
        ]
        yield from self._counters(reported)
        yield from self._gauges(reported)
        yield from self._histograms(reported)
        if self.components is not None:
            component = GaugeMetricFamily(
                "feedfleet_component_up", "1 when the API reaches the component.",
                labels=["component"],
            )  # fmt: skip
            for key, is_up in self.components.items():
                component.add_metric([key], float(is_up))
            yield component

    @staticmethod
    def _read_straight(
        kind: type[CounterMetricFamily] | type[GaugeMetricFamily],
        table: tuple[tuple[str, str, str], ...],
        reported: list[tuple[str, dict[str, Any]]],
    ) -> Iterator[Metric]:
        """One family per row of ``table``: the number under its key, per provider."""
        for metric, key, help_text in table:
            family = kind(metric, help_text, labels=["provider"])
            for name, metrics in reported:
                value = _number(metrics.get(key))
                if value is not None:
                    family.add_metric([name], value)
            yield family

    def _counters(self, reported: list[tuple[str, dict[str, Any]]]) -> Iterator[Metric]:
        yield from self._read_straight(CounterMetricFamily, COUNTERS, reported)
        flags = CounterMetricFamily(
            "feedfleet_quality_flags", "Events carrying each quality flag (gap: a provider-side "
            "sequence gap).", labels=["provider", "flag"],
        )  # fmt: skip
        for name, metrics in reported:
            counts = metrics.get("quality_flags")
            counts = counts if isinstance(counts, dict) else {}
            for flag in QualityFlag:
                flags.add_metric([name, flag.value], _number(counts.get(flag.value)) or 0.0)
        yield flags

    def _gauges(self, reported: list[tuple[str, dict[str, Any]]]) -> Iterator[Metric]:
        yield from self._read_straight(GaugeMetricFamily, GAUGES, reported)
        circuit = GaugeMetricFamily(
            "feedfleet_circuit_state", "1 for the state of the provider connection's circuit "
            "breaker.", labels=["provider", "state"],
        )  # fmt: skip
        journal_bytes = GaugeMetricFamily(
            "feedfleet_journal_bytes", "Size of the worker's journal.", labels=["provider"]
        )
        journal_max = GaugeMetricFamily(
            "feedfleet_journal_max_bytes", "The journal's cap; near it the worker stops reading.",
            labels=["provider"],
        )  # fmt: skip
        backlog = GaugeMetricFamily(
            "feedfleet_sink_backlog_events", "Events in the journal a sink has not acknowledged.",
            labels=["provider", "sink"],
        )  # fmt: skip
        healthy = GaugeMetricFamily(
            "feedfleet_sink_healthy", "1 while the sink delivers.", labels=["provider", "sink"]
        )
        for name, metrics in reported:
            state = metrics.get("circuit_state")
            if isinstance(state, str):
                for known in CIRCUIT_STATES:
                    circuit.add_metric([name, known], float(state.lower() == known))
            journal = metrics.get("journal")
            if isinstance(journal, dict):
                for family, key in ((journal_bytes, "bytes"), (journal_max, "max_bytes")):
                    value = _number(journal.get(key))
                    if value is not None:
                        family.add_metric([name], value)
            sinks = metrics.get("sinks")
            for sink in SINKS:
                report = sinks.get(sink) if isinstance(sinks, dict) else None
                if not isinstance(report, dict):
                    continue
                for family, key in ((backlog, "backlog"), (healthy, "healthy")):
                    value = _number(report.get(key))
                    if value is not None:
                        family.add_metric([name, sink], value)
        yield from (circuit, journal_bytes, journal_max, backlog, healthy)

    def _histograms(self, reported: list[tuple[str, dict[str, Any]]]) -> Iterator[Metric]:
        for metric, key, help_text in HISTOGRAMS:
            family = HistogramMetricFamily(metric, help_text, labels=["provider"])
            for name, metrics in reported:
                if key not in metrics:
                    continue  # a worker that does not keep this histogram
                encoded = metrics[key]
                buckets, total_s = latency_buckets(encoded if isinstance(encoded, str) else None)
                family.add_metric([name], buckets, sum_value=total_s)
            yield family


def _accepted(accept: str) -> dict[str, float]:
    """Media types of an Accept header and their quality (1 where none or unreadable)."""
    accepted: dict[str, float] = {}
    for item in accept.split(","):
        media, *params = (part.strip() for part in item.split(";"))
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = min(1.0, max(0.0, float(value)))
                except ValueError:
                    quality = 1.0
        if media:
            accepted[media.lower()] = max(quality, accepted.get(media.lower(), 0.0))
    return accepted


def wants_exposition(accept: str) -> bool:
    """Whether an Accept header asks for the text exposition rather than JSON: it names
    ``text/plain`` or ``application/openmetrics-text`` above ``application/json``."""
    accepted = _accepted(accept)
    text = max(accepted.get("text/plain", 0.0), accepted.get(OPENMETRICS, 0.0))
    return text > 0 and text > accepted.get("application/json", 0.0)


def render(collector: Collector, accept: str) -> tuple[bytes, str]:
    """The exposition body and its Content-Type: OpenMetrics 1.0 when the Accept header
    names it, else the text format 0.0.4 (what every Prometheus version reads)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    if _accepted(accept).get(OPENMETRICS, 0.0) > 0:
        return openmetrics.generate_latest(registry), openmetrics.CONTENT_TYPE_LATEST
    return exposition.generate_latest(registry), exposition.CONTENT_TYPE_PLAIN_0_0_4
