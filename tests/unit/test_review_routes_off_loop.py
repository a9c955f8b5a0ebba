"""The review routes read the store in threads, never on the event loop: the store is files on a
shared volume, where each read is a network round trip (docs/DESIGN.md, the review loop)."""

from __future__ import annotations

import asyncio
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx

from models.review_store import Budget, ReviewStore
from service.api.app import create_app
from service.config import Settings

KEY = "reviewer-key-loop"


def test_the_pending_page_reads_its_labels_off_the_loop(tmp_path: Path) -> None:
    """GET .../items read each listed item's label file on the event loop (up to 100 opens a
    page, every other request waiting behind them on a network volume)."""
    store = ReviewStore(tmp_path / ".review", Budget(max_bytes=10**8, max_items=100, retention_s=10**9,
                                                   label_retention_s=10**9))
    fields = {"reason": "review", "model_version": "1", "engine": "null", "filename": "a.png", "verdict": "review",
              "is_anomalous": True, "raw_score": 1.5, "score": 0.55, "threshold": 1.0, "ng_threshold": 2.0}
    for i in range(3):
        store.add("brick", fields, f"image {i}".encode(), "PNG", (8, 8), None, None,
                  now=datetime.now(timezone.utc) - timedelta(seconds=60 - i))
    app = create_app(Settings(model_store=tmp_path, reviewer_api_keys={"alice": KEY}))
    served = app.state.service.review.store
    read_on: list[int] = []
    get_label = served.get_label

    def recorded(*args: Any) -> Any:
        read_on.append(threading.get_ident())
        return get_label(*args)

    served.get_label = recorded

    async def call() -> tuple[httpx.Response, int]:
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/v1/review/brick/items", headers={"X-API-Key": KEY}), threading.get_ident()

    r, loop_thread = asyncio.run(call())
    assert r.status_code == 200 and len(r.json()["items"]) == 3, r.text
    assert len(read_on) == 3 and loop_thread not in read_on
