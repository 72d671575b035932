"""The supervisor console in a real headless Chromium (Debian's, driven by Selenium through
chromedriver; nothing downloaded): sign in with a supervisor token, watch the real model lock
a shift on the board without a reload, unlock it, find the unlock audited with the
supervisor's name; a softphone token is refused, and a POST without the CSRF token too."""

from __future__ import annotations

import json
import os
import shutil
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
    assert "not" in browser.find_element(By.CSS_SELECTOR, "[role=alert]").text
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
    shutil.copy(artifacts / "console-board.png", tmp_path / "board-copy.png")
