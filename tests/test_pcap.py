"""Capture framing: classic pcap and pcapng, gzip, link layers, IPv4/UDP extraction.

The captures here are laid out by hand from the file formats (libpcap's global and record
headers; pcapng's section header, interface description, enhanced and simple packet blocks)
and the IPv4/UDP headers, not by ``pcap.write_udp``, so a mistake shared by the reader and
the writer cannot hide.
"""

from __future__ import annotations

import gzip
import ipaddress
import struct
import zlib

import pytest

from common.codecs import pcap
from common.codecs.base import CaptureError
from common.codecs.pcap import PcapReader, UdpDatagram

SRC = ("10.1.2.3", 5000)
DST = ("233.215.21.4", 10378)
SEC = 1_700_000_000
DF = 0x4000  # IPv4 "don't fragment", as market data senders set it
MF = 0x2000  # IPv4 "more fragments"
GLOBAL_HEADER = 24
RECORD_HEADER = 16
SHB_LEN = 28  # section header block without options


# ---------------------------------------------------------------- building bytes by hand


def ipv4_udp(
    payload: bytes,
    *,
    options: bytes = b"",
    frag: int = DF,
    proto: int = 17,
    total: int | None = None,
    udp_len: int | None = None,
    ihl_words: int | None = None,
) -> bytes:
    """An IPv4 header (checksum left 0: the reader does not check it) and a UDP datagram."""
    udp_length = 8 + len(payload) if udp_len is None else udp_len
    udp = struct.pack("!HHHH", SRC[1], DST[1], udp_length, 0) + payload
    header_len = 20 + len(options)
    words = header_len // 4 if ihl_words is None else ihl_words
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | words,
        0,
        header_len + len(udp) if total is None else total,
        0x1234,
        frag,
        64,
        proto,
        0,
        ipaddress.IPv4Address(SRC[0]).packed,
        ipaddress.IPv4Address(DST[0]).packed,
    )
    return ip + options + udp


def ether(ip: bytes, ethertype: int = 0x0800, tags: tuple[int, ...] = ()) -> bytes:
    """An Ethernet II frame; each tag is a TPID followed by a TCI (VLAN id 100)."""
    macs = bytes.fromhex("01005e571504") + bytes.fromhex("020000000001")
    vlan = b"".join(struct.pack("!HH", tpid, 100) for tpid in tags)
    return macs + vlan + struct.pack("!H", ethertype) + ip


def pcap_file(*records: bytes, order: str = "<", nano: bool = False, linktype: int = 1) -> bytes:
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    return struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 65535, linktype) + b"".join(records)


def record(frame: bytes, frac: int = 0, *, order: str = "<", orig: int | None = None) -> bytes:
    orig_len = len(frame) if orig is None else orig
    return struct.pack(order + "IIII", SEC, frac, len(frame), orig_len) + frame


def block(btype: int, body: bytes, order: str = "<") -> bytes:
    body += bytes(-len(body) % 4)
    total = len(body) + 12
    return struct.pack(order + "II", btype, total) + body + struct.pack(order + "I", total)


def shb(order: str = "<") -> bytes:
    return block(0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1), order)


def option(code: int, value: bytes, order: str = "<") -> bytes:
    return struct.pack(order + "HH", code, len(value)) + value + bytes(-len(value) % 4)


def idb(linktype: int = 1, options: bytes = b"", order: str = "<") -> bytes:
    return block(1, struct.pack(order + "HHI", linktype, 0, 0) + options, order)


def tsresol(value: int, order: str = "<") -> bytes:
    return option(9, bytes([value]), order) + option(0, b"", order)


def epb(
    ts: int,
    frame: bytes,
    *,
    iface: int = 0,
    orig: int | None = None,
    order: str = "<",
) -> bytes:
    orig_len = len(frame) if orig is None else orig
    head = struct.pack(order + "IIIII", iface, ts >> 32, ts & 0xFFFFFFFF, len(frame), orig_len)
    return block(6, head + frame, order)


def spb(frame: bytes, orig: int | None = None) -> bytes:
    return block(3, struct.pack("<I", len(frame) if orig is None else orig) + frame)


