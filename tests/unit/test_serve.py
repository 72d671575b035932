"""`voxauth serve` stops with a clear message when the speaker model's files are not usable."""

from __future__ import annotations

import base64
import socket
from pathlib import Path

import pytest

from server.tools.cli import EXIT_USAGE, main
from tests.support import KEY


def test_serve_without_usable_model_files_says_how_to_get_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VOXAUTH_KEY", base64.b64encode(KEY).decode())
    for name in ("VOXAUTH_KEY_FILE", "VOXAUTH_PREVIOUS_KEYS", "VOXAUTH_PREVIOUS_KEYS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VOXAUTH_HTTP_LISTEN", "")
    empty = tmp_path / "no-model"
    empty.mkdir()
    arguments = ["--listen", "127.0.0.1:0", "--db", str(tmp_path / "voxauth.db")]

    code = main(["serve", *arguments, "--model-dir", str(empty), "--insecure-dev"])

    assert code == EXIT_USAGE
    error = capsys.readouterr().err
    assert f"in {empty} are not usable" in error
    assert f"voxauth fetch-model --dir {empty}" in error


def test_serve_on_an_http_port_in_use_says_so_and_closes_what_it_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second voxauth on the same host used to die with a traceback (and gRPC's 'event
    loop is closed' noise from the listener it had opened): a clear line and exit 2 now."""
    monkeypatch.setenv("VOXAUTH_KEY", base64.b64encode(KEY).decode())
    for name in ("VOXAUTH_KEY_FILE", "VOXAUTH_PREVIOUS_KEYS", "VOXAUTH_PREVIOUS_KEYS_FILE"):
        monkeypatch.delenv(name, raising=False)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        monkeypatch.setenv("VOXAUTH_HTTP_LISTEN", f"127.0.0.1:{port}")
        arguments = ["--listen", "127.0.0.1:0", "--db", str(tmp_path / "voxauth.db")]

        code = main(["serve", *arguments, "--insecure-dev"])

    assert code == EXIT_USAGE
    error = capsys.readouterr().err
    assert f"cannot listen for HTTP on 127.0.0.1:{port}" in error
    assert "Traceback" not in error
