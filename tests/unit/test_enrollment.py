"""Voiceprint building rules, on hand-made embeddings (no model needed)."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np

from enrollment.voiceprint import check_consistency, mean_embedding
from server.storage.interface import UtteranceRecord


def utterance(uid: str, direction: list[float], seconds: float = 5.0) -> UtteranceRecord:
    vector = np.array(direction, dtype=np.float32)
    return UtteranceRecord(
        utterance_id=uid,
        agent_id="a",
        model_id="m",
        embedding=vector / np.linalg.norm(vector),
        duration_seconds=seconds,
        net_speech_seconds=seconds,
        speech_level_dbfs=-25.0,
        clipped_fraction=0.0,
        received_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


def test_mean_is_unit_length_and_weighted_by_speech() -> None:
    long = utterance("long", [1, 0, 0], seconds=9.0)
    short = utterance("short", [0, 1, 0], seconds=1.0)
    mean = mean_embedding([long, short])
    assert abs(float(np.linalg.norm(mean)) - 1.0) < 1e-6
    assert mean[0] > 8 * mean[1]


def test_the_outlier_is_rejected_and_the_rest_kept() -> None:
    agent = [utterance(f"a{i}", [1, 0.1 * i, 0]) for i in range(3)]
    other = utterance("other", [0, 0, 1])
    result = check_consistency([agent[0], other, agent[1], agent[2]], threshold=0.5)
    assert [r.utterance.utterance_id for r in result.rejected] == ["other"]
    assert "another speaker" in result.rejected[0].reason
    assert [u.utterance_id for u in result.accepted] == ["a0", "a1", "a2"]
    assert not result.undecided


def test_two_impostor_utterances_are_removed_one_at_a_time() -> None:
    agent = [utterance(f"a{i}", [1, 0.05 * i, 0]) for i in range(3)]
    others = [utterance("x", [0, 0, 1]), utterance("y", [0, 1, 0.2])]
    result = check_consistency([*agent, *others], threshold=0.5)
    assert {r.utterance.utterance_id for r in result.rejected} == {"x", "y"}
    assert len(result.accepted) == 3


def test_two_that_disagree_are_undecided_and_both_kept() -> None:
    result = check_consistency([utterance("a", [1, 0, 0]), utterance("b", [0, 1, 0])], 0.5)
    assert result.undecided
    assert len(result.accepted) == 2 and not result.rejected


def test_consistent_utterances_all_pass() -> None:
    result = check_consistency([utterance("a", [1, 0.1, 0]), utterance("b", [1, 0, 0.1])], 0.5)
    assert not result.undecided and not result.rejected and len(result.accepted) == 2