def read(data: bytes) -> list[UdpDatagram | CaptureError]:
    return list(pcap.read_udp(data))


def udp(ts: int, payload: bytes, offset: int) -> UdpDatagram:
    return UdpDatagram(ts, payload, SRC, DST, offset)


# ---------------------------------------------------------------- classic libpcap


@pytest.mark.parametrize(
    ("magic", "order", "frac", "ns"),
    [
        (b"\xd4\xc3\xb2\xa1", "<", 123_456, 123_456_000),  # microseconds
        (b"\x4d\x3c\xb2\xa1", "<", 7, 7),  # nanoseconds
        (b"\xa1\xb2\xc3\xd4", ">", 123_456, 123_456_000),
        (b"\xa1\xb2\x3c\x4d", ">", 7, 7),
    ],
    ids=["le-us", "le-ns", "be-us", "be-ns"],
)
def test_classic_byte_orders_and_resolutions(magic: bytes, order: str, frac: int, ns: int) -> None:
    first = ether(ipv4_udp(b"hello"))
    second = ether(ipv4_udp(b"world!"))
    header = magic + struct.pack(order + "HHiIII", 2, 4, 0, 0, 65535, 1)
    data = header + record(first, frac, order=order) + record(second, order=order)
    assert read(data) == [
        udp(SEC * 1_000_000_000 + ns, b"hello", GLOBAL_HEADER),
        udp(SEC * 1_000_000_000, b"world!", GLOBAL_HEADER + RECORD_HEADER + len(first)),
    ]


def test_classic_fed_one_byte_at_a_time() -> None:
    frames = [ether(ipv4_udp(bytes([i]) * (i + 1))) for i in range(3)]
    data = pcap_file(*(record(f, i) for i, f in enumerate(frames)), nano=True)
    reader = PcapReader()
    got = []
    for i in range(len(data)):
        got.extend(reader.feed(data[i : i + 1]))
    assert reader.close() == []
    assert [(g.timestamp_ns, g.payload) for g in got] == [  # type: ignore[union-attr]
        (SEC * 1_000_000_000 + i, bytes([i]) * (i + 1)) for i in range(3)
    ]
    assert (reader.packets, reader.skipped_packets) == (3, 0)


def test_classic_link_type_ignores_the_fcs_bits() -> None:
    # The upper 16 bits of the link type field say whether frames carry an FCS.
    frame = ether(ipv4_udp(b"fcs"))
    (item,) = read(pcap_file(record(frame), linktype=0x1000_0001))
    assert item == udp(SEC * 1_000_000_000, b"fcs", GLOBAL_HEADER)


def test_empty_and_short_ethernet_records() -> None:
    good = ether(ipv4_udp(b"ok"))
    header_only = ether(b"")  # 14 bytes: an IPv4 ethertype and nothing after it
    data = pcap_file(record(good), record(good[:13]), record(header_only), record(b""))
    second = GLOBAL_HEADER + RECORD_HEADER + len(good)
    reader = PcapReader()
    assert reader.feed(data) == [
        udp(SEC * 1_000_000_000, b"ok", GLOBAL_HEADER),
        CaptureError(f"offset {second}", "truncated Ethernet header"),
        # The empty record is the last 16 bytes: it is a record, not a leftover.
        CaptureError(f"offset {second + 16 + 13 + 16 + 14}", "truncated Ethernet header"),
    ]
    assert reader.close() == []
    assert (reader.packets, reader.skipped_packets) == (4, 1)


def test_record_length_limit() -> None:
    limit = 256 * 1024
    arp = ether(bytes(limit - 14), ethertype=0x0806)  # the longest record accepted
    data = pcap_file(record(arp), struct.pack("<IIII", SEC, 0, limit + 1, limit + 1))
    reader = PcapReader()
    assert reader.feed(data) == [
        CaptureError(
            f"offset {GLOBAL_HEADER + 16 + limit}",
            f"record length {limit + 1} is not plausible (corrupt file?)",
        )
    ]
    assert (reader.packets, reader.skipped_packets) == (1, 1)
    # Nothing after a framing error is trusted.
    assert reader.feed(record(ether(ipv4_udp(b"late")))) == []
    assert reader.close() == []


