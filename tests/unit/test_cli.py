"""The `voxauth` client commands' own checks, made before any server is reached (the commands
against a running server, and `voxauth eval` with the real model, are in
tests/e2e/test_cli_e2e.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.tools.cli import EXIT_USAGE, main


def test_local_file_problems_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", "agent", str(tmp_path / "missing.wav")]) == EXIT_USAGE
    assert "no such file" in capsys.readouterr().err
    raw = tmp_path / "call.pcm"
    raw.write_bytes(b"\0\0" * 100)
    assert main(["verify", "agent", str(raw)]) == EXIT_USAGE
    assert "--rate" in capsys.readouterr().err
