"""Shared fixtures: the real speaker model and countermeasure (loaded once) and in-process
voxauth servers."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from models.aasist import READOUT_DIM
from models.aasist_countermeasure import AasistCountermeasure
from models.countermeasure import judged_id
from models.ecapa import EcapaEmbedder
from models.embedder import SpeakerEmbedder
from models.fetch import default_countermeasure_dir, default_model_dir
from models.manifest import AASIST_MANIFEST
from models.pad_backend import SPECTRAL_DIM, PadBackEnd, default_backend_path
from server.config import ServerConfig
from tests.clock import ManualClock
from tests.postgres import PostgresServer
from tests.support import KEY, RunningServer, make_config


@pytest.fixture(scope="session")
def embedder() -> SpeakerEmbedder:
    """The real ECAPA model, loaded once for the whole run."""
    return EcapaEmbedder.load(ServerConfig.from_environment().model_dir or default_model_dir())


@pytest.fixture(scope="session")
def countermeasure() -> AasistCountermeasure:
    """The real AASIST countermeasure on the service's path, loaded once for the whole run."""
    configured = ServerConfig.from_environment().countermeasure_dir
    return AasistCountermeasure.load(configured or default_countermeasure_dir())


@pytest.fixture(scope="session")
def service_countermeasure(countermeasure: AasistCountermeasure) -> AasistCountermeasure:
    """The countermeasure as the service runs it: the network through the shipped back-end."""
    backend = PadBackEnd.load(
        default_backend_path(), judged_id(AASIST_MANIFEST.model_id), READOUT_DIM + SPECTRAL_DIM
    )
    return countermeasure.with_backend(backend)


@pytest.fixture
def start_server(
    tmp_path: Path, embedder: SpeakerEmbedder, service_countermeasure: AasistCountermeasure
) -> Iterator[Callable[..., RunningServer]]:
    """Starts servers on demand (several in a row share the same database: restarts), with
    the real speaker model and countermeasure."""
    running: list[RunningServer] = []

    def start(
        config: ServerConfig | None = None,
        clock: ManualClock | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> RunningServer:
        server = RunningServer(
            config or make_config(tmp_path),
            lambda: embedder,
            KEY,
            clock,
            credentials,
            load_countermeasure=lambda: service_countermeasure,
        )
        running.append(server)
        return server

    yield start
    for server in running:
        if server._thread.is_alive():
            server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The tests' own PostgreSQL server, started on first use and stopped at the end of the
    session; fails (never skips) where its binaries are missing."""
    server = PostgresServer()
    yield server
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


# Fixtures that bring the real speaker model: a test using one is end to end, and lives there.
_REAL_MODEL_FIXTURES = frozenset(
    {"embedder", "countermeasure", "voxauth", "start_server", "key_env"}
)
_SUITES = ("unit", "contract", "e2e")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks each test with its suite's name (its folder), so `-m unit` or `-m "not e2e"`
    select by kind, and refuses a real-model test outside tests/e2e: the fast suites stay fast."""
    misplaced = []
    for item in items:
        suite = next((s for s in _SUITES if f"tests/{s}/" in item.nodeid), None)
        if suite is None:
            misplaced.append(f"{item.nodeid}: outside tests/unit, tests/contract and tests/e2e")
            continue
        item.add_marker(getattr(pytest.mark, suite))
        uses_model = _REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ()))
        if uses_model and suite != "e2e":
            misplaced.append(f"{item.nodeid}: uses {sorted(uses_model)}, belongs in tests/e2e")
    if misplaced:
        raise pytest.UsageError("tests in the wrong suite:\n  " + "\n  ".join(misplaced))
