"""`voxauth token --name NAME --role ROLE`: mints a bearer token for a caller that cannot use a
client certificate (server/security/identity.py keeps the token logic)."""

from __future__ import annotations

import argparse

from server.errors import InvalidRequestError
from server.security.identity import Role, mint_token


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="voxauth token",
        description="Mint a bearer token for a caller that cannot use mutual TLS.",
    )
    parser.add_argument("--name", required=True, help="the caller's name, as audited")
    parser.add_argument("--role", required=True, choices=[role.value for role in Role])
    args = parser.parse_args(argv)
    try:
        minted = mint_token(args.name, Role(args.role))
    except InvalidRequestError as error:
        parser.error(error.message)
    print(f"token (give it to {args.name}; it is not stored anywhere): {minted.token}")
    print(f"line to add to the token file: {minted.line}")
    return 0