def test_snaplen_cut_record_reports_what_was_captured() -> None:
    full = ether(ipv4_udp(b"p" * 100))
    cut = full[:60]  # snaplen 60: 26 bytes of the UDP datagram
    data = pcap_file(record(cut, orig=len(full)), record(ether(ipv4_udp(b"next"))))
    assert read(data) == [
        CaptureError(f"offset {GLOBAL_HEADER}", "packet cut short: UDP length 108, captured 26"),
        udp(SEC * 1_000_000_000, b"next", GLOBAL_HEADER + RECORD_HEADER + 60),
    ]


def test_packet_and_skip_counters() -> None:
    arp = ether(bytes(28), ethertype=0x0806)
    tcp = ether(ipv4_udp(b"tcp", proto=6))
    short = ether(b"")[:13]
    frames = [ether(ipv4_udp(b"a")), arp, tcp, ether(ipv4_udp(b"b")), short, ether(b"\x45")]
    reader = PcapReader()
    items = reader.feed(pcap_file(*(record(f) for f in frames)))
    assert [i.payload if isinstance(i, UdpDatagram) else i.reason for i in items] == [
        b"a",
        b"b",
        "truncated Ethernet header",
    ]
    assert (reader.packets, reader.skipped_packets) == (6, 3)


def test_plain_capture_chunk_starting_with_gzip_magic() -> None:
    # Only the first bytes of the input say whether it is gzip: a later read that happens to
    # start with 1f 8b is capture data.
    frame = ether(ipv4_udp(b"\x1f\x8b\x08 payload"))
    data = pcap_file(record(frame), record(ether(ipv4_udp(b"more"))))
    cut = data.index(b"\x1f\x8b")
    reader = PcapReader()
    got = reader.feed(data[:cut]) + reader.feed(data[cut:])
    assert got == [
        udp(SEC * 1_000_000_000, b"\x1f\x8b\x08 payload", GLOBAL_HEADER),
        udp(SEC * 1_000_000_000, b"more", GLOBAL_HEADER + RECORD_HEADER + len(frame)),
    ]
    assert reader.close() == []


@pytest.mark.parametrize(
    "data",
    [pcap_file(), pcap_file(nano=True, order=">"), shb(), shb() + idb()],
    ids=["classic", "classic-be-ns", "pcapng-section", "pcapng-interface"],
)
def test_capture_without_packets_is_empty_not_truncated(data: bytes) -> None:
    reader = PcapReader()
    assert reader.feed(data) == []
    assert reader.close() == []
    assert reader.packets == 0


def test_not_a_capture_is_reported_once_four_bytes_are_in() -> None:
    reader = PcapReader()
    assert reader.feed(b"GIF") == []
    assert reader.feed(b"8") == [
        CaptureError("offset 0", "not a pcap or pcapng file (magic 47494638)")
    ]
    assert reader.feed(b"9a" + bytes(100)) == []
    assert reader.close() == []


def test_close_reports_a_truncated_capture_once() -> None:
    first = ether(ipv4_udp(b"a"))
    data = pcap_file(record(first), record(ether(ipv4_udp(b"b"))))
    second = GLOBAL_HEADER + RECORD_HEADER + len(first)
    reader = PcapReader()
    assert len(reader.feed(data[:-3])) == 1
    assert reader.close() == [
        CaptureError(f"offset {second}", f"truncated: {len(data) - 3 - second} bytes left over")
    ]
    # End of input is final: nothing more is read or reported.
    assert reader.close() == []
    assert reader.feed(data[-3:]) == []


# ---------------------------------------------------------------- Ethernet, VLAN, other links


@pytest.mark.parametrize(
    "tags",
    [(0x8100,), (0x88A8, 0x8100), (0x9100,), (0x9100, 0x88A8, 0x8100)],
    ids=["802.1Q", "QinQ", "9100", "three"],
)
def test_vlan_tags_are_skipped(tags: tuple[int, ...]) -> None:
    frame = ether(ipv4_udp(b"tagged"), tags=tags)
    arp = ether(bytes(28), ethertype=0x0806, tags=tags)
    reader = PcapReader()
    assert reader.feed(pcap_file(record(frame), record(arp))) == [
        udp(SEC * 1_000_000_000, b"tagged", GLOBAL_HEADER)
    ]
    assert reader.skipped_packets == 1


