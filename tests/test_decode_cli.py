"""`feedfleet decode PROVIDER [FILE]` as an operator runs it, on each provider's data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

from common.codecs import fix
from simulators.iex import IexSimConfig, build_capture

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
