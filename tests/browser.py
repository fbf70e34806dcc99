"""Drive Debian's headless chromium over the Chrome DevTools Protocol (CDP) for page tests.

Only /usr/bin/chromium is used (never a browser a tool downloads). CDP over a websocket, rather than
--dump-dom, lets a test read the live DOM after several server pushes, collect console errors and CSP
violations, and take screenshots at a chosen viewport.

    with Chromium() as browser:
        page = browser.open(url)
        page.wait_for("document.body.dataset.updates >= 1")
        total = page.evaluate("document.querySelector('[data-testid=total]').dataset.value")
        page.screenshot("docs/dashboard.png")
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

CHROMIUM = "/usr/bin/chromium"
FLAGS = (
    "--headless",
    "--no-sandbox",  # we run as root, where chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",  # pages under test live on loopback; never route them through a proxy
    "--hide-scrollbars",
)


class BrowserError(RuntimeError):
    pass


def chromium_available(executable: str = CHROMIUM) -> bool:
    return os.access(executable, os.X_OK)


class Chromium:
    """One headless chromium process with its own throw-away profile."""

    def __init__(self, executable: str = CHROMIUM, *, width: int = 1366, height: int = 768) -> None:
        self.executable = executable
        self.width = width
        self.height = height
        self._profile: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._ws: ClientConnection | None = None
        self._stack = contextlib.ExitStack()
        self._ids = itertools.count(1)
        self._pending: list[dict[str, Any]] = []  # events read while waiting for a reply

    def start(self, timeout: float = 30.0) -> Chromium:
        if not chromium_available(self.executable):
            raise BrowserError(f"{self.executable} is missing or not executable")
        self._profile = tempfile.mkdtemp(prefix="aw-chromium-")
        log = open(Path(self._profile) / "chromium.log", "wb")  # noqa: SIM115 - lives as long as the process
        self._proc = subprocess.Popen(
            [
                self.executable,
                *FLAGS,
                f"--user-data-dir={self._profile}",
                f"--window-size={self.width},{self.height}",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        log.close()
        # Chromium writes the port it picked (and the browser target path) into the profile.
        active = Path(self._profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while True:
            if active.exists() and len(active.read_text().splitlines()) >= 2:
                break
            if self._proc.poll() is not None:
                raise BrowserError(f"chromium exited with {self._proc.returncode}: {self._log_tail()}")
            if time.monotonic() > deadline:
                self.close()
                raise BrowserError(f"chromium did not open its DevTools port within {timeout:g} s")
            time.sleep(0.05)
        port, path = active.read_text().splitlines()[:2]
        self._ws = self._stack.enter_context(
            connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=timeout)
        )
        return self

    def _log_tail(self) -> str:
        try:
            return (Path(self._profile or "") / "chromium.log").read_text(errors="replace")[-800:]
        except OSError:
            return "(no log)"

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session: str | None = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """Send one CDP command and return its result (events arriving meanwhile are kept)."""
        if self._ws is None:
            raise BrowserError("browser not started")
        msg_id = next(self._ids)
        message: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        self._ws.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrowserError(f"no reply to {method} within {timeout:g} s")
            try:
                reply = json.loads(self._ws.recv(timeout=remaining))
            except TimeoutError:
                continue
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise BrowserError(f"{method} failed: {reply['error'].get('message')}")
                return reply.get("result", {})
            if "method" in reply:
                self._pending.append(reply)

    def drain_events(self, session: str) -> list[dict[str, Any]]:
        mine = [e for e in self._pending if e.get("sessionId") == session]
        self._pending = [e for e in self._pending if e.get("sessionId") != session]
        return mine

    def pump(self, seconds: float) -> None:
        """Read events for a while (so that console errors are not left unread in the socket)."""
        assert self._ws is not None
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                event = json.loads(self._ws.recv(timeout=remaining))
            except TimeoutError:
                return
            if "method" in event:
                self._pending.append(event)

    def open(self, url: str, *, timeout: float = 30.0) -> Page:
        """A new tab showing `url`, once its load event has fired."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, target, session)
        for domain in ("Page.enable", "Runtime.enable", "Log.enable"):
            self.call(domain, session=session)
        page.set_viewport(self.width, self.height)
        page.goto(url, timeout=timeout)
        return page

    def close(self) -> None:
        if self._ws is not None:
            # The browser may already be gone; the process is reaped (or killed) below anyway.
            with contextlib.suppress(Exception):
                self.call("Browser.close", timeout=5)
            self._stack.close()
            self._ws = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
            self._proc = None
        if self._profile is not None:
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = None

    def __enter__(self) -> Chromium:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class Page:
    def __init__(self, browser: Chromium, target: str, session: str) -> None:
        self.browser = browser
        self.target = target
        self.session = session
        self.errors: list[str] = []  # uncaught exceptions, console.error calls, CSP and network errors

    def _call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0) -> dict:
        result = self.browser.call(method, params, session=self.session, timeout=timeout)
        self._collect()
        return result

    def _collect(self) -> list[dict[str, Any]]:
        events = self.browser.drain_events(self.session)
        for event in events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                text = details.get("exception", {}).get("description") or details.get("text", "?")
                self.errors.append(text)
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                args = params.get("args", [])
                self.errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                self.errors.append(params["entry"].get("text", "?"))
        return events

    def close(self) -> None:
        """Close the tab (and with it the page's open connections)."""
        self.browser.call("Target.closeTarget", {"targetId": self.target})

    def __enter__(self) -> Page:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_viewport(self, width: int, height: int) -> None:
        self._call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    def goto(self, url: str, *, timeout: float = 30.0) -> None:
        result = self._call("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(f"cannot load {url}: {result['errorText']}")
        deadline = time.monotonic() + timeout
        while not any(e["method"] == "Page.loadEventFired" for e in self._collect_after_pump()):
            if time.monotonic() > deadline:
                raise BrowserError(f"{url} did not finish loading within {timeout:g} s")

    def _collect_after_pump(self) -> list[dict[str, Any]]:
        self.browser.pump(0.1)
        return self._collect()

    def evaluate(self, expression: str, *, timeout: float = 30.0) -> Any:
        """Value of a JavaScript expression (JSON-serialisable results only)."""
        result = self._call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            timeout=timeout,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"evaluating {expression!r} failed: {text}")
        return result["result"].get("value")

    def wait_for(self, expression: str, *, timeout: float = 15.0, interval: float = 0.1) -> Any:
        """Poll until the expression is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out after {timeout:g} s waiting for: {expression}")
            self.browser.pump(interval)
            self._collect()

    def screenshot(self, path: str | os.PathLike[str], *, full_page: bool = False) -> Path:
        """Write a PNG of the viewport (or of the whole page) and return its path."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self._call("Page.getLayoutMetrics")["cssContentSize"]
            params["clip"] = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
            params["captureBeyondViewport"] = True
        data = base64.b64decode(self._call("Page.captureScreenshot", params)["data"])
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
        return out


def screenshot(
    url: str,
    path: str | os.PathLike[str],
    *,
    width: int = 1366,
    height: int = 768,
    ready: str = "Number(document.body.dataset.updates || 0) >= 2",
    full_page: bool = False,
    timeout: float = 30.0,
) -> Path:
    """One-shot helper: open `url`, wait until `ready` is truthy, save a PNG (e.g. docs/dashboard.png)."""
    with Chromium(width=width, height=height) as browser:
        page = browser.open(url, timeout=timeout)
        page.wait_for(ready, timeout=timeout)
        return page.screenshot(path, full_page=full_page)