def sll(ip: bytes, protocol: int = 0x0800) -> bytes:
    # packet type, ARPHRD_ETHER, address length, 8 address bytes, protocol
    return (
        struct.pack("!HHH", 0, 1, 6)
        + bytes.fromhex("020000000001")
        + bytes(2)
        + (struct.pack("!H", protocol) + ip)
    )


def sll2(ip: bytes, protocol: int = 0x0800) -> bytes:
    # protocol, reserved, interface index, ARPHRD_ETHER, packet type, address length, address
    return struct.pack("!HHIHBB", protocol, 0, 3, 1, 0, 6) + bytes(8) + ip


@pytest.mark.parametrize(
    ("linktype", "frame"),
    [
        (101, ipv4_udp(b"linked")),
        (12, ipv4_udp(b"linked")),
        (14, ipv4_udp(b"linked")),
        (113, sll(ipv4_udp(b"linked"))),
        (276, sll2(ipv4_udp(b"linked"))),
        (0, b"\x02\x00\x00\x00" + ipv4_udp(b"linked")),  # BSD loopback, little-endian host
        (0, b"\x00\x00\x00\x02" + ipv4_udp(b"linked")),  # big-endian host
    ],
    ids=["raw", "raw-12", "raw-14", "sll", "sll2", "null-le", "null-be"],
)
def test_link_types(linktype: int, frame: bytes) -> None:
    reader = PcapReader()
    assert reader.feed(pcap_file(record(frame, 5), linktype=linktype)) == [
        udp(SEC * 1_000_000_000 + 5_000, b"linked", GLOBAL_HEADER)
    ]
    assert (reader.packets, reader.skipped_packets) == (1, 0)


@pytest.mark.parametrize(
    ("linktype", "frame"),
    [
        (1, ether(ipv4_udp(b"x"), ethertype=0x86DD)),
        (113, sll(ipv4_udp(b"x"), protocol=0x86DD)),
        (276, sll2(ipv4_udp(b"x"), protocol=0x86DD)),
        (0, b"\x18\x00\x00\x00" + ipv4_udp(b"x")),  # AF_INET6 on BSD
        (101, b"\x65" + ipv4_udp(b"x")[1:]),  # version 6 in the first nibble
    ],
    ids=["ether", "sll", "sll2", "null", "raw"],
)
def test_link_header_decides_the_protocol(linktype: int, frame: bytes) -> None:
    # IPv4/UDP-looking bytes behind a header that says IPv6 are not read as IPv4.
    reader = PcapReader()
    assert reader.feed(pcap_file(record(frame), linktype=linktype)) == []
    assert (reader.packets, reader.skipped_packets) == (1, 1)


def test_unsupported_link_type_is_reported_per_packet() -> None:
    frame = ipv4_udp(b"x")
    reader = PcapReader()
    assert reader.feed(pcap_file(record(frame), record(frame), linktype=147)) == [
        CaptureError(f"offset {GLOBAL_HEADER}", "unsupported link type 147"),
        CaptureError(f"offset {GLOBAL_HEADER + 16 + len(frame)}", "unsupported link type 147"),
    ]
    assert reader.packets == 2


# ---------------------------------------------------------------- IPv4 and UDP headers


def raw(*frames: bytes) -> list[UdpDatagram | CaptureError]:
    return read(pcap_file(*(record(f) for f in frames), linktype=101))


def test_ipv4_options_are_skipped() -> None:
    router_alert = b"\x94\x04\x00\x00"
    assert raw(ipv4_udp(b"opt", options=router_alert)) == [
        udp(SEC * 1_000_000_000, b"opt", GLOBAL_HEADER)
    ]
    assert raw(ipv4_udp(b"opt", options=router_alert * 10)) == [
        udp(SEC * 1_000_000_000, b"opt", GLOBAL_HEADER)
    ]


