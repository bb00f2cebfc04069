"""The dashboard in Debian's headless Chromium, driven over the Chrome DevTools protocol: every
page loads from the running service (uvicorn on a loopback port, a small simulated crowd with
marks), its plots render with their data in the DOM, nothing is logged as an error, and a
screenshot of each page is kept under artifacts/. Where credentials are configured the browser
is asked for a token once and keeps it in a Secure, HttpOnly, SameSite=Strict cookie.

The DevTools client is a few lines of WebSocket over a plain socket (RFC 6455), so the tests need
no package beyond the standard library and no browser download.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import Request, urlopen

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.db import migrate
from app.service import Service, build_service
from app.settings import Settings
from tests import payloads as p
from tests.servers import free_port
from tests.test_query_api import fill

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
WF = p.WORKFLOW
UNREACHABLE = "http://127.0.0.1:9/unreachable.png"  # the discard port: refused at once
READ_TOKEN = "dashboard-reader-41ab"

pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason=f"{CHROMIUM} is missing: install Debian's chromium package (scripts/test.sh does)",
)


# --------------------------------------------------------------------------- DevTools client


class DevTools:
    """One page target of a headless Chromium, spoken to over the DevTools WebSocket."""

    def __init__(self, url: str) -> None:
        parsed = urlparse(url)
        self.socket = socket.create_connection((parsed.hostname, parsed.port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.socket.sendall(
            (
                f"GET {parsed.path} HTTP/1.1\r\nHost: {parsed.hostname}:{parsed.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.socket.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.socket.recv(n - len(data))
            if not chunk:
                raise ConnectionError("DevTools closed the connection")
            data += chunk
        return data

    def _send(self, text: str) -> None:
        payload = text.encode()
        header = bytes([0x81])
        if len(payload) < 126:
            header += bytes([0x80 | len(payload)])
        elif len(payload) < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack(">H", len(payload))
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", len(payload))
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.socket.sendall(header + mask + masked)

    def _receive(self) -> dict[str, Any]:
        message = b""
        while True:
            first, second = self._read(2)
            length = second & 0x7F
            if length == 126:
                length = struct.unpack(">H", self._read(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self._read(8))[0]
            message += self._read(length)
            if first & 0x80:  # FIN
                return dict(json.loads(message))

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self._send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = self._receive()
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return dict(message.get("result", {}))
            self.events.append(message)

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {expression}")

    def errors(self, allowed_urls: tuple[str, ...] = ()) -> list[str]:
        """Console errors, uncaught exceptions and error log entries so far (network errors of
        the allowed URLs left out: an image deliberately unreachable)."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(json.dumps(params["exceptionDetails"])[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(json.dumps(params.get("args"))[:500])
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                entry = params["entry"]
                if entry.get("url") not in allowed_urls:
                    found.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url')}")
        return found

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("Page.close")
        self.socket.close()


class Browser:
    """Debian's chromium, headless, with a fresh profile and DevTools on a loopback port."""

    def __init__(self) -> None:
        self.profile = tempfile.mkdtemp(prefix="gzx-chromium-")
        self.process = subprocess.Popen(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--hide-scrollbars",
                "--window-size=1200,900",
                f"--user-data-dir={self.profile}",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.05)
        self.port = int(port_file.read_text().split("\n")[0])

    def page(self) -> DevTools:
        """A fresh tab, with console, log and page events switched on, 1200 x 900."""
        opening = Request(f"http://127.0.0.1:{self.port}/json/new?about:blank", method="PUT")
        with urlopen(opening, timeout=10) as response:
            target = json.loads(response.read())
        tools = DevTools(target["webSocketDebuggerUrl"])
        for domain in ("Runtime", "Log", "Page", "Network"):
            tools.call(f"{domain}.enable")
        tools.call(
            "Emulation.setDeviceMetricsOverride",
            width=1200,
            height=900,
            deviceScaleFactor=1,
            mobile=False,
        )
        return tools

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


def visit(tools: DevTools, url: str) -> str:
    """Load a page and wait for the dashboard to say it is ready (or failed, or asks to log in)."""
    tools.events.clear()
    tools.call("Page.navigate", url=url)
    time.sleep(0.05)
    state = tools.wait_for(
        "document.readyState === 'complete' && document.body && "
        "['yes', 'error', 'login'].includes(document.body.dataset.ready)"
        " && document.body.dataset.ready"
    )
    return str(state)


