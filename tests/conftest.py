"""Shared fixtures: the real speaker model (loaded once) and in-process voxauth servers."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from models.ecapa import EcapaEmbedder
from models.embedder import SpeakerEmbedder
from models.fetch import default_model_dir
from server.config import ServerConfig
from tests.support import KEY, ManualClock, RunningServer, make_config


@pytest.fixture(scope="session")
def embedder() -> SpeakerEmbedder:
    """The real ECAPA model, loaded once for the whole run."""
    return EcapaEmbedder.load(default_model_dir())


@pytest.fixture
def start_server(
    tmp_path: Path, embedder: SpeakerEmbedder
) -> Iterator[Callable[..., RunningServer]]:
    """Starts servers on demand (several in a row share the same database: restarts)."""
    running: list[RunningServer] = []

    def start(
        config: ServerConfig | None = None,
        clock: ManualClock | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> RunningServer:
        server = RunningServer(
            config or make_config(tmp_path), lambda: embedder, KEY, clock, credentials
        )
        running.append(server)
        return server

    yield start
    for server in running:
        if server._thread.is_alive():
            server.stop()


@pytest.fixture
def voxauth(start_server: Callable[..., RunningServer]) -> RunningServer:
    return start_server()


@pytest.fixture
def key_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a `voxauth serve` subprocess, with or without a key as the test sets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXAUTH_")}
    env["VOXAUTH_KEY"] = base64.b64encode(KEY).decode()
    return env
