"""The domain modules import without torch, torchaudio, SpeechBrain or OpenVINO: those load
only with the adapters that need them (the speaker model, the speech detector), so pure logic
imports in a fraction of a second and its tests stay fast."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys

import enrollment
import models
import server.pipeline
import server.runtime
import server.scoring
import server.security
import server.shifts
import server.storage
import server.verification

HEAVY = ("torch", "torchaudio", "speechbrain", "openvino", "silero_vad")

# The adapters: the only modules that may bring the heavy libraries with them.
ADAPTERS = frozenset(
    {
        "models.aasist",
        "models.aasist_countermeasure",
        "models.ecapa",
        "models.export",
        "models.reference",
        "models.openvino_runtime",
        "server.pipeline.silero",
    }
)


def domain_modules() -> list[str]:
    """Every module of the domain packages, the adapters left out."""
    found = ["server.config", "server.errors", "server.validation"]
    for package in (
        enrollment,
        models,
        server.pipeline,
        server.runtime,
        server.scoring,
        server.security,
        server.shifts,
        server.storage,
        server.verification,
    ):
        found.append(package.__name__)
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            found.append(module.name)
    return sorted(set(found) - ADAPTERS)


def test_domain_modules_import_without_the_heavy_libraries() -> None:
    modules = domain_modules()
    assert {"server.verification.throttling", "server.shifts.service"} <= set(modules)
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    # A fresh interpreter: this one has long imported everything.
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=environment,
        check=True,
        timeout=120,
    )
    assert json.loads(done.stdout) == []
