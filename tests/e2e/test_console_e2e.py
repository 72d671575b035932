"""The supervisor console in a real headless Chromium (Debian's, driven by Selenium through
chromedriver; nothing downloaded): sign in with a supervisor token, watch the real model lock
a shift on the board without a reload, unlock it, find the unlock audited with the
supervisor's name; a softphone token is refused, and a POST without the CSRF token too."""

from __future__ import annotations

import http.client
import json
import os
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from voxauth.v1 import admin_pb2
from voxauth.v1 import admin_pb2_grpc as admin_grpc
from voxauth.v1 import shifts_pb2 as spb
from voxauth.v1 import shifts_pb2_grpc as spb_grpc

from server.api.console.sessions import COOKIE
from server.audit_actions import AuditAction
from server.security.certificates import create_pki
from server.security.identity import Role, mint_token
from tests.softphone import POLICY, ShiftStream, fail_until_locked
from tests.support import (
    OTHER_1,
    OTHER_2,
    SPEAKER_A,
    RunningServer,
    as_role,
    first_half,
    https_context,
    second_half,
    speech,
    split,
    tls_config,
    wav_audio,
)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    # Installed by scripts/setup.sh --dev; a missing browser fails the test, it never skips.
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1280,800",
        # The development CA is not in Chromium's store; the server's certificate is checked
        # by the other clients of this test (urllib, gRPC) against it.
        "--ignore-certificate-errors",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def post(url: str, fields: dict[str, str], context: ssl.SSLContext, cookie: str) -> int:
    request = urllib.request.Request(
        url,
        data=urllib.parse.urlencode(fields).encode(),
        headers={"Cookie": f"{COOKIE}={cookie}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as refused:
        return int(refused.code)


def sign_in(browser: webdriver.Chrome, base: str, token: str) -> None:
    browser.get(f"{base}/console")
    field = browser.find_element(By.ID, "token")
    field.send_keys(token)
    field.submit()


def test_a_supervisor_watches_a_lock_appear_live_and_unlocks_it(
    start_server: Callable[..., RunningServer],
    browser: webdriver.Chrome,
    tmp_path: Path,
) -> None:
    pki = create_pki(tmp_path / "pki")
    supervisor = mint_token("sam.supervisor", Role.SUPERVISOR)
    softphone = mint_token("desk-phone", Role.SOFTPHONE)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{supervisor.line}\n{softphone.line}\n")
    config = replace(tls_config(tmp_path, pki), shifts=POLICY)
    config = replace(config, transport=replace(config.transport, tokens_file=tokens))
    voxauth = start_server(config, credentials=as_role(pki, Role.HR))
    voxauth.enroll("agent-a", split(first_half(SPEAKER_A), 2))
    base = voxauth.http_url("")
    context = https_context(pki)

    # A softphone's token does not open the console.
    sign_in(browser, base, softphone.token)
    alert = WebDriverWait(browser, 10).until(
        lambda b: b.find_elements(By.CSS_SELECTOR, "[role=alert]"), message=browser.page_source
    )
    assert "not" in alert[0].text
    assert browser.get_cookie(COOKIE) is None

    sign_in(browser, base, supervisor.token)
    try:
        WebDriverWait(browser, 10).until(lambda b: b.current_url.endswith("/console/board"))
    except Exception:
        raise AssertionError(browser.current_url + browser.page_source) from None
    assert "Signed in as sam.supervisor" in browser.page_source
    cookie = browser.get_cookie(COOKIE)
    assert cookie is not None
    assert (cookie["httpOnly"], cookie["secure"], cookie["sameSite"]) == (True, True, "Strict")

    with grpc.secure_channel(f"127.0.0.1:{voxauth.port}", as_role(pki, Role.SOFTPHONE)) as phone:
        shifts = spb_grpc.ShiftServiceStub(phone)
        shift_id = shifts.StartShift(
            spb.StartShiftRequest(
                agent_id="agent-a",
                device_id="desk-1",
                login_audio=wav_audio(second_half(SPEAKER_A)),
            )
        ).shift.shift_id
        stream = ShiftStream(shifts, shift_id)
        assert stream.next_event().kind == spb.SHIFT_EVENT_KIND_STREAM_ATTACHED
        row = f'tr[data-shift="{shift_id}"]'
        WebDriverWait(browser, 10).until(
            lambda b: b.find_elements(By.CSS_SELECTOR, f'{row}[data-state="verified"]')
        )

        # The real model fails two checkpoints; the board shows the lock without a reload.
        marker = browser.execute_script("window.notReloaded = true; return window.notReloaded")
        fail_until_locked(stream, voxauth.advance, [speech(OTHER_1), speech(OTHER_2)])
        locked = WebDriverWait(browser, 10).until(
            lambda b: b.find_elements(By.CSS_SELECTOR, f'{row}[data-state="locked"]')
        )[0]
        assert marker and browser.execute_script("return window.notReloaded") is True
        assert "checkpoint failed" in locked.text and "0 passed, 2 failed" in locked.text
        artifacts = Path(os.environ.get("TEST_ARTIFACTS_DIR", tmp_path / "artifacts"))
        artifacts.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(artifacts / "console-board.png"))

        # A POST without the session's CSRF token is refused, and changes nothing.
        unlock_url = f"{base}/console/shifts/{shift_id}/unlock"
        assert post(unlock_url, {"reason": "x"}, context, cookie["value"]) == 403
        assert post(unlock_url, {"reason": "x", "csrf": "guess"}, context, cookie["value"]) == 403
        # Nor does a session cookie that is not one.
        assert post(unlock_url, {"reason": "x"}, context, "forged") == 401
        assert shifts.GetShift(spb.GetShiftRequest(shift_id=shift_id)).state == (
            spb.SHIFT_STATE_LOCKED
        )

        reason = browser.find_element(By.ID, f"reason-{shift_id}")
        reason.send_keys("talked to the agent on the phone")
        reason.submit()
        WebDriverWait(browser, 10).until(lambda b: "unlocked" in b.page_source)
        WebDriverWait(browser, 10).until(
            lambda b: b.find_elements(By.CSS_SELECTOR, f'{row}[data-state="verified"]')
        )
        assert shifts.GetShift(spb.GetShiftRequest(shift_id=shift_id)).state == (
            spb.SHIFT_STATE_VERIFIED
        )
        stream.close()

    with grpc.secure_channel(f"127.0.0.1:{voxauth.port}", as_role(pki, Role.ADMIN)) as admin:
        records = [
            json.loads(r.line)
            for r in admin_grpc.AdminServiceStub(admin).ExportAudit(admin_pb2.ExportAuditRequest())
        ]
    unlocks = [r for r in records if r["action"] == AuditAction.SHIFT_ADMIN_UNLOCK]
    assert [(u["details"]["unlocked_by"], u["details"]["reason"]) for u in unlocks] == [
        ("sam.supervisor", "talked to the agent on the phone")
    ]
    signed_in = [r for r in records if r["action"] == AuditAction.CONSOLE_SIGN_IN]
    assert [r["details"]["caller"] for r in signed_in] == ["sam.supervisor"]
    denials = [r["details"]["reason"] for r in records if r["action"] == AuditAction.ACCESS_DENIED]
    assert "the console is for supervisors" in denials
    assert denials.count("no or wrong CSRF token") == 2


class Client:
    """One browser-less console client over https: redirects not followed, one cookie."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        self.port, self.context, self.cookie = port, context, ""

    def request(
        self, method: str, path: str, fields: dict[str, str] | None = None, **headers: str
    ) -> tuple[int, dict[str, str], str]:
        connection = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context)
        sent = {k.replace("_", "-"): v for k, v in headers.items()}
        body = None
        if fields is not None:
            body = urllib.parse.urlencode(fields)
            sent["Content-Type"] = "application/x-www-form-urlencoded"
        if self.cookie:
            sent["Cookie"] = f"{COOKIE}={self.cookie}"
        try:
            connection.request(method, path, body=body, headers=sent)
            answer = connection.getresponse()
            got = {k.lower(): v for k, v in answer.getheaders()}
            text = answer.read().decode()
        finally:
            connection.close()
        if "set-cookie" in got and got["set-cookie"].startswith(f"{COOKIE}="):
            self.cookie = got["set-cookie"].split(";")[0].split("=", 1)[1].strip('"')
        return answer.status, got, text

    def csrf(self) -> str:
        status, _, page = self.request("GET", "/console/board")
        assert status == 200, page
        found = re.search(r'name="csrf-token" content="([^"]+)"', page)
        assert found is not None
        return found.group(1)


def test_the_console_refuses_what_a_supervisor_may_not_do_and_forged_requests(
    start_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    pki = create_pki(tmp_path / "pki")
    supervisor = mint_token("sam.supervisor", Role.SUPERVISOR)
    admin = mint_token("ada.admin", Role.ADMIN)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{supervisor.line}\n{admin.line}\n")
    config = tls_config(tmp_path, pki)
    config = replace(config, transport=replace(config.transport, tokens_file=tokens))
    voxauth = start_server(config, credentials=as_role(pki, Role.HR))
    voxauth.enroll("agent-a", split(first_half(SPEAKER_A), 2))
    context = https_context(pki)

    anonymous = Client(voxauth.server.http_port, context)
    assert anonymous.request("GET", "/console/board")[:2][0] == 303
    assert anonymous.request("GET", "/console/board.json")[0] == 401
    assert anonymous.request("POST", "/console/sign-in", {"token": "x" * 43})[0] == 401
    # Signing in from another site's page (login CSRF) is refused even with a good token.
    evil = {"Origin": "https://evil.example"}
    for origin in (evil, {"Origin": "null"}):
        status, _, _ = anonymous.request(
            "POST", "/console/sign-in", {"token": supervisor.token}, **origin
        )
        assert status == 403 and anonymous.cookie == ""

    sam = Client(voxauth.server.http_port, context)
    status, headers, _ = sam.request("POST", "/console/sign-in", {"token": supervisor.token})
    assert status == 303 and headers["location"] == "/console/board"
    flags = {f.strip().lower() for f in headers["set-cookie"].split(";")[1:]}
    assert {"httponly", "secure", "samesite=strict", "path=/"} <= flags
    csrf = sam.csrf()
    status, headers, page = sam.request("GET", "/console/agents/agent-a")
    assert status == 200 and "enrolled: 2 utterance(s)" in page
    assert "default-src 'none'" in headers["content-security-policy"]
    assert "Re-enable" not in page  # admins only
    enable = "/console/agents/agent-a/enable-verification"
    assert sam.request("POST", enable, {"csrf": csrf, "reason": "x"})[0] == 403
    # A valid token from another origin, and hostile ids, are refused; nothing is echoed.
    assert (
        sam.request("POST", "/console/shifts/s1/unlock", {"csrf": csrf, "reason": "x"}, **evil)[0]
        == 403
    )
    status, _, page = sam.request("GET", "/console/agents/%3Cscript%3E")
    assert status == 400 and "<script>" not in page
    status, _, page = sam.request(
        "POST", "/console/shifts/no-such/unlock", {"csrf": csrf, "reason": "r"}
    )
    assert status == 404
    status, _, page = sam.request("GET", "/console/board?unlocked=%3Cb%3Ecall+555%3C%2Fb%3E")
    assert status == 200 and "call 555" not in page
    assert sam.request("POST", "/console/sign-out", {"csrf": "wrong"})[0] == 403
    status, _, page = sam.request("GET", "/console/compliance")
    assert status == 200 and "Intact:" in page and "Consents recorded (1)" in page

    ada = Client(voxauth.server.http_port, context)
    assert ada.request("POST", "/console/sign-in", {"token": admin.token})[0] == 303
    status, _, page = ada.request("GET", "/console/agents/agent-a")
    assert status == 200 and "Re-enable" in page
    assert ada.request("POST", enable, {"csrf": ada.csrf(), "reason": "HD-12"})[0] == 303

    # Signing out ends the session at once; an idle session expires after 30 minutes.
    assert sam.request("POST", "/console/sign-out", {"csrf": csrf})[0] == 303
    assert sam.request("GET", "/console/board.json")[0] == 401
    assert ada.request("GET", "/console/board.json")[0] == 200
    voxauth.advance(31 * 60)
    assert ada.request("GET", "/console/board.json")[0] == 401
