"""`voxauth report --from DATE --to DATE [--out report.html]`: the compliance report
(server/api/console/compliance.py) as one self-contained HTML file.

It reads the database directly, as `voxauth audit verify` does, with the service key, rather
than over ExportAudit: the report must state whether the chain verifies, and only the holder
of the key can check its seals (an export over gRPC carries hashes a tamperer could recompute);
the consents it lists are in the agents' records, which no RPC returns. Admin-only for the same
reason: whoever runs it holds the key. The server may be running.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from server.api.console.compliance import Period, build_report, load_evaluation, render_html
from server.config import KeySettings, ServerConfig
from server.errors import ConfigurationError, StorageError
from server.security.audit import AuditKey
from server.security.crypto import VoiceprintCipher, load_key, load_previous_keys
from server.storage.databases import open_store, store_exists

EXIT_OK = 0
EXIT_BROKEN = 1
EXIT_USAGE = 2


def main(argv: Sequence[str]) -> int:
    """Exit 0: written, chain intact; 1: written, but the audit chain does not verify (the
    report says where); 2: usage, configuration or storage problem."""
    args = _parser().parse_args(argv)
    if args.end <= args.start:
        print("voxauth report: --to must come after --from", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = ServerConfig.from_environment()
        database = args.db or config.database_path
        if not store_exists(database):
            raise ConfigurationError(f"no database at {database}")
        keys = KeySettings.from_environment()
        key = load_key(key_b64=keys.key, key_file=keys.key_file)
        previous = load_previous_keys(listed=keys.previous_keys, key_file=keys.previous_keys_file)
        store = open_store(database, VoiceprintCipher(key, previous), audit_key=AuditKey(key))
        try:
            report = build_report(
                store,
                [AuditKey(known) for known in (key, *previous)],
                config,
                Period(args.start, args.end),
                datetime.now(UTC),
                load_evaluation(args.eval or config.eval_results_path),
            )
        finally:
            store.close()
        _write(args.out, render_html(report))
        if args.pdf is not None:
            print_pdf(args.out, args.pdf, args.browser)
    except (ConfigurationError, StorageError) as error:
        print(f"voxauth report: {error.message}", file=sys.stderr)
        return EXIT_USAGE
    intact = "audit chain intact" if report.chain.intact else "AUDIT CHAIN BROKEN (see report)"
    also = f" and {args.pdf}" if args.pdf is not None else ""
    print(
        f"wrote {args.out}{also}: {report.records_in_period} audit records in the period; {intact}"
    )
    return EXIT_OK if report.chain.intact else EXIT_BROKEN


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="voxauth report",
        description="Write the compliance report for a period: consents, erasures, expiries, "
        "access denials, decisions and PAD refusals by channel, the policy, the last "
        "evaluation's accuracy and DET plot, and the audit chain's verification.",
    )
    parser.add_argument("--from", dest="start", type=_day, required=True, help="first day (UTC)")
    parser.add_argument(
        "--to", dest="end", type=_day_end, required=True, help="last day (UTC), included"
    )
    parser.add_argument("--out", type=Path, default=Path("report.html"), help="HTML file")
    parser.add_argument(
        "--db", help="SQLite file or postgresql:// URI (default var/voxauth.db, VOXAUTH_DB)"
    )
    parser.add_argument(
        "--pdf", type=Path, help="also print the report to this PDF file (needs Chromium)"
    )
    parser.add_argument(
        "--browser",
        type=Path,
        default=Path("/usr/bin/chromium"),
        help="the Chromium that prints the PDF (default /usr/bin/chromium)",
    )
    parser.add_argument(
        "--eval", type=Path, help="`voxauth eval` results (default VOXAUTH_EVAL_RESULTS)"
    )
    return parser


def _day(text: str) -> datetime:
    """A date (the day's start) or an ISO 8601 time; UTC unless it gives an offset."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date or time: {text!r}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _day_end(text: str) -> datetime:
    moment = _day(text)
    # A bare date names the whole day.
    return moment + timedelta(days=1) if len(text) == 10 else moment


def print_pdf(html: Path, pdf: Path, browser: Path) -> None:
    """Chromium's own print of the HTML file: the same page, no second renderer to keep in
    step. The page holds no script and no external reference, so nothing is fetched."""
    if not browser.is_file():
        raise ConfigurationError(f"no browser at {browser} to print the PDF (--browser)")
    # Printed inside a private folder and moved into place 0600: the PDF is as private as
    # the HTML, and never readable half-written.
    with tempfile.TemporaryDirectory(prefix="voxauth-pdf-") as private:
        printed = Path(private) / "report.pdf"
        command = [
            str(browser),
            "--headless",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            "--no-pdf-header-footer",
            f"--user-data-dir={Path(private) / 'profile'}",
            f"--print-to-pdf={printed}",
            html.resolve().as_uri(),
        ]
        if os.geteuid() == 0:
            # Chromium refuses to run as root with its sandbox; the page is our own, inert.
            command.insert(1, "--no-sandbox")
        try:
            done = subprocess.run(command, capture_output=True, timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise ConfigurationError(f"{browser} could not print the PDF: {error}") from error
        if done.returncode != 0 or not printed.is_file() or printed.read_bytes()[:4] != b"%PDF":
            tail = done.stderr.decode(errors="replace")[-500:]
            raise ConfigurationError(
                f"{browser} did not print the PDF (exit {done.returncode}): {tail}"
            )
        printed.chmod(0o600)
        shutil.move(printed, pdf)


def _write(path: Path, html: str) -> None:
    try:
        # The report names agents and what happened to them: as private as the audit export.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        raise ConfigurationError(f"cannot write {path}: {exc.strerror}") from exc
    with os.fdopen(descriptor, "w", encoding="utf-8") as out:
        out.write(html)
