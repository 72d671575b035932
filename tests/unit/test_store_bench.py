"""`voxauth bench store` measures the store work of Verifies and leaves no bench agent."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.security.crypto import VoiceprintCipher
from server.storage.databases import open_store
from server.tools import store_bench


def test_the_bench_prints_figures_per_database_and_removes_its_agents(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    key = bytes(range(32))
    monkeypatch.setenv("VOXAUTH_KEY", "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")
    database = tmp_path / "bench.db"
    argv = ["--db", str(database), "--agents", "2", "--verifies", "6", "--threads", "2"]
    assert store_bench.main(argv) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith("sqlite: store work per Verify, one at a time over 6 Verifies: mean ")
    assert line.endswith("Verifies/s")
    store = open_store(database, VoiceprintCipher(key))
    try:
        verifies = [e for e in store.audit_events() if e.action == "verify"]
        # The warm-up, the timed run and the threaded run: each an accepted Verify.
        assert len(verifies) == 1 + 6 + 6
        assert {e.outcome for e in verifies} == {"ACCEPT"}
        assert store.voiceprints(store_bench.BENCH_MODEL) == []
    finally:
        store.close()


def test_the_bench_refuses_nonsense_counts(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        store_bench.main(["--verifies", "0"])
    assert "--verifies must be at least 1" in capsys.readouterr().err
