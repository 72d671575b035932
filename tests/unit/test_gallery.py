"""The 1:N search (server/scoring/gallery.py): the bound of each comparison tightens with the
gallery's size so that the whole search keeps to its false-alarm target."""

from __future__ import annotations

from datetime import UTC, datetime
from statistics import NormalDist
from typing import cast

import numpy as np
import pytest

from server.pipeline.channel import Channel
from server.records import Voiceprint, WatchlistEntry
from server.scoring.calibration import Condition, DecidedBy
from server.scoring.gallery import GallerySearch, Probe, per_comparison_rate
from server.scoring.scorer import Score, Scorer

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("size", [1, 2, 100, 1000, 100_000])
@pytest.mark.parametrize("target", [0.01, 0.001])
def test_the_per_comparison_rate_keeps_the_whole_search_to_its_target(
    size: int, target: float
) -> None:
    rate = per_comparison_rate(target, size)
    assert -np.expm1(size * np.log1p(-rate)) == pytest.approx(target, rel=1e-9)
    assert rate <= target


def test_the_rate_falls_about_as_one_over_the_gallery_size() -> None:
    assert per_comparison_rate(0.01, 1000) == pytest.approx(1.005e-5, rel=1e-3)
    assert per_comparison_rate(0.01, 100) == pytest.approx(1.005e-4, rel=1e-3)


def score(normalized: float, *, needed: float) -> Score:
    return Score(
        condition=Condition.WIDEBAND,
        cosine=0.0,
        normalized=normalized,
        llr=normalized,
        normalized_threshold=needed,
        decided_by=DecidedBy.FMR_THRESHOLD,
        threshold=0.0,
        llr_threshold=0.0,
        expected_false_non_match_rate=0.0,
    )


class StubScorer:
    """Scores by a table: reference agent id -> AS-norm score. The impostor tail is standard
    normal, so the bound for rate p is the normal deviate of 1 - p."""

    def __init__(self, scores: dict[str, float]) -> None:
        self.scores = scores

    def score(
        self, voiceprint: Voiceprint, test: object, net_speech: float, channel: Channel
    ) -> Score:
        normalized = self.scores[voiceprint.agent_id]
        return Score(
            Condition.WIDEBAND,
            0.0,
            normalized,
            normalized,
            0.5,
            DecidedBy.FMR_THRESHOLD,
            0.0,
            0.0,
            0.0,
        )

    def normalized_threshold_at(self, condition: Condition, false_match_rate: float) -> float:
        return NormalDist().inv_cdf(1 - false_match_rate)


def voice(agent_id: str) -> Voiceprint:
    return Voiceprint(agent_id, "m", np.full(4, 0.5, np.float32), NOW, 1, 20.0)


PROBE = Probe(np.full(4, 0.5, np.float32), 20.0)


def test_a_score_that_matches_one_voice_does_not_match_in_a_gallery_of_a_thousand() -> None:
    scores = {"twin": 3.0} | {f"other{i}": 0.0 for i in range(999)}
    search = GallerySearch(cast(Scorer, StubScorer(scores)))
    alone = search.search(PROBE, [voice("twin")], 0.01)
    assert alone is not None and alone.reference_id == "twin"
    assert alone.threshold == pytest.approx(2.326, abs=1e-3)
    crowd = [voice("twin"), *(voice(f"other{i}") for i in range(999))]
    assert search.search(PROBE, crowd, 0.01) is None
    # A duplicate scores far above any bound: found among a thousand, named.
    search = GallerySearch(cast(Scorer, StubScorer(scores | {"twin": 9.0})))
    found = search.search(PROBE, crowd, 0.01)
    assert found is not None and found.reference_id == "twin" and found.gallery_size == 1000


def test_the_best_margin_wins_and_an_empty_gallery_matches_nothing() -> None:
    search = GallerySearch(cast(Scorer, StubScorer({"a": 5.0, "b": 7.0, "c": 6.0})))
    match = search.search(PROBE, [voice("a"), voice("b"), voice("c")], 0.01)
    assert match is not None and match.reference_id == "b"
    assert search.search(PROBE, [], 0.01) is None


def test_the_verification_bound_is_a_floor() -> None:
    class Demanding(StubScorer):
        def score(
            self, voiceprint: Voiceprint, test: object, net_speech: float, channel: Channel
        ) -> Score:
            # The LLR floor asks for more than the gallery's bound.
            return score(self.scores[voiceprint.agent_id], needed=10.0)

    search = GallerySearch(cast(Scorer, Demanding({"a": 8.0})))
    assert search.search(PROBE, [voice("a")], 0.01) is None


def test_a_watchlist_match_names_the_entry_and_skips_other_models() -> None:
    entry = WatchlistEntry(
        "e1", "Fraudster", "CASE-1", "m", np.full(4, 0.5, np.float32), NOW, NOW, 8.0
    )
    other_model = WatchlistEntry("e2", "Old", "CASE-2", "old", entry.embedding, NOW, NOW, 8.0)
    search = GallerySearch(cast(Scorer, StubScorer({"watchlist:e1": 6.0})))
    match = search.search_watchlist(PROBE, [entry, other_model], "m", 0.001)
    assert match is not None and match.reference_id == "e1" and match.gallery_size == 1


def test_the_evaluation_counts_false_alarms_and_detections_per_search() -> None:
    from server.tools.gallery_eval import Voice, measure, pairwise, speed_changed

    speakers = ["s1", "s2", "s3"]

    def voice_of(speaker: str, speed: float = 1.0) -> Voice:
        # The probe says who searches: a one-hot vector of the speaker's number.
        probe = np.zeros(4, np.float32)
        probe[speakers.index(speaker)] = 1.0
        return Voice(speaker, speed, voice(f"{speaker}x{speed:g}"), Probe(probe, 8.0))

    class Table(StubScorer):
        """Each speaker matches its own natural voiceprint; s3 also matches every s2 voice."""

        def score(
            self, voiceprint: Voiceprint, test: object, net_speech: float, channel: Channel
        ) -> Score:
            searching = speakers[int(np.argmax(cast(np.ndarray, test)))]
            own = voiceprint.agent_id == f"{searching}x1"
            false = searching == "s3" and voiceprint.agent_id.startswith("s2")
            return score(9.0 if own or false else 0.0, needed=0.5)

    voices = [voice_of("s1"), voice_of("s2"), voice_of("s2", 1.1), voice_of("s3")]
    search = GallerySearch(cast(Scorer, Table({})))
    rates = measure(voices, search, 2, 0.01, np.random.default_rng(0), draws=2)
    # s1, s2 and s3 search twice each way (the copy at 1.1 does not search): any two of s3's
    # three others hold an s2 voice, so both of s3's searches are false alarms; every
    # speaker's own voiceprint is found.
    assert rates.searches == rates.detection_trials == 6
    assert rates.detections == 6
    assert rates.false_alarms == 2
    # One to one over natural voices: s3 against s2 is the one false match of 6 pairs.
    assert pairwise(voices, search, 2, 0.01) == (1, 6)

    slowed = speed_changed(np.ones(16_000, np.float32), 0.9)
    assert len(slowed) == pytest.approx(16_000 / 0.9, abs=2)
