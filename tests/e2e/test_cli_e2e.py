"""The `voxauth` client commands against a running server, as the HR workflow uses them."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from server.api.console.compliance import load_evaluation
from server.config import ServerConfig
from server.security.certificates import create_pki
from server.tools.cli import EXIT_INCONCLUSIVE, EXIT_OK, EXIT_REFUSED, EXIT_REJECT, EXIT_USAGE, main
from tests.support import (
    DATA,
    OTHER_1,
    SHORT_CLIP,
    SPEAKER_A,
    RunningServer,
    first_half,
    second_half,
    speech,
    split,
    tls_config,
)


def write_flac(path: Path, samples: np.ndarray) -> Path:
    sf.write(path, samples, 16_000, format="FLAC")
    return path


def test_enroll_verify_status_delete(
    start_server: Callable[..., RunningServer],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The real path: mutual TLS, each command with its role's certificate from the PKI folder.
    pki = create_pki(tmp_path / "pki")
    voxauth = start_server(tls_config(tmp_path, pki))
    server = ["--server", f"127.0.0.1:{voxauth.port}", "--pki-dir", str(pki.folder)]
    parts = [
        write_flac(tmp_path / f"part{i}.flac", samples)
        for i, samples in enumerate(split(first_half(SPEAKER_A), 2))
    ]
    genuine = write_flac(tmp_path / "genuine.flac", second_half(SPEAKER_A))
    impostor = write_flac(tmp_path / "impostor.flac", second_half(OTHER_1))
    short = write_flac(tmp_path / "short.flac", speech(SHORT_CLIP))

    assert main(["enroll", *server, "agent-7", *map(str, parts)]) == EXIT_USAGE
    assert "--consent" in capsys.readouterr().err

    code = main(
        ["enroll", *server, "agent-7", *map(str, parts), "--name", "Ann", "--consent", "HR-7"]
    )
    out = capsys.readouterr().out
    assert code == EXIT_OK, out
    assert "agent-7 enrolled" in out

    assert main(["verify", *server, "agent-7", str(genuine)]) == EXIT_OK
    assert capsys.readouterr().out.startswith("ACCEPT")
    assert main(["verify", *server, "agent-7", str(impostor)]) == EXIT_REJECT
    assert capsys.readouterr().out.startswith("REJECT")
    assert main(["verify", *server, "agent-7", str(short)]) == EXIT_INCONCLUSIVE

    assert main(["status", *server, "agent-7"]) == EXIT_OK
    assert "enrolled: 2 utterance(s)" in capsys.readouterr().out

    # A certificate of the wrong role is refused.
    mfa = ["--cert", str(pki.client_certificate("mfa")), "--key", str(pki.client_key("mfa"))]
    assert main(["delete", *server, *mfa, "agent-7"]) == EXIT_REFUSED
    assert "PERMISSION_DENIED" in capsys.readouterr().err

    assert main(["delete", *server, "agent-7"]) == EXIT_OK
    assert main(["status", *server, "agent-7"]) == EXIT_REFUSED
    assert "NOT_FOUND" in capsys.readouterr().err


def test_eval_prints_error_rates_with_trial_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    det = tmp_path / "det.png"
    results = tmp_path / "eval.json"
    arguments = ["eval", str(DATA), "--det", str(det), "--cache", str(tmp_path / "cache")]
    arguments += ["--results", str(results)]
    assert main([*arguments, "--duration", "full", "--duration", "minimum"]) == EXIT_OK
    out = capsys.readouterr().out
    # 4 of the 5 files have two halves with enough speech: 4 target, 12 impostor trials, in
    # each condition; the tests' speakers are none of the calibration's. `minimum` tests each
    # channel at the service's own minimum of net speech.
    assert "speakers: 5 held out of 5" in out
    minimums = ServerConfig().verification
    assert "the service's minimums: wideband 3 s, telephone " in out
    for condition in ("wideband", "wideband-to-telephone", "telephone"):
        telephone = condition != "wideband"
        shortest = f"{minimums.min_net_speech_for(telephone=telephone):g} s"
        for duration in ("full", shortest):
            assert f"{condition}, {duration} test: 4 target, 12 impostor trials" in out
    assert "AS-norm  EER 0.00%" in out
    assert "FMR 0.00% (0/12" in out
    assert det.read_bytes().startswith(b"\x89PNG")
    # The figures for `voxauth report`, as printed, and the plot they go with.
    evaluation = load_evaluation(results)
    assert evaluation is not None and evaluation.problem is None, evaluation
    assert (evaluation.speakers, len(evaluation.conditions)) == (5, 6)
    figures = evaluation.conditions[0]
    assert (figures["target_trials"], figures["impostor_trials"]) == (4, 12)
    assert figures["fmr_at_policy"].startswith("0.00% (0/12")
    assert all(line in out for line in figures["report"])
    assert base64.b64decode(evaluation.det_png_base64 or "") == det.read_bytes()
    # A second run embeds nothing: every segment comes from the cache.
    assert main([*arguments, "--condition", "wideband"]) == EXIT_OK
    assert "0 segments embedded" in capsys.readouterr().out
