"""A small packet-capture reader and writer for UDP feeds, sans-I/O.

Reads classic libpcap (micro- or nanosecond, either byte order) and pcapng (section header,
interface description, enhanced and simple packet blocks), gzip-compressed or not, as the
IEX HIST downloads come (``...IEXTP1_TOPS1.6.pcap.gz``). Link layers: Ethernet (with VLAN
tags), raw IPv4, Linux cooked (SLL, SLL2) and BSD loopback. Only IPv4/UDP packets come out;
other packets are counted and skipped. Fragmented UDP is reported, not reassembled: market
data segments are sized to fit one frame.

Writes classic libpcap with nanosecond timestamps, Ethernet/IPv4/UDP encapsulation.
"""

from __future__ import annotations

import ipaddress
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from common.codecs.base import CaptureError

# Classic libpcap magic numbers as read little-endian: (byte order, ns per timestamp unit).
_CLASSIC_MAGIC: dict[bytes, tuple[str, int]] = {
    b"\xd4\xc3\xb2\xa1": ("<", 1000),  # little-endian, microseconds
    b"\x4d\x3c\xb2\xa1": ("<", 1),  # little-endian, nanoseconds
    b"\xa1\xb2\xc3\xd4": (">", 1000),
    b"\xa1\xb2\x3c\x4d": (">", 1),
}
_PCAPNG_SHB = b"\x0a\x0d\x0d\x0a"
_GZIP_MAGIC = b"\x1f\x8b"

LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113
LINKTYPE_LINUX_SLL2 = 276
_RAW_ALIASES = frozenset({12, 14, LINKTYPE_RAW})

_ETHERTYPE_IPV4 = 0x0800
_VLAN_TAGS = frozenset({0x8100, 0x88A8, 0x9100})
_IPPROTO_UDP = 17
# A record longer than this is corruption, not a packet (jumbo frames are 9 KiB).
_MAX_RECORD = 256 * 1024


@dataclass(slots=True)
class UdpDatagram:
    """One UDP payload from a capture, with where and when it was seen."""

    timestamp_ns: int
    payload: bytes
    src: tuple[str, int]
    dst: tuple[str, int]
    offset: int  # byte offset of the packet's record in the (decompressed) capture


