"""Mutation testing of the core: `make mutate` (or `python -m tests.mutate`).

mutmut plants one small bug at a time (a flipped comparison, a changed constant, a dropped
call) in the modules below and runs the module's own tests that cover the mutated function;
a mutant they do not notice "survived". Each run works in a copy of the tree whose mutmut
settings name only the chosen modules and their tests. This prints the share killed per
module against the 85% target, and lists every survivor that `tests/mutation_survivors.md`
does not explain.

PostgreSQL, Redis and the broker come from ``FEEDFLEET_DATABASE_URL`` /
``FEEDFLEET_REDIS_URL`` / ``FEEDFLEET_PULSAR_URL`` when set, else embedded ones are started
once here, so each mutant's test run only creates its own database instead of a server.

    python -m tests.mutate               # every module (about an hour on 2 cores)
    python -m tests.mutate --quick       # the small pure modules (about a minute)
    python -m tests.mutate quality fix   # chosen modules, by the names in MODULES
    python -m tests.mutate --report      # scores of the last run, without running
    python -m tests.mutate --recheck     # only last run's survivors, after adding tests

Verdicts are kept in ``mutants/`` (ignored by git). A plain run tests every mutant of the
chosen modules again; ``--recheck`` only those no test killed last time.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from common.embedded import (
    EmbeddedPostgres,
    EmbeddedProcess,
    free_port,
    pulsar_command,
    redis_command,
)

ROOT = Path(__file__).resolve().parents[1]
SURVIVORS_FILE = ROOT / "tests" / "mutation_survivors.md"
TARGET = 0.85

# mutmut's exit-code verdicts (mutmut.stats.status_by_exit_code): 1 and 3 are test
# failures, 36/24/-24/152/255 timeouts, 37 a type-check kill.
KILLED_CODES = {1, 3, 36, 24, -24, 152, 255, 37}
NOT_RUN_CODES = {None, 2, 34}


@dataclass(frozen=True)
class Module:
    """A module under mutation: its file, the mutant names that count (fnmatch patterns
    over mutmut's ``module.x_function`` / ``module.xǁClassǁmethod`` names), and the ones
    left out because they are I/O loops that tests exercise end to end instead."""

    path: str
    # The module's own tests: a mutant must be caught by these, not by an end-to-end test
    # that happens to pass through it.
    tests: tuple[str, ...]
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    quick: bool = False  # small and pure: `--quick` (and CI) runs these
    # Tests too slow to run once per mutant (pytest node ids); the suite still runs them.
    deselect: tuple[str, ...] = ()

    @property
    def dotted(self) -> str:
        return self.path.removesuffix(".py").replace("/", ".")

    def patterns(self) -> list[str]:
        return [f"{self.dotted}.{p}" for p in self.include]

    def counts(self, name: str) -> bool:
        local = name.removeprefix(self.dotted + ".")
        return any(fnmatch.fnmatch(local, p) for p in self.include) and not any(
            fnmatch.fnmatch(local, p) for p in self.exclude
        )


SINK_TESTS = (
    "tests/test_sink_base.py", "tests/test_postgres_sink.py", "tests/test_pulsar_sink.py",
    "tests/test_replay_order.py",
)  # fmt: skip


def fns(*names: str) -> tuple[str, ...]:
    """Patterns for module-level functions by name."""
    return tuple(f"x_{name}__mutmut_*" for name in names)


def methods(cls: str, *names: str) -> tuple[str, ...]:
    """Patterns for the named methods of a class, or all of them."""
    return tuple(f"xǁ{cls}ǁ{name}__mutmut_*" for name in names) or (f"xǁ{cls}ǁ*",)


MODULES: dict[str, Module] = {
    "quality": Module("common/quality.py", ("tests/test_quality.py",), quick=True),
    "circuit": Module(
        "common/circuit.py", ("tests/test_circuit.py", "tests/test_status_reporter.py"), quick=True
    ),
    "ratelimit": Module("common/ratelimit.py", ("tests/test_ratelimit.py",), quick=True),
    "log": Module("common/log.py", ("tests/test_log.py",), quick=True),
    "events": Module("common/events.py", ("tests/test_events.py",)),
    "journal": Module("common/journal.py", ("tests/test_journal.py",)),
    "sink_base": Module("common/sinks/base.py", SINK_TESTS),
    "sink_postgres": Module("common/sinks/postgres.py", SINK_TESTS),
    "sink_pulsar": Module("common/sinks/pulsar.py", SINK_TESTS),
    # The assignment planner; the Coordinator class around it is the LISTEN/lock loop.
    "coordinator": Module(
        "workers/coordinator.py",
        (
            "tests/test_failover.py",
            # The pure tests of the planner's helpers (the rest drive the loop).
            "tests/test_coordinator.py::test_each_symbol_goes_to_exactly_one_live_instance",
            "tests/test_coordinator.py::test_disabled_provider_or_no_instance_gets_nothing",
            "tests/test_coordinator.py::test_an_instance_dying_moves_only_its_symbols",
            "tests/test_coordinator.py::test_diff_assignments",
            "tests/test_coordinator.py::test_affected_symbols",
        ),
        # Named rather than excluded, so the loop's mutants are not even run.
        fns(
            "_weight",
            "_rendezvous",
            "failover_policy",
            "assess_providers",
            "plan_symbols",
            "plan_assignments",
            "diff_assignments",
            "affected_symbols",
            "_name",
        )
        + methods("FailoverPolicy")
        + methods("ProviderHealth")
        + methods("Health")
        + methods("_Planner")
        + methods("_Known"),
        # A 300-example property test (30 s); the example-based planner tests must do.
        deselect=("tests/test_failover.py::test_exactly_one_latest_row_the_best_serving_provider",),
    ),
    # Codecs: their framing, bytes to messages (the decoding of each message's fields is
    # covered by the codec tests but not scored here).
    "codec_polygon": Module(
        "common/codecs/polygon.py",
        ("tests/test_polygon_codec.py",),
        fns(
            "decode_frame",
            "_symbol",
            "_time_ms",
            "_number",
            "_sequence",
            "_decode_trade",
            "_decode_quote",
            "_decode_aggregate",
            "encode_auth",
            "encode_subscribe",
            "encode_unsubscribe",
            "channels_for",
        ),
    ),
    "codec_refinitiv": Module(
        "common/codecs/refinitiv.py",
        ("tests/test_refinitiv_codec.py",),
        methods("ConsumerProtocol", "decode", "_decode_message", "_item_for", "_open", "_forget")
        + fns("_login_event", "_state"),
    ),
    "codec_fix": Module(
        "common/codecs/fix.py",
        ("tests/test_fix_codec.py",),
        methods("FixFramer")
        + fns(
            "parse_frame",
            "_pairs",
            "_uint",
            "_civil_from_days",
            "parse_utc_date",
            "parse_utc_time_only",
            "parse_utc_timestamp",
        ),
    ),
    "codec_iex": Module(
        "common/codecs/iex.py",
        ("tests/test_iex_codec.py",),
        methods("SequenceTracker")
        + methods("SegmentHeader")
        + methods("DecodedSegment")
        + fns("decode_segment", "_symbol", "_timestamp", "_price"),
    ),
    "codec_pcap": Module(
        "common/codecs/pcap.py",
        ("tests/test_pcap.py", "tests/test_iex_codec.py"),
        methods("PcapReader") + fns("_pcapng_time_ns", "_udp_from_frame", "read_udp"),
    ),
    "codec_alphavantage": Module(
        "common/codecs/alphavantage.py",
        ("tests/test_alphavantage_codec.py",),
        fns("decode_response", "_decode_json", "_read_csv", "classify_message", "_find_series"),
    ),
    "codec_bloomberg": Module(
        "common/codecs/bloomberg.py",
        ("tests/test_bloomberg_codec.py",),
        fns("decode_event_line", "_untag", "decode_messages", "_symbol", "time_ns", "_event_time"),
    ),
}


@dataclass
class Score:
    module: str
    killed: int = 0
    survived: list[str] = field(default_factory=list)
    not_run_keys: list[str] = field(default_factory=list)

    @property
    def not_run(self) -> int:
        return len(self.not_run_keys)

    @property
    def tested(self) -> int:
        return self.killed + len(self.survived)

    @property
    def ratio(self) -> float | None:
        return self.killed / self.tested if self.tested else None


def explained_survivors(path: Path = SURVIVORS_FILE) -> dict[str, str]:
    """``| mutant name | reason |`` rows of the survivors file."""
    rows: dict[str, str] = {}
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        m = re.match(r"\|\s*`?([\w.ǁ]+__mutmut_\d+)`?\s*\|\s*(.+?)\s*\|\s*$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def score(modules: list[str], mutants_dir: Path = ROOT / "mutants") -> list[Score]:
    scores = []
    for name in modules:
        module = MODULES[name]
        result = Score(name)
        meta = mutants_dir / f"{module.path}.meta"
        codes = json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}
        for key, code in codes.items():
            if not module.counts(key):
                continue
            if code in NOT_RUN_CODES:
                result.not_run_keys.append(key)
            elif code in KILLED_CODES:
                result.killed += 1
            else:  # survived (0), no tests (5, 33), suspicious, segfault
                result.survived.append(key)
        scores.append(result)
    return scores


def report(scores: list[Score]) -> bool:
    explained = explained_survivors()
    print(f"\n{'module':<20}{'mutants':>8}{'killed':>8}{'score':>8}  target {TARGET:.0%}")
    ok = True
    unexplained: list[str] = []
    for s in scores:
        ratio = s.ratio
        shown = "-" if ratio is None else f"{ratio:.1%}"
        met = ratio is not None and ratio >= TARGET
        ok &= met
        note = "" if met else "  below target"
        if s.not_run:
            note += f"  ({s.not_run} not run)"
        print(f"{s.module:<20}{s.tested:>8}{s.killed:>8}{shown:>8}{note}")
        unexplained += [k for k in s.survived if k not in explained]
    total_killed = sum(s.killed for s in scores)
    total = sum(s.tested for s in scores)
    if total:
        print(f"{'all':<20}{total:>8}{total_killed:>8}{total_killed / total:>8.1%}")
    if unexplained:
        print(f"\n{len(unexplained)} survivors not in {SURVIVORS_FILE.relative_to(ROOT)}:")
        for key in unexplained:
            print(f"  {key}")
        print("see one with: .venv/bin/mutmut show NAME")
    return ok


@contextlib.contextmanager
def services(work: Path) -> Iterator[dict[str, str]]:
    """Service URLs for the tests: the environment's, else embedded servers."""
    env: dict[str, str] = {}
    started: list[EmbeddedProcess] = []
    postgres: EmbeddedPostgres | None = None
    try:
        if not os.environ.get("FEEDFLEET_DATABASE_URL"):
            postgres = EmbeddedPostgres(work / "pg")
            postgres.start()
            env["FEEDFLEET_DATABASE_URL"] = postgres.url()
        if not os.environ.get("FEEDFLEET_REDIS_URL"):
            port = free_port()
            started.append(EmbeddedProcess(redis_command(port, work / "redis"), port, work / "r"))
            env["FEEDFLEET_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        if not os.environ.get("FEEDFLEET_PULSAR_URL"):
            port = free_port()
            started.append(EmbeddedProcess(pulsar_command(port, work / "pulsar"), port, work / "p"))
            env["FEEDFLEET_PULSAR_URL"] = f"pulsar://127.0.0.1:{port}"
        for proc in started:
            proc.start()
        yield env
    finally:
        for proc in started:
            proc.stop()
        if postgres is not None:
            postgres.stop()


def run_mutmut(patterns: list[str], env: dict[str, str], root: Path = ROOT) -> int:
    mutmut = Path(sys.executable).with_name("mutmut")
    # The tests run from the copy under mutants/, so they cannot find ../shared themselves.
    env = {"FEEDFLEET_SHARED_DIR": str(ROOT.parent / "shared")} | env
    (root / "mutants").mkdir(exist_ok=True)
    log = root / "mutants" / "run.log"
    print(f"mutmut run over {len(patterns)} pattern(s); progress in {log}", flush=True)
    with open(log, "wb") as out:
        code = subprocess.run(
            [str(mutmut), "run", *patterns], cwd=root, env=os.environ | env, stdout=out,
            stderr=subprocess.STDOUT,
        ).returncode  # fmt: skip
    if code != 0:
        # The tree is temporary: show why before it goes (spinner frames end in \r).
        lines = log.read_text(errors="replace").replace("\r", "\n").splitlines()
        print("\n".join(line for line in lines[-60:] if line.strip()), file=sys.stderr)
    return code


def narrowed_tree(names: list[str], work: Path) -> Path:
    """A copy of the tree whose mutmut settings mutate only the named modules and collect
    only their tests, so mutmut's first pass over the tests is short."""
    tree = work / "tree"
    skip = shutil.ignore_patterns("__pycache__", "mutants", ".*")
    for name in ("common", "workers", "simulators", "chaos", "tests"):
        shutil.copytree(ROOT / name, tree / name, ignore=skip)
    shutil.copy2(ROOT / "schema.sql", tree / "schema.sql")
    text = (ROOT / "pyproject.toml").read_text()
    paths = [MODULES[n].path for n in names]
    tests = sorted({t for n in names for t in MODULES[n].tests})
    tests += [arg for n in names for d in MODULES[n].deselect for arg in ("--deselect", d)]
    text = re.sub(r"(?ms)^only_mutate = \[.*?^\]", f"only_mutate = {json.dumps(paths)}", text)
    text = re.sub(
        r"(?ms)^pytest_add_cli_args_test_selection = \[.*?^\]",
        f"pytest_add_cli_args_test_selection = {json.dumps(tests)}",
        text,
    )
    (tree / "pyproject.toml").write_text(text)
    return tree


def keep_verdicts(tree: Path, names: list[str]) -> None:
    """Merge a run's verdicts (and mutated sources, for ``mutmut show``) into ``mutants/``,
    for --report and --recheck: a mutant the run did not test keeps its earlier verdict."""
    for name in names:
        source = Path("mutants") / MODULES[name].path
        meta = source.with_name(source.name + ".meta")
        (ROOT / source).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(tree / source, ROOT / source)
        new = json.loads((tree / meta).read_text())
        if (ROOT / meta).exists():
            old = json.loads((ROOT / meta).read_text())
            earlier = old["exit_code_by_key"]
            # Only mutants of the current source count; a verdict the run left empty
            # (the mutant was not named this time) keeps the earlier one.
            new["exit_code_by_key"] = {
                key: code if code is not None else earlier.get(key)
                for key, code in new["exit_code_by_key"].items()
            }
        (ROOT / meta).write_text(json.dumps(new, indent=4))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutate", description=__doc__)
    parser.add_argument("modules", nargs="*", metavar="MODULE", help=", ".join(MODULES))
    parser.add_argument("--quick", action="store_true", help="only the small pure modules")
    parser.add_argument("--report", action="store_true", help="scores of the last run")
    parser.add_argument(
        "--recheck", action="store_true",
        help="run again only the mutants that survived (or did not run) last time",
    )  # fmt: skip
    args = parser.parse_args(argv)
    unknown = sorted(set(args.modules) - set(MODULES))
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}; choose from {', '.join(MODULES)}")
    if args.quick and args.modules:
        parser.error("--quick chooses its modules itself")
    names = args.modules or [n for n, m in MODULES.items() if m.quick or not args.quick]

    if not args.report:
        patterns = [p for n in names for p in MODULES[n].patterns()]
        if args.recheck:
            # mutmut re-runs every mutant named on its command line; naming only the
            # survivors keeps the verdicts of those already killed.
            patterns = [k for s in score(names) for k in s.survived + s.not_run_keys]
            if not patterns:
                return 0 if report(score(names)) else 1
        with (
            tempfile.TemporaryDirectory(prefix="feedfleet-mutate-") as tmp,
            services(Path(tmp)) as env,
        ):
            tree = narrowed_tree(names, Path(tmp))
            code = run_mutmut(patterns, env, tree)
            if code == 0:
                keep_verdicts(tree, names)
        if code != 0:
            print(f"mutmut failed (exit {code}); see its log above", file=sys.stderr)
            return code
    return 0 if report(score(names)) else 1


if __name__ == "__main__":
    sys.exit(main())
