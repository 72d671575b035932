"""The real AASIST countermeasure: our network against the official code's outputs on real
speech (tests/data/aasist_reference.json), the OpenVINO path against the torch network, and
the export's caching.

Uses the session-scoped `countermeasure` fixture from conftest.py (loaded from
models.fetch.default_countermeasure_dir(); set VOXAUTH_COUNTERMEASURE_DIR or run `voxauth
fetch-model` first).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import soundfile as sf
import torch

from models.aasist import (
    BONA_FIDE_CLASS,
    READOUT_DIM,
    WINDOW_SAMPLES,
    build_network,
    export_network,
    export_path,
)
from models.aasist_countermeasure import AasistCountermeasure
from models.countermeasure import judged_id, window_starts, windows_of
from models.embedder import Waveform
from models.fetch import default_countermeasure_dir
from models.manifest import AASIST_MANIFEST, verify_model_dir
from models.pad_backend import SPECTRAL_DIM, PadBackEnd, default_backend_path
from server.config import ServerConfig

DATA = Path(__file__).parents[1] / "data"
REFERENCE = json.loads((DATA / "aasist_reference.json").read_text())
# Float32 on another CPU or thread count sums in another order: a few 1e-6 of a logit.
_SAME_NETWORK = 1e-4
# bfloat16 keeps 8 bits of mantissa: over 1,782 windows of the shared LibriSpeech set (wideband
# and telephone) it moved the bona-fide logit from float32 by 0.017 on average, 0.10 at the 99th
# percentile, 0.39 at most (server/tools/ATTACKS.md). These clips' windows move less.
_BFLOAT16 = 0.15
# The back-end's score weighs 160 readouts, so bfloat16's errors could add up there; on the
# first 5 clips of tests/data they moved it by 0.008 at most (readouts by 0.058), against a
# genuine spread of about 0.8 (models/scoring/pad_calibration.json).
_BACKEND_BFLOAT16 = 0.05


def _clip(name: str) -> Waveform:
    audio, rate = sf.read(DATA / name, dtype="float32")
    assert rate == 16_000
    waveform: Waveform = audio
    return waveform


def _reference_window(entry: dict[str, Any]) -> np.ndarray:
    """The window the official evaluation fed the network: 64,600 samples from the start,
    the clip repeated to fill it when shorter."""
    audio = _clip(entry["clip"])
    start = entry["start_sample"]
    return windows_of(audio[start : start + WINDOW_SAMPLES], WINDOW_SAMPLES)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    directory = ServerConfig.from_environment().countermeasure_dir or default_countermeasure_dir()
    verify_model_dir(directory, AASIST_MANIFEST)
    return directory


@pytest.fixture(scope="session")
def network(model_dir: Path) -> torch.nn.Module:
    return build_network(model_dir)


def test_reference_was_made_from_the_pinned_checkpoint() -> None:
    assert REFERENCE["checkpoint"]["sha256"] == AASIST_MANIFEST.files[0].sha256
    assert len(REFERENCE["windows"]) == 9
    assert any(entry["tiled"] for entry in REFERENCE["windows"])


@pytest.mark.parametrize(
    "entry", REFERENCE["windows"], ids=lambda e: f"{e['clip']}@{e['start_sample']}"
)
def test_network_reproduces_the_official_logits(
    network: torch.nn.Module, entry: dict[str, Any]
) -> None:
    with torch.inference_mode():
        logits = network(torch.from_numpy(_reference_window(entry))).numpy()[0]
    np.testing.assert_allclose(logits, entry["logits"], atol=_SAME_NETWORK, rtol=0)


def test_export_in_float32_gives_the_official_logits(model_dir: Path) -> None:
    exported = AasistCountermeasure.load(model_dir, precision="f32")
    for entry in REFERENCE["windows"]:
        logits = exported.window_logits(
            _clip(entry["clip"])[entry["start_sample"] :][:WINDOW_SAMPLES]
        )
        np.testing.assert_allclose(logits[0], entry["logits"], atol=_SAME_NETWORK, rtol=0)


def test_service_path_agrees_with_the_torch_network(
    countermeasure: AasistCountermeasure, model_dir: Path
) -> None:
    torch_path = AasistCountermeasure.load_torch(model_dir)
    for name in ("198-126831-0000.flac", "3374-298025-0000.flac", "1447-130550-0000.flac"):
        check = _clip(name)[: 8 * 16_000]
        ours, theirs = countermeasure.window_logits(check), torch_path.window_logits(check)
        assert ours.shape == theirs.shape == (len(window_starts(len(check), WINDOW_SAMPLES)), 2)
        np.testing.assert_allclose(
            ours[:, BONA_FIDE_CLASS], theirs[:, BONA_FIDE_CLASS], atol=_BFLOAT16, rtol=0
        )
        assert countermeasure.score(check) == pytest.approx(torch_path.score(check), abs=_BFLOAT16)


def test_service_path_readouts_and_backend_scores_agree_with_the_torch_network(
    countermeasure: AasistCountermeasure, model_dir: Path
) -> None:
    backend = PadBackEnd.load(
        default_backend_path(), judged_id(AASIST_MANIFEST.model_id), READOUT_DIM + SPECTRAL_DIM
    )
    ours_path = countermeasure.with_backend(backend)
    torch_path = AasistCountermeasure.load_torch(model_dir).with_backend(backend)
    for name in ("198-126831-0000.flac", "3374-298025-0000.flac", "1447-130550-0000.flac"):
        check = _clip(name)[: 8 * 16_000]
        _, ours = ours_path.window_outputs(check)
        _, theirs = torch_path.window_outputs(check)
        windows = len(window_starts(len(check), WINDOW_SAMPLES))
        assert ours.shape == theirs.shape == (windows, READOUT_DIM)
        np.testing.assert_allclose(ours, theirs, atol=_BFLOAT16, rtol=0)
        ours_evidence, theirs_evidence = ours_path.evidence(check), torch_path.evidence(check)
        for channel in ("wideband", "telephone"):
            assert ours_path.channel_score(ours_evidence, channel) == pytest.approx(
                torch_path.channel_score(theirs_evidence, channel), abs=_BACKEND_BFLOAT16
            )


def test_describes_itself(countermeasure: AasistCountermeasure) -> None:
    assert countermeasure.model_id == judged_id(AASIST_MANIFEST.model_id)
    assert countermeasure.sample_rate == 16_000
    assert countermeasure.min_samples == 16_000


def test_concurrent_calls_match_sequential_ones(countermeasure: AasistCountermeasure) -> None:
    checks = [
        _clip(name)[: 5 * 16_000] for name in ("198-126831-0000.flac", "8770-295462-0000.flac")
    ]
    sequential = [countermeasure.score(check) for check in checks]
    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(countermeasure.score, checks)) == sequential


def test_export_is_made_once_from_the_weights_and_replaces_a_stale_one(
    model_dir: Path, tmp_path: Path
) -> None:
    for spec in AASIST_MANIFEST.files:
        (tmp_path / spec.name).symlink_to(model_dir / spec.name)
    stale = tmp_path / "aasist-network-0000000000000000-v0.onnx"
    stale.write_bytes(b"an export of other weights")
    made = export_network(tmp_path)
    assert made == export_path(tmp_path)
    assert not stale.exists()
    modified = made.stat().st_mtime_ns
    assert export_network(tmp_path) == made  # current: left alone
    assert made.stat().st_mtime_ns == modified
    entry = REFERENCE["windows"][0]
    logits = AasistCountermeasure.load(tmp_path, precision="f32").window_logits(
        _clip(entry["clip"])[:WINDOW_SAMPLES]
    )
    np.testing.assert_allclose(logits[0], entry["logits"], atol=_SAME_NETWORK, rtol=0)


def test_export_holds_no_selu_node(model_dir: Path) -> None:
    """OpenVINO's CPU plugin runs Selu in a float32 reference loop, which was two thirds of
    the network's time; the export writes it as a scaled Elu (models.aasist._selu)."""
    graph = onnx.load(str(export_network(model_dir))).graph
    operators = {node.op_type for node in graph.node}
    assert "Selu" not in operators
    assert "Elu" in operators


def test_export_pools_the_filter_bank_along_time_first(model_dir: Path) -> None:
    """The filter bank's magnitudes are pooled in their 1-D layout (models.aasist._pooled_bands):
    a 3 x 3 pool of them made OpenVINO reorder all of them into a 2-D layout first."""
    graph = onnx.load(str(export_network(model_dir))).graph
    kernels = [
        next(
            list(attribute.ints) for attribute in node.attribute if attribute.name == "kernel_shape"
        )
        for node in graph.node
        if node.op_type == "MaxPool"
    ]
    assert kernels[0] == [3]
    assert [3, 3] not in kernels