class PcapReader:
    """Incremental capture reader: ``feed`` bytes as they are read, get datagrams back.

    After a framing error (bad magic, absurd record length) the rest of the input cannot be
    trusted, so the reader reports it once and ignores everything after it.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._base = 0  # offset in the capture of self._buf[0]
        self._format: str | None = None  # "pcap" or "pcapng"
        self._order = "<"
        self._ts_unit_ns = 1000
        self._linktype = LINKTYPE_ETHERNET
        # pcapng: (linktype, timestamp resolution byte) per interface of the current section
        self._interfaces: list[tuple[int, int]] = []
        self._inflate: zlib._Decompress | None = None
        self._started = False
        self.failed = False
        self.packets = 0
        self.skipped_packets = 0  # not IPv4/UDP

    def feed(self, data: bytes) -> list[UdpDatagram | CaptureError]:
        if self.failed:
            return []
        if not self._started:
            self._started = True
            if data[:2] == _GZIP_MAGIC:
                self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        if self._inflate is not None:
            try:
                data = self._inflate_all(data)
            except zlib.error as exc:
                self.failed = True
                return [CaptureError(f"offset {self._base + len(self._buf)}", f"gzip: {exc}")]
        self._buf += data
        out: list[UdpDatagram | CaptureError] = []
        self._parse(out)
        return out

    def _inflate_all(self, data: bytes) -> bytes:
        assert self._inflate is not None
        chunks = [self._inflate.decompress(data)]
        # Concatenated gzip members (``cat a.gz b.gz``) are one valid gzip stream.
        while self._inflate.eof and self._inflate.unused_data:
            rest = self._inflate.unused_data
            self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
            chunks.append(self._inflate.decompress(rest))
        return b"".join(chunks)

    def close(self) -> list[CaptureError]:
        """End of input: anything left over is a truncated record."""
        if self.failed:
            return []
        self.failed = True
        if self._format is None and not self._buf:
            return [CaptureError("offset 0", "empty capture")]
        if self._inflate is not None and not self._inflate.eof:
            return [CaptureError(f"offset {self._base}", "gzip stream is truncated")]
        if self._buf:
            left = len(self._buf)
            return [CaptureError(f"offset {self._base}", f"truncated: {left} bytes left over")]
        return []

    def _fail(self, out: list[UdpDatagram | CaptureError], reason: str) -> None:
        out.append(CaptureError(f"offset {self._base}", reason))
        self.failed = True
        self._buf.clear()

    def _consume(self, n: int) -> None:
        del self._buf[:n]
        self._base += n

    def _parse(self, out: list[UdpDatagram | CaptureError]) -> None:
        buf = self._buf
        if self._format is None:
            if len(buf) < 4:
                return
            magic = bytes(buf[:4])
            if magic == _PCAPNG_SHB:
                self._format = "pcapng"
            elif magic in _CLASSIC_MAGIC:
                if len(buf) < 24:
                    return
                self._order, self._ts_unit_ns = _CLASSIC_MAGIC[magic]
                self._linktype = struct.unpack_from(self._order + "I", buf, 20)[0] & 0xFFFF
                self._format = "pcap"
                self._consume(24)
            else:
                self._fail(out, f"not a pcap or pcapng file (magic {magic.hex()})")
                return
        if self._format == "pcap":
            self._parse_classic(out)
        else:
            self._parse_pcapng(out)

    def _parse_classic(self, out: list[UdpDatagram | CaptureError]) -> None:
        record = struct.Struct(self._order + "IIII")
        buf = self._buf
        while len(buf) >= 16:
            sec, frac, incl, _orig = record.unpack_from(buf, 0)
            if incl > _MAX_RECORD:
                self._fail(out, f"record length {incl} is not plausible (corrupt file?)")
                return
            if len(buf) < 16 + incl:
                return
            ts_ns = sec * 1_000_000_000 + frac * self._ts_unit_ns
            self._packet(out, bytes(buf[16 : 16 + incl]), ts_ns, self._linktype, self._base)
            self._consume(16 + incl)

    def _parse_pcapng(self, out: list[UdpDatagram | CaptureError]) -> None:
        buf = self._buf
        while len(buf) >= 12:
            if bytes(buf[:4]) == _PCAPNG_SHB:
                bom = bytes(buf[8:12])
                if bom == b"\x4d\x3c\x2b\x1a":
                    self._order = "<"
                elif bom == b"\x1a\x2b\x3c\x4d":
                    self._order = ">"
                else:
                    self._fail(out, f"pcapng byte-order magic {bom.hex()} is invalid")
                    return
                self._interfaces = []
            btype, blen = struct.unpack_from(self._order + "II", buf, 0)
            if blen < 12 or blen % 4 or blen > _MAX_RECORD:
                self._fail(out, f"pcapng block length {blen} is invalid")
                return
            if len(buf) < blen:
                return
            block = bytes(buf[8 : blen - 4])
            if btype == 1:
                self._interface_block(block)
            elif btype == 6:
                self._enhanced_block(out, block)
            elif btype == 3:
                self._simple_block(out, block)
            self._consume(blen)

    def _interface_block(self, block: bytes) -> None:
        linktype = struct.unpack_from(self._order + "H", block, 0)[0] if len(block) >= 2 else 1
        tsresol = 6
        pos = 8
        while pos + 4 <= len(block):
            code, length = struct.unpack_from(self._order + "HH", block, pos)
            if code == 0:
                break
            if code == 9 and length >= 1 and pos + 5 <= len(block):  # if_tsresol
                tsresol = block[pos + 4]
            pos += 4 + (length + 3) // 4 * 4
        self._interfaces.append((linktype, tsresol))

    def _enhanced_block(self, out: list[UdpDatagram | CaptureError], block: bytes) -> None:
        if len(block) < 20:
            out.append(CaptureError(f"offset {self._base}", "short enhanced packet block"))
            return
        iface, hi, lo, caplen, _orig = struct.unpack_from(self._order + "IIIII", block, 0)
        if iface >= len(self._interfaces):
            out.append(CaptureError(f"offset {self._base}", f"unknown interface {iface}"))
            return
        linktype, tsresol = self._interfaces[iface]
        ts_ns = _pcapng_time_ns((hi << 32) | lo, tsresol)
        self._packet(out, block[20 : 20 + caplen], ts_ns, linktype, self._base)

    def _simple_block(self, out: list[UdpDatagram | CaptureError], block: bytes) -> None:
        if not self._interfaces or len(block) < 4:
            out.append(
                CaptureError(f"offset {self._base}", "simple packet block without interface")
            )
            return
        orig = struct.unpack_from(self._order + "I", block, 0)[0]
        # Simple packet blocks carry no timestamp.
        self._packet(out, block[4 : 4 + orig], 0, self._interfaces[0][0], self._base)

    def _packet(
        self, out: list[UdpDatagram | CaptureError], frame: bytes, ts_ns: int, linktype: int,
        offset: int,
    ) -> None:  # fmt: skip
        self.packets += 1
        try:
            datagram = _udp_from_frame(frame, linktype, ts_ns, offset)
        except ValueError as exc:
            out.append(CaptureError(f"offset {offset}", str(exc)))
            return
        if datagram is None:
            self.skipped_packets += 1
        else:
            out.append(datagram)


def _pcapng_time_ns(ts: int, tsresol: int) -> int:
    if tsresol & 0x80:
        return (ts * 1_000_000_000) >> (tsresol & 0x7F)
    if tsresol <= 9:
        return ts * 10 ** (9 - tsresol)
    return ts // 10 ** (tsresol - 9)


def _udp_from_frame(frame: bytes, linktype: int, ts_ns: int, offset: int) -> UdpDatagram | None:
    """The UDP payload of one link-layer frame; None when it is not IPv4/UDP."""
    if linktype == LINKTYPE_ETHERNET:
        if len(frame) < 14:
            raise ValueError("truncated Ethernet header")
        pos = 12
        ethertype = int.from_bytes(frame[12:14], "big")
        while ethertype in _VLAN_TAGS and len(frame) >= pos + 6:
            pos += 4
            ethertype = int.from_bytes(frame[pos : pos + 2], "big")
        if ethertype != _ETHERTYPE_IPV4:
            return None
        ip_start = pos + 2
    elif linktype in _RAW_ALIASES:
        ip_start = 0
    elif linktype == LINKTYPE_LINUX_SLL:
        if len(frame) < 16 or int.from_bytes(frame[14:16], "big") != _ETHERTYPE_IPV4:
            return None
        ip_start = 16
    elif linktype == LINKTYPE_LINUX_SLL2:
        if len(frame) < 20 or int.from_bytes(frame[0:2], "big") != _ETHERTYPE_IPV4:
            return None
        ip_start = 20
    elif linktype == LINKTYPE_NULL:
        # The address family is in the capturing host's byte order; AF_INET is 2 everywhere.
        if len(frame) < 4 or 2 not in (frame[0], frame[3]):
            return None
        ip_start = 4
    else:
        raise ValueError(f"unsupported link type {linktype}")
    ip = frame[ip_start:]
    if len(ip) < 20 or ip[0] >> 4 != 4:
        return None
    ihl = (ip[0] & 0x0F) * 4
    if ip[9] != _IPPROTO_UDP:
        return None
    total = int.from_bytes(ip[2:4], "big")
    frag = int.from_bytes(ip[6:8], "big")
    if frag & 0x1FFF:
        return None  # a later fragment: its first fragment was reported
    if frag & 0x2000:
        raise ValueError("fragmented UDP datagram (not reassembled)")
    if ihl < 20 or len(ip) < ihl + 8:
        raise ValueError("truncated IPv4/UDP header")
    udp = ip[ihl : min(total, len(ip))] if total >= ihl + 8 else ip[ihl:]
    udp_len = int.from_bytes(udp[4:6], "big")
    if udp_len < 8:
        raise ValueError(f"UDP length {udp_len} is shorter than its header")
    if len(udp) < udp_len:
        raise ValueError(f"packet cut short: UDP length {udp_len}, captured {len(udp)}")
    src = (str(ipaddress.IPv4Address(ip[12:16])), int.from_bytes(udp[0:2], "big"))
    dst = (str(ipaddress.IPv4Address(ip[16:20])), int.from_bytes(udp[2:4], "big"))
    return UdpDatagram(ts_ns, bytes(udp[8:udp_len]), src, dst, offset)


def read_udp(data: bytes) -> Iterator[UdpDatagram | CaptureError]:
    """Every UDP datagram of a whole capture (pcap or pcapng, gzip or not)."""
    reader = PcapReader()
    yield from reader.feed(data)
    yield from reader.close()


# ---------------------------------------------------------------- writing


def pcap_header(snaplen: int = 65535, linktype: int = LINKTYPE_ETHERNET) -> bytes:
    """Global header of a little-endian, nanosecond-resolution classic pcap file."""
    return struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, snaplen, linktype)


def pcap_record(
    timestamp_ns: int, payload: bytes, src: tuple[str, int], dst: tuple[str, int]
) -> bytes:
    """One packet record: ``payload`` in UDP in IPv4 in Ethernet."""
    frame = udp_frame(payload, src, dst)
    sec, ns = divmod(timestamp_ns, 1_000_000_000)
    return struct.pack("<IIII", sec, ns, len(frame), len(frame)) + frame


def udp_frame(payload: bytes, src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    src_ip = ipaddress.IPv4Address(src[0])
    dst_ip = ipaddress.IPv4Address(dst[0])
    udp = struct.pack("!HHHH", src[1], dst[1], 8 + len(payload), 0) + payload  # no checksum
    ip = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, _IPPROTO_UDP, 0,
            src_ip.packed, dst_ip.packed,
        )
    )  # fmt: skip
    struct.pack_into("!H", ip, 10, _ipv4_checksum(bytes(ip)))
    if dst_ip.is_multicast:
        # RFC 1112 mapping: 01:00:5e + low 23 bits of the group address.
        dst_mac = b"\x01\x00\x5e" + (int(dst_ip) & 0x7FFFFF).to_bytes(3, "big")
    else:
        dst_mac = b"\x02\x00\x00\x00\x00\x02"
    ether = dst_mac + b"\x02\x00\x00\x00\x00\x01" + _ETHERTYPE_IPV4.to_bytes(2, "big")
    return ether + bytes(ip) + udp


def _ipv4_checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def write_udp(
    datagrams: Iterable[tuple[int, bytes]],
    src: tuple[str, int] = ("10.0.0.1", 10000),
    dst: tuple[str, int] = ("233.215.21.4", 10378),
) -> bytes:
    """A whole capture of ``(timestamp_ns, payload)`` datagrams sent from ``src`` to ``dst``."""
    parts = [pcap_header()]
    parts.extend(pcap_record(ts, payload, src, dst) for ts, payload in datagrams)
    return b"".join(parts)
