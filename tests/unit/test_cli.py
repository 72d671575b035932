"""The `voxauth` client commands against a running server, as the HR workflow uses them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from server.tools.cli import EXIT_OK, EXIT_USAGE, main
from tests.support import (
    DATA,
)


def write_flac(path: Path, samples: np.ndarray) -> Path:
    sf.write(path, samples, 16_000, format="FLAC")
    return path




def test_local_file_problems_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", "agent", str(tmp_path / "missing.wav")]) == EXIT_USAGE
    assert "no such file" in capsys.readouterr().err
    raw = tmp_path / "call.pcm"
    raw.write_bytes(b"\0\0" * 100)
    assert main(["verify", "agent", str(raw)]) == EXIT_USAGE
    assert "--rate" in capsys.readouterr().err


def test_eval_prints_error_rates_with_trial_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    det = tmp_path / "det.png"
    arguments = ["eval", str(DATA), "--det", str(det), "--cache", str(tmp_path / "cache")]
    assert main([*arguments, "--duration", "full", "--duration", "3"]) == EXIT_OK
    out = capsys.readouterr().out
    # 4 of the 5 files have two halves with enough speech: 4 target, 12 impostor trials, in
    # each condition; the tests' speakers are none of the calibration's.
    assert "speakers: 5 held out of 5" in out
    for condition in ("wideband", "wideband-to-telephone", "telephone"):
        for duration in ("full", "3 s"):
            assert f"{condition}, {duration} test: 4 target, 12 impostor trials" in out
    assert "AS-norm  EER 0.00%" in out
    assert "FMR 0.00% (0/12" in out
    assert det.read_bytes().startswith(b"\x89PNG")
    # A second run embeds nothing: every segment comes from the cache.
    assert main([*arguments, "--condition", "wideband"]) == EXIT_OK
    assert "0 segments embedded" in capsys.readouterr().out
