"""Instructions per image by process, counted by valgrind: serving modes compared without drift.

    python -m loadtests.instructions --store model_store --modes one api=2 --requests 300

CPU seconds on a shared two-core box drift by 10-20% between minutes (docs/performance-log.md);
instruction counts do not: the same code, inputs and load give the same count to about a
percent, whatever else the machine runs. So this settles what timing cannot: whether a mode
*does more work* per image, or the same work more slowly.

Each mode runs ``msflow serve`` (null engine, the front-end benchmark's settings:
:func:`loadtests.frontend.server_env`) under callgrind with counting off
(``--instr-atstart=no``: start-up and warm-up run at a few times native speed), then turns
counting on in every process of the server (``callgrind_control -i on``), posts
``--requests`` images from ``--concurrency`` clients per input kind, and reads each
process's count back from a dump, by role (the process names: service/supervisor/supervisor.py). Each
count is split in two: libc's ``memcpy``/``memmove``/``memset``, where valgrind counts each
byte a ``rep movsb`` moves as an instruction (so that part is mostly bytes copied or cleared,
not work done), and the rest.

Each kind's row also gives the batches the counted posts made (``msflow_batch_size``, read
from ``/metrics`` before and after them): the engine process does much of its work once per
batch (a wake-up, a hop to the engine thread and back, the batch's metrics), so its count per
image falls as batches grow, and batches form by timing, which valgrind's pace and the box's
other load move (190 against 211 batches of 300 images made 0.270 against 0.295 M per image
in the engine process, same code). Compare counts at similar batch sizes, or over several runs.

The dumps stay in ``<out>/<mode>/cg.<pid>.<n>`` (one per kind, in ``--kinds`` order; the
process's command line is in each), to be read by function:
``callgrind_annotate --inclusive=yes <dump>``.

What instruction counts leave out: the kernel (system calls, page faults, wake-ups), and how
fast each instruction runs. :mod:`loadtests.frontend` gives both (its kernel time by process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from loadtests.frontend import BATCH, every_front_end_ready, server_env
from loadtests.frontend_inputs import KINDS, encoded, source
from loadtests.frontend_report import histogram_means
from loadtests.frontend_modes import mode_args
from loadtests.procstat import role_of, tree
from loadtests.run import LocalServer, wait_ready
from service.os_names import task_names

COPY_FUNCTIONS = re.compile(r"__(memcpy|memmove|memset)_")
_ANNOTATED = re.compile(r"^\s*([\d,]+) \(\s*[\d.]+%\)\s+(\S.*)$")


def mode_processes(mode: str) -> int:
    """``one`` -> 1, ``api=N`` -> N front ends (and the engine process); the modes'
    spelling is loadtests/frontend_modes.py's."""
    option = mode_args(mode)
    if option and option[0] != "--api-processes":
        raise SystemExit(f"unknown mode {mode!r} here: one or api=N (N separate servers would count the same code)")
    return int(option[1]) if option else 1


def counted(dump: Path) -> tuple[int, int]:
    """(all instructions, those in libc's copy and clear functions) of one callgrind dump."""
    listing = subprocess.run(["callgrind_annotate", "--threshold=100", "--inclusive=no", str(dump)],
                             capture_output=True, text=True, check=True).stdout
    total = copies = 0
    for line in listing.splitlines():
        match = _ANNOTATED.match(line)
        if not match:
            continue
        n = int(match.group(1).replace(",", ""))
        if "PROGRAM TOTALS" in match.group(2):
            total = n
        elif COPY_FUNCTIONS.search(match.group(2)):
            copies += n
    return total, copies


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], capture_output=True, text=True, check=True, timeout=60)


async def _post(url: str, category: str, body: bytes, content_type: str, query: dict[str, str], n: int,
                concurrency: int) -> int:
    """``n`` posts from ``concurrency`` clients; returns how many were not answered 200."""
    todo = iter(range(n))
    failures = 0

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal failures
        for _ in todo:
            r = await c.post(f"/v1/inspect/{category}", params=query, content=body,
                             headers={"Content-Type": content_type})
            failures += r.status_code != 200

    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        await asyncio.gather(*(client(c) for _ in range(concurrency)))
    return failures


def batches_so_far(url: str) -> tuple[float, float]:
    """(images, batches) the server's engine batches have held so far (``msflow_batch_size``:
    one process's batcher, or the engine process's, which any front end's ``/metrics`` adds in)."""
    body = httpx.get(f"{url}/metrics", timeout=600).text
    images, batches = histogram_means(body, "msflow_batch_size").get("", (0.0, 0.0))
    return images, batches


def _latest_dump(folder: Path, pid: int) -> Path | None:
    dumps = [(int(p.name.rsplit(".", 1)[1]), p) for p in folder.glob(f"cg.{pid}.*")]
    return max(dumps)[1] if dumps else None


