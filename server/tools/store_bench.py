"""`voxauth bench store`: the store's share of one Verify, on each database given, in one run:
so the SQLite file and a PostgreSQL database are measured side by side on the same machine.

One Verify's store work, as VerificationService.verify does it for an accepted check (the
model's work left out): read the agent and its voiceprint, admit the attempt (throttle, a write
unit), read the replay fingerprints, append the decision to the audit chain, keep the check's
fingerprint, settle the attempt (a write unit). The hourly note of the voiceprint's use and a
request id's record are left out: most checks do neither. Each database gets `--agents` bench
agents with a voiceprint and `--fingerprints` enrollment fingerprints; then `--verifies`
Verifies run one after another (latency), and again from `--threads` threads at once
(throughput). A database must be empty or this bench's own: the store is opened with
VOXAUTH_KEY / VOXAUTH_KEY_FILE if set, else a throwaway key. Bench agents are deleted at the
end (their audit records stay, as every audit record does).
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from models.embedder import Embedding
from server.audit_actions import AuditAction
from server.config import KeySettings, PresentationAttackPolicy, ThrottlePolicy
from server.errors import ConfigurationError, StorageError
from server.records import (
    AgentRecord,
    AuditEvent,
    RecordingOrigin,
    ReplayFingerprint,
    Voiceprint,
)
from server.security.audit import AuditKey
from server.security.crypto import VoiceprintCipher, load_key
from server.storage.databases import is_postgresql, open_store
from server.storage.secure_store import SecureStore
from server.tools.shift_bench import nearest_rank
from server.verification.decision import Decision
from server.verification.replay import ReplayGuard
from server.verification.throttling import VerificationThrottle

BENCH_MODEL = "bench-store"
"""The model id of the bench voiceprints (they are never scored)."""
_DIMENSIONS = 192


@dataclass(frozen=True)
class Figures:
    database: str
    verifies: int
    mean_ms: float
    p50_ms: float
    p95_ms: float
    threads: int
    concurrent_verifies: int
    per_second: float


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="voxauth bench store", description=__doc__)
    parser.add_argument(
        "--db",
        action="append",
        help="SQLite file or postgresql:// URI; repeat to compare (default: a temporary "
        "SQLite file)",
    )
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--fingerprints", type=int, default=3, help="per agent, at enrollment")
    parser.add_argument("--verifies", type=int, default=300, help="Verifies per measurement")
    parser.add_argument("--threads", type=int, default=4, help="store threads for throughput")
    args = parser.parse_args(argv)
    for name in ("agents", "verifies", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.fingerprints < 0:
        parser.error("--fingerprints must be zero or more")
    try:
        key = _key()
        with tempfile.TemporaryDirectory(prefix="voxauth-bench-") as scratch:
            databases = args.db or [str(Path(scratch) / "bench.db")]
            for database in databases:
                figures = _measure(database, key, args)
                _print(figures)
    except (ConfigurationError, StorageError) as error:
        print(f"voxauth bench store: {error.message}", file=sys.stderr)
        return 2
    return 0


def _key() -> bytes:
    keys = KeySettings.from_environment()
    if keys.key is None and keys.key_file is None:
        return secrets.token_bytes(32)
    return load_key(key_b64=keys.key, key_file=keys.key_file)


def _measure(database: str, key: bytes, args: argparse.Namespace) -> Figures:
    store = open_store(
        database if is_postgresql(database) else Path(database),
        VoiceprintCipher(key),
        audit_key=AuditKey(key),
        connections=args.threads,
    )
    try:
        bench = _Bench(store, args.agents, args.fingerprints)
        try:
            bench.verify(0)  # connections, caches and the first page reads warm up
            latencies = [bench.timed_verify(n) for n in range(args.verifies)]
            started = time.perf_counter()
            with ThreadPoolExecutor(args.threads) as pool:
                list(pool.map(bench.verify, range(args.verifies)))
            elapsed = time.perf_counter() - started
        finally:
            bench.remove()
    finally:
        store.close()
    return Figures(
        database="postgresql" if is_postgresql(database) else "sqlite",
        verifies=len(latencies),
        mean_ms=1000 * float(np.mean(latencies)),
        p50_ms=1000 * nearest_rank(latencies, 0.5),
        p95_ms=1000 * nearest_rank(latencies, 0.95),
        threads=args.threads,
        concurrent_verifies=args.verifies,
        per_second=args.verifies / elapsed,
    )


class _Bench:
    """Bench agents in one store and the store work of one Verify on them."""

    def __init__(self, store: SecureStore, agents: int, fingerprints: int) -> None:
        self._store = store
        self._throttle = VerificationThrottle(store, ThrottlePolicy())
        self._replay = ReplayGuard(store, PresentationAttackPolicy())
        self._rng = np.random.default_rng(0)
        prefix = f"bench-{secrets.token_hex(4)}"
        self.agent_ids = [f"{prefix}-{n}" for n in range(agents)]
        now = datetime.now(UTC)
        for agent_id in self.agent_ids:
            store.create_agent(AgentRecord(agent_id, agent_id, "bench", now))
            store.replace_voiceprint(
                Voiceprint(agent_id, BENCH_MODEL, self._embedding(), now, 3, 20.0), []
            )
            for _ in range(fingerprints):
                store.add_fingerprint(
                    ReplayFingerprint(
                        agent_id, BENCH_MODEL, RecordingOrigin.ENROLLMENT, now, self._embedding()
                    ),
                    keep_after=now,
                    keep=fingerprints,
                )

    def _embedding(self) -> Embedding:
        vector = self._rng.standard_normal(_DIMENSIONS).astype(np.float32)
        return vector / np.linalg.norm(vector)

    def timed_verify(self, n: int) -> float:
        started = time.perf_counter()
        self.verify(n)
        return time.perf_counter() - started

    def verify(self, n: int) -> None:
        """The store calls of one accepted Verify of agent n (round robin)."""
        agent_id = self.agent_ids[n % len(self.agent_ids)]
        embedding = self._embedding()
        agent = self._store.get_agent(agent_id)
        voiceprint = self._store.get_voiceprint(agent.agent_id)
        assert voiceprint is not None
        self._throttle.check(agent_id, datetime.now(UTC))
        now = datetime.now(UTC)
        self._replay.match(agent_id, BENCH_MODEL, embedding, now)
        self._store.append_audit(
            AuditEvent(
                AuditAction.VERIFY,
                agent_id,
                Decision.ACCEPT.value,
                now,
                {"score": 0.71, "threshold": 0.46, "model_id": BENCH_MODEL},
            )
        )
        self._replay.remember(agent_id, BENCH_MODEL, embedding, now)
        self._throttle.record(agent_id, Decision.ACCEPT, datetime.now(UTC))

    def remove(self) -> None:
        for agent_id in self.agent_ids:
            self._store.delete_agent(agent_id)


def _print(figures: Figures) -> None:
    print(
        f"{figures.database}: store work per Verify, one at a time over {figures.verifies} "
        f"Verifies: mean {figures.mean_ms:.2f} ms, p50 {figures.p50_ms:.2f} ms, "
        f"p95 {figures.p95_ms:.2f} ms; {figures.threads} threads, {figures.concurrent_verifies} "
        f"Verifies: {figures.per_second:.0f} Verifies/s"
    )
    sys.stdout.flush()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
