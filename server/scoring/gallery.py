"""1:N search: a voice compared with every voice of a gallery (the other enrolled agents, or
the watchlist), with a bound that holds for the gallery's size.

One comparison of two different people's voices passes a threshold set for the false-match
rate p with probability p; a search over N of them raises a false alarm with probability
1 - (1 - p)^N, about N * p. So each comparison is held to the p at which the whole search
keeps to the target: p = 1 - (1 - target)^(1/N). The threshold for p comes from the same
calibration verification uses (the impostor tail of the AS-norm scores, with its bootstrap
upper bound; models/scoring/README.md), and never falls below what a verification of the same
length would need (the target false-match rate and the LLR floor).

Pure computation over the voices it is given: the callers read the galleries from the store.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from models.embedder import Embedding
from server.pipeline.channel import Channel
from server.records import Voiceprint, WatchlistEntry
from server.scoring.scorer import Scorer

_WATCHLIST_PREFIX = "watchlist:"


def per_comparison_rate(target: float, gallery_size: int) -> float:
    """The false-match rate p of one comparison at which a search over `gallery_size` voices
    raises a false alarm with probability `target`."""
    if gallery_size <= 1:
        return target
    # log1p/expm1 keep p exact where target is small and N large.
    return -math.expm1(math.log1p(-target) / gallery_size)


@dataclass(frozen=True)
class GalleryMatch:
    reference_id: str
    """The agent id, or the watchlist entry id, of the voice matched."""
    normalized: float
    """The AS-norm score of the comparison."""
    threshold: float
    """The AS-norm score this search needed."""
    llr: float
    gallery_size: int


@dataclass(frozen=True)
class Probe:
    """The voice searched for: a new voiceprint, or a check's speech."""

    embedding: Embedding
    net_speech_seconds: float
    channel: Channel = Channel.WIDEBAND


class GallerySearch:
    """Searches galleries with the service's scorer. Thread-safe as the scorer is."""

    def __init__(self, scorer: Scorer) -> None:
        self._scorer = scorer

    def search(
        self, probe: Probe, gallery: list[Voiceprint], false_alarm: float
    ) -> GalleryMatch | None:
        """The best match of `probe` in `gallery` that passes the bound for the gallery's size
        and `false_alarm`, or None."""
        if not gallery:
            return None
        rate = per_comparison_rate(false_alarm, len(gallery))
        best: GalleryMatch | None = None
        for reference in gallery:
            score = self._scorer.score(
                reference, probe.embedding, probe.net_speech_seconds, probe.channel
            )
            threshold = max(
                self._scorer.normalized_threshold_at(score.condition, rate),
                score.normalized_threshold,
            )
            if score.normalized >= threshold and (
                best is None or score.normalized - threshold > best.normalized - best.threshold
            ):
                best = GalleryMatch(
                    reference.agent_id, score.normalized, threshold, score.llr, len(gallery)
                )
        return best

    def search_watchlist(
        self, probe: Probe, entries: list[WatchlistEntry], model_id: str, false_alarm: float
    ) -> GalleryMatch | None:
        """As `search`, over the watchlist entries of `model_id`; the match names the entry."""
        gallery = [watchlist_voice(entry) for entry in entries if entry.model_id == model_id]
        match = self.search(probe, gallery, false_alarm)
        if match is None:
            return None
        return GalleryMatch(
            match.reference_id.removeprefix(_WATCHLIST_PREFIX),
            match.normalized,
            match.threshold,
            match.llr,
            match.gallery_size,
        )


def watchlist_voice(entry: WatchlistEntry) -> Voiceprint:
    """The entry as a reference voice the scorer compares with (its own cache key: an agent
    id cannot hold the ':')."""
    return Voiceprint(
        agent_id=_WATCHLIST_PREFIX + entry.entry_id,
        model_id=entry.model_id,
        embedding=entry.embedding,
        created_at=entry.added_at,
        utterance_count=1,
        net_speech_seconds=entry.net_speech_seconds,
        telephone_embedding=entry.telephone_embedding,
    )
