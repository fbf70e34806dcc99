"""Shared test plumbing.

Kernel and browser tests must run in CI (CI is root with eBPF and Chromium): a skip there is
turned into a failure, so a missing install step cannot hide behind a green run.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from browser import Chromium, chromium_available

STRICT_MARKERS = ("kernel", "browser", "containers")

# Shared assertion helpers of the real-server tests: pytest explains their failures too.
pytest.register_assert_rewrite("tests.verdicts", "tests.groundtruth")


def in_ci() -> bool:
    return bool(os.environ.get("CI"))


def kernel_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "kernel tests need root"
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        return "no BTF"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc not importable (make setup)"
    return None


def browser_unavailable_reason() -> str | None:
    return None if shutil.which("chromium") else "Debian's chromium is not installed (make setup)"


@pytest.fixture(scope="module")
def browser() -> Iterator[Chromium]:
    """One Chromium per test module. Fails rather than skips under CI, also for tests not marked
    `browser` (the skip-to-failure hook below only sees marked ones)."""
    if not chromium_available():
        if in_ci():
            pytest.fail("/usr/bin/chromium is missing: browser tests cannot be skipped under CI")
        pytest.skip("/usr/bin/chromium is missing")
    with Chromium() as b:
        yield b


@pytest.fixture
def kernel_ok() -> None:
    reason = kernel_unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and in_ci() and any(item.get_closest_marker(m) for m in STRICT_MARKERS):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.longrepr = f"skipped under CI, which must run kernel and browser tests: {reason}"
    return report
