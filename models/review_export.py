"""A category's labels as a data set, for tools outside the service (``GET /v1/review/<c>/export``).

``labels.jsonl`` (one line per labelled item: the label and the answer it judged), and the
images under ``good/<id>.<ext>`` and ``ng/<defect type or "unspecified">/<id>.<ext>``, the
layout image-folder data loaders read.
"""

from __future__ import annotations

import contextlib
import json
import zipfile
from pathlib import Path
from typing import IO

from models.review_store import ReviewStore


def export_zip(store: ReviewStore, category: str, out: IO[bytes]) -> int:
    """Write ``category``'s labelled items to ``out`` as a zip (stored, not compressed: the
    images are compressed already). Returns how many labelled items there were."""
    rows = store.labelled(category)
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as z:
        lines = []
        for item, label, path in rows:
            folder = "good" if label.label == "ok" else f"ng/{label.defect_type or 'unspecified'}"
            name = f"{folder}/{item.id}{Path(item.image.file).suffix}"
            with contextlib.suppress(FileNotFoundError):  # expired since the listing: left out
                z.write(path, name)
                lines.append(json.dumps({"file": name, "label": label.model_dump(mode="json"),
                                         "item": item.model_dump(mode="json")}))
        z.writestr("labels.jsonl", "".join(line + "\n" for line in lines))
    return len(rows)
