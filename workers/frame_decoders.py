"""Recorded frames back to records, per provider type, as that provider's adapter decodes
what it reads (``feedfleet replay``).

Each decoder is the provider's real codec, fed frames in the order they were read and with
the times they were read, plus what the adapter itself does to decoded records where that
changes them: the IEX adapter's symbol filter and sequence tracker (its own ``_decode``),
Alpha Vantage's "only what is new since the last poll". Statuses, logins and heartbeats
decode to no records, as they do live; what the adapter would do about them (reconnect,
answer a Ping) does not apply to a file.

Where a replay cannot see what the live adapter knew, the decoder says what it assumes:

- Refinitiv names an item's stream on its Refresh (``Key.Name``), which every recording
  holds since it starts with its own connection;
- FIX: the recording starts at the Logon reply of a session that reset its numbers
  (``feedfleet record`` logs on with ResetSeqNumFlag), so a fresh session reads it all;
- Bloomberg's correlation ids are the adapter's own numbering, 1, 2, ... in the order the
  header lists the instruments (the order ``feedfleet record`` subscribed them), with a
  message's topic as the fallback; a DataLoss status does not flag the next record ``gap``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field, replace
from typing import ClassVar
from urllib.parse import parse_qsl

from common.codecs import alphavantage as av_codec
from common.codecs import bloomberg as bbg_codec
from common.codecs import fix as fix_codec
from common.codecs import polygon as polygon_codec
from common.codecs import refinitiv as refinitiv_codec
from common.codecs.base import CodecError, DecodeError
from common.model import RawMarketData
from common.provider import ProviderConfig
from common.recording import FrameKind, RecordedFrame, RecordingHeader
from common.symbols import SymbolMap


@dataclass(slots=True)
class DecodedFrame:
    records: list[RawMarketData] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class FrameDecoder(abc.ABC):
    """One recording's frames to records; keeps the codec's state between frames."""

    kinds: ClassVar[frozenset[FrameKind]]

    def __init__(self, header: RecordingHeader, provider_name: str) -> None:
        self.header = header
        self.name = provider_name
        self.config = ProviderConfig(
            id=header.provider_id, name=provider_name, provider_type=header.provider_type,
            connection_config=dict(header.connection_config),
        )  # fmt: skip
        # The provider's own names of the recorded instruments, as the adapter saw them.
        self.instruments = list(
            SymbolMap.from_config(self.config).instruments(header.instruments).values()
        )

    def decode(self, frame: RecordedFrame) -> DecodedFrame:
        if frame.kind not in self.kinds:
            expected = ", ".join(sorted(self.kinds))
            return DecodedFrame(errors=[f"a {frame.kind} frame in a recording of "
                                        f"{self.header.provider_type} ({expected})"])  # fmt: skip
        return self._decode(frame)

    @abc.abstractmethod
    def _decode(self, frame: RecordedFrame) -> DecodedFrame: ...


def _reasons(errors: list[DecodeError]) -> list[str]:
    return [e.reason for e in errors]


def _as_bytes(data: bytes | str) -> bytes:
    return data.encode() if isinstance(data, str) else data


class PolygonFrames(FrameDecoder):
    kinds = frozenset({FrameKind.WEBSOCKET})

    def _decode(self, frame: RecordedFrame) -> DecodedFrame:
        decoded = polygon_codec.decode_frame(frame.data, frame.receive_ns, self.name)
        return DecodedFrame(decoded.records, _reasons(decoded.errors))


class RefinitivFrames(FrameDecoder):
    kinds = frozenset({FrameKind.WEBSOCKET})

    def __init__(self, header: RecordingHeader, provider_name: str) -> None:
        super().__init__(header, provider_name)
        self.consumer = refinitiv_codec.ConsumerProtocol(provider_name)

    def _decode(self, frame: RecordedFrame) -> DecodedFrame:
        decoded = self.consumer.decode(frame.data, frame.receive_ns)
        return DecodedFrame(decoded.records, _reasons(decoded.errors))


class AlphaVantageFrames(FrameDecoder):
    kinds = frozenset({FrameKind.HTTP_BODY})

    def __init__(self, header: RecordingHeader, provider_name: str) -> None:
        super().__init__(header, provider_name)
        from workers.alphavantage import AlphaVantageAdapter

        # Its filter of what a poll returns again (the same bars, an unchanged quote).
        self.adapter = AlphaVantageAdapter(self.config)

    def _decode(self, frame: RecordedFrame) -> DecodedFrame:
        _, _, query_string = (frame.source or "").partition("?")
        params = dict(parse_qsl(query_string))
        try:
            query = av_codec.decode_query(params)
        except CodecError as exc:
            return DecodedFrame(errors=[f"request path {frame.source!r}: {exc}"])
        # decode_query (the server's view) leaves out the two optional flags.
        if "extended_hours" in params:
            query = replace(query, extended_hours=params["extended_hours"] == "true")
        if "adjusted" in params:
            query = replace(query, adjusted=params["adjusted"] == "true")
        decoded = av_codec.decode_response(
            _as_bytes(frame.data), query, frame.receive_ns, self.name
        )
        if decoded.message is not None or decoded.empty:
            return DecodedFrame(errors=_reasons(decoded.errors))
        return DecodedFrame(self.adapter._new_records(decoded.records), _reasons(decoded.errors))


class IexFrames(FrameDecoder):
    kinds = frozenset({FrameKind.UDP})

    def __init__(self, header: RecordingHeader, provider_name: str) -> None:
        super().__init__(header, provider_name)
        from workers.iex import IexAdapter

        # The adapter's own datagram path: its symbol filter and its sequence tracker
        # (which drops retransmitted messages), without a socket.
        self.adapter = IexAdapter(self.config)
        for inst in self.instruments:
            self.adapter.subscribed[inst.symbol] = inst
        self.adapter._update_filters()

    def _decode(self, frame: RecordedFrame) -> DecodedFrame:
        before = self.adapter.decode_errors
        records = self.adapter._decode(_as_bytes(frame.data), frame.receive_ns)
        failed = self.adapter.decode_errors - before
        return DecodedFrame(
            records, [f"{failed} message(s) could not be decoded"] if failed else []
        )


class FixFrames(FrameDecoder):
    kinds = frozenset({FrameKind.TCP})

    def __init__(self, header: RecordingHeader, provider_name: str) -> None:
        super().__init__(header, provider_name)
        cc = self.config.connection_config
        self.session = fix_codec.FixSession(
            str(cc.get("sender_comp_id", "")), str(cc.get("target_comp_id", "")),
            heartbeat_interval=self.config.integer("heartbeat_interval", 30),
            provider=provider_name,
        )  # fmt: skip
        self.session.new_connection()
        self._logged_on = False

    def _decode(self, frame: RecordedFrame) -> DecodedFrame:
        if not self._logged_on:
            # What is written is thrown away; the session only has to expect the reply.
            self.session.logon(frame.receive_ns, reset_seq_num=True)
            self._logged_on = True
        result = self.session.receive(_as_bytes(frame.data), frame.receive_ns)
        return DecodedFrame(result.records, _reasons(result.errors))


class BloombergFrames(FrameDecoder):
    kinds = frozenset({FrameKind.BLPAPI_EVENT})

    def __init__(self, header: RecordingHeader, provider_name: str) -> None:
        super().__init__(header, provider_name)
        self.symbols_by_cid = {cid: i.symbol for cid, i in enumerate(self.instruments, 1)}
        self.quotes = bbg_codec.QuoteCache()

    def _decode(self, frame: RecordedFrame) -> DecodedFrame:
        event = bbg_codec.decode_event_line(frame.data)
        if isinstance(event, DecodeError):
            return DecodedFrame(errors=[event.reason])
        decoded = bbg_codec.decode_messages(
            event.messages, frame.receive_ns, self.symbols_by_cid, self.name, self.quotes
        )
        return DecodedFrame(decoded.records, _reasons(decoded.errors))


DECODERS: dict[str, type[FrameDecoder]] = {
    "polygon": PolygonFrames,
    "refinitiv": RefinitivFrames,
    "alphavantage": AlphaVantageFrames,
    "iex": IexFrames,
    "fix": FixFrames,
    "bloomberg": BloombergFrames,
}


def frame_decoder(header: RecordingHeader, provider_name: str | None = None) -> FrameDecoder:
    """The decoder for the recording's provider type; raises ``CodecError`` for a type this
    feedfleet has no codec for."""
    cls = DECODERS.get(header.provider_type)
    if cls is None:
        known = ", ".join(sorted(DECODERS))
        raise CodecError(f"no decoder for provider_type {header.provider_type!r}; known: {known}")
    return cls(header, provider_name or header.provider)
