"""Headless Chromium for the web page's end-to-end tests: Debian's ``chromium`` driven by Playwright.

The browser is the system one (Debian's ``chromium``), never a Playwright download. Like the servers
other tests need, it is installed when missing and the tests run as root with apt (a fresh Debian
machine or CI); otherwise a missing browser fails the tests. Screenshots go to
``test-artifacts/web/`` (git-ignored).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "web"
PHONE = {
    "viewport": {"width": 390, "height": 844},
    "device_scale_factor": 2,
    "is_mobile": True,
    "has_touch": True,
}
DESKTOP = {"viewport": {"width": 1280, "height": 900}}


def _installed() -> bool:
    return Path(CHROMIUM).is_file() or shutil.which("chromium") is not None


def _install() -> str:
    """Install Debian's chromium if this is root on an apt system; returns why not otherwise."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "not root on an apt system"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            return f"{' '.join(cmd)} failed: {done.stderr.strip()[-300:]}"
    return ""


def chromium_path() -> str:
    if not _installed():
        why = _install()
        if not _installed():
            pytest.fail(f"no Chromium at {CHROMIUM} ({why}): install it with `apt-get install -y chromium`")
    return CHROMIUM if Path(CHROMIUM).is_file() else str(shutil.which("chromium"))


def launch(playwright):
    """A headless Chromium; ``--no-sandbox`` because tests run as root in containers."""
    return playwright.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])


def screenshot(page, name: str, full_page: bool = True) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    print(f"screenshot: {path}")
    return path


class PageErrors:
    """Uncaught script errors of a page: a test fails on any (API errors are shown, not thrown)."""

    def __init__(self, page) -> None:
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def check(self) -> None:
        assert not self.errors, f"script errors in the page: {self.errors}"
