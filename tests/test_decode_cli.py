"""`feedfleet decode PROVIDER [FILE]` as an operator runs it, on each provider's data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from common.codecs import fix
from simulators.iex import IexSimConfig, build_capture

SAMPLES = Path(__file__).parent / "samples"

KEYS = {
    "symbol", "provider", "data_type", "timestamp", "price", "volume", "bid", "ask",
    "provider_sequence", "provider_specific",
}  # fmt: skip


def decode(provider: str, data: bytes, *args: str) -> tuple[int, list[dict[str, object]], str]:
    proc = subprocess.run(
        [sys.executable, "-m", "workers.cli", "decode", provider, *args],
        input=data, capture_output=True, timeout=60,
    )  # fmt: skip
    rows = [orjson.loads(line) for line in proc.stdout.splitlines()]
    for row in rows:
        assert set(row) == KEYS
    return proc.returncode, rows, proc.stderr.decode()


def read_hex_sample(name: str) -> bytes:
    """A hex dump with ``#`` comments from tests/samples as bytes."""
    lines = (line.partition("#")[0] for line in (SAMPLES / name).read_text().splitlines())
    return bytes.fromhex("".join("".join(line.split()) for line in lines))


IEX_SAMPLE = read_hex_sample("iex_tops16.pcap.hex")
# Offsets in IEX_SAMPLE: pcap header 24, record header 16, Ethernet 14, IPv4 20, UDP 8.
IEX_TP_VERSION_AT = 24 + 16 + 14 + 20 + 8
IEX_SECOND_RECORD_AT = 24 + 16 + 166
IEX_ROWS = [
    {"symbol": "ZIEXT", "provider": "iex", "data_type": "QUOTE",
     "timestamp": "2016-08-23T19:30:32.572715Z", "price": None, "volume": None, "bid": 99.05,
     "ask": 99.07, "provider_sequence": 1000,
     "provider_specific": {"bid_size": 9700, "ask_size": 1000, "flags": 0}},
    {"symbol": "ZIEXT", "provider": "iex", "data_type": "TRADE",
     "timestamp": "2016-08-23T19:30:32.600012Z", "price": 99.0525, "volume": 37.0, "bid": None,
     "ask": None, "provider_sequence": 1001,
     "provider_specific": {"trade_id": 429974, "sale_condition_flags": 96,
                           "sale_conditions": ["extended_hours", "odd_lot"]}},
]  # fmt: skip
REFINITIV_REFRESH = (
    b'[{"ID":2,"Type":"Refresh","Key":{"Name":"TRI.N","Service":"ELEKTRON_DD"},'
    b'"Fields":{"BID":44.33,"ASK":44.34,"BIDSIZE":10,"ASKSIZE":4,"QUOTE_DATE":"2017-11-29",'
    b'"QUOTIM_MS":68515583},"SeqNumber":58352,"State":{"Stream":"Open","Data":"Ok"}}]\n'
)


def test_polygon_capture_with_a_bad_line(fixtures_dir: Path) -> None:
    data = (fixtures_dir / "polygon_ws.jsonl").read_bytes() + b"{broken\n"
    code, rows, err = decode("polygon", data)
    assert code == 1
    assert "line 13" in err
    first = rows[0]
    assert first["symbol"] == "AAPL" and first["price"] == 161.87
    assert first["timestamp"] == "2022-05-04T17:09:52.462000Z"
    assert first["data_type"] == "TRADE" and first["provider_sequence"] == 4009402


def test_refinitiv_capture_from_file(fixtures_dir: Path) -> None:
    code, rows, err = decode("refinitiv", b"", str(fixtures_dir / "refinitiv_ws.jsonl"))
    assert code == 0, err
    assert rows and all(r["symbol"] == "TRI.N" for r in rows)
    assert {r["data_type"] for r in rows} <= {"TRADE", "QUOTE"}