def test_empty_udp_datagram() -> None:
    # 28 bytes exactly: a datagram with no payload is still a datagram.
    assert raw(ipv4_udp(b"")) == [udp(SEC * 1_000_000_000, b"", GLOBAL_HEADER)]


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (ipv4_udp(b"")[:20], "truncated IPv4/UDP header"),
        (ipv4_udp(b"")[:24], "truncated IPv4/UDP header"),
        (ipv4_udp(b"")[:27], "truncated IPv4/UDP header"),
        (ipv4_udp(b"12345678", ihl_words=4), "truncated IPv4/UDP header"),
        (ipv4_udp(b"x" * 30, ihl_words=15), "truncated IPv4/UDP header"),
        (ipv4_udp(b"abc", udp_len=7), "UDP length 7 is shorter than its header"),
        (ipv4_udp(b"abc", udp_len=12), "packet cut short: UDP length 12, captured 11"),
        (ipv4_udp(b"abc", frag=MF), "fragmented UDP datagram (not reassembled)"),
        (ipv4_udp(b"abc", frag=MF | DF), "fragmented UDP datagram (not reassembled)"),
    ],
    ids=[
        "no-udp-header",
        "half-udp-header",
        "udp-header-less-one",
        "ihl-too-small",
        "ihl-beyond-packet",
        "udp-length-7",
        "udp-length-beyond",
        "first-fragment",
        "first-fragment-df",
    ],
)
def test_malformed_packets_are_reported(frame: bytes, reason: str) -> None:
    assert raw(frame, ipv4_udp(b"after")) == [
        CaptureError(f"offset {GLOBAL_HEADER}", reason),
        udp(SEC * 1_000_000_000, b"after", GLOBAL_HEADER + 16 + len(frame)),
    ]


@pytest.mark.parametrize(
    "frame",
    [
        ipv4_udp(b"abcdefgh", frag=185),  # last fragment (offset 1480 bytes, no MF)
        ipv4_udp(b"abcdefgh", frag=MF | 185),  # a middle fragment
        ipv4_udp(b"abcdefgh", proto=6),  # TCP
        ipv4_udp(b"abcdefgh")[:19],  # shorter than an IPv4 header: not IPv4
    ],
    ids=["last-fragment", "middle-fragment", "tcp", "short"],
)
def test_non_udp_packets_and_later_fragments_are_skipped(frame: bytes) -> None:
    reader = PcapReader()
    assert reader.feed(pcap_file(record(frame), linktype=101)) == []
    assert (reader.packets, reader.skipped_packets) == (1, 1)


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        # Ethernet pads short frames to 60 bytes: the IP total length ends the datagram.
        (ipv4_udp(b"ab"), b"ab"),
        # Offloaded (TSO) captures carry total length 0; a bogus 20 is no better.
        (ipv4_udp(b"ab", total=0), b"ab"),
        (ipv4_udp(b"ab", total=20), b"ab"),
        # A UDP length past the IP total length must not reach into the padding.
        (ipv4_udp(b"ab", udp_len=14), "packet cut short: UDP length 14, captured 10"),
        (ipv4_udp(b"", udp_len=10), "packet cut short: UDP length 10, captured 8"),
    ],
    ids=["padded", "total-0", "total-20", "udp-length-past-total", "empty-past-total"],
)
def test_ethernet_padding_is_not_payload(ip: bytes, expected: bytes | str) -> None:
    frame = ether(ip)
    frame += b"\xee" * (60 - len(frame))
    items = read(pcap_file(record(frame)))
    if isinstance(expected, bytes):
        assert items == [udp(SEC * 1_000_000_000, expected, GLOBAL_HEADER)]
    else:
        assert items == [CaptureError(f"offset {GLOBAL_HEADER}", expected)]


# ---------------------------------------------------------------- pcapng

NG_TS = 1_700_000_002_500_000_000  # low 32 bits have the top bit set


@pytest.mark.parametrize("order", ["<", ">"], ids=["little-endian", "big-endian"])
def test_pcapng_byte_orders(order: str) -> None:
    frame = ether(ipv4_udp(b"ng"))
    iface = idb(1, tsresol(9, order), order)
    data = shb(order) + iface + epb(NG_TS, frame, order=order) + epb(NG_TS + 1, frame, order=order)
    first = SHB_LEN + len(iface)
    assert read(data) == [
        udp(NG_TS, b"ng", first),
        udp(NG_TS + 1, b"ng", first + len(epb(0, frame))),
    ]


