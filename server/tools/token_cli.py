"""`voxauth token --name NAME --role ROLE [--ttl DAYS]`: mints a bearer token for a caller
that cannot use a client certificate (server/security/identity.py keeps the token logic)."""

from __future__ import annotations

import argparse
from datetime import timedelta

from server.errors import InvalidRequestError
from server.security.identity import DEFAULT_TOKEN_LIFETIME, Role, mint_token

# Ten years: longer is a token that never expires in all but name.
_MAX_TTL_DAYS = 3650


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="voxauth token",
        description="Mint a bearer token for a caller that cannot use mutual TLS. The server "
        "reads its token file again within a second of a change: add the line to accept the "
        "token, remove it to revoke the token; no restart.",
    )
    parser.add_argument("--name", required=True, help="the caller's name, as audited")
    parser.add_argument("--role", required=True, choices=[role.value for role in Role])
    parser.add_argument(
        "--ttl",
        type=_days,
        default=DEFAULT_TOKEN_LIFETIME,
        metavar="DAYS",
        help=f"days the token is valid (default {DEFAULT_TOKEN_LIFETIME.days})",
    )
    args = parser.parse_args(argv)
    try:
        minted = mint_token(args.name, Role(args.role), args.ttl)
    except InvalidRequestError as error:
        parser.error(error.message)
    expiry = minted.expires_at.strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"token (give it to {args.name}; it is not stored anywhere; valid until {expiry}): "
        f"{minted.token}"
    )
    print(f"line to add to the token file: {minted.line}")
    return 0


def _days(text: str) -> timedelta:
    try:
        days = float(text)
        if not 0 < days <= _MAX_TTL_DAYS:
            raise ValueError(text)
        return timedelta(days=days)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a number of days above 0 and at most {_MAX_TTL_DAYS}"
        ) from None
