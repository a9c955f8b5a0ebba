"""Headless load test with a report: runs Locust on ``loadtests/locustfile.py`` and writes a
markdown summary (images/s, p50/p95/p99, failures) next to Locust's CSV and HTML.

    python -m loadtests.run --url http://127.0.0.1:8000 --users 8 --spawn-rate 8 --duration 30s
    python -m loadtests.run --serve --store model_store --duration 30s --fail-on-error

``--serve`` starts a local ``msflow serve`` on a free loopback port for the run and stops
it afterwards; the runner starts nothing else and leaves nothing running.

Output folder (default ``reports/load-<UTC timestamp>/``): ``summary.md``, ``summary.json``,
``locust_stats.csv``, ``locust_failures.csv``, ``locust_stats_history.csv``,
``locust_exceptions.csv``, ``report.html``, ``locust.log`` and, with ``--serve``, ``server.log``.

Exit status: 0; 1 with ``--fail-on-error`` when any request failed or none was made;
2 when Locust or the server could not run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

LOCUSTFILE = Path(__file__).resolve().with_name("locustfile.py")
IMAGES_PER_REQUEST = re.compile(r"\[x(\d+)\]")
PERCENTILES = ("50%", "95%", "99%")


# ------------------------------------------------------------------ summary from Locust's CSV
def _num(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "", "N/A") else None
    except ValueError:
        return None


def images_per_request(name: str) -> int:
    """Images one request of this Locust name carries (``[xN]`` in the name, else 1)."""
    m = IMAGES_PER_REQUEST.search(name)
    return int(m.group(1)) if m else 1


def is_image_request(method: str, name: str) -> bool:
    """Requests that inspect images synchronously (what images/s counts)."""
    return method.upper() == "POST" and "/v1/inspect/" in name


def summarize(csv_prefix: Path, run_seconds: float | None = None) -> dict[str, Any]:
    """Parse ``<prefix>_stats.csv`` (and ``_failures.csv``) into the summary dictionary.

    Locust divides every count by one window, from the start to the last request of any
    kind; a job still polled after ``--run-time`` (no worker running: up to
    ``--stop-timeout`` more) stretches it, and every rate with it. With ``run_seconds``
    the rates are over the run at most: counts over ``min(Locust's window, run_seconds)``.
    """
    rows = list(csv.DictReader(open(f"{csv_prefix}_stats.csv", newline="")))
    endpoints, total = [], None
    for row in rows:
        entry = {
            "method": row.get("Type", ""),
            "name": row.get("Name", ""),
            "requests": int(_num(row.get("Request Count")) or 0),
            "failures": int(_num(row.get("Failure Count")) or 0),
            "rps": _num(row.get("Requests/s")) or 0.0,
            "avg_ms": _num(row.get("Average Response Time")),
            **{f"p{p[:-1]}_ms": _num(row.get(p)) for p in PERCENTILES},
            "max_ms": _num(row.get("Max Response Time")),
        }
        if entry["name"] == "Aggregated":
            total = entry
        else:
            endpoints.append(entry)
    if total is None:
        total = {"requests": 0, "failures": 0, "rps": 0.0, "avg_ms": None, "p50_ms": None, "p95_ms": None,
                 "p99_ms": None, "max_ms": None}
    window = total["requests"] / total["rps"] if total["rps"] else None
    if window is not None and run_seconds and window > run_seconds:
        for entry in (*endpoints, total):
            entry["rps"] *= window / run_seconds
        window = run_seconds
    image_rows = [e for e in endpoints if is_image_request(e["method"], e["name"])]
    images_ok = sum((e["requests"] - e["failures"]) * images_per_request(e["name"]) for e in image_rows)
    images_per_s = sum(e["rps"] * images_per_request(e["name"]) for e in image_rows)
    ok_share = 1.0 - total["failures"] / total["requests"] if total["requests"] else 0.0
    failures: list[dict[str, Any]] = []
    failures_csv = Path(f"{csv_prefix}_failures.csv")
    if failures_csv.exists():
        for row in csv.DictReader(open(failures_csv, newline="")):
            failures.append({"method": row.get("Method", ""), "name": row.get("Name", ""),
                             "error": row.get("Error", ""), "occurrences": int(_num(row.get("Occurrences")) or 0)})
    return {
        "requests": total["requests"],
        "failures": total["failures"],
        "requests_per_s": total["rps"],
        "window_s": window,
        "images": images_ok,
        "images_per_s": images_per_s,
        "images_per_s_ok": images_per_s * ok_share,
        "latency_ms": {k: total[k] for k in ("avg_ms", "p50_ms", "p95_ms", "p99_ms", "max_ms")},
        "endpoints": endpoints,
        "failure_details": failures,
    }


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def render_markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    lat = summary["latency_ms"]
    lines = [
        "# MSFlow load test",
        "",
        f"- target: `{meta['url']}`" + (f" (started by the runner, store `{meta['store']}`)" if meta.get("served") else ""),
        f"- users: {meta['users']}, spawn rate {meta['spawn_rate']}/s, duration {meta['duration']}",
        f"- started: {meta['started']} UTC",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| images/s (synchronous inspect) | {summary['images_per_s']:.1f} |",
        f"| requests/s | {summary['requests_per_s']:.1f} |",
        f"| requests | {summary['requests']} |",
        f"| failed requests | {summary['failures']} |",
        f"| latency p50 / p95 / p99 (ms) | {_ms(lat['p50_ms'])} / {_ms(lat['p95_ms'])} / {_ms(lat['p99_ms'])} |",
        f"| latency max (ms) | {_ms(lat['max_ms'])} |",
        "",
        "## Per endpoint",
        "",
        "| method | name | requests | failures | req/s | p50 | p95 | p99 (ms) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for e in summary["endpoints"]:
        lines.append(f"| {e['method']} | `{e['name']}` | {e['requests']} | {e['failures']} | {e['rps']:.1f} | "
                     f"{_ms(e['p50_ms'])} | {_ms(e['p95_ms'])} | {_ms(e['p99_ms'])} |")
    if summary["failure_details"]:
        lines += ["", "## Failures", "", "| method | name | occurrences | error |", "| --- | --- | ---: | --- |"]
        for f in summary["failure_details"]:
            error = f["error"].replace("|", "\\|").replace("\n", " ")[:300]
            lines.append(f"| {f['method']} | `{f['name']}` | {f['occurrences']} | {error} |")
    lines += ["", "Locust's own report: `report.html`; raw numbers: `locust_stats.csv`.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------ the optional local server
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def sockets_held(pid: int, port: int, state: str) -> int:
    """How many TCP sockets on local ``port`` in ``state`` (``/proc/net/tcp``'s hex code:
    "0A" listening, "01" established) process ``pid`` holds (Linux; 0 once it has exited)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == state:
                inodes.add(fields[9])
    held = 0
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:  # closed meanwhile
                continue
            held += target.startswith("socket:[") and target[8:-1] in inodes
    except OSError:
        return 0
    return held


def listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a socket listening on TCP ``port``."""
    return sockets_held(pid, port, "0A") > 0


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float, path: str = "/readyz") -> None:
    """Poll ``GET <url><path>`` until it answers 200; raises when the server process exits
    first or the time is up."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}{path}", timeout=2) as resp:
                if resp.status == 200:
                    return
        except urllib.error.HTTPError as e:
            last = f"{path} answered {e.code}"
        except OSError as e:
            last = str(e)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not ready after {timeout:.0f}s ({last})")
        time.sleep(0.5)


