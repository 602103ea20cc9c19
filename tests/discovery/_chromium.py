"""Headless Chromium driven over the DevTools protocol, to screenshot web UIs in tests.

``--screenshot``/``--dump-dom`` capture at the load event, before a single-page app such as
the Consul UI has rendered, and ``--virtual-time-budget`` never ends on it (its blocking
queries keep the network busy). So we navigate, wait until the page shows what we expect,
then capture.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,900",
)


def chromium_binary() -> str:
    """Path of Debian's `chromium` (or `chromium-browser`, `google-chrome`)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError("chromium not found: apt-get install -y chromium")


class Page:
    """One browser tab spoken to over a DevTools websocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Call a DevTools method and return its result (events are skipped)."""
        call_id = next(self._ids)
        await self._ws.send_str(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads((await self._ws.receive()).data)
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    async def wait_for_text(self, needles: Sequence[str], *, within: float = 20.0) -> str:
        """Wait until the page's visible text contains every needle; return the text."""
        text = ""
        async with asyncio.timeout(within):
            while not all(n in text for n in needles):
                await asyncio.sleep(0.2)
                text = str(await self.evaluate("document.body ? document.body.innerText : ''"))
        return text

    async def navigate(self, url: str) -> None:
        """Open `url` in this tab."""
        await self.send("Page.navigate", url=url)

    async def screenshot(self, path: Path) -> None:
        """Save a PNG of the viewport."""
        shot = await self.send("Page.captureScreenshot", format="png")
        await asyncio.to_thread(path.write_bytes, base64.b64decode(shot["data"]))


@asynccontextmanager
async def open_page(url: str) -> AsyncIterator[Page]:
    """Launch headless Chromium on `url`; the browser and its profile are gone at exit."""
    profile = Path(tempfile.mkdtemp(prefix="loomha-chromium-"))
    argv = [chromium_binary(), *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0"]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        "about:blank",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        async with asyncio.timeout(20):
            # Chromium writes the file when DevTools listens; there is nothing to await.
            while not port_file.exists() or not port_file.read_text().strip():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as answer:
                targets = await answer.json()
            ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            async with http.ws_connect(ws_url, max_msg_size=0) as ws:
                page = Page(ws)
                await page.send("Page.enable")
                await page.send(
                    "Emulation.setDeviceMetricsOverride",
                    width=1400,
                    height=900,
                    deviceScaleFactor=1,
                    mobile=False,
                )
                await page.navigate(url)
                yield page
    finally:
        # The whole process group: renderers and the zygote must not outlive the test.
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                async with asyncio.timeout(5):
                    await proc.wait()
            except TimeoutError:
                os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