def test_pcapng_new_section_resets_interfaces_and_byte_order() -> None:
    frame = ether(ipv4_udp(b"s"))
    first = shb("<") + idb(101) + epb(1_000, ipv4_udp(b"s"))
    second_head = shb(">")
    orphan = epb(2_000, frame, order=">")
    second_rest = idb(1, order=">") + epb(3_000, frame, order=">")
    data = first + second_head + orphan + second_rest
    at = len(first) + len(second_head)
    assert read(data) == [
        udp(1_000_000, b"s", SHB_LEN + 20),
        CaptureError(f"offset {at}", "unknown interface 0"),
        udp(3_000_000, b"s", at + len(orphan) + 20),
    ]


def test_pcapng_bad_byte_order_magic() -> None:
    data = bytearray(shb() + idb() + epb(0, ether(ipv4_udp(b"x"))))
    data[8:12] = b"\xde\xad\xbe\xef"
    reader = PcapReader()
    assert reader.feed(bytes(data)) == [
        CaptureError("offset 0", "pcapng byte-order magic deadbeef is invalid")
    ]
    assert reader.feed(shb()) == [] and reader.close() == []


@pytest.mark.parametrize("length", [0, 8, 14, 262148, 0xFFFFFFF0])
def test_pcapng_block_length_must_be_plausible(length: int) -> None:
    head = shb() + idb()
    bad = struct.pack("<II", 6, length) + bytes(32)
    reader = PcapReader()
    assert reader.feed(head + bad) == [
        CaptureError(f"offset {len(head)}", f"pcapng block length {length} is invalid")
    ]
    assert reader.close() == []


def test_pcapng_block_length_limit_and_empty_blocks() -> None:
    frame = ether(ipv4_udp(b"big"))
    largest = block(0x0BAD, bytes(256 * 1024 - 12))  # a custom block, skipped
    empty = block(5, b"")  # the smallest block there is: 12 bytes
    head = shb() + idb(1, tsresol(9))
    reader = PcapReader()
    at = len(head) + len(largest) + len(empty)
    assert reader.feed(head + largest + empty + epb(NG_TS, frame) + empty) == [
        udp(NG_TS, b"big", at)
    ]
    assert reader.close() == []


def test_pcapng_interface_defaults() -> None:
    # No options: microseconds. An empty description body: Ethernet.
    ts_us = 1_700_000_000_123_456
    frame = ether(ipv4_udp(b"d"))
    head = shb() + block(1, b"")
    assert read(head + epb(ts_us, frame)) == [udp(ts_us * 1000, b"d", len(head))]
    head = shb() + idb(101)
    assert read(head + epb(ts_us, ipv4_udp(b"d"))) == [udp(ts_us * 1000, b"d", len(head))]


def test_pcapng_interface_options_before_and_after_tsresol() -> None:
    options = (
        option(1, b"captured on eth0 A/B")  # a 20-byte comment
        + option(9, b"\x09")  # if_tsresol: nanoseconds
        + option(2, b"eth0")  # if_name, whose first byte is no resolution
        + option(0, b"")
        + option(9, b"\x03")  # after the end of options: ignored
    )
    head = shb() + idb(1, options)
    assert read(head + epb(NG_TS, ether(ipv4_udp(b"o")))) == [udp(NG_TS, b"o", len(head))]


def test_pcapng_long_option_before_tsresol() -> None:
    # Option lengths are unsigned 16-bit: a 40000-byte comment is legal.
    options = option(1, b"c" * 40_000) + tsresol(9)
    head = shb() + idb(1, options)
    assert read(head + epb(NG_TS, ether(ipv4_udp(b"o")))) == [udp(NG_TS, b"o", len(head))]


def test_pcapng_truncated_tsresol_option_is_ignored() -> None:
    # The last option claims one byte of value that the block does not hold.
    head = shb() + idb(1, struct.pack("<HH", 9, 1))
    ts_us = 1_700_000_000_123_456
    assert read(head + epb(ts_us, ether(ipv4_udp(b"t")))) == [udp(ts_us * 1000, b"t", len(head))]


