"""How long `./scripts/demo.sh` takes, from the command, to answer its first inspection.

    git clone . /tmp/fresh && python3 scripts/time_to_first_answer.py /tmp/fresh

Runs the checkout's demo.sh (setup included: a checkout without .venv measures a fresh
machine) on a free port and an empty model store, posts a demo image to every category
until each answers 200, and prints the seconds to the first answer, to each category's
first answer and to the build's end. The quick pass only (MSFLOW_DEMO_FULL=0) unless
--full. Standard library only: it runs before the checkout has a virtual environment.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

CATEGORIES = ("brick", "grass", "gravel")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def inspect(url: str, image: bytes) -> int:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path)
    parser.add_argument("--full", action="store_true", help="also wait for the full pass")
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args()
    checkout = args.checkout.resolve()
    port = free_port()
    store = checkout / "model_store-timing"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSFLOW_")}
    env.update(MSFLOW_PORT=str(port), MSFLOW_MODEL_STORE=str(store), MSFLOW_DEMO_FULL="1" if args.full else "0")
    log = open(checkout / "time_to_first_answer.log", "wb")
    started = time.monotonic()
    demo = subprocess.Popen(["./scripts/demo.sh"], cwd=checkout, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    first: dict[str, float] = {}
    build_done: float | None = None
    try:
        while time.monotonic() - started < args.timeout and demo.poll() is None:
            for category in CATEGORIES:
                image_path = checkout / "data/demo" / category / "test/good/000.png"
                if category in first or not image_path.is_file():
                    continue
                status = inspect(f"http://127.0.0.1:{port}/v1/inspect/{category}?heatmap=none", image_path.read_bytes())
                if status == 200:
                    first[category] = time.monotonic() - started
                    print(f"{category}: first answer after {first[category]:.0f} s", flush=True)
            progress = store / ".build" / "status.json"
            if build_done is None and progress.is_file():
                try:
                    if json.loads(progress.read_text()).get("state") == "done":
                        build_done = time.monotonic() - started
                        print(f"build done after {build_done:.0f} s", flush=True)
                except ValueError:
                    pass
            if len(first) == len(CATEGORIES) and build_done is not None:
                break
            time.sleep(1.0)
    finally:
        os.killpg(demo.pid, signal.SIGTERM)
        demo.wait(60)
        log.close()
    summary = {"first_answer_s": round(min(first.values())) if first else None,
               "per_category_s": {c: round(t) for c, t in first.items()},
               "build_done_s": round(build_done) if build_done else None, "full": args.full,
               "cpus": os.cpu_count()}
    print(json.dumps(summary))
    return 0 if first else 1


if __name__ == "__main__":
    sys.exit(main())