def screenshot(tools: DevTools, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    shot = tools.call("Page.captureScreenshot", format="png")
    path = ARTIFACTS / f"dashboard-{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    assert path.stat().st_size > 5000
    return path


# --------------------------------------------------------------------------- servers


class Serving:
    """uvicorn serving the app in a thread on a free loopback port."""

    def __init__(self, app: FastAPI) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=self.port,
                log_level="warning",
                access_log=False,
                log_config=None,
                lifespan="off",
                ws="none",
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def galaxy_png(size: int = 424) -> bytes:
    """A dark sky with a soft blue-white galaxy in the middle (a PNG made by hand, no Pillow)."""
    rows = []
    centre = size / 2
    for y in range(size):
        row = bytearray([0])
        for x in range(size):
            r2 = ((x - centre) ** 2 + ((y - centre) * 1.4) ** 2) / (size * 0.22) ** 2
            glow = max(0.0, 1.0 - r2) ** 2
            row += bytes([int(12 + 200 * glow), int(16 + 210 * glow), int(30 + 225 * glow)])
        rows.append(bytes(row))
    raw = zlib.compress(b"".join(rows), 6)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


class ImageServer:
    """Serves one PNG at every path: the platform's image CDN, on loopback."""

    def __init__(self) -> None:
        image = galaxy_png()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(image)))
                self.end_headers()
                self.wfile.write(image)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------- fixtures


def crowd_service(tmp_path: Path, images: ImageServer, **settings: Any) -> Service:
    """An embedded service (SQLite) filled with the small simulated crowd: the images of every
    fourth subject load from the image server, the others point at an unreachable URL."""
    url = f"sqlite:///{tmp_path / 'dashboard.db'}"
    migrate(url)
    service = build_service(
        Settings(
            database_url=url, export_dir=tmp_path / "exports", sweep_interval_s=3600, **settings
        )
    )
    headers = {"Authorization": f"Bearer {READ_TOKEN}-admin"} if settings else {}
    client = TestClient(service.app, headers=headers)

    def location(subject: int) -> str:
        return f"{images.url}/{subject}.png" if subject % 4 == 0 else UNREACHABLE

    fill(client, service, location=location)
    manual = client.post(
        f"/v1/workflows/{WF}/subjects/505/retire", json={"reason": "an artefact on the edge"}
    )
    assert manual.status_code == 200, manual.text
    return service


@pytest.fixture(scope="module")
def images() -> Iterator[ImageServer]:
    server = ImageServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = Browser()
    yield chromium
    chromium.close()


@pytest.fixture
def served(tmp_path: Path, images: ImageServer) -> Iterator[tuple[Service, Serving]]:
    service = crowd_service(tmp_path, images)
    serving = Serving(service.app)
    yield service, serving
    serving.stop()
    service.close()


# --------------------------------------------------------------------------- tests


def count(tools: DevTools, selector: str) -> int:
    return int(tools.evaluate(f"document.querySelectorAll({json.dumps(selector)}).length"))


def test_the_workflow_list_loads(browser: Browser, served: tuple[Service, Serving]) -> None:
    """`/`: the workflow is listed with its subject counts; no error logged."""
    _, serving = served
    tools = browser.page()
    assert visit(tools, serving.url + "/") == "yes"
    assert count(tools, "table[data-table=workflows] tr") == 2
    assert "Clumps (test crowd)" in tools.evaluate("document.body.innerText")
    screenshot(tools, "workflows")
    assert tools.errors() == []
    tools.close()


def test_the_workflow_page_draws_progress_trajectories_and_skills(
    browser: Browser, served: tuple[Service, Serving]
) -> None:
    """`/workflows/<id>`: the retirement plot, one trajectory per sampled subject, one circle
    per volunteer, and the first page of subjects, all from the API's numbers."""
    service, serving = served
    client = TestClient(service.app)
    summary = client.get(f"/v1/workflows/{WF}/summary").json()
    sample = client.get(f"/v1/workflows/{WF}/trajectories", params={"per_status": 40}).json()
    tools = browser.page()
    assert visit(tools, f"{serving.url}/workflows/{WF}") == "yes"
    retirement = "svg[data-plot=retirement]"
    assert count(tools, f"{retirement} rect.bar") == len(summary["retirement_rate"]) > 0
    assert count(tools, f"{retirement} polyline.series") == 1
    trajectories = "svg[data-plot=trajectories] polyline.trajectory"
    assert count(tools, trajectories) == len(sample["trajectories"]) > 0
    statuses = tools.evaluate(
        f"[...document.querySelectorAll('{trajectories}')].map(e => e.dataset.status)"
    )
    assert {"retired", "live"} <= set(statuses)
    assert count(tools, "svg[data-plot=skills] circle.volunteer") == 12
    assert count(tools, "table[data-table=subjects] tbody tr") == 25
    assert count(tools, "table[data-table=audit] tr") == 2  # the header and the manual retirement
    screenshot(tools, "workflow")
    assert tools.errors() == []
    tools.close()


def subject_with_clusters(service: Service, residue: int) -> dict[str, Any]:
    """A clumpy subject (not gold) with clusters, its id `residue` modulo 4."""
    client = TestClient(service.app)
    for subject in range(504 + residue, 530, 4):
        drawn = client.get(f"/v1/workflows/{WF}/subjects/{subject}/clusters").json()
        if len(drawn["clusters"]) >= 1:
            return dict(drawn)
    raise AssertionError("no subject with clusters")