@pytest.mark.parametrize(
    ("resolution", "ts", "ns"),
    [
        (6, 1_700_000_000_123_456, 1_700_000_000_123_456_000),
        (3, 1_700_000_000_123, 1_700_000_000_123_000_000),
        (9, 1_700_000_000_123_456_789, 1_700_000_000_123_456_789),
        (10, 17_000_000_001_234_567_891, 1_700_000_000_123_456_789),
        (12, 12_345_678_901_234_567, 12_345_678_901_234),  # picoseconds, a relative clock
        (0x80 | 20, (SEC << 20) | (1 << 19), SEC * 1_000_000_000 + 500_000_000),  # 2**-20 s
        (0x80 | 32, (SEC << 32) | (3 << 30), SEC * 1_000_000_000 + 750_000_000),  # 2**-32 s
    ],
    ids=["us", "ms", "ns", "100ps", "ps", "2^-20", "2^-32"],
)
def test_pcapng_timestamp_resolutions(resolution: int, ts: int, ns: int) -> None:
    head = shb() + idb(1, tsresol(resolution))
    (item,) = read(head + epb(ts, ether(ipv4_udp(b"r"))))
    assert item == udp(ns, b"r", len(head))
    assert type(item.timestamp_ns) is int


def test_pcapng_enhanced_block_errors_are_not_fatal() -> None:
    frame = ether(ipv4_udp(b"e"))
    head = shb() + idb(1, tsresol(9))
    short = block(6, bytes(16))
    empty = epb(NG_TS, b"")
    other_iface = epb(NG_TS, frame, iface=1)
    no_iface = epb(NG_TS, frame, iface=0xFFFFFFFF)
    blocks = [short, empty, other_iface, no_iface, epb(NG_TS, frame)]
    offsets = [len(head) + sum(len(b) for b in blocks[:i]) for i in range(len(blocks))]
    reader = PcapReader()
    assert reader.feed(head + b"".join(blocks)) == [
        CaptureError(f"offset {offsets[0]}", "short enhanced packet block"),
        CaptureError(f"offset {offsets[1]}", "truncated Ethernet header"),
        CaptureError(f"offset {offsets[2]}", "unknown interface 1"),
        CaptureError(f"offset {offsets[3]}", "unknown interface 4294967295"),
        udp(NG_TS, b"e", offsets[4]),
    ]
    assert reader.close() == []
    assert reader.packets == 2


def test_pcapng_snaplen_cut_packets_exclude_block_padding() -> None:
    full = ether(ipv4_udp(b"p" * 58))  # 100 bytes
    head = shb() + idb(1, tsresol(9))
    # 50 captured bytes are followed by 2 bytes of block padding.
    cut = epb(NG_TS, full[:50], orig=len(full))
    assert read(head + cut + epb(NG_TS, ether(ipv4_udp(b"n")))) == [
        CaptureError(f"offset {len(head)}", "packet cut short: UDP length 66, captured 16"),
        udp(NG_TS, b"n", len(head) + len(cut)),
    ]


def test_pcapng_unsupported_link_type() -> None:
    head = shb() + idb(0xFFFF)
    assert read(head + epb(0, b"frame")) == [
        CaptureError(f"offset {len(head)}", "unsupported link type 65535")
    ]


# ---------------------------------------------------------------- pcapng simple packet blocks


def test_simple_packet_blocks_use_the_first_interface() -> None:
    # Interface 0 is raw IPv4; interface 1 is Ethernet and must not be used.
    head = shb() + idb(101) + idb(1, tsresol(9))
    first = spb(ipv4_udp(b"simple"))
    second = spb(ipv4_udp(b"again!"))
    reader = PcapReader()
    assert reader.feed(head + first + second) == [
        udp(0, b"simple", len(head)),  # simple packet blocks carry no timestamp
        udp(0, b"again!", len(head) + len(first)),
    ]
    assert reader.close() == [] and reader.packets == 2