def count_mode(mode: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    processes = mode_processes(mode)
    folder = out / mode.replace("=", "")
    folder.mkdir(parents=True, exist_ok=True)
    env = server_env("null", "cpu", processes, batch=args.batch)
    prefix = ["valgrind", "--tool=callgrind", "--trace-children=yes", "--instr-atstart=no",
              f"--callgrind-out-file={folder}/cg.%p"]
    result: dict[str, Any] = {"mode": mode, "kinds": {}}
    with LocalServer(args.store, folder / "server.log", env=env, prefix=prefix) as server:
        assert server.proc is not None
        wait_ready(server.url, server.proc, timeout=600)
        models = every_front_end_ready(server.url, server.proc.pid, processes, timeout=600)
        category = args.category or sorted(m["category"] for m in models)[0]
        pids = tree(server.proc.pid)
        roles = {pid: role_of(task_names(pid).get(pid, "")) for pid in pids}
        for kind in args.kinds:
            shape = KINDS[kind]
            body, ctype, query = encoded(source(None, shape.side), shape.format), shape.content_type, shape.query
            warm = asyncio.run(_post(server.url, category, body, ctype, query, args.warmup, args.concurrency))
            images_before, batches_before = batches_so_far(server.url)  # before counting starts: not counted
            for pid in pids:
                _control("-z", str(pid))
                _control("-i", "on", str(pid))
            started = time.monotonic()
            failed = asyncio.run(_post(server.url, category, body, ctype, query, args.requests, args.concurrency))
            wall = time.monotonic() - started
            by_role: dict[str, Counter[str]] = {}
            for pid in pids:
                _control("-d", str(pid))
                _control("-i", "off", str(pid))
                dump = _latest_dump(folder, pid)
                if dump is None:
                    raise RuntimeError(f"no callgrind dump from process {pid} in {folder}")
                total, copies = counted(dump)
                by_role.setdefault(roles[pid], Counter()).update({"total": total, "copies": copies})
            if warm or failed:
                raise RuntimeError(f"{mode}, {kind}: {warm + failed} posts not answered 200 (see {folder}/server.log)")
            images_after, batches_after = batches_so_far(server.url)  # after counting ended: not counted
            batches = round(batches_after - batches_before)
            n = args.requests
            result["kinds"][kind] = {
                "requests": n, "wall_s": round(wall, 1), "batches": batches,
                "mean_batch": round((images_after - images_before) / batches, 2) if batches else None,
                "instructions_per_image": round(sum(c["total"] for c in by_role.values()) / n),
                "copied_per_image": round(sum(c["copies"] for c in by_role.values()) / n),
                "by_role": {role: {"instructions_per_image": round(c["total"] / n),
                                   "copied_per_image": round(c["copies"] / n)}
                            for role, c in sorted(by_role.items()) if c["total"]}}
    return result


def render(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    first = results[0]
    lines = [f"# Instructions per image, counted by callgrind ({args.requests} posts per kind, "
             f"{args.concurrency} at a time, null engine)", "",
             "`rest`: every instruction outside libc's memcpy/memmove/memset; `copied`: those functions' count, "
             "where each byte a `rep movsb` moves counts as one (mostly bytes moved or cleared, not work done). "
             f"Ratios to `{first['mode']}`.", "",
             "| input | mode | rest per image | ratio | copied per image | batches (mean) | by process (rest / copied) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for kind in args.kinds:
        base = first["kinds"][kind]
        base_rest = base["instructions_per_image"] - base["copied_per_image"]
        for r in results:
            k = r["kinds"][kind]
            rest = k["instructions_per_image"] - k["copied_per_image"]
            split = ", ".join(f"{role} {(v['instructions_per_image'] - v['copied_per_image']) / 1e6:.3f} M / "
                              f"{v['copied_per_image'] / 1e3:.0f} KB" for role, v in k["by_role"].items())
            lines.append(f"| {kind} | {r['mode']} | {rest / 1e6:.3f} M | {rest / base_rest:.3f} | "
                         f"{k['copied_per_image'] / 1e3:.0f} KB | {k['batches']} ({k['mean_batch']}) | {split} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True)
    p.add_argument("--category")
    p.add_argument("--modes", nargs="+", default=["one", "api=2"], help="one, api=N (N >= 2)")
    p.add_argument("--kinds", nargs="+", default=["jpeg256-none"], choices=sorted(KINDS))
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--batch", type=int, default=BATCH, help="the server's MSFLOW_MAX_BATCH_SIZE")
    p.add_argument("--out")
    args = p.parse_args(argv)
    for mode in args.modes:
        mode_processes(mode)  # every mode checked before the first server starts
    missing = [tool for tool in ("valgrind", "callgrind_control", "callgrind_annotate") if not shutil.which(tool)]
    if missing:
        raise SystemExit(f"needs valgrind's {', '.join(missing)} (Debian's package valgrind)")
    if args.requests < 1 or args.concurrency < 1 or args.warmup < 0:
        raise SystemExit("--requests and --concurrency must be at least 1, --warmup at least 0")
    out = Path(args.out or f"reports/instructions-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}")
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for mode in args.modes:
        results.append(count_mode(mode, args, out))
        print(f"{mode}: " + "; ".join(f"{kind} {r['instructions_per_image'] / 1e6:.3f} M instructions per image"
                                      for kind, r in results[-1]["kinds"].items()), flush=True)
    (out / "summary.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    report = render(results, args)
    (out / "summary.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
