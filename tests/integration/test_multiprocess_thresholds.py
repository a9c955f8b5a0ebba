"""A threshold change in multi-process mode without Redis, over real HTTP: the override file
carries it to every front end of ``msflow serve``.
"""

from __future__ import annotations

import collections
import concurrent.futures
from pathlib import Path

import httpx

from harness import ADMIN_KEY, CATEGORY, fake_version, start, wait_until


def test_a_threshold_change_reaches_every_front_end_without_redis(tmp_path: Path) -> None:
    """Without Redis the override file is the only shared copy: each front end follows it
    within MSFLOW_THRESHOLD_SYNC_S (the others kept the old value until restarted, and answers
    used the old and the new threshold at random). A DELETE travels the same way."""
    import io

    from PIL import Image

    store = tmp_path / "store"
    fake_version(store, CATEGORY, "1", size=32)
    server = start(store, tmp_path / "server.log", api_processes=2, engine="null", admin_api_keys=ADMIN_KEY,
                   threshold_sync_s=0.3, review_enabled=False)
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (90, 90, 90)).save(buf, "PNG")
    png = buf.getvalue()

    def thresholds_seen(count: int = 16) -> collections.Counter[float]:
        """Over fresh connections, which SO_REUSEPORT spreads over the front ends."""
        def one(i: int) -> tuple[float, float]:
            got = httpx.get(f"{server.url}/v1/models/{CATEGORY}/threshold", timeout=30).json()["threshold"]
            r = httpx.post(f"{server.url}/v1/inspect/{CATEGORY}", files={"file": (f"{i}.png", png, "image/png")},
                           params={"heatmap": "none"}, timeout=30)
            return got, r.json()["results"][0]["threshold"]
        with concurrent.futures.ThreadPoolExecutor(count) as pool:
            return collections.Counter(t for pair in pool.map(one, range(count)) for t in pair)

    try:
        assert set(thresholds_seen()) == {0.5}  # both front ends serving, the calibrated threshold read
        r = httpx.put(f"{server.url}/v1/models/{CATEGORY}/threshold", json={"threshold": -0.5},
                      headers={"X-API-Key": ADMIN_KEY}, timeout=30)
        assert r.status_code == 200 and r.json()["persisted"] == ["file"], r.text
        wait_until(lambda: set(thresholds_seen()) == {-0.5}, 10, "every front end on the new threshold",
                   interval=0.1)
        r = httpx.delete(f"{server.url}/v1/models/{CATEGORY}/threshold", headers={"X-API-Key": ADMIN_KEY},
                         timeout=30)
        assert r.status_code == 200, r.text
        wait_until(lambda: set(thresholds_seen()) == {0.5}, 10, "every front end back on the calibrated one",
                   interval=0.1)
    finally:
        server.stop()
