"""The tests' PostgreSQL server fails, never skips, where its binaries are missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import postgres


def test_missing_server_binaries_fail_with_how_to_install_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres, "BIN_DIR", tmp_path / "no-postgresql")
    with pytest.raises(pytest.fail.Exception, match=r"scripts/setup.sh --dev"):
        postgres.PostgresServer()
