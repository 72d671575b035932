"""Telephone band: telling it from wideband, and the companion voiceprint's storage."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from scipy.signal import resample_poly

from server.pipeline.channel import Channel, channel_of, high_band_fraction
from server.pipeline.decode import AudioEncoding, decode_audio, encode_mulaw, telephone_channel
from server.security.crypto import VoiceprintCipher, associated_data
from server.storage.interface import AgentRecord, UtteranceRecord, Voiceprint
from server.storage.sqlite import open_store
from server.storage.sqlite.schema import MIGRATIONS
from tests.support import KEY, SPEAKER_A, speech, wav_bytes

AT = datetime(2026, 3, 1, tzinfo=UTC)


def test_telephone_band_is_told_by_rate_or_by_bandwidth() -> None:
    wideband = speech(SPEAKER_A)
    assert channel_of(16_000, wideband) is Channel.WIDEBAND
    # A G.711 call relayed as a 16 kHz WAV still sounds like a telephone.
    relayed = decode_audio(
        wav_bytes(telephone_channel(wideband)), AudioEncoding.WAV, 0, max_seconds=60
    )
    assert relayed.source_rate_hz == 16_000
    assert high_band_fraction(relayed.waveform) < 1e-4 < high_band_fraction(wideband)
    assert channel_of(relayed.source_rate_hz, relayed.waveform) is Channel.TELEPHONE
    # u-law is 8 kHz by definition.
    mulaw = encode_mulaw(resample_poly(wideband, 1, 2).astype(np.float32))
    decoded = decode_audio(mulaw, AudioEncoding.MULAW, 8000, max_seconds=60)
    assert decoded.source_rate_hz == 8000
    assert channel_of(decoded.source_rate_hz, decoded.waveform) is Channel.TELEPHONE


def _embedding(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).normal(size=192)
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def test_companion_embeddings_are_stored_encrypted_with_their_records(tmp_path: Path) -> None:
    store = open_store(tmp_path / "v.db", VoiceprintCipher(KEY))
    store.create_agent(AgentRecord("a", "A", "HR-1", AT))
    store.add_utterance(
        UtteranceRecord("u1", "a", "m", _embedding(1), 9.0, 8.0, -20.0, 0.0, AT, _embedding(2)),
        max_pending=4,
    )
    (pending,) = store.pending_utterances("a")
    assert pending.telephone_embedding is not None
    assert np.array_equal(pending.telephone_embedding, _embedding(2))
    store.replace_voiceprint(Voiceprint("a", "m", _embedding(3), AT, 1, 8.0, _embedding(4)), [])
    stored = store.get_voiceprint("a")
    assert stored is not None and stored.telephone_embedding is not None
    assert np.array_equal(stored.telephone_embedding, _embedding(4))
    assert [v.agent_id for v in store.voiceprints("m")] == ["a"]
    assert store.voiceprints("other-model") == []
    store.close()
    raw = (tmp_path / "v.db").read_bytes()
    assert _embedding(4).tobytes() not in raw


def test_voiceprints_from_before_companions_load_without_one(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    cipher = VoiceprintCipher(KEY)
    conn = sqlite3.connect(path)
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO agents VALUES ('a', 'A', 'HR-1', 0)")
    blob = cipher.encrypt_embedding(
        _embedding(5),
        associated=associated_data(agent_id="a", record_kind="voiceprint", model_id="m"),
    )
    conn.execute("INSERT INTO voiceprints VALUES ('a', 'm', ?, 0, 2, 21.0)", (blob,))
    conn.commit()
    conn.close()

    store = open_store(path, cipher)
    old = store.get_voiceprint("a")
    store.close()
    assert old is not None
    assert old.telephone_embedding is None
    assert np.array_equal(old.embedding, _embedding(5))