def test_a_subject_page_draws_its_marks_and_clusters_over_the_image(
    browser: Browser, served: tuple[Service, Serving]
) -> None:
    """`/workflows/<id>/subjects/<sid>` with a reachable image: the image, every mark and every
    cluster drawn over it (coloured by P(real)), and the posterior history."""
    service, serving = served
    drawn = subject_with_clusters(service, residue=0)
    tools = browser.page()
    assert visit(tools, f"{serving.url}/workflows/{WF}/subjects/{drawn['subject_id']}") == "yes"
    stage = "svg[data-plot=subject]"
    assert (
        tools.wait_for(
            f"document.querySelector('{stage}').dataset.image !== 'none'"
            f" && document.querySelector('{stage}').dataset.image"
        )
        == "loaded"
    )
    assert count(tools, f"{stage} image") == 1
    assert count(tools, f"{stage} .mark") == len(drawn["marks"]) > 0
    assert count(tools, f"{stage} rect.cluster") == len(drawn["clusters"])
    shown = tools.evaluate(
        f"[...document.querySelectorAll('{stage} rect.cluster')].map(e => +e.dataset.pReal)"
    )
    assert sorted(shown) == sorted(round(c["p_real"], 4) for c in drawn["clusters"])
    assert count(tools, "svg[data-plot=history] polyline.series") == 2
    screenshot(tools, "subject")
    assert tools.errors() == []
    tools.close()


def test_without_its_image_a_subject_is_drawn_on_a_blank_canvas(
    browser: Browser, served: tuple[Service, Serving]
) -> None:
    """An unreachable image URL: the marks and clusters on a blank canvas of the subject's size;
    the failed image load is the only error the browser logs."""
    service, serving = served
    drawn = subject_with_clusters(service, residue=2)
    tools = browser.page()
    url = f"{serving.url}/workflows/{WF}/subjects/{drawn['subject_id']}"
    assert visit(tools, url) == "yes"
    stage = "svg[data-plot=subject]"
    assert (
        tools.wait_for(
            f"document.querySelector('{stage}').dataset.image !== 'none'"
            f" && document.querySelector('{stage}').dataset.image"
        )
        == "unreachable"
    )
    assert count(tools, f"{stage} image") == 0
    canvas = tools.evaluate(f"document.querySelector('{stage}').getAttribute('viewBox')")
    assert canvas == f"0 0 {drawn['width']:g} {drawn['height']:g}"
    assert count(tools, f"{stage} .mark") == len(drawn["marks"]) > 0
    assert count(tools, f"{stage} rect.cluster") == len(drawn["clusters"])
    screenshot(tools, "subject-blank")
    assert tools.errors(allowed_urls=(UNREACHABLE,)) == []
    tools.close()


def test_with_credentials_the_browser_signs_in_once_and_keeps_a_secure_cookie(
    browser: Browser, tmp_path: Path, images: ImageServer
) -> None:
    """A token is asked for once: the form sets a Secure, HttpOnly, SameSite=Strict cookie,
    with which every page and its read routes load; a wrong token is refused."""
    service = crowd_service(tmp_path, images, tokens=f"{READ_TOKEN}=read;{READ_TOKEN}-admin=admin")
    serving = Serving(service.app)
    try:
        tools = browser.page()
        tools.call("Network.clearBrowserCookies")
        assert visit(tools, f"{serving.url}/workflows/{WF}") == "login"
        screenshot(tools, "login")
        tools.evaluate("document.querySelector('input[name=token]').value = 'wrong-token'")
        tools.evaluate("document.querySelector('form').submit()")
        time.sleep(0.3)
        assert visit_current(tools) == "login"
        assert "not a token" in tools.evaluate("document.body.innerText")
        tools.evaluate(f"document.querySelector('input[name=token]').value = '{READ_TOKEN}'")
        tools.evaluate("document.querySelector('form').submit()")
        time.sleep(0.3)
        assert visit_current(tools) == "yes"
        assert tools.evaluate("location.pathname") == f"/workflows/{WF}"
        assert count(tools, "svg[data-plot=skills] circle.volunteer") == 12
        cookies = tools.call("Network.getCookies", urls=[serving.url])["cookies"]
        cookie = next(c for c in cookies if c["name"] == "gzx_read")
        assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert tools.evaluate("document.cookie") == ""  # not readable by scripts
        assert visit(tools, f"{serving.url}/") == "yes"  # asked once: the cookie is kept
        assert tools.errors(allowed_urls=(UNREACHABLE,)) == []
        tools.close()
    finally:
        serving.stop()
        service.close()


def visit_current(tools: DevTools) -> str:
    """Wait for the page the browser is on now to be ready (after a form submission)."""
    return str(
        tools.wait_for(
            "document.readyState === 'complete' && document.body && "
            "['yes', 'error', 'login'].includes(document.body.dataset.ready)"
            " && document.body.dataset.ready"
        )
    )