class LocalServer:
    """``msflow serve`` on a free loopback port; stopped (SIGTERM, then SIGKILL) on exit.
    ``prefix``: a command that runs the server (``valgrind ...``: loadtests/instructions.py)."""

    def __init__(self, store: str, log_path: Path, host: str = "127.0.0.1", port: int | None = None,
                 env: dict[str, str] | None = None, prefix: Sequence[str] = ()) -> None:
        self.host, self.port = host, port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.store, self.log_path, self.env, self.prefix = store, log_path, env or {}, list(prefix)
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "LocalServer":
        env = dict(os.environ, MSFLOW_HOST=self.host, MSFLOW_PORT=str(self.port), MSFLOW_MODEL_STORE=self.store,
                   **self.env)
        self._log = open(self.log_path, "wb")
        cmd = [*self.prefix, sys.executable, "-m", "msflow.cli", "serve", "--host", self.host,
               "--port", str(self.port), "--store", self.store]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     stdin=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()


# ------------------------------------------------------------------ Locust
def run_locust(args: argparse.Namespace, url: str, out: Path) -> int:
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
           "--host", url, "--users", str(args.users), "--spawn-rate", str(args.spawn_rate),
           "--run-time", args.duration, "--stop-timeout", str(args.stop_timeout),
           "--csv", str(out / "locust"), "--csv-full-history", "--html", str(out / "report.html"),
           "--logfile", str(out / "locust.log"), "--loglevel", "INFO", "--only-summary",
           "--exit-code-on-error", "0"]
    if args.tags:
        cmd += ["--tags", *args.tags]
    env = dict(os.environ)
    if args.images:
        env["MSFLOW_LOAD_IMAGES"] = args.images
    if args.categories:
        env["MSFLOW_LOAD_CATEGORIES"] = args.categories
    if args.api_key:
        env["MSFLOW_LOAD_API_KEY"] = args.api_key
    # Locust's own console summary goes to the log too; the runner prints the short one.
    with open(out / "locust.out", "wb") as console:
        proc = subprocess.Popen(cmd, stdout=console, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
        try:
            return proc.wait(timeout=_seconds(args.duration) + args.stop_timeout + 120)
        except BaseException:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise


def _seconds(duration: str) -> float:
    """Locust run-time syntax (``30s``, ``2m``, ``1h30m``, ``45``) in seconds."""
    total, found = 0.0, False
    for value, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([hms]?)", duration):
        total += float(value) * {"h": 3600, "m": 60, "s": 1, "": 1}[unit]
        found = True
    if not found:
        raise argparse.ArgumentTypeError(f"bad duration {duration!r}")
    return total


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="API base URL (default http://127.0.0.1:8000; ignored with --serve)")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--spawn-rate", type=float, default=8)
    p.add_argument("--duration", default="30s", help="Locust run time: 30s, 2m, 1h ...")
    p.add_argument("--stop-timeout", type=int, default=10, help="seconds users get to finish their task at the end")
    p.add_argument("--out", default=None, help="report folder (default reports/load-<timestamp>/)")
    p.add_argument("--images", default=None, help="MSFLOW_LOAD_IMAGES: folder or glob of images to post")
    p.add_argument("--categories", default=None, help="MSFLOW_LOAD_CATEGORIES: e.g. grass:3,brick:1")
    p.add_argument("--api-key", default=None, help="API key to send (MSFLOW_LOAD_API_KEY)")
    p.add_argument("--tags", nargs="*", default=None,
                   help="only these tasks: fast (1 image, no heatmap), batch, heatmap, redis (default: the mix)")
    p.add_argument("--fail-on-error", action="store_true", help="exit 1 when any request failed (or none was made)")
    g = p.add_argument_group("local server")
    g.add_argument("--serve", action="store_true", help="start `msflow serve` on a free loopback port for the run")
    g.add_argument("--store", default=None, help="model store for --serve (default: MSFLOW_MODEL_STORE or model_store)")
    p.add_argument("--ready-timeout", type=float, default=None,
                   help="seconds to wait for the server: /readyz with --serve (default 180), else /healthz (15)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _seconds(args.duration)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    started = datetime.now(timezone.utc)
    out = Path(args.out or f"reports/load-{started.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    store = args.store or os.environ.get("MSFLOW_MODEL_STORE") or "model_store"
    meta: dict[str, Any] = {"users": args.users, "spawn_rate": args.spawn_rate, "duration": args.duration,
                            "started": started.strftime("%Y-%m-%d %H:%M:%S"), "served": args.serve}

    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the server below is stopped.
    def _interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _interrupt)

    server: LocalServer | None = None
    try:
        if args.serve:
            server = LocalServer(str(store), out / "server.log").__enter__()
            meta.update(url=server.url, store=str(store), server_pid=server.proc.pid)
            print(f"load test: started msflow serve (pid {server.proc.pid}) at {server.url}, store {store}",
                  flush=True)
        else:
            meta["url"] = (args.url or "http://127.0.0.1:8000").rstrip("/")
        url = meta["url"]
        try:
            # Our own server must be ready (models loaded); someone else's need only be up,
            # since its /readyz may report a degraded Redis that the run itself will show.
            if server is not None:
                wait_ready(url, server.proc, args.ready_timeout or 180, "/readyz")
            else:
                wait_ready(url, None, args.ready_timeout or 15, "/healthz")
        except RuntimeError as e:
            print(f"load test: {e}" + (f" (see {out / 'server.log'})" if server else ""), file=sys.stderr)
            return 2
        print(f"load test: {args.users} users for {args.duration} against {url} -> {out}/", flush=True)
        rc = run_locust(args, url, out)
    except KeyboardInterrupt:
        print("load test: interrupted", file=sys.stderr)
        return 130
    finally:
        if server is not None:
            server.stop()

    if not Path(f"{out / 'locust'}_stats.csv").exists():
        print(f"load test: Locust wrote no statistics (exit status {rc}); see {out / 'locust.log'} "
              f"and {out / 'locust.out'}", file=sys.stderr)
        return 2
    summary = summarize(out / "locust", run_seconds=_seconds(args.duration))
    summary["locust_exit_status"] = rc
    (out / "summary.json").write_text(json.dumps({"meta": meta, **summary}, indent=2) + "\n")
    markdown = render_markdown(summary, meta)
    (out / "summary.md").write_text(markdown)
    print(markdown)
    if rc != 0:
        print(f"load test: Locust exited with status {rc}; see {out / 'locust.log'}", file=sys.stderr)
        return 2
    if args.fail_on_error and (summary["failures"] or not summary["requests"]):
        print(f"load test: FAILED ({summary['failures']} failed of {summary['requests']} requests)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