def test_iex_pcap_from_the_simulator() -> None:
    pcap = build_capture(IexSimConfig(symbols=["ZIEXT", "AAPL"]), 40, start_ns=10**18)
    code, rows, err = decode("iex", pcap)
    assert code == 0, err
    assert len(rows) == 40
    assert {r["symbol"] for r in rows} == {"ZIEXT", "AAPL"}
    seqs = [r["provider_sequence"] for r in rows]
    assert seqs == sorted(seqs)


def test_alphavantage_body_needs_no_symbol_for_json() -> None:
    body = orjson.dumps(
        {"Global Quote": {"01. symbol": "MSFT", "02. open": "112.6300", "03. high": "113.1700",
                          "04. low": "110.6400", "05. price": "112.1300",
                          "06. volume": "29062853", "07. latest trading day": "2018-10-05",
                          "08. previous close": "112.7900", "09. change": "-0.6600",
                          "10. change percent": "-0.5852%"}}
    )  # fmt: skip
    code, rows, err = decode("alphavantage", body)
    assert code == 0, err
    assert rows[0]["symbol"] == "MSFT" and rows[0]["price"] == 112.13


def test_fix_message_per_line_with_pipes() -> None:
    good = fix.to_pipes(
        fix.build_message(
            "X",
            [(34, "5"), (49, "SIM"), (56, "FF"), (52, "20240102-15:30:00.000")],
            [(268, 1), (279, 0), (269, 2), (55, "IBM"), (270, "187.25"), (271, 300)],
        )
    )
    assert good.startswith("8=FIX.4.4|9=92|")
    bad = good.replace("|10=", "|58=x|10=")  # body no longer matches BodyLength/CheckSum
    code, rows, err = decode("fix", f"{good}\n{bad}\n".encode())
    assert code == 1 and "line 2" in err
    assert [(r["symbol"], r["price"], r["volume"], r["data_type"]) for r in rows] == [
        ("IBM", 187.25, 300, "TRADE")
    ]


def test_unknown_provider_exits_2() -> None:
    code, rows, err = decode("nosuch", b"")
    assert code == 2 and "unknown provider" in err and rows == []


def test_iex_sample_capture_from_file() -> None:
    """The hand-written capture: exact rows and a clean exit."""
    code, rows, err = decode("iex", IEX_SAMPLE)
    assert (code, err) == (0, "")
    assert rows == IEX_ROWS


# Undecodable input: each error on stderr with its place, what did decode on stdout, exit 1.
# Rows as (symbol, data_type, price, bid, ask, provider_sequence).
IEX_SAMPLE_ROWS = [("ZIEXT", "QUOTE", None, 99.05, 99.07, 1000),
                   ("ZIEXT", "TRADE", 99.0525, None, None, 1001)]  # fmt: skip
