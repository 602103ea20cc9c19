"""The Consul UI shows loom-ha instances and their passing checks (screenshot for the docs)."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest

from loom_ha.discovery import ServiceInstance
from loom_ha.discovery.consul import ConsulRegistry
from loom_ha.testing.servers import ConsulAgent

from ._chromium import open_page
from .conftest import consul_url

DOCS_IMG = Path(__file__).resolve().parents[2] / "docs" / "img"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.mark.consul
async def test_consul_ui_shows_instances_with_passing_ttl_checks(
    consul_agent: ConsulAgent, tmp_path: Path
) -> None:
    """Headless Chromium renders the service's instances page listing every loom-ha instance."""
    service = "loom-agent-ui"
    ids = [f"{service}-{n}" for n in range(3)]
    async with ConsulRegistry(consul_url(consul_agent), ttl=15.0) as registry:
        for n, instance_id in enumerate(ids):
            await registry.register(
                ServiceInstance(
                    service=service,
                    instance_id=instance_id,
                    address=f"redis://10.0.0.{n + 1}:6379",
                    tags=("loom-ha", "redis"),
                    meta={"version": "0.1.0", "transport": "redis"},
                )
            )
        url = f"{consul_agent.http_url}/ui/dc1/services/{service}/instances"
        shot, check_shot = tmp_path / "consul-ui.png", tmp_path / "consul-ui-check.png"
        async with open_page(url) as page:
            text = await page.wait_for_text([*(f"{service}:{i}" for i in ids), "passing"])
            dom = str(await page.evaluate("document.documentElement.outerHTML"))
            await page.screenshot(shot)
            node = consul_agent.node_name
            await page.navigate(f"{url}/{node}/{service}:{ids[0]}/health-checks")
            check_text = await page.wait_for_text(["loom-ha process heartbeat"])
            await page.screenshot(check_shot)
    assert all(i in dom for i in ids)
    assert "TTL expired" not in check_text and "heartbeat every" in check_text
    assert "critical" not in text.lower().replace("0 critical", "")
    assert shot.stat().st_size > 20_000
    assert _png_size(shot) == (1400, 900)
    assert _png_size(check_shot) == (1400, 900)
    if os.environ.get("LOOM_HA_UPDATE_DOCS"):
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, DOCS_IMG / shot.name)
        shutil.copyfile(check_shot, DOCS_IMG / check_shot.name)
