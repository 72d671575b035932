"""Several replicas on one PostgreSQL (issue 15, point 3): real `voxauth serve` processes with
the real models, a softphone and clients that spread calls over their addresses (as a load
balancer would), and a PostgreSQL server of the test's own.

`kill -9` of the replica holding a shift's stream, when the next checkpoint is about to fall
due: the softphone reconnects to the other replica, which takes the shift over and decides
that checkpoint (never twice, never skipped); the MFA provider subscribed on the other replica
receives every event once; the audit chain verifies. Then PostgreSQL restarts while the
replicas take calls: their health turns NOT_SERVING and back to SERVING, no call is answered
wrongly in between, and the shift's checkpoints go on.

The failover time (death to the shift's next decided checkpoint on another replica) is
printed; VOXAUTH_TEST_FAILOVER_TRIALS=n repeats the kill n times, and
VOXAUTH_TEST_SOFTPHONE_REPLAY_SECONDS (default 10) is how much of its recent audio the softphone
sends again on reconnecting (README, "Running several replicas", reports such runs)."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from voxauth.v1 import shifts_pb2 as spb
from voxauth.v1 import shifts_pb2_grpc as spb_grpc
from voxauth.v1 import voxauth_pb2 as pb
from voxauth.v1 import voxauth_pb2_grpc as pb_grpc

from tests.postgres import PostgresServer
from tests.softphone import ShiftStream
from tests.support import (
    OTHER_1,
    SPEAKER_A,
    Samples,
    first_half,
    second_half,
    speech,
    split,
    wav_audio,
)

INTERVAL_SECONDS = 15
"""Checkpoints every 15 s (no jitter) and 8 s of net speech each: the default amount."""
SERVING = health_pb2.HealthCheckResponse.SERVING
PASSED = spb.SHIFT_EVENT_KIND_CHECKPOINT_PASSED


_SERVE = (sys.executable, "-m", "server.tools.cli", "serve", "--insecure-dev")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Replica:
    """One `voxauth serve` process on the shared database."""

    def __init__(self, name: str, env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.address = f"127.0.0.1:{free_port()}"
        self._env = env
        self._log = logs / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with self._log.open("ab") as log:
            self.process = subprocess.Popen(
                [*_SERVE, "--listen", self.address],
                env=self._env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def health(self) -> int | None:
        with grpc.insecure_channel(self.address) as channel:
            try:
                return int(
                    health_pb2_grpc.HealthStub(channel)
                    .Check(health_pb2.HealthCheckRequest(), timeout=1)
                    .status
                )
            except grpc.RpcError:
                return None

    def wait_serving(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while self.health() != SERVING:
            assert self.process is not None and self.process.poll() is None, self.log_tail()
            assert time.monotonic() < deadline, f"{self.name} not serving\n{self.log_tail()}"
            time.sleep(0.5)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def log_tail(self) -> str:
        return self._log.read_text(errors="replace")[-3000:]


@dataclass
class Softphone:
    """Streams the agent's speech in real time to one replica after another: on a broken
    stream it reconnects to the next address, as behind a load balancer, and sends first the
    last `replay_seconds` it had sent (the new replica has none of the old one's audio)."""

    addresses: list[str]
    shift_id: str
    replay_seconds: float = 0.0
    passed: queue.Queue[tuple[float, str, spb.ShiftEvent]] = field(default_factory=queue.Queue)
    reconnects: list[tuple[float, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        audio = speech(SPEAKER_A)
        half_second = 8000
        position, turn = 0, 0
        sent: deque[Samples] = deque(maxlen=int(self.replay_seconds * 2))
        while not self._stop.is_set():
            address = self.addresses[turn % len(self.addresses)]
            channel = grpc.insecure_channel(address)
            stream = ShiftStream(spb_grpc.ShiftServiceStub(channel), self.shift_id)
            for recent in sent:
                stream.send(recent)
            try:
                while not self._stop.is_set():
                    if position + half_second > len(audio):
                        position = 0
                    chunk = audio[position : position + half_second]
                    stream.send(chunk)
                    sent.append(chunk)
                    position += half_second
                    deadline = time.monotonic() + 0.5
                    while (left := deadline - time.monotonic()) > 0:
                        try:
                            event = stream.next_event(timeout=left)
                        except queue.Empty:
                            break
                        if event.kind == PASSED:
                            self.passed.put((time.monotonic(), address, event))
            except grpc.RpcError:
                turn += 1
                self.reconnects.append(
                    (time.monotonic(), self.addresses[turn % len(self.addresses)])
                )
                time.sleep(0.2)
            finally:
                stream.close()
                channel.close()

    def next_checkpoint(self, timeout: float) -> tuple[float, str, spb.ShiftEvent]:
        return self.passed.get(timeout=timeout)


@dataclass
class Subscriber:
    """The MFA provider, subscribed to every shift event on one replica."""

    address: str
    events: list[spb.ShiftEvent] = field(default_factory=list)
    after_event_id: int | None = None
    """Resume after this event (SubscribeShiftEventsRequest.after_event_id)."""

    def start(self) -> None:
        self._channel = grpc.insecure_channel(self.address)
        request = spb.SubscribeShiftEventsRequest()
        if self.after_event_id is not None:
            request.after_event_id = self.after_event_id
        self._call = spb_grpc.ShiftServiceStub(self._channel).SubscribeShiftEvents(request)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for event in self._call:
                self.events.append(event)
        except grpc.RpcError:
            pass

    def stop(self) -> None:
        self._call.cancel()
        self._channel.close()


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[PostgresServer]:
    """A server of this test's own: it restarts it."""
    server = PostgresServer()
    yield server
    server.stop()


def lease(conninfo: str, shift_id: str) -> tuple[str, int, int, datetime]:
    with psycopg.connect(conninfo) as conn:
        row = conn.execute(
            "SELECT owner, token, checkpoint_seq, next_checkpoint_at FROM shift_leases "
            "WHERE shift_id = %s",
            (shift_id,),
        ).fetchone()
    assert row is not None
    return row[0], row[1], row[2], row[3]


def test_replicas_fail_over_and_ride_out_a_database_restart(
    tmp_path: Path, key_env: dict[str, str], postgres: PostgresServer
) -> None:
    conninfo = postgres.new_database()
    env = key_env | {
        "VOXAUTH_DB": conninfo,
        "VOXAUTH_ENROLL_NET_SPEECH_SECONDS": "5",
        "VOXAUTH_CHECKPOINT_MEAN_SECONDS": str(INTERVAL_SECONDS),
        "VOXAUTH_CHECKPOINT_JITTER_SECONDS": "0",
        "VOXAUTH_CHECKPOINT_MIN_GAP_SECONDS": "5",
        "VOXAUTH_SHIFT_LEASE_SECONDS": "3",
        "VOXAUTH_HTTP_LISTEN": "",  # (GetJwks over gRPC serves the same keys)
        # The test sends the same recordings again and again.
        "VOXAUTH_REPLAY_DETECTION": "0",
    }
    replicas = [Replica(name, env, tmp_path) for name in ("a", "b")]
    softphone: Softphone | None = None
    subscriber: Subscriber | None = None
    try:
        for replica in replicas:
            replica.wait_serving()
        addresses = [replica.address for replica in replicas]
        channels = [grpc.insecure_channel(address) for address in addresses]
        enrollment = [pb_grpc.EnrollmentServiceStub(c) for c in channels]
        verification = [pb_grpc.VerificationServiceStub(c) for c in channels]
        shifts = [spb_grpc.ShiftServiceStub(c) for c in channels]

        # HR enrolls through one replica, the login check goes through the other.
        enrollment[0].CreateAgent(
            pb.CreateAgentRequest(agent_id="agent-a", display_name="A", consent_reference="HR-1")
        )
        for part in split(first_half(SPEAKER_A), 2):
            enrollment[1].AddEnrollmentAudio(
                pb.AddEnrollmentAudioRequest(agent_id="agent-a", audio=wav_audio(part))
            )
        enrollment[0].FinalizeEnrollment(pb.FinalizeEnrollmentRequest(agent_id="agent-a"))
        subscriber = Subscriber(addresses[1])
        subscriber.start()
        shift_id = (
            shifts[1]
            .StartShift(
                spb.StartShiftRequest(
                    agent_id="agent-a",
                    device_id="phone-1",
                    login_audio=wav_audio(second_half(SPEAKER_A)),
                )
            )
            .shift.shift_id
        )
        replay = float(os.environ.get("VOXAUTH_TEST_SOFTPHONE_REPLAY_SECONDS", "10"))
        softphone = Softphone(addresses, shift_id, replay)
        softphone.start()
        _, where, first = softphone.next_checkpoint(timeout=INTERVAL_SECONDS + 60)
        assert (where, first.shift.checkpoints_passed) == (addresses[0], 1)

        trials = int(os.environ.get("VOXAUTH_TEST_FAILOVER_TRIALS", "1"))
        holder = 0
        figures: list[tuple[float, float]] = []
        for _ in range(trials):
            # Kill the replica holding the stream 2 s before the next checkpoint is due.
            while True:
                owner_before, token_before, seq_before, due = lease(conninfo, shift_id)
                wait = (due - datetime.now(UTC)).total_seconds() - 2
                if wait > 1:
                    break
                softphone.next_checkpoint(timeout=60)  # Too close: the one after.
            time.sleep(wait)
            while not softphone.passed.empty():
                softphone.passed.get_nowait()
            killed_at = time.monotonic()
            replicas[holder].kill()
            decided_at, where, event = softphone.next_checkpoint(timeout=60)
            assert where == addresses[1 - holder]
            assert event.shift.checkpoints_passed == seq_before + 1
            owner, token, seq, _ = lease(conninfo, shift_id)
            assert (owner != owner_before, token > token_before, seq) == (
                True,
                True,
                seq_before + 1,
            )
            figures.append((decided_at - killed_at, decided_at - killed_at - 2.0))
            # Back, empty, once the figure is taken (its model loading would slow the other's
            # checkpoint on a small machine); the next trial kills the other.
            replicas[holder].start()
            replicas[holder].wait_serving()
            holder = 1 - holder
        for n, (total, past_due) in enumerate(figures, 1):
            print(
                f"failover trial {n} (softphone replays {replay:g} s): {total:.1f} s from kill -9 "
                f"to the next decided checkpoint on another replica ({past_due:.1f} s past its "
                "due time)"
            )

        # PostgreSQL restarts while both replicas take calls (a genuine check and, twice, an
        # impostor's, spread over both): health goes NOT_SERVING and back, and every answer
        # given is right.
        answers: list[tuple[bool, str]] = []
        health_seen: dict[str, set[int | None]] = {r.name: set() for r in replicas}
        loading = threading.Event()
        loading.set()

        def calls() -> None:
            n = 0
            while loading.is_set():
                genuine = n % 6 != 3
                audio = second_half(SPEAKER_A) if genuine else first_half(OTHER_1)
                try:
                    reply = verification[n % 2].Verify(
                        pb.VerifyRequest(agent_id="agent-a", audio=wav_audio(audio)), timeout=20
                    )
                    answers.append((genuine, pb.Decision.Name(reply.decision)))
                except grpc.RpcError as error:
                    answers.append((genuine, error.code().name))
                n += 1
                time.sleep(0.3)

        def watch() -> None:
            while loading.is_set():
                for replica in replicas:
                    health_seen[replica.name].add(replica.health())
                time.sleep(0.2)

        workers = [threading.Thread(target=calls), threading.Thread(target=watch)]
        for worker in workers:
            worker.start()
        time.sleep(2)
        postgres.halt()
        time.sleep(4)
        postgres.resume()
        for replica in replicas:
            replica.wait_serving(timeout=60)
        time.sleep(2)
        loading.clear()
        for worker in workers:
            worker.join(30)
        for name, seen in health_seen.items():
            assert {SERVING, health_pb2.HealthCheckResponse.NOT_SERVING} <= seen, (name, seen)
        for genuine, answer in answers:
            if genuine:
                assert answer not in ("DECISION_REJECT",), answers
            else:
                assert answer != "DECISION_ACCEPT", answers
        for stub in verification:
            reply = stub.Verify(
                pb.VerifyRequest(agent_id="agent-a", audio=wav_audio(second_half(SPEAKER_A)))
            )
            assert reply.decision == pb.DECISION_ACCEPT
        # The shift rode it out: its next checkpoint is decided.
        softphone.passed = queue.Queue()
        _, _, after = softphone.next_checkpoint(timeout=INTERVAL_SECONDS + 60)
        passed = after.shift.checkpoints_passed
        softphone.stop()
        time.sleep(1)

        # Every checkpoint reached the MFA provider on replica b once, in order, whichever
        # replica decided it; the store holds exactly as many.
        state = shifts[1].GetShift(spb.GetShiftRequest(shift_id=shift_id))
        assert state.checkpoints_passed >= passed
        counts = [e.shift.checkpoints_passed for e in subscriber.events if e.kind == PASSED]
        if trials == 1:
            assert counts == list(range(1, state.checkpoints_passed + 1)), counts
        else:
            # Later trials kill the subscriber's replica too, and a subscription hears what
            # happens while it is connected: no duplicates, in order.
            assert counts == sorted(set(counts)), counts
        assert lease(conninfo, shift_id)[2] == state.checkpoints_passed
        for channel in channels:
            channel.close()
    finally:
        if softphone is not None:
            softphone.stop()
        if subscriber is not None:
            subscriber.stop()
        for replica in replicas:
            replica.stop()
    verified = subprocess.run(
        [sys.executable, "-m", "server.tools.cli", "audit", "verify", "--db", conninfo],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr


def wait_for(what: Callable[[], bool], timeout: float = 60.0) -> None:
    # 60 s: on the 2-core CI machine, once, two events took longer than 30 s to reach a
    # subscriber on a freshly started replica (it passes in 12 s alone); not yet explained.
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def refused(stub: spb_grpc.ShiftServiceStub, after: int) -> grpc.RpcError:
    call = stub.SubscribeShiftEvents(spb.SubscribeShiftEventsRequest(after_event_id=after))
    with pytest.raises(grpc.RpcError) as error:
        next(iter(call))
    return error.value


def test_a_subscriber_killed_with_its_replica_resumes_on_another_with_every_event_once(
    tmp_path: Path, key_env: dict[str, str], postgres_server: PostgresServer
) -> None:
    """The MFA provider subscribes on replica a; a is killed (-9) mid-shift while shifts end
    on replica b; the provider subscribes again on b after the last event id it saw (some
    shifts ending as it does): it gets every event exactly once, in order. Then hostile
    resume ids, and one older than the store keeps."""
    conninfo = postgres_server.new_database()
    env = key_env | {
        "VOXAUTH_DB": conninfo,
        "VOXAUTH_ENROLL_NET_SPEECH_SECONDS": "5",
        "VOXAUTH_SHIFT_LEASE_SECONDS": "3",
        "VOXAUTH_HTTP_LISTEN": "",
        "VOXAUTH_REPLAY_DETECTION": "0",  # the same login recording every time
    }
    a, b = (Replica(name, env, tmp_path) for name in ("a", "b"))
    first = second = None
    try:
        a.wait_serving()
        b.wait_serving()
        on_b = spb_grpc.ShiftServiceStub(channel := grpc.insecure_channel(b.address))
        enrollment = pb_grpc.EnrollmentServiceStub(channel)
        enrollment.CreateAgent(
            pb.CreateAgentRequest(agent_id="agent-a", display_name="A", consent_reference="HR-1")
        )
        for part in split(first_half(SPEAKER_A), 2):
            enrollment.AddEnrollmentAudio(
                pb.AddEnrollmentAudioRequest(agent_id="agent-a", audio=wav_audio(part))
            )
        enrollment.FinalizeEnrollment(pb.FinalizeEnrollmentRequest(agent_id="agent-a"))
        login = wav_audio(second_half(SPEAKER_A))
        shift_ids = [
            on_b.StartShift(
                spb.StartShiftRequest(agent_id="agent-a", device_id="phone-1", login_audio=login)
            ).shift.shift_id
            for _ in range(6)
        ]

        def end(shift_id: str) -> None:
            on_b.EndShift(spb.EndShiftRequest(shift_id=shift_id))

        first = Subscriber(a.address, after_event_id=0)  # every event kept: from the first
        first.start()
        for shift_id in shift_ids[:2]:
            end(shift_id)
        wait_for(lambda: len(first.events) == 2)
        a.kill()
        for shift_id in shift_ids[2:4]:
            end(shift_id)  # while the provider has no subscription
        seen = list(first.events)

        def end_the_last() -> None:
            for shift_id in shift_ids[4:]:
                end(shift_id)

        ending = threading.Thread(target=end_the_last)
        second = Subscriber(b.address, after_event_id=seen[-1].event_id)
        ending.start()  # the last two end as it subscribes again
        second.start()
        ending.join(30)
        wait_for(lambda: len(second.events) >= 4)
        time.sleep(1)  # nothing more comes
        events = seen + second.events
        assert [(e.kind, e.shift_id) for e in events] == [
            (spb.SHIFT_EVENT_KIND_SHIFT_ENDED, shift_id) for shift_id in shift_ids
        ]
        ids = [e.event_id for e in events]
        assert ids == sorted(set(ids)) and ids[0] > 0
        with psycopg.connect(conninfo) as conn:
            stored = [row[0] for row in conn.execute("SELECT event_id FROM shift_events")]
        assert sorted(stored) == ids  # every event the store holds, once

        # Hostile resume ids: told which field, with the right status.
        for hostile in (-1, -(2**63), ids[-1] + 1, 2**63 - 1):
            error = refused(on_b, hostile)
            assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, (hostile, error)
            assert "after_event_id" in (error.details() or "")
        # An id whose successors the retention dropped (as it would after
        # VOXAUTH_SHIFT_EVENT_RETENTION_HOURS): OUT_OF_RANGE, not a silent gap.
        with psycopg.connect(conninfo) as conn:
            conn.execute("DELETE FROM shift_events WHERE event_id <= %s", (ids[2],))
        assert refused(on_b, ids[1]).code() is grpc.StatusCode.OUT_OF_RANGE
        resumed = Subscriber(b.address, after_event_id=ids[2])
        resumed.start()
        wait_for(lambda: len(resumed.events) == 3)
        resumed.stop()
        channel.close()
    finally:
        for subscriber in (first, second):
            if subscriber is not None:
                subscriber.stop()
        a.stop()
        b.stop()
    verified = subprocess.run(
        [sys.executable, "-m", "server.tools.cli", "audit", "verify", "--db", conninfo],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