UNDECODABLE = [
    pytest.param("iex", b"not a capture", [], [],
                 "offset 0: not a pcap or pcapng file (magic 6e6f7420)\n", id="iex-not-pcap"),
    pytest.param("iex", IEX_SAMPLE[:-10], [], IEX_SAMPLE_ROWS,
                 f"offset {IEX_SECOND_RECORD_AT}: truncated: 88 bytes left over\n",
                 id="iex-truncated"),
    pytest.param("iex", IEX_SAMPLE[:IEX_TP_VERSION_AT] + b"\x02"
                 + IEX_SAMPLE[IEX_TP_VERSION_AT + 1 :], [], [],
                 "offset 24: IEX-TP version 2, expected 1\n", id="iex-not-iex-tp"),
    pytest.param("refinitiv", REFINITIV_REFRESH + b"{broken\n", [],
                 [("TRI.N", "QUOTE", None, 44.33, 44.34, 58352)], "line 2: invalid JSON: ",
                 id="refinitiv-bad-json"),
    pytest.param("refinitiv", b'[{"ID":5,"Type":"Update","Fields":{"BID":1.0}}]\n', [], [],
                 "line 1: Update on unknown stream 5 without Key.Name\n",
                 id="refinitiv-unknown-stream"),
    pytest.param("refinitiv", b"null\n", [], [], "line 1: frame is not a JSON array\n",
                 id="refinitiv-not-array"),
    pytest.param("alphavantage", (SAMPLES / "alphavantage_note_per_minute.json").read_bytes(),
                 [], [],
                 "offset 0: rate_limit: Note: Thank you for using Alpha Vantage! Our standard "
                 "API call frequency is 5 calls per minute and 500 calls per day. Please visit "
                 "https://www.alphavantage.co/premium/ if you would like to target a higher API "
                 "call frequency.\n", id="alphavantage-note"),
    pytest.param("alphavantage",
                 (SAMPLES / "alphavantage_error_invalid_call.json").read_bytes(), [], [],
                 "offset 0: invalid_call: Error Message: Invalid API call. Please retry or visit "
                 "the documentation (https://www.alphavantage.co/documentation/) for "
                 "TIME_SERIES_INTRADAY.\n", id="alphavantage-error-message"),
    pytest.param("alphavantage", b"<html><body>502 Bad Gateway</body></html>\n",
                 ["--symbol", "IBM"], [],
                 "offset 0: CSV bars lack columns "
                 "['timestamp', 'open', 'high', 'low', 'close', 'volume']\n",
                 id="alphavantage-html"),
    pytest.param("alphavantage", b'{"Global Quote": {"01. symbol": "IBM"}}\n{broken\n', [],
                 [], "line 1: bad latest trading day null\nline 2: invalid JSON: ",
                 id="alphavantage-bad-lines"),
]  # fmt: skip


@pytest.mark.parametrize(("provider", "data", "args", "rows", "stderr"), UNDECODABLE)
def test_undecodable_input_exits_1_with_located_errors(
    provider: str, data: bytes, args: list[str], rows: list[tuple[object, ...]], stderr: str
) -> None:
    code, got_rows, err = decode(provider, data, *args)
    assert code == 1, err
    if stderr.endswith("\n"):
        assert err == stderr
    else:  # it ends in the JSON parser's own words: compared up to them
        assert err.startswith(stderr) and err.count("\n") == stderr.count("\n") + 1, err
    got = [(r["symbol"], r["data_type"], r["price"], r["bid"], r["ask"], r["provider_sequence"])
           for r in got_rows]  # fmt: skip
    assert got == rows


@pytest.mark.parametrize("provider", ["iex", "refinitiv", "alphavantage"])
def test_empty_input_exits_1(provider: str) -> None:
    code, rows, err = decode(provider, b"\n")
    assert (code, rows, err) == (1, [], "decode: empty input\n")


def test_unreadable_file_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pcap"
    code, rows, err = decode("iex", b"", str(missing))
    assert (code, rows, err) == (
        2,
        [],
        f"decode: cannot read {missing}: No such file or directory\n",
    )
    code, rows, err = decode("refinitiv", b"", str(tmp_path))
    assert (code, rows, err) == (2, [], f"decode: cannot read {tmp_path}: Is a directory\n")


def test_codec_helper_modules_are_not_providers() -> None:
    for name in ("base", "pcap"):
        code, rows, err = decode(name, b"x")
        assert (code, rows, err) == (2, [], f"decode: unknown provider {name!r}\n")


def test_a_reader_that_stops_early_is_no_error(fixtures_dir: Path) -> None:
    """`feedfleet decode polygon capture | head -1`: the first line, then a quiet exit 0 when
    the reader goes (no BrokenPipeError traceback)."""
    lines = (fixtures_dir / "polygon_ws.jsonl").read_bytes().splitlines()
    line = next(x for x in lines if b'"ev":"T"' in x)
    capture = b"\n".join([line] * 20_000) + b"\n"  # far more than a pipe buffer holds
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "decode", "polygon"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    proc.stdin.write(capture)
    proc.stdin.close()
    first = proc.stdout.readline()
    proc.stdout.close()  # as head does after its line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert set(orjson.loads(first)) == KEYS
    assert "Traceback" not in err and "BrokenPipe" not in err