def test_simple_packet_block_errors() -> None:
    lone = spb(ipv4_udp(b"x"))
    empty = block(3, b"")
    no_packet = spb(b"")
    head = shb() + idb(101)
    reader = PcapReader()
    assert reader.feed(shb() + lone + idb(101) + empty + no_packet + spb(ipv4_udp(b"y"))) == [
        CaptureError(f"offset {SHB_LEN}", "simple packet block without interface"),
        CaptureError(f"offset {len(head) + len(lone)}", "simple packet block without interface"),
        udp(0, b"y", len(head) + len(lone) + len(empty) + len(no_packet)),
    ]
    # The block with an empty packet is a packet, not an IPv4/UDP one.
    assert (reader.packets, reader.skipped_packets) == (2, 1)


def test_simple_packet_block_padding_is_not_payload() -> None:
    # The headers claim one byte more than the 45-byte packet: the block padding after it
    # must not stand in for that byte.
    ip = ipv4_udp(b"z" * 17, total=46, udp_len=26)
    head = shb() + idb(101)
    assert read(head + spb(ip)) == [
        CaptureError(f"offset {len(head)}", "packet cut short: UDP length 26, captured 25")
    ]


@pytest.mark.parametrize("orig", [100, 0xFFFFFFFF], ids=["snaplen", "absurd-length"])
def test_simple_packet_block_cut_by_snaplen(orig: int) -> None:
    # The original packet was longer than the 48 bytes kept (no padding after them); the
    # block's end, not the original length, bounds what was captured.
    ip = ipv4_udp(b"q" * 72)
    head = shb() + idb(101)
    cut = spb(ip[:48], orig=orig)
    assert read(head + cut + spb(ipv4_udp(b"n"))) == [
        CaptureError(f"offset {len(head)}", "packet cut short: UDP length 80, captured 28"),
        udp(0, b"n", len(head) + len(cut)),
    ]


# ---------------------------------------------------------------- gzip


def classic_capture(count: int) -> tuple[bytes, list[UdpDatagram]]:
    frames = [ether(ipv4_udp(bytes([65 + i]) * (10 + i))) for i in range(count)]
    data = pcap_file(*(record(f, i) for i, f in enumerate(frames)), nano=True)
    expected, at = [], GLOBAL_HEADER
    for i, f in enumerate(frames):
        expected.append(udp(SEC * 1_000_000_000 + i, bytes([65 + i]) * (10 + i), at))
        at += 16 + len(f)
    return data, expected


def test_gzip_capture_fed_in_chunks() -> None:
    data, expected = classic_capture(6)
    packed = gzip.compress(data)
    reader = PcapReader()
    got = []
    for i in range(0, len(packed), 5):
        got.extend(reader.feed(packed[i : i + 5]))
    assert got == expected
    assert reader.close() == []


@pytest.mark.parametrize("chunk", [1 << 20, 7], ids=["whole", "chunks"])
def test_concatenated_gzip_members(chunk: int) -> None:
    # ``cat a.gz b.gz c.gz``: members split the capture mid-record.
    data, expected = classic_capture(6)
    packed = gzip.compress(data[:50]) + gzip.compress(data[50:130]) + gzip.compress(data[130:])
    reader = PcapReader()
    got = []
    for i in range(0, len(packed), chunk):
        got.extend(reader.feed(packed[i : i + chunk]))
    assert got == expected
    assert reader.close() == []


def test_gzip_member_followed_by_something_else() -> None:
    data, expected = classic_capture(3)
    kept = len(data) - 5  # the member ends inside the last record
    reader = PcapReader()
    assert reader.feed(gzip.compress(data[:kept])) == expected[:2]
    # A zlib stream is deflate too, but not a gzip member. The error is located where the
    # decompressed capture stopped, past the partial record.
    assert reader.feed(zlib.compress(data[kept:])) == [
        CaptureError(
            f"offset {kept}", "gzip: Error -3 while decompressing data: incorrect header check"
        )
    ]
    assert reader.close() == []


def test_truncated_gzip() -> None:
    data, expected = classic_capture(3)
    packed = gzip.compress(data)
    reader = PcapReader()
    got = reader.feed(packed[:-8])  # the whole deflate stream, not the gzip trailer
    assert got == expected
    assert reader.close() == [CaptureError(f"offset {len(data)}", "gzip stream is truncated")]
