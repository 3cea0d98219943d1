"""The ``feedfleet`` command.

feedfleet run                      the whole fleet under supervisord (make run)
feedfleet worker NAME              one provider's worker (also: python -m workers NAME);
                                   --metrics-port N serves its Prometheus exposition
feedfleet coordinator | api        the other fleet processes
feedfleet db init                  apply schema.sql (idempotent)
feedfleet seed-demo                demo provider rows and 20 subscribed symbols
feedfleet decode PROVIDER [FILE]   captured provider data -> normalized JSON lines
feedfleet record PROVIDER --out F  a provider's frames, as read, to a recording file
feedfleet replay FILE              a recording through the codec and pipeline into the sinks
feedfleet chaos [--quick]          faults injected into the fleet, hand-over measured
feedfleet status [--api URL]       the fleet as tables in the terminal; --watch redraws
feedfleet ctl [--var DIR] ARGS     supervisorctl against the running fleet's supervisord
feedfleet fleet-config --host H    one host's supervisord configuration (its workers, api,
                                   coordinators); feedfleet run --config FILE runs it
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any

import orjson


def _run(coro: Coroutine[Any, Any, None]) -> None:
    import uvloop

    uvloop.run(coro)


async def _db_init() -> None:
    from common import db
    from common.config import Settings

    settings = Settings.from_env()
    conn = await db.connect(settings.database_url)
    try:
        await db.apply_schema(conn)
    finally:
        await conn.close()
    print("schema applied", file=sys.stderr)


def decode_main(provider: str, path: str | None, symbol: str | None) -> int:
    """Print one JSON object per record; errors to stderr. Exit 1 if anything failed to
    decode (an empty input included), 2 for an unknown provider or an unreadable file."""
    try:
        codec = importlib.import_module(f"common.codecs.{provider}")
    except ModuleNotFoundError:
        codec = None
    # common.codecs also holds modules that are not a provider's codec (base, pcap).
    decode_capture = getattr(codec, "decode_capture", None)
    if decode_capture is None:
        print(f"decode: unknown provider {provider!r}", file=sys.stderr)
        return 2
    try:
        if path in (None, "-"):
            data = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except OSError as exc:
        print(f"decode: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if not data.strip():
        # Some codecs find nothing wrong in no data; an empty capture is still a failed one.
        print("decode: empty input", file=sys.stderr)
        return 1
    try:
        failed = _print_records(decode_capture(data, symbol=symbol))
    except BrokenPipeError:
        # The reader has had enough (`feedfleet decode ... | head`): not an error. Point
        # stdout at /dev/null so the interpreter's own flush at exit does not fail too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return 1 if failed else 0


def _print_records(items: Iterable[Any]) -> bool:
    """One JSON line per record, errors to stderr; True if anything failed to decode."""
    from common.codecs.base import CaptureError

    failed = False
    out = sys.stdout.buffer
    for item in items:
        if isinstance(item, CaptureError):
            failed = True
            print(f"{item.location}: {item.reason}", file=sys.stderr)
            continue
        out.write(orjson.dumps(record_document(item)) + b"\n")
    out.flush()
    return failed


def record_document(item: Any) -> dict[str, Any]:
    """A ``RawMarketData`` as ``feedfleet decode`` prints it (``feedfleet replay --dry-run``
    prints the same, with the quality flags)."""
    from common.model import iso_ns

    return {
        "symbol": item.symbol,
        "provider": item.provider,
        "data_type": item.data_type.value,
        "timestamp": iso_ns(item.timestamp_ns),
        "price": item.price,
        "volume": item.volume,
        "bid": item.bid,
        "ask": item.ask,
        "provider_sequence": item.provider_sequence,
        "provider_specific": item.provider_specific or None,
    }


def _port_number(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"not a port number (0-65535): {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="feedfleet", description="market-data ingestion fleet")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the fleet under supervisord (embedded services as needed)")
    r.add_argument("--var", default=None, help="state directory (default: ./var)")
    r.add_argument(
        "--config", default=None, metavar="FILE",
        help="supervisord configuration (default: supervisord.conf; a host's own is written "
        "by feedfleet fleet-config)",
    )  # fmt: skip
    w = sub.add_parser("worker", help="run one provider's worker")
    w.add_argument("name", help="providers.name of the row to serve")
    w.add_argument(
        "--metrics-port", type=_port_number, default=None,
        help="serve this worker's Prometheus exposition on this port, GET /metrics "
        "(default: FEEDFLEET_METRICS_PORT; host: FEEDFLEET_METRICS_HOST, 127.0.0.1)",
    )  # fmt: skip
    sub.add_parser("coordinator", help="run the coordinator")
    sub.add_parser("api", help="run the REST API")
    d = sub.add_parser("db", help="database tasks")
    d.add_argument("action", choices=["init"])
    sub.add_parser("seed-demo", help="insert demo provider rows and subscriptions")
    sub.add_parser("chaos", help="inject faults into the fleet (feedfleet chaos --help)")
    st = sub.add_parser("status", help="the fleet's state from the API, as tables")
    st.add_argument(
        "--api",
        default=None,
        metavar="URL",
        help="the API's base URL (default: http://$FEEDFLEET_API_HOST:$FEEDFLEET_API_PORT, "
        "else http://127.0.0.1:8080; `source var/env` sets the running fleet's)",
    )
    st.add_argument("--watch", action="store_true", help="redraw every 2 s until Ctrl-C")
    sub.add_parser("ctl", help="supervisorctl for the running fleet (feedfleet ctl --help)")
    sub.add_parser(
        "fleet-config",
        help="write one host's supervisord configuration (feedfleet fleet-config --help)",
    )
    dec = sub.add_parser("decode", help="decode captured provider data to JSON lines")
    dec.add_argument("provider")
    dec.add_argument("file", nargs="?", default=None)
    dec.add_argument("--symbol", default=None, help="symbol for inputs that do not carry one")
    sub.add_parser("record", help="record a provider's frames (feedfleet record --help)")
    sub.add_parser("replay", help="replay a recording (feedfleet replay --help)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:1] == ["ctl"]:
        # Everything after it is supervisorctl's (`feedfleet ctl tail -f worker:polygon`).
        from workers.ctl import main as ctl_main

        raise SystemExit(ctl_main(raw[1:]))
    if raw[:1] == ["fleet-config"]:
        # Its own options (feedfleet fleet-config --help).
        from workers.fleet_config import main as fleet_config_main

        raise SystemExit(fleet_config_main(raw[1:]))
    if raw[:1] == ["record"] or raw[:1] == ["replay"]:
        # Their own options (feedfleet record --help, feedfleet replay --help).
        from workers import record, replay

        raise SystemExit((record if raw[0] == "record" else replay).main(raw[1:]))
    if raw[:1] == ["chaos"]:
        # The chaos run has its own options (feedfleet chaos --help).
        from chaos.run import main as chaos_main

        code = chaos_main(raw[1:])
        # The run, the fleet's stop and the report are done. Skip the interpreter's
        # teardown: the Pulsar client's C++ library has aborted there ("terminate called
        # without an active exception") after a clean close(), turning a passed run into
        # a crash.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    args = build_parser().parse_args(raw)
    if args.command == "worker":
        from workers.worker import run_worker

        _run(run_worker(args.name, args.metrics_port))
    elif args.command == "coordinator":
        from workers.coordinator import run_coordinator

        _run(run_coordinator())
    elif args.command == "api":
        from workers.api import run_api

        _run(run_api())
    elif args.command == "db":
        _run(_db_init())
    elif args.command == "seed-demo":
        from workers.fleet import seed_demo_from_env

        _run(seed_demo_from_env())
    elif args.command == "status":
        from workers.status_view import main as status_main

        raise SystemExit(status_main(args.api, args.watch))
    elif args.command == "decode":
        raise SystemExit(decode_main(args.provider, args.file, args.symbol))
    elif args.command == "run":
        from pathlib import Path

        from workers.fleet import run_fleet

        raise SystemExit(
            run_fleet(
                Path(args.var) if args.var else None, Path(args.config) if args.config else None
            )
        )


if __name__ == "__main__":
    main()
