"""`voxauth certs init|server|client`: the development PKI (server/security/certificates.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from server.errors import VoxauthError
from server.security.certificates import (
    DEFAULT_FOLDER,
    DEFAULT_SERVER_NAMES,
    DevelopmentPki,
    create_pki,
    issue_client_certificate,
    issue_server_certificate,
)
from server.security.identity import Role


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="voxauth certs",
        description="Create a development PKI: a local CA, a server certificate and client "
        "certificates carrying the caller's name and role. For development and tests only.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser("init", help="CA, server certificate and one client per role")
    server = commands.add_parser("server", help="a new server certificate from the existing CA")
    client = commands.add_parser("client", help="a client certificate from the existing CA")
    for command in (init, server, client):
        command.add_argument("--dir", type=Path, default=DEFAULT_FOLDER, help="the PKI folder")
        command.add_argument("--force", action="store_true", help="replace existing files")
    for command in (init, server):
        command.add_argument(
            "--server-name",
            action="append",
            dest="server_names",
            metavar="NAME",
            help="a DNS name or IP address of the server (repeatable; default: "
            f"{', '.join(DEFAULT_SERVER_NAMES)})",
        )
    client.add_argument("--name", required=True, help="the caller's name (certificate CN)")
    client.add_argument("--role", required=True, choices=[role.value for role in Role])
    args = parser.parse_args(argv)
    pki = DevelopmentPki(args.dir)
    server_names = getattr(args, "server_names", None) or DEFAULT_SERVER_NAMES
    try:
        if args.command == "init":
            create_pki(args.dir, server_names, force=args.force)
            written = [pki.ca_certificate, pki.server_certificate]
            written += [pki.client_certificate(role.value) for role in Role]
        elif args.command == "server":
            issue_server_certificate(pki, server_names, force=args.force)
            written = [pki.server_certificate]
        else:
            issue_client_certificate(pki, args.name, Role(args.role), force=args.force)
            written = [pki.client_certificate(args.name)]
    except VoxauthError as error:
        print(f"voxauth certs: error: {error.message}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path} (key: {path.with_suffix('.key')})")
    return 0
