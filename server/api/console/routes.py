"""The supervisor console on the HTTP side (a route provider, server/api/http/app.py).

Sign-in: POST a bearer token of role supervisor or admin (`voxauth token`); it becomes a
30-minute server-side session (server/api/console/sessions.py) in an HttpOnly, Secure,
SameSite=Strict cookie. Any other role, a softphone's above all, is refused and the refusal
audited. Every POST after sign-in must carry the session's CSRF token (form field `csrf` or
header X-CSRF-Token) or is refused with 403. Every action is audited with the caller's name.

Pages: the board (shifts live: state, last checkpoint, locks, PAD alerts; the page polls
/console/board.json, which the shift event fan-out keeps current), an agent page, and the
compliance page (the report of server/api/console/compliance.py for the last 30 days).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from http import HTTPStatus
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from server.api.access import BearerTokens
from server.api.console.compliance import (
    TEMPLATES,
    Period,
    build_report,
    environment,
    load_evaluation,
)
from server.api.console.sessions import COOKIE, SESSION_LIFETIME, Session, Sessions
from server.api.http.errors import http_status_for
from server.api.readiness import Readiness, Services
from server.audit_actions import AuditAction
from server.config import ServerConfig
from server.errors import (
    InvalidInputError,
    UnauthenticatedError,
    VoxauthError,
)
from server.records import AuditEvent, ShiftRecord, ShiftState
from server.runtime.clock import Clock
from server.runtime.store_pool import StorePool
from server.security.audit import AuditKey
from server.security.identity import Identity, Role
from server.shifts.events import ShiftEvent, ShiftEventKind
from server.validation import validate_agent_id, validate_shift_id, validate_text

log = logging.getLogger(__name__)

AuditSink = Callable[[AuditEvent], Awaitable[None]]


_CONSOLE_ROLES = frozenset({Role.SUPERVISOR, Role.ADMIN})
_BOARD_SHIFTS = 200
_MAX_FORM_BYTES = 8192
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'"
)


@dataclass
class _Recent:
    """What the fan-out told the board about a shift beyond its stored state."""

    last_checkpoint: str = ""
    last_checkpoint_at: datetime | None = None
    pad_alert: str = ""


class ConsoleRoutes:
    def __init__(
        self,
        readiness: Readiness,
        tokens: BearerTokens | None,
        audit: AuditSink,
        clock: Clock,
        config: ServerConfig,
        audit_keys: Sequence[AuditKey],
        store_pool: StorePool,
    ) -> None:
        """`tokens`: the server's bearer tokens; None: no token file, so no sign-in."""
        self._readiness = readiness
        self._tokens = tokens
        self._audit = audit
        self._clock = clock
        self._config = config
        self._audit_keys = list(audit_keys)
        self._store_pool = store_pool
        self._sessions = Sessions()
        self._templates = environment()
        self._board_script = (TEMPLATES / "board.js").read_text(encoding="utf-8")
        self._recent: dict[str, _Recent] = {}
        self._follower: asyncio.Task[None] | None = None

    def routes(self) -> Sequence[BaseRoute]:
        return [
            Route("/console", self._home, methods=["GET"]),
            Route("/console/sign-in", self._sign_in, methods=["POST"]),
            Route("/console/sign-out", self._sign_out, methods=["POST"]),
            Route("/console/board", self._board, methods=["GET"]),
            Route("/console/board.json", self._board_json, methods=["GET"]),
            Route("/console/board.js", self._script, methods=["GET"]),
            Route("/console/shifts/{shift_id}/unlock", self._unlock, methods=["POST"]),
            Route("/console/agents/{agent_id}", self._agent, methods=["GET"]),
            Route(
                "/console/agents/{agent_id}/enable-verification",
                self._enable_verification,
                methods=["POST"],
            ),
            Route("/console/compliance", self._compliance, methods=["GET"]),
        ]

    # --- sign-in ------------------------------------------------------------------------

    async def _home(self, request: Request) -> Response:
        if self._session(request) is not None:
            return RedirectResponse("/console/board", status_code=303)
        return self._page("sign_in.html", None, status=200)

    async def _sign_in(self, request: Request) -> Response:
        if not _same_origin(request):
            # Else another site could sign a visitor in under the other site's own token.
            await self._record_denial(request, None, "cross-origin sign-in")
            return JSONResponse({"error": "cross-origin request"}, status_code=403)
        form = await self._form(request)
        token = (form or {}).get("token", "").strip()
        try:
            if self._tokens is None:
                raise UnauthenticatedError("this server accepts no bearer tokens (no token file)")
            if not token:
                raise UnauthenticatedError("no token given")
            identity = self._tokens.identify(token, self._clock.now())
        except UnauthenticatedError as refusal:
            await self._record_denial(request, None, refusal.message)
            return self._page("sign_in.html", None, status=401, error="That token is not valid.")
        if identity.roles.isdisjoint(_CONSOLE_ROLES):
            await self._record_denial(request, identity, "the console is for supervisors")
            return self._page(
                "sign_in.html",
                None,
                status=403,
                error="The console is for supervisors and administrators; this token is not.",
            )
        session_id, session = self._sessions.open(identity, self._clock.now())
        await self._record(AuditAction.CONSOLE_SIGN_IN, session, "ok")
        response = RedirectResponse("/console/board", status_code=303)
        response.set_cookie(
            COOKIE,
            session_id,
            max_age=int(SESSION_LIFETIME.total_seconds()),
            path="/",
            secure=True,
            httponly=True,
            samesite="strict",
        )
        return response

    async def _sign_out(self, request: Request) -> Response:
        session, refused = await self._state_change(request)
        if refused is not None:
            return refused
        assert session is not None
        self._sessions.close(request.cookies.get(COOKIE))
        await self._record(AuditAction.CONSOLE_SIGN_OUT, session, "ok")
        response = RedirectResponse("/console", status_code=303)
        response.delete_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="strict")
        return response

    # --- the board ----------------------------------------------------------------------

    async def _board(self, request: Request) -> Response:
        session = self._session(request)
        if session is None:
            return RedirectResponse("/console", status_code=303)
        try:
            rows = await self._board_rows()
        except VoxauthError as error:
            return self._error(session, error)
        return self._page("board.html", session, rows=rows, flash=_unlocked_flash(request))

    async def _board_json(self, request: Request) -> Response:
        if self._session(request) is None:
            return JSONResponse({"error": "sign in first"}, status_code=401)
        try:
            rows = await self._board_rows()
        except VoxauthError as error:
            return JSONResponse({"error": error.message}, status_code=_status(error))
        return JSONResponse({"shifts": rows})

    async def _script(self, request: Request) -> Response:
        return Response(self._board_script, media_type="text/javascript")

    async def _board_rows(self) -> list[dict[str, Any]]:
        services = self._readiness.require()
        self._follow(services)
        active = {ShiftState.VERIFIED, ShiftState.UNVERIFIED, ShiftState.LOCKED}
        shifts = await services.shifts.page(active, _BOARD_SHIFTS, None)
        return [self._row(shift) for shift in shifts]

    def _row(self, shift: ShiftRecord) -> dict[str, Any]:
        recent = self._recent.get(shift.shift_id, _Recent())
        return {
            "shift_id": shift.shift_id,
            "agent_id": shift.agent_id,
            "device_id": shift.device_id,
            "state": shift.state.value.lower(),
            "started_at": shift.started_at.strftime("%H:%M:%S"),
            "updated_at": shift.updated_at.strftime("%H:%M:%S"),
            "consecutive_failures": shift.consecutive_failures,
            "checkpoints": f"{shift.checkpoints_passed} passed, {shift.checkpoints_failed} failed",
            "last_checkpoint": recent.last_checkpoint
            + (
                f" at {recent.last_checkpoint_at:%H:%M:%S}"
                if recent.last_checkpoint_at is not None
                else ""
            ),
            "pad_alert": recent.pad_alert,
        }

    def _follow(self, services: Services) -> None:
        """Once: follow the shift event fan-out, for what the stored state does not say."""
        if self._follower is not None and not self._follower.done():
            return
        subscription = services.shifts.subscribe()

        async def follow() -> None:
            try:
                while True:
                    self._note(await subscription.next_event())
            finally:
                subscription.close()

        self._follower = asyncio.create_task(follow(), name="console-board")

    def _note(self, event: ShiftEvent) -> None:
        recent = self._recent.setdefault(event.shift.shift_id, _Recent())
        if event.kind in (
            ShiftEventKind.CHECKPOINT_PASSED,
            ShiftEventKind.CHECKPOINT_FAILED,
            ShiftEventKind.INSUFFICIENT_SPEECH,
        ):
            recent.last_checkpoint = event.kind.value.replace("_", " ").lower()
            recent.last_checkpoint_at = event.at
        if event.presentation is not None and event.presentation.decision.suspected:
            recent.pad_alert = f"{event.presentation.decision.value} at {event.at:%H:%M:%S}"
        if event.kind is ShiftEventKind.SHIFT_ENDED:
            self._recent.pop(event.shift.shift_id, None)
        # Bounded: a board never needs more shifts' notes than it shows, and then some.
        while len(self._recent) > 4 * _BOARD_SHIFTS:
            self._recent.pop(next(iter(self._recent)))

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower

    # --- actions ------------------------------------------------------------------------

    async def _unlock(self, request: Request) -> Response:
        session, refused = await self._state_change(request)
        if refused is not None:
            return refused
        assert session is not None
        form = await self._form(request) or {}
        try:
            reason = validate_text(form.get("reason", ""), "reason", 512)
            role = ",".join(sorted(r.value for r in session.identity.roles))
            shift = await self._readiness.require().shifts.unlock(
                request.path_params["shift_id"], reason, by=session.identity.name, role=role
            )
        except VoxauthError as error:
            return self._error(session, error)
        return RedirectResponse(f"/console/board?unlocked={shift.shift_id}", status_code=303)

    async def _agent(self, request: Request) -> Response:
        session = self._session(request)
        if session is None:
            return RedirectResponse("/console", status_code=303)
        try:
            services = self._readiness.require()
            agent_id = validate_agent_id(request.path_params["agent_id"])
            facts = await self._store_pool.run(
                lambda: _agent_facts(services, agent_id, self._config)
            )
        except VoxauthError as error:
            return self._error(session, error)
        is_admin = Role.ADMIN in session.identity.roles
        return self._page("agent.html", session, agent=facts, is_admin=is_admin)

    async def _enable_verification(self, request: Request) -> Response:
        session, refused = await self._state_change(request)
        if refused is not None:
            return refused
        assert session is not None
        if Role.ADMIN not in session.identity.roles:
            await self._record_denial(request, session.identity, "re-enabling is for admins")
            return self._page(
                "error.html",
                session,
                status=403,
                error="Only administrators may re-enable verification.",
            )
        form = await self._form(request) or {}
        try:
            services = self._readiness.require()
            agent_id = validate_agent_id(request.path_params["agent_id"])
            reason = validate_text(form.get("reason", ""), "reason", 512)
            by, now = session.identity.name, self._clock.now()
            await self._store_pool.run(
                lambda: services.throttle.re_enable(agent_id, reason=reason, by=by, now=now)
            )
        except VoxauthError as error:
            return self._error(session, error)
        return RedirectResponse(f"/console/agents/{agent_id}", status_code=303)

    async def _compliance(self, request: Request) -> Response:
        session = self._session(request)
        if session is None:
            return RedirectResponse("/console", status_code=303)
        now = self._clock.now()
        period = Period(now - timedelta(days=30), now + timedelta(seconds=1))
        try:
            store = self._readiness.require().store
            evaluation = load_evaluation(self._config.eval_results_path)
            report = await self._store_pool.run(
                lambda: build_report(store, self._audit_keys, self._config, period, now, evaluation)
            )
        except VoxauthError as error:
            return self._error(session, error)
        return self._page("compliance.html", session, report=report)

    # --- plumbing -----------------------------------------------------------------------

    def _session(self, request: Request) -> Session | None:
        return self._sessions.find(request.cookies.get(COOKIE), self._clock.now())

    async def _state_change(self, request: Request) -> tuple[Session | None, Response | None]:
        """The session of a POST that carries its CSRF token, or the refusal to send."""
        session = self._session(request)
        if session is None:
            return None, JSONResponse({"error": "sign in first"}, status_code=401)
        form = await self._form(request)
        offered = request.headers.get("x-csrf-token") or (form or {}).get("csrf")
        if not session.csrf_matches(offered) or not _same_origin(request):
            await self._record_denial(request, session.identity, "no or wrong CSRF token")
            return None, JSONResponse({"error": "missing or wrong CSRF token"}, status_code=403)
        return session, None

    async def _form(self, request: Request) -> dict[str, str] | None:
        """The POST's urlencoded fields (what the console's forms send), or None when it is
        not such a form or is larger than any of them. Parsed here with the standard
        library's bounded parser, not Starlette's, which needs python-multipart for it."""
        cached: dict[str, str] | None = request.scope.get("voxauth.form")
        if cached is not None:
            return cached
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/x-www-form-urlencoded":
            return None
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > _MAX_FORM_BYTES:
                return None
        try:
            pairs = urllib.parse.parse_qsl(
                body.decode("utf-8"), strict_parsing=False, max_num_fields=16
            )
        except (UnicodeDecodeError, ValueError):
            return None
        fields = dict(pairs)
        request.scope["voxauth.form"] = fields
        return fields

    async def _record(
        self, action: AuditAction, session: Session, outcome: str, **details: object
    ) -> None:
        await self._audit(
            AuditEvent(
                action, "", outcome, self._clock.now(), {**session.identity.describe(), **details}
            )
        )

    async def _record_denial(
        self, request: Request, identity: Identity | None, reason: str
    ) -> None:
        details: dict[str, Any] = {
            "method": f"HTTP {request.method} {request.url.path}"[:200],
            "peer": request.client.host if request.client else "",
            "reason": reason,
        }
        if identity is not None:
            details |= identity.describe()
        log.warning("console refused %s: %s", details["method"], reason)
        try:
            await self._audit(
                AuditEvent(
                    AuditAction.ACCESS_DENIED, "", "PERMISSION_DENIED", self._clock.now(), details
                )
            )
        except Exception:
            log.exception("could not audit a refused console request")

    def _error(self, session: Session, error: VoxauthError) -> Response:
        return self._page("error.html", session, status=_status(error), error=error.message)

    def _page(
        self, name: str, session: Session | None, status: int = 200, **values: Any
    ) -> Response:
        html = self._templates.get_template(name).render(session=session, **values)
        # same-origin, not the HTTP side's no-referrer: with no-referrer a browser sends
        # `Origin: null` on the console's own forms, which _same_origin must refuse.
        headers = {"Content-Security-Policy": _CSP, "Referrer-Policy": "same-origin"}
        return HTMLResponse(html, status_code=status, headers=headers)


