"""Telling a new enrollment utterance from a copy of one already pending: the same recording
sent again, re-encoded, gain-changed, trimmed at the edges or with a little noise would count
its speech twice toward the voiceprint.

The fingerprint is what enrollment keeps of every utterance anyway: its embedding and its
telephone companion, which say nothing recoverable about the audio. A copy of a recording
embeds almost exactly as the recording does; another utterance of the same speaker, even from
the same session and microphone, does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.embedder import Embedding
from server.storage.interface import UtteranceRecord

# Measured with scripts/measure_duplicates.py on LibriSpeech train-clean-100: 251 speakers, one
# file each, 226 of whose halves both hold 2 s of net speech; the first half stands for the
# pending utterance. `similarity` of a copy of it (n, lowest, median):
#   the same audio              226  1.000   1.000
#   G.711 u-law at 8 kHz        223  0.930   0.993
#   gain +6 dB (some clipping)  226  0.976   1.000
#   gain -6 dB                  226  1.000   1.000
#   trimmed 0.5 s at each edge  215  0.893   0.985
#   noise at 30 dB SNR          226  0.922   0.979
#   trimmed, G.711 and -6 dB    212  0.864   0.976
# and of the second half of the same file, a different utterance of the same speaker from the
# same session and microphone (n, median, highest): 226  0.838  0.916. (Copies that lost too
# much speech to be kept are not counted.) At 0.93 no second half of the 226 is refused (the
# closest is 0.014 below), and 9 of the 1,328 altered copies pass: 2 trimmed, 2 noisy, and 5
# trimmed, G.711-coded and 6 dB quieter at once; every exact, G.711 (lowest: 0.930) and
# gain-changed copy is refused.
DUPLICATE_SIMILARITY = 0.93
"""At or above this similarity, an utterance is taken for a copy of a pending one."""


@dataclass(frozen=True, eq=False)
class Fingerprint:
    """What an utterance is compared by."""

    embedding: Embedding
    telephone_embedding: Embedding | None


def similarity(new: Fingerprint, pending: Fingerprint) -> float:
    """Cosine of the two embeddings, or of the two telephone companions where that is higher.

    The companions make a G.711 copy of a wideband recording recognisable: both are the speech
    as a telephone call carries it, while the copy's own embedding, telephone-band, is far from
    the recording's wideband one (median cosine 0.75 in the measurement above).
    """
    score = float(np.dot(new.embedding, pending.embedding))
    if new.telephone_embedding is not None and pending.telephone_embedding is not None:
        score = max(score, float(np.dot(new.telephone_embedding, pending.telephone_embedding)))
    return score


@dataclass(frozen=True)
class Duplicate:
    of: UtteranceRecord
    similarity: float


def find_duplicate(
    new: Fingerprint, pending: list[UtteranceRecord], threshold: float
) -> Duplicate | None:
    """The pending utterance `new` is a copy of (the most similar one), or None. Only
    utterances of the same model compare: another model's embeddings live in another space, so
    the caller passes those of the current model alone."""
    best: Duplicate | None = None
    for record in pending:
        score = similarity(new, Fingerprint(record.embedding, record.telephone_embedding))
        if score >= threshold and (best is None or score > best.similarity):
            best = Duplicate(record, score)
    return best
