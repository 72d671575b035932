"""The speaker model's weight checks and network split, and the benchmark's arithmetic on a fake
embedder (the real model on real speech is in tests/e2e/test_models_e2e.py).

Reads the model files from models.fetch.default_model_dir(); set VOXAUTH_MODEL_DIR or run
`voxauth fetch-model` first.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openvino as ov
import pytest

from models.ecapa import EcapaEmbedder, split_network
from models.errors import ModelFilesError
from models.export import EMBEDDING_OUTPUT, export_path
from models.fetch import default_model_dir
from models.manifest import ECAPA_MANIFEST, verify_model_dir
from server.config import ServerConfig
from server.tools.model_bench import (
    BenchReport,
    Engine,
    PathResult,
    PathSpec,
    ThroughputReport,
    embedding_benchmark,
    format_results,
    parse_lengths,
)
from tests.fakes import FakeEmbedder


@pytest.fixture(scope="session")
def model_dir() -> Path:
    directory = ServerConfig.from_environment().model_dir or default_model_dir()
    verify_model_dir(directory)
    return directory


def _missing(path: Path, real: Path) -> None:
    """Leaves the file out."""


def _truncated(path: Path, real: Path) -> None:
    with real.open("rb") as f:
        path.write_bytes(f.read(1000))


def _corrupt(path: Path, real: Path) -> None:
    """Right size, wrong bytes: all zeros (sparse, so the 83 MB file costs no disk)."""
    with path.open("wb") as f:
        f.truncate(real.stat().st_size)


@pytest.mark.parametrize(
    ("name", "damage", "problem"),
    [
        ("embedding_model.ckpt", _missing, "missing"),
        ("embedding_model.ckpt", _truncated, "wrong size"),
        ("embedding_model.ckpt", _corrupt, "wrong SHA-256"),
        ("hyperparams.yaml", _corrupt, "wrong SHA-256"),
        ("mean_var_norm_emb.ckpt", _missing, "missing"),
    ],
)
def test_damaged_weights_name_the_file_and_the_fix(
    model_dir: Path,
    tmp_path: Path,
    name: str,
    damage: Callable[[Path, Path], None],
    problem: str,
) -> None:
    # Symlinks to the real files, except the damaged one, which is a new file: the real
    # weights are never written to.
    for spec in ECAPA_MANIFEST.files:
        if spec.name != name:
            (tmp_path / spec.name).symlink_to(model_dir / spec.name)
    damage(tmp_path / name, model_dir / name)
    with pytest.raises(ModelFilesError) as raised:
        EcapaEmbedder.load(tmp_path)
    assert f"{name}: {problem}" in raised.value.message
    assert "voxauth fetch-model" in raised.value.message


def test_missing_or_stale_export_names_the_fix(model_dir: Path, tmp_path: Path) -> None:
    for spec in ECAPA_MANIFEST.files:
        (tmp_path / spec.name).symlink_to(model_dir / spec.name)
    # An export of other weights (or an older format) sits there under another name.
    (tmp_path / "ecapa-network-0000000000000000-v0.onnx").symlink_to(export_path(model_dir))
    with pytest.raises(ModelFilesError) as raised:
        EcapaEmbedder.load(tmp_path)
    assert export_path(tmp_path).name in raised.value.message
    assert f"voxauth fetch-model --dir {tmp_path}" in raised.value.message


def test_trunk_then_head_is_the_whole_network(model_dir: Path) -> None:
    # The service runs the network in two parts (the trunk in bfloat16 where the CPU has it,
    # the pooling head in float32): in float32 the two chained give the whole network's output.
    core = ov.Core()
    network = core.read_model(export_path(model_dir))
    trunk, head = split_network(network)
    f32 = {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32"}
    features = np.random.default_rng(0).standard_normal((1, 400, 80)).astype(np.float32)
    whole = core.compile_model(network, "CPU", f32)({0: features})[EMBEDDING_OUTPUT]
    frames = core.compile_model(trunk, "CPU", f32)({0: features})[0]
    assert frames.shape == (1, 3072, 400)
    chained = core.compile_model(head, "CPU", f32)({0: frames})[0]
    np.testing.assert_allclose(chained, whole, rtol=1e-4, atol=1e-5)


def test_benchmark_reports_real_time_factor() -> None:
    audio = np.zeros(3 * 16_000, dtype=np.float32)
    report = embedding_benchmark(FakeEmbedder(seconds_per_call=0.01), audio, seconds=2.0, runs=3)
    assert report.audio_seconds == 2.0
    assert report.runs == 3
    assert report.min_seconds <= report.median_seconds
    assert report.median_rtf == pytest.approx(report.median_seconds / 2.0)
    with pytest.raises(ValueError, match="shorter"):
        embedding_benchmark(FakeEmbedder(seconds_per_call=0.01), audio, seconds=4.0)


def _result(engine: Engine, threads: int, rtf: float, embedding: list[float]) -> PathResult:
    return PathResult(
        spec=PathSpec(engine, threads, throughput=engine is Engine.SERVICE),
        threads=threads,
        load_seconds=0.5,
        reports=tuple(BenchReport(s, 7, rtf * s, rtf * s, rtf * s) for s in (3.0, 8.0)),
        peak_rss_bytes=600 * 2**20,
        embedding=np.array(embedding, dtype=np.float32),
        throughput=(
            (ThroughputReport(1, 12, 8.0, 2.0), ThroughputReport(2, 12, 8.0, 1.0))
            if engine is Engine.SERVICE
            else ()
        ),
    )


def test_benchmark_prints_baseline_and_service_side_by_side() -> None:
    text = format_results(
        [
            _result(Engine.SPEECHBRAIN, 2, 0.02, [1.0, 0.0]),
            _result(Engine.SPEECHBRAIN, 1, 0.045, [1.0, 0.0]),
            _result(Engine.SERVICE, 1, 0.015, [0.6, 0.8]),
        ],
        runs=7,
    )
    assert "median of 7 runs" in text
    assert "RTF    3 s" in text and "RTF    8 s" in text
    assert "voxauth (1 thread) vs SpeechBrain (1 thread): 3.0x at 3 s, 3.0x at 8 s" in text
    assert "vs SpeechBrain (2 threads): 1.3x at 3 s" in text
    assert "embedding (8 s): 0.60000" in text
    assert "1 caller 48.0, 2 callers 96.0 s of audio per s (2.00x" in text


def test_benchmark_lengths_parse() -> None:
    assert parse_lengths("3,8,20") == [3.0, 8.0, 20.0]
    for bad in ("", "0", "x", "90"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_lengths(bad)


def test_the_bench_default_speech_file_exists() -> None:
    from server.tools.model_bench import _DEFAULT_SPEECH

    assert _DEFAULT_SPEECH.is_file(), _DEFAULT_SPEECH
