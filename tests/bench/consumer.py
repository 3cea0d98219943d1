"""The checking consumer: every event of a step's topic, read on a thread of the bench.

It counts unique event ids (the embedded broker may deliver a message twice) and records
provider -> consumer latency from each trade's send stamp. The stamp is Polygon's own trade
id field: in bench mode the simulator (``--stamp-send-time``) and the replay source send
each trade with ``i`` = its frame's send time in ns as a decimal string, and the codec
keeps ``i`` in ``provider_specific``, so it reaches the published event. Quotes carry
``i`` as a list of indicators and are not stamped: only trades are timed here, to the ns.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
import uuid
from typing import Any

import orjson
import pulsar

from common.metrics import new_latency_histogram
from tests.bench.options import log

HDR_MAX_US = 600_000_000
# Nineteen digits: a time in ns since 1970 (2001 to 2286), never a small trade id.
_SEND_STAMP = re.compile(rb'"i":"(\d{19})"')
_EVENT_ID_PREFIX = b'{"event_id":"'


class Consumer:
    """Reads one topic on a thread: unique event ids and provider -> consumer latency.

    Only the id and the send stamp are read from each payload (no full JSON parse), so
    this thread costs the machine as little as it can.
    """

    def __init__(self, client: pulsar.Client, topic: str) -> None:
        self._consumer: Any = client.subscribe(
            topic,
            f"bench-{uuid.uuid4().hex[:8]}",
            receiver_queue_size=100_000,
            initial_position=pulsar.InitialPosition.Earliest,
        )
        self.ids: set[bytes] = set()
        self.deliveries = 0
        self.unstamped = 0
        self.histogram = new_latency_histogram()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-consumer", daemon=True)
        self._thread.start()

    def start_window(self) -> None:
        self.histogram = new_latency_histogram()

    def _run(self) -> None:
        consumer = self._consumer
        receive = consumer.receive
        ids = self.ids
        search = _SEND_STAMP.search
        since_ack = 0
        last: Any = None
        while not self._stop.is_set():
            try:
                msg = receive(200)
            except pulsar.Timeout:
                if last is not None and since_ack:
                    with contextlib.suppress(Exception):
                        consumer.acknowledge_cumulative(last)
                    since_ack = 0
                continue
            except Exception:
                if self._stop.is_set():
                    return
                time.sleep(0.05)
                continue
            now_ns = time.time_ns()
            data = msg.data()
            self.deliveries += 1
            if data.startswith(_EVENT_ID_PREFIX):
                ids.add(data[13:49])
            else:
                ids.add(str(orjson.loads(data)["event_id"]).encode())
            stamp = search(data)
            if stamp is None:
                self.unstamped += 1
            else:
                latency_us = (now_ns - int(stamp.group(1))) // 1000
                self.histogram.record_value(max(1, min(latency_us, HDR_MAX_US)))
            last = msg
            since_ack += 1
            if since_ack >= 1000:
                with contextlib.suppress(Exception):
                    consumer.acknowledge_cumulative(msg)
                since_ack = 0

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self._thread.is_alive():
            log("consumer thread did not stop within 10 s")
        with contextlib.suppress(Exception):
            self._consumer.unsubscribe()
        with contextlib.suppress(Exception):
            self._consumer.close()
        self._consumer = None