def _unlocked_flash(request: Request) -> str | None:
    """The note after an unlock: built here from a valid shift id, never echoed from the URL,
    so a link cannot make the console say something it did not."""
    shift_id = request.query_params.get("unlocked")
    if shift_id is None:
        return None
    try:
        return f"Shift {validate_shift_id(shift_id)} unlocked; the audit log records it."
    except InvalidInputError:
        return None


def _status(error: VoxauthError) -> int:
    """The HTTP status of the error's category: the HTTP side's one mapping
    (server/api/http/errors.py), beside gRPC's in interceptors.py."""
    status = http_status_for(type(error))
    if status is HTTPStatus.INTERNAL_SERVER_ERROR:
        log.error("console: %s", error.message)
    return int(status)


def _same_origin(request: Request) -> bool:
    """A browser names the page a POST comes from; one from another origin is refused even
    with a valid token (defence in depth beside SameSite=Strict and the CSRF token). Clients
    that send no Origin (not browsers) rely on those two."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    # "null": an opaque origin (a sandboxed frame, a no-referrer page): not provably ours.
    return urllib.parse.urlsplit(origin).netloc == request.headers.get("host", "")


def _agent_facts(services: Services, agent_id: str, config: ServerConfig) -> dict[str, Any]:
    store = services.store
    agent = store.get_agent(agent_id)
    voiceprint = store.get_voiceprint(agent_id)
    pending = len(store.pending_utterances(agent_id))
    throttle = store.throttle_state(agent_id)
    ttl = timedelta(days=config.retention.voiceprint_ttl_days)
    facts: dict[str, Any] = {
        "agent_id": agent.agent_id,
        "display_name": agent.display_name,
        "created_at": agent.created_at,
        "pending_utterances": pending,
        "required_seconds": config.enrollment.required_net_speech_seconds,
        "enrolled": voiceprint is not None,
        "throttle_failures": throttle.consecutive_failures,
        "disabled_at": throttle.disabled_at,
    }
    if voiceprint is not None:
        last_used = voiceprint.last_used_at or voiceprint.created_at
        facts |= {
            "voiceprint_created_at": voiceprint.created_at,
            "voiceprint_age_days": (services.shifts.clock.now() - voiceprint.created_at).days,
            "voiceprint_expires_at": last_used + ttl,
            "net_speech_seconds": voiceprint.net_speech_seconds,
            "utterances": voiceprint.utterance_count,
        }
    return facts
