"""The FIX adapter's session store: one JSON file per CompID pair, replaced atomically."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from common.codecs.fix import SessionState
from common.provider import ProviderConfig, ProviderConfigError
from workers.fix import STORE_DIR_ENV, FixAdapter, SessionStore

STATE = SessionState(12, 340, "VENUE->FEEDFLEET@20240504-17:00:00.000", 338, False)


def test_round_trip_and_nothing_stored_yet(tmp_path: Path) -> None:
    store = SessionStore(tmp_path / "fix", "FEEDFLEET", "VENUE")
    assert store.load() is None  # creates the directory; a fresh session
    store.save(STATE)
    assert SessionStore(tmp_path / "fix", "FEEDFLEET", "VENUE").load() == STATE
    assert sorted(p.name for p in (tmp_path / "fix").iterdir()) == [
        "FEEDFLEET+VENUE.fixsession.json"
    ]  # the temporary file was renamed over it
    data = orjson.loads(store.path.read_bytes())
    assert data["sender_comp_id"] == "FEEDFLEET" and data["next_target_seq"] == 340


def test_unchanged_state_is_not_written_again(tmp_path: Path) -> None:
    store = SessionStore(tmp_path, "A", "B")
    store.save(STATE)
    store.save(SessionState(12, 340, STATE.stream, 338, False))
    assert store.writes == 1
    store.save(SessionState(13, 340, STATE.stream, 338, False))
    assert store.writes == 2


def test_comp_ids_never_share_a_file(tmp_path: Path) -> None:
    pairs = [("A+B", "C"), ("A", "B+C"), ("A/B", "C"), ("A-B", "C"), ("A", "B-C")]
    paths = {SessionStore(tmp_path, s, t).path for s, t in pairs}
    assert len(paths) == len(pairs) and all(p.parent == tmp_path for p in paths)


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[]", b'{"sender_comp_id": "A", "target_comp_id": "B"}',
     b'{"sender_comp_id": "X", "target_comp_id": "B", "next_sender_seq": 1, '
     b'"next_target_seq": 1}'],
)  # fmt: skip
def test_damaged_or_foreign_file_is_a_config_error(tmp_path: Path, content: bytes) -> None:
    store = SessionStore(tmp_path, "A", "B")
    store.path.write_bytes(content)
    with pytest.raises(ProviderConfigError, match="remove it"):
        store.load()


def test_failed_write_is_counted_not_raised(tmp_path: Path) -> None:
    store = SessionStore(tmp_path / "gone", "A", "B")
    store.save(STATE)  # the directory does not exist: the open fails
    assert store.errors == 1 and store.writes == 0
    (tmp_path / "gone").mkdir()
    store.save(STATE)  # not skipped as unchanged: it was never written
    assert store.writes == 1 and store.load() == STATE


def adapter(cc: dict[str, object]) -> FixAdapter:
    base: dict[str, object] = {
        "host": "127.0.0.1", "port": 1, "sender_comp_id": "FEEDFLEET", "target_comp_id": "V",
    }  # fmt: skip
    return FixAdapter(ProviderConfig("p", "fix", "fix", connection_config={**base, **cc}))


def test_store_directory_from_config_then_environment_else_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(STORE_DIR_ENV, raising=False)
    plain = adapter({})
    assert plain.session_store_dir is None and plain.reset_on_logon is True
    monkeypatch.setenv(STORE_DIR_ENV, str(tmp_path / "env"))
    from_env = adapter({})
    assert from_env.session_store_dir == tmp_path / "env" and from_env.reset_on_logon is False
    from_row = adapter({"session_store_dir": str(tmp_path / "row")})
    assert from_row.session_store_dir == tmp_path / "row"
    assert adapter({"reset_on_logon": True}).reset_on_logon is True


@pytest.mark.parametrize(
    ("cc", "message"),
    [({"reset_on_logon": "false"}, "reset_on_logon"), ({"session_store_dir": 7}, "path")],
)
async def test_bad_store_settings_are_config_errors(cc: dict[str, object], message: str) -> None:
    with pytest.raises(ProviderConfigError, match=message):
        await adapter(cc).connect()


async def test_unreadable_store_stops_connect_before_any_socket(tmp_path: Path) -> None:
    store = SessionStore(tmp_path, "FEEDFLEET", "V")
    store.path.write_bytes(b"garbage")
    with pytest.raises(ProviderConfigError, match="unreadable"):
        await adapter({"session_store_dir": str(tmp_path)}).connect()
    assert os.listdir(tmp_path) == [store.path.name]


def test_the_worker_s_journal_directory_is_the_default_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker hands every adapter its journal directory; FIX keeps its session there
    unless the row or the environment names another place."""
    monkeypatch.delenv(STORE_DIR_ENV, raising=False)
    plain = adapter({})
    assert plain.session_store_dir is None and plain.reset_on_logon is True
    plain.use_state_dir(tmp_path)
    assert plain.session_store_dir == tmp_path / "fix-session"
    assert plain.reset_on_logon is False
    named = adapter({"session_store_dir": str(tmp_path / "own")})
    named.use_state_dir(tmp_path)
    assert named.session_store_dir == tmp_path / "own"
    resetting = adapter({"reset_on_logon": True})
    resetting.use_state_dir(tmp_path)
    assert resetting.session_store_dir == tmp_path / "fix-session"
    assert resetting.reset_on_logon is True
