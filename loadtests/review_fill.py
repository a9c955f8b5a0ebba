"""A review store filled to a given size, for benchmarks of a server whose store is full.

    python -m loadtests.review_fill --root /tmp/review --category brick --items 10000 --labels 2000

A busy line fills the review store quickly (at 700 images/s and the default 2% audit rate,
the default 10,000-item budget in about 12 minutes) and then keeps it full: items leave after
their retention (7 days unlabelled, 90 labelled). So a server's steady state has a full
store, and every capture is checked against it. One real item is made through
:class:`~models.review_store.ReviewStore` and cloned under distinct ids (a millisecond apart,
in the hour before now, so none expires): seconds for 10,000 items where adding each would
take minutes. ``--labels`` of them get a label (a clone of one real label).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from models.review_store import Budget, ReviewStore, id_stamp

_FIELDS = {"model_version": "1", "verdict": "ok", "is_anomalous": False, "raw_score": 1.0, "score": 0.1,
           "threshold": 2.0, "ng_threshold": 3.0, "reason": "audit", "engine": "onnx", "filename": "part.png",
           "regions": []}


def fill(root: Path, category: str, items: int, labels: int) -> tuple[int, int]:
    """Add ``items`` items to ``category`` (``labels`` of them labelled); returns what the
    category then holds (items, labelled)."""
    store = ReviewStore(root, Budget(max_bytes=1 << 40, max_items=1 << 30, retention_s=1e9, label_retention_s=1e9))
    start = datetime.now(timezone.utc) - timedelta(hours=1)
    outcome, first = store.add(category, _FIELDS, os.urandom(4096), "PNG", (256, 256), None, None, now=start)
    if first is None:
        raise RuntimeError(f"the first item was refused: {outcome}")
    store.label(category, first, "ok", by="review_fill")
    items_dir, labels_dir = root / category / "items", root / category / "labels"
    item_json = json.loads((items_dir / first / "item.json").read_text())
    label_json = json.loads((labels_dir / f"{first}.json").read_text())
    size_field = first.split("-")[2]
    for i in range(1, items):
        item_id = f"{id_stamp(start + timedelta(milliseconds=i))}-ok-{size_field}-{secrets.token_hex(6)}"
        folder = items_dir / item_id
        folder.mkdir()
        os.link(items_dir / first / "image.png", folder / "image.png")
        (folder / "item.json").write_text(json.dumps({**item_json, "id": item_id}))
        if i < labels:
            (labels_dir / f"{item_id}.json").write_text(json.dumps({**label_json, "id": item_id}))
    scan = ReviewStore(root).scan(category)
    return len(scan.entries), len(scan.labelled)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="the review store (MSFLOW_REVIEW_STORE)")
    p.add_argument("--category", required=True)
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--labels", type=int, default=2_000)
    args = p.parse_args(argv)
    held, labelled = fill(Path(args.root), args.category, args.items, args.labels)
    print(f"{args.root}: {args.category} holds {held} items, {labelled} labelled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
