"""
Headless Chromium driven over the DevTools protocol, with the standard
library only: a minimal RFC 6455 WebSocket client and a CDP session.

Everything here blocks: run it in a thread (``deferToThread``) while the
reactor serves the pages.  Every wait is bounded by a deadline.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import re
import signal
import socket
import struct
import subprocess
import time
from urllib.parse import urlsplit

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_DEVTOOLS = re.compile(rb"DevTools listening on (ws://\S+)")


class CDPError(Exception):
    """Chromium answered a command with an error, or the session broke."""


class WebSocket:
    """
    A blocking WebSocket client, just enough for the DevTools protocol:
    text messages, fragmented or not, with ping answered and close
    reported.  Client frames are masked, as RFC 6455 requires.

    :param url: ``ws://host:port/path``.
    :param timeout: Seconds any single socket operation may take.
    """

    def __init__(self, url: str, timeout: float):
        parts = urlsplit(url)
        self._sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16))
        self._sock.sendall(
            b"GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
            % (parts.path.encode(), parts.netloc.encode(), key)
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self._sock.recv(4096)
            if not chunk:
                raise CDPError("the DevTools WebSocket closed during the handshake")
            head += chunk
        head, _, self._buffer = head.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        if b" 101 " not in lines[0]:
            raise CDPError(f"WebSocket handshake refused: {lines[0]!r}")
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        headers = dict(line.split(b": ", 1) for line in lines[1:] if b": " in line)
        found = {k.lower(): v for k, v in headers.items()}.get(b"sec-websocket-accept")
        if found != accept:
            raise CDPError("bad Sec-WebSocket-Accept in the handshake")

    def _read(self, n: int) -> bytes:
        while len(self._buffer) < n:
            chunk = self._sock.recv(max(65536, n - len(self._buffer)))
            if not chunk:
                raise CDPError("the DevTools WebSocket closed")
            self._buffer += chunk
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        header = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self._sock.sendall(header + mask + masked)

    def send(self, text: str) -> None:
        """Send one text message."""
        self._send_frame(0x1, text.encode("utf-8"))

    def receive(self) -> str:
        """The next text message (pings are answered on the way)."""
        message = b""
        while True:
            first, second = self._read(2)
            opcode = first & 0x0F
            n = second & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", self._read(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", self._read(8))
            mask = self._read(4) if second & 0x80 else None
            payload = self._read(n)
            if mask is not None:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x8:
                raise CDPError("the DevTools WebSocket was closed by Chromium")
            if opcode == 0x9:
                self._send_frame(0xA, payload)
                continue
            if opcode in (0x0, 0x1, 0x2):
                message += payload
                if first & 0x80:
                    return message.decode("utf-8")

    def close(self) -> None:
        """Close the connection (without waiting for Chromium's close)."""
        try:
            self._send_frame(0x8, struct.pack("!H", 1000))
        except OSError:
            pass
        self._sock.close()


class Browser:
    """
    One headless Chromium process and a DevTools session with one page.

    :param executable: The ``chromium`` binary.
    :param profile: An empty directory for ``--user-data-dir``.
    :param deadline: ``time.monotonic()`` value after which any wait fails.
    """

    def __init__(self, executable: str, profile: str, deadline: float):
        self._deadline = deadline
        self._ids = itertools.count(1)
        self._log_path = os.path.join(profile, "chromium.log")
        self._log = open(self._log_path, "wb")
        self.process = subprocess.Popen(
            [
                executable,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--hide-scrollbars",
                "--window-size=1280,900",
                f"--user-data-dir={profile}",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            start_new_session=True,
        )
        self._ws: WebSocket | None = None
        self.session: str | None = None
        self.events: list[dict] = []

    def left(self) -> float:
        """Seconds until the deadline; raises once it has passed."""
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise CDPError("out of time driving Chromium")
        return left

    def connect(self) -> None:
        """Wait for the DevTools URL on stderr, connect, and open a page."""
        while True:
            with open(self._log_path, "rb") as f:
                found = _DEVTOOLS.search(f.read())
            if found:
                break
            if self.process.poll() is not None:
                raise CDPError(f"chromium exited with {self.process.returncode}: {self.log()}")
            self.left()
            time.sleep(0.05)
        self._ws = WebSocket(found.group(1).decode(), timeout=min(10.0, self.left()))
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)
        attached = self.call(
            "Target.attachToTarget",
            {"targetId": target["targetId"], "flatten": True},
            session=False,
        )
        self.session = attached["sessionId"]

    def log(self) -> str:
        """What Chromium wrote to stderr so far (for failure messages)."""
        with open(self._log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")[-2000:]

    def call(self, method: str, params: dict | None = None, session: bool = True) -> dict:
        """
        Send a DevTools command and wait for its result; events that arrive
        meanwhile are appended to ``events``.

        :param session: Send it to the page's session rather than the browser.
        """
        if self._ws is None:
            raise CDPError("not connected")
        message_id = next(self._ids)
        message = {"id": message_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        self._ws._sock.settimeout(min(10.0, self.left()))
        self._ws.send(json.dumps(message))
        while True:
            self.left()
            answer = json.loads(self._ws.receive())
            if "method" in answer:
                self.events.append(answer)
                continue
            if answer.get("id") != message_id:
                continue
            if "error" in answer:
                raise CDPError(f"{method}: {answer['error']}")
            return answer["result"]

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (awaited if a promise)."""
        result = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise CDPError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str, interval: float = 0.1):
        """
        Evaluate ``expression`` until it is truthy (an exception counts as
        not yet: the page may still be loading); return its value.
        """
        guarded = f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return null; }} }})()"
        while True:
            value = self.evaluate(guarded)
            if value:
                return value
            if time.monotonic() + interval > self._deadline:
                raise CDPError(f"timed out waiting for {what}; last value {value!r}")
            time.sleep(interval)

    def screenshot(self, width: int = 1280) -> bytes:
        """A PNG of the whole page, ``width`` CSS pixels wide."""
        metrics = self.call("Page.getLayoutMetrics")
        height = int(metrics["cssContentSize"]["height"])
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        shot = self.call(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True, "optimizeForSpeed": False},
        )
        return base64.b64decode(shot["data"])

    def stop(self, grace: float = 5.0) -> None:
        """Stop Chromium by its PID (SIGTERM, then SIGKILL of its group)."""
        if self._ws is not None:
            self._ws.close()
            self._ws = None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(grace)
        # Helpers it left behind, if any, are in the session we started it
        # in, whose id is its PID.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()
