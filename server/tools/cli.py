"""The `voxauth` command: run the server, and talk to a running one.

Exit codes: 0 success (verify: ACCEPT); 1 verify REJECT; 3 verify INCONCLUSIVE; 2 usage or
local input error; 4 the server refused the request; 5 the server could not be reached; 6 some
agents of a bulk enrollment failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import grpc
from voxauth.v1 import voxauth_pb2 as pb
from voxauth.v1 import voxauth_pb2_grpc as pb_grpc

from models.errors import ModelFilesError
from server.config import AudioLimits, ClientSettings
from server.errors import ConfigurationError
from server.tools.agents_cli import add_commands as add_agents_commands
from server.tools.client import AudioFile, AudioFileError, EnrollmentClient
from server.tools.ops_cli import (
    add_agent_commands,
    add_key_commands,
    add_shift_commands,
    remote_configuration,
)

EXIT_OK = 0
EXIT_REJECT = 1
EXIT_USAGE = 2
EXIT_INCONCLUSIVE = 3
EXIT_REFUSED = 4
EXIT_UNREACHABLE = 5


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # These commands own their options; hand them everything after the command name.
    if argv and argv[0] in _DELEGATED:
        return _DELEGATED[argv[0]](argv[1:])
    args = _parser().parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.command
    try:
        return command(args)
    except AudioFileError as error:
        print(f"voxauth: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (ConfigurationError, ModelFilesError) as error:
        # Model files that are missing or do not match the manifest stop `serve` here.
        print(f"voxauth: {error.message}", file=sys.stderr)
        return EXIT_USAGE
    except grpc.RpcError as error:
        return _report_rpc_error(error)
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voxauth", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--listen", help="host:port (default 127.0.0.1:50051, VOXAUTH_LISTEN)")
    serve.add_argument(
        "--db", help="SQLite file or postgresql:// URI (default var/voxauth.db, VOXAUTH_DB)"
    )
    serve.add_argument("--model-dir", type=Path, help="verified model files (VOXAUTH_MODEL_DIR)")
    serve.add_argument("--log-level", default="INFO")
    serve.add_argument(
        "--insecure-dev",
        action="store_true",
        help="plain text, every caller with every role: one developer's machine only",
    )
    serve.set_defaults(command=_serve)

    commands.add_parser(
        "fetch-model", help="download and verify the speaker model and the countermeasure"
    )

    config = commands.add_parser(
        "config", help="print the effective configuration as JSON, secrets redacted"
    )
    _client_options(config, "admin")
    config.add_argument(
        "--remote",
        action="store_true",
        help="the running server's configuration (GetConfiguration, admin), not this shell's",
    )
    config.set_defaults(command=_config)

    key = commands.add_parser("create-key", help="write a new voiceprint encryption key file")
    key.add_argument("path", type=Path)
    key.set_defaults(command=_create_key)

    enroll = commands.add_parser(
        "enroll", help="create (if needed) and enroll an agent from audio files"
    )
    _client_options(enroll, "hr")
    enroll.add_argument("agent_id")
    enroll.add_argument("files", nargs="+", type=Path, metavar="FILE")
    enroll.add_argument("--name", help="display name (needed when the agent is new)")
    enroll.add_argument("--consent", help="consent reference (needed when the agent is new)")
    enroll.add_argument(
        "--no-finalize", action="store_true", help="only add the utterances; finalize later"
    )
    enroll.set_defaults(command=_enroll)

    verify = commands.add_parser("verify", help="verify an audio file against an agent")
    _client_options(verify, "softphone")
    verify.add_argument("agent_id")
    verify.add_argument("file", type=Path)
    verify.set_defaults(command=_verify)

    status = commands.add_parser("status", help="show an agent's enrollment status")
    _client_options(status, "hr")
    status.add_argument("agent_id")
    status.set_defaults(command=_status)

    delete = commands.add_parser("delete", help="erase an agent and its voiceprint")
    _client_options(delete, "hr")
    delete.add_argument("agent_id")
    delete.set_defaults(command=_delete)

    add_shift_commands(commands, _client_options, _channel)
    agents = add_agents_commands(commands, _client_options, _channel)
    add_agent_commands(agents, _client_options, _channel)
    approve = agents.add_parser(
        "approve",
        help="approve (or --reject) a voiceprint held for review: a duplicate of another "
        "agent's voice, a watchlist match, or a passive enrollment awaiting approval",
    )
    _client_options(approve, "hr")
    approve.add_argument("agent_id")
    approve.add_argument("--reason", required=True, help="why (recorded in the audit log)")
    approve.add_argument(
        "--reject", action="store_true", help="erase the held voiceprint instead of approving it"
    )
    approve.set_defaults(command=_agents_approve)
    add_key_commands(commands, _client_options, _channel)

    commands.add_parser("certs", help="create a development CA, server and client certificates")
    commands.add_parser(
        "reencrypt", help="re-wrap the stored data keys under the current key (key rotation)"
    )
    commands.add_parser("token", help="mint a bearer token for a caller without a certificate")
    commands.add_parser("eval", help="measure accuracy over a folder of speakers")
    commands.add_parser(
        "calibrate", help="make the score cohort and calibration from a folder of speakers"
    )
    commands.add_parser(
        "bench",
        help="measure embedding speed (`--check`: each stage of a whole check); `bench load`: "
        "Verify load; `bench shifts`: shift load; `bench capacity`: shift streams; "
        "`bench store`: store work per Verify",
    )
    commands.add_parser("audit", help="verify or export the tamper-evident audit log")
    commands.add_parser("report", help="write the compliance report for a period (HTML)")
    commands.add_parser(
        "attacks",
        help="build the presentation-attack corpus, score it, calibrate or evaluate the PAD",
    )
    return parser


def _client_options(parser: argparse.ArgumentParser, role: str) -> None:
    parser.add_argument(
        "--server",
        help=f"server address (default {ClientSettings.server}, VOXAUTH_SERVER)",
    )
    parser.add_argument(
        "--pki-dir",
        type=Path,
        help=f"development PKI from `voxauth certs init` (default {ClientSettings.pki_dir}, "
        f"VOXAUTH_PKI_DIR): its CA, and the client certificate named {role!r}",
    )
    parser.add_argument("--ca", type=Path, help="CA certificate of the server (VOXAUTH_CA)")
    parser.add_argument("--cert", type=Path, help="client certificate (VOXAUTH_CERT)")
    parser.add_argument("--key", type=Path, help="its private key (VOXAUTH_CERT_KEY)")
    parser.add_argument(
        "--token", help="bearer token instead of a client certificate (VOXAUTH_TOKEN)"
    )
    parser.add_argument(
        "--insecure", action="store_true", help="plain text, to a server run with --insecure-dev"
    )
    parser.set_defaults(role=role)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per call")
    parser.add_argument("--rate", type=int, default=0, help="sample rate of raw .pcm/.raw files")


# --- server side ------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    from server.app import VoxauthServer, serve_until_signalled
    from server.config import KeySettings, ServerConfig
    from server.runtime.log_format import configure_logging
    from server.security.crypto import load_key, load_previous_keys

    config = ServerConfig.from_environment()
    configure_logging(
        args.log_level,
        format_name=config.log.format,
        agent_pseudonyms=config.log.agent_pseudonyms,
    )
    if args.listen:
        config = replace(config, listen_address=args.listen)
    if args.db:
        config = replace(config, database_path=args.db)
    if args.model_dir:
        config = replace(config, model_dir=args.model_dir)
    if args.insecure_dev:
        config = replace(config, transport=replace(config.transport, insecure_development=True))
    keys = KeySettings.from_environment()
    key = load_key(key_b64=keys.key, key_file=keys.key_file)
    previous = load_previous_keys(listed=keys.previous_keys, key_file=keys.previous_keys_file)
    asyncio.run(serve_until_signalled(VoxauthServer(config, key, previous_keys=previous)))
    return EXIT_OK


def _config(args: argparse.Namespace) -> int:
    """The settings every command reads from the environment (`voxauth serve` flags aside):
    keys and tokens only as whether they are set, and the key ids."""
    if args.remote:
        return remote_configuration(_channel, args)
    from server.config import KeySettings, ServerConfig, redacted
    from server.security.crypto import VoiceprintCipher, load_key, load_previous_keys

    keys = KeySettings.from_environment()
    shown_keys = redacted(keys) | {"key_id": None, "previous_key_ids": []}
    if keys.key is not None or keys.key_file is not None:
        key = load_key(key_b64=keys.key, key_file=keys.key_file)
        previous = load_previous_keys(listed=keys.previous_keys, key_file=keys.previous_keys_file)
        shown_keys["key_id"] = VoiceprintCipher(key).key_id
        shown_keys["previous_key_ids"] = [VoiceprintCipher(k).key_id for k in previous]
    effective = {
        "server": redacted(ServerConfig.from_environment()),
        "keys": shown_keys,
        "client": redacted(ClientSettings.from_environment()),
    }
    print(json.dumps(effective, indent=2, sort_keys=True))
    return EXIT_OK


def _fetch_model(argv: list[str]) -> int:
    from models.fetch import main as fetch_main
    from server.config import ServerConfig

    try:
        configured = ServerConfig.from_environment()
    except ConfigurationError as error:
        print(f"voxauth fetch-model: {error.message}", file=sys.stderr)
        return EXIT_USAGE
    return fetch_main(
        argv,
        configured_dir=configured.model_dir,
        configured_countermeasure_dir=configured.countermeasure_dir,
    )


def _create_key(args: argparse.Namespace) -> int:
    from server.security.crypto import create_key_file

    if args.path.exists():
        print(f"voxauth: {args.path} exists; keeping it")
        return EXIT_OK
    create_key_file(args.path)
    print(f"wrote a new voiceprint encryption key to {args.path} (mode 0600)")
    return EXIT_OK


def _eval(argv: list[str]) -> int:
    if argv[:1] == ["gallery"]:
        from server.tools.gallery_eval import main as gallery_main

        return gallery_main(argv[1:])
    if argv[:1] == ["passive"]:
        from server.tools.passive_eval import main as passive_main

        return passive_main(argv[1:])
    from server.tools.evaluation import main as eval_main

    return eval_main(argv)


def _calibrate(argv: list[str]) -> int:
    from server.tools.calibrate import main as calibrate_main

    return calibrate_main(argv)


def _bench(argv: list[str]) -> int:
    if argv[:1] == ["shifts"]:
        from server.tools.shift_bench import main as shift_bench_main

        return shift_bench_main(argv[1:])
    if argv[:1] == ["capacity"]:
        from server.tools.capacity_bench import main as capacity_bench_main

        return capacity_bench_main(argv[1:])
    if argv[:1] == ["store"]:
        from server.tools.store_bench import main as store_bench_main

        return store_bench_main(argv[1:])
    if argv[:1] == ["load"]:
        from server.tools.load_bench import main as load_bench_main

        return load_bench_main(argv[1:])
    from server.tools.model_bench import main as bench_main

    return bench_main(argv)


def _reencrypt(argv: list[str]) -> int:
    from server.tools.reencrypt_cli import main as reencrypt_main

    return reencrypt_main(argv)


def _certs(argv: list[str]) -> int:
    from server.tools.certs_cli import main as certs_main

    return certs_main(argv)


def _token(argv: list[str]) -> int:
    from server.tools.token_cli import main as token_main

    return token_main(argv)


def _audit(argv: list[str]) -> int:
    from server.tools.audit_cli import main as audit_main

    return audit_main(argv)


def _report(argv: list[str]) -> int:
    from server.tools.report_cli import main as report_main

    return report_main(argv)


def _attacks(argv: list[str]) -> int:
    if argv[:1] == ["evaluate"]:
        from server.tools.pad_evaluation import main as evaluate_main

        return evaluate_main(argv[1:])
    if argv[:1] in (["features"], ["fit-backend"], ["calibrate"]):
        from server.tools.pad_backend_fit import main as backend_main

        return backend_main(argv)
    from server.tools.attack_corpus import main as attacks_main

    return attacks_main(argv)


_DELEGATED: dict[str, Callable[[list[str]], int]] = {
    "certs": _certs,
    "reencrypt": _reencrypt,
    "token": _token,
    "fetch-model": _fetch_model,
    "eval": _eval,
    "calibrate": _calibrate,
    "bench": _bench,
    "audit": _audit,
    "attacks": _attacks,
    "report": _report,
}


# --- client side ------------------------------------------------------------------------------


def _channel(args: argparse.Namespace) -> grpc.Channel:
    """Mutual TLS with the command's role certificate from the PKI folder unless told
    otherwise; a bearer token instead of a certificate; plain text only when asked."""
    settings = ClientSettings.from_environment()
    server: str = args.server or settings.server
    if args.insecure or settings.insecure:
        return grpc.insecure_channel(server)
    from server.api.tls import channel_credentials

    pki: Path = args.pki_dir or settings.pki_dir
    ca: Path = args.ca or settings.ca or pki / "ca.crt"
    token: str | None = args.token or settings.token
    if token:
        return grpc.secure_channel(server, channel_credentials(ca, bearer_token=token))
    clients = pki / "clients"
    certificate: Path = args.cert or settings.certificate or clients / f"{args.role}.crt"
    private_key: Path = args.key or settings.certificate_key or clients / f"{args.role}.key"
    credentials = channel_credentials(ca, certificate=certificate, private_key=private_key)
    return grpc.secure_channel(server, credentials)


def _enroll(args: argparse.Namespace) -> int:
    # Every file is checked before the first call, so a file the server would refuse cannot
    # leave a new agent created, with its consent recorded, but no voiceprint.
    max_seconds = AudioLimits.from_environment().max_seconds
    files = [AudioFile.from_path(path, args.rate) for path in args.files]
    for audio in files:
        audio.check(max_seconds)
    with _channel(args) as channel:
        client = EnrollmentClient(channel, args.timeout)
        try:
            client.status(args.agent_id)
        except grpc.RpcError as error:
            if error.code() is not grpc.StatusCode.NOT_FOUND:
                raise
            if not args.name or not args.consent:
                print(
                    f"voxauth: agent {args.agent_id} is new: give --name and --consent "
                    "(the reference of the agent's recorded biometric consent)",
                    file=sys.stderr,
                )
                return EXIT_USAGE
            client.create_agent(args.agent_id, args.name, args.consent)
            print(f"created agent {args.agent_id}")
        for audio in files:
            response = client.add_utterance(args.agent_id, audio)
            _print_utterance(audio.path, response.utterance)
        status = client.status(args.agent_id)
        print(
            f"net speech collected: {status.net_speech_seconds:.1f} s of "
            f"{status.required_net_speech_seconds:.1f} s required"
        )
        if args.no_finalize:
            return EXIT_OK
        result = client.finalize(args.agent_id)
        for rejected in result.rejected:
            print(f"  rejected utterance {rejected.utterance_id}: {rejected.rejection_reason}")
        verb = (
            "re-enrolled (previous voiceprint replaced)" if result.replaced_previous else "enrolled"
        )
        print(
            f"{args.agent_id} {verb}: {result.voiceprint.utterance_count} utterance(s), "
            f"{result.voiceprint.net_speech_seconds:.1f} s net speech, "
            f"model {result.voiceprint.model_id}"
        )
    return EXIT_OK


def _print_utterance(path: Path, utterance: pb.Utterance) -> None:
    q = utterance.quality
    figures = (
        f"{q.net_speech_seconds:.1f} s speech of {q.duration_seconds:.1f} s, "
        f"level {q.speech_level_dbfs:.0f} dBFS, clipped {q.clipped_fraction:.2%}"
    )
    if utterance.accepted:
        print(f"  {path}: accepted ({figures})")
    else:
        print(f"  {path}: NOT accepted: {utterance.rejection_reason} ({figures})")


def _verify(args: argparse.Namespace) -> int:
    audio = AudioFile.from_path(args.file, args.rate)
    with _channel(args) as channel:
        response = pb_grpc.VerificationServiceStub(channel).Verify(
            pb.VerifyRequest(agent_id=args.agent_id, audio=audio.message()),
            timeout=args.timeout,
        )
    decision = pb.Decision.Name(response.decision).removeprefix("DECISION_")
    band = pb.Channel.Name(response.channel).removeprefix("CHANNEL_").lower()
    print(
        f"{decision}  score {response.score:.3f}  threshold {response.threshold:.3f}  "
        f"LLR {response.llr:+.2f} (threshold {response.llr_threshold:+.2f})  "
        f"net speech {response.quality.net_speech_seconds:.1f} s  {band}  "
        f"model {response.model_id}"
    )
    if response.decision != pb.DECISION_INCONCLUSIVE:
        print(
            f"threshold set for a false-match rate of {response.target_false_match_rate:g}; "
            f"expected false-non-match rate at this length "
            f"{response.expected_false_non_match_rate:.2%}"
        )
    elif pb.QUALITY_ISSUE_TOO_LITTLE_SPEECH in response.quality.issues:
        print(
            f"too little speech: a decision on the {band} channel needs "
            f"{response.min_net_speech_seconds:g} s of net speech"
        )
    return {
        pb.DECISION_ACCEPT: EXIT_OK,
        pb.DECISION_REJECT: EXIT_REJECT,
    }.get(response.decision, EXIT_INCONCLUSIVE)


def _status(args: argparse.Namespace) -> int:
    with _channel(args) as channel:
        status = EnrollmentClient(channel, args.timeout).status(args.agent_id)
    agent = status.agent
    print(f"agent {agent.agent_id} ({agent.display_name}), consent {agent.consent_reference}")
    if status.HasField("voiceprint"):
        vp = status.voiceprint
        print(
            f"  enrolled: {vp.utterance_count} utterance(s), {vp.net_speech_seconds:.1f} s, "
            f"model {vp.model_id}, since {vp.created_at.ToDatetime():%Y-%m-%d %H:%M} UTC"
        )
    else:
        print(
            "  not enrolled"
            + (" (passive enrollment from its shifts)" if agent.passive_enrollment else "")
        )
    if status.HasField("held_voiceprint"):
        held = status.held_voiceprint
        reason = pb.HoldReason.Name(held.reason).removeprefix("HOLD_REASON_").lower()
        match = held.matching_agent_id or held.watchlist_entry_id
        print(
            f"  held for review ({reason}{f': matches {match}' if match else ''}); "
            f"`voxauth agents approve {agent.agent_id} --reason ...` to decide"
        )
    print(
        f"  pending: {len(status.pending_utterances)} utterance(s), "
        f"{status.net_speech_seconds:.1f} s of {status.required_net_speech_seconds:.1f} s "
        f"required{' (ready to finalize)' if status.ready_to_finalize else ''}"
    )
    return EXIT_OK


def _agents_approve(args: argparse.Namespace) -> int:
    with _channel(args) as channel:
        reviewed = EnrollmentClient(channel, args.timeout).review(
            args.agent_id, approve=not args.reject, reason=args.reason
        )
    vp = reviewed.voiceprint
    if reviewed.approved:
        replaced = " (replacing the previous one)" if reviewed.replaced_previous else ""
        print(
            f"agent {args.agent_id}: voiceprint approved and active{replaced}: "
            f"{vp.utterance_count} utterance(s), {vp.net_speech_seconds:.1f} s"
        )
    else:
        print(f"agent {args.agent_id}: held voiceprint rejected and erased")
    return EXIT_OK


def _delete(args: argparse.Namespace) -> int:
    with _channel(args) as channel:
        EnrollmentClient(channel, args.timeout).delete(args.agent_id)
    print(f"agent {args.agent_id} erased")
    return EXIT_OK


def _report_rpc_error(error: grpc.RpcError) -> int:
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        print(f"voxauth: server unreachable or not ready ({code.name}): {details}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(f"voxauth: {code.name}: {details}", file=sys.stderr)
    return EXIT_REFUSED


if __name__ == "__main__":
    raise SystemExit(main())
